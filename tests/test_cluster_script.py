"""scripts/cluster.py's pure parts, without Go (issue 10): the wrapper module that builds k8s.io/kubernetes
from the proxy, and which binaries already on the machine are used."""

from __future__ import annotations

import pytest

from scripts import cluster as devcluster

# The shape of k8s.io/kubernetes' go.mod: staging modules required at v0.0.0 and replaced by ./staging paths.
KUBERNETES_GOMOD = """\
module k8s.io/kubernetes

go 1.24.0

godebug default=go1.24

require (
\tgithub.com/spf13/cobra v1.9.1
\tk8s.io/api v0.0.0
\tk8s.io/client-go v0.0.0
\tk8s.io/kube-openapi v0.0.0-20250710124328-f3f2b991d03b
)

require (
\tk8s.io/cri-client v0.0.0 // indirect
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tk8s.io/cri-client => ./staging/src/k8s.io/cri-client
)
"""


def test_the_wrapper_points_every_staging_module_at_its_release():
    wrapper = devcluster.k8s_wrapper("v1.34.4", KUBERNETES_GOMOD)
    assert "require k8s.io/kubernetes v1.34.4" in wrapper
    replaces = [line.strip() for line in wrapper.splitlines() if "=>" in line]
    assert replaces == [
        "k8s.io/api => k8s.io/api v0.34.4",
        "k8s.io/client-go => k8s.io/client-go v0.34.4",
        "k8s.io/cri-client => k8s.io/cri-client v0.34.4",
    ]
    assert "kube-openapi =>" not in wrapper  # a module of its own, required at a real version
    assert "godebug default=go1.24" in wrapper  # the main module's GODEBUG defaults, which a dependency's are not


@pytest.mark.parametrize("k8s, staging", [("v1.34.4", "v0.34.4"), ("v1.35.10", "v0.35.10")])
def test_staging_modules_are_released_as_v0_minor_patch(k8s, staging):
    assert devcluster.staging_version(k8s) == staging


@pytest.mark.parametrize(
    "binary, output, fits",
    [
        ("kube-apiserver", "Kubernetes v1.34.0", True),  # any 1.34 patch (envtest's assets, say)
        ("kube-apiserver", "Kubernetes v1.33.5", False),
        ("kubectl", "Client Version: v1.32.4-dispatcher\nKustomize Version: v5.5.0", False),
        ("etcd", "etcd Version: 3.6.8\nGit SHA: abc", True),
        ("etcd", "etcd Version: 3.5.21", False),
        ("kube-scheduler", "", False),
    ],
)
def test_a_binary_on_the_machine_is_used_only_when_its_version_fits(tmp_path, binary, output, fits):
    path = tmp_path / binary
    path.write_text(f"#!/bin/sh\nprintf '%s\\n' '{output}'\n")
    path.chmod(0o755)
    assert devcluster.fits(binary, path) is fits


def test_kwok_is_never_taken_from_the_machine_since_ours_is_patched(tmp_path, monkeypatch):
    kwok = tmp_path / "kwok"
    kwok.write_text(f"#!/bin/sh\necho 'kwok version {devcluster.KWOK_VERSION} go1.26.8 (linux/amd64)'\n")
    kwok.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert devcluster.fits("kwok", kwok)
    assert devcluster.found_binary("kwok") is None


def test_each_engine_is_cached_under_its_own_version_so_moving_kubernetes_rebuilds_neither(monkeypatch):
    keys = {b: devcluster.build_key(b) for b in devcluster.BINARIES}
    monkeypatch.setattr(devcluster, "K8S_VERSION", "v1.35.0")
    moved = {b: devcluster.build_key(b) for b in devcluster.BINARIES}
    assert {b for b in keys if keys[b] != moved[b]} == {"etcd", *devcluster.K8S_BINARIES, "kwok"}
    assert devcluster.KUEUE_VERSION in keys["kueue"] and devcluster.JOBSET_VERSION in keys["jobset"]


def test_a_cached_kueue_built_without_todays_patch_or_its_manifests_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMJOBS_CLUSTER_CACHE", str(tmp_path))
    binary = devcluster.cached_binary("kueue")
    binary.parent.mkdir(parents=True)
    binary.write_text("")
    binary.with_name("kueue.patch").write_text("")  # built unpatched
    (binary.parent.parent / "manifests").mkdir()
    assert not devcluster.built("kueue")
    binary.with_name("kueue.patch").write_text(devcluster.patch_id(devcluster.KUEUE_PATCHES))
    assert devcluster.built("kueue")
    (binary.parent.parent / "manifests").rmdir()  # no CRDs to apply: not usable
    assert not devcluster.built("kueue")
    assert devcluster.found_binary("kueue") is None  # an engine is never taken from the machine


def test_audit_events_survive_a_mark_mid_event_and_a_torn_line(tmp_path):
    """The request-counting tests read the API server's audit log from a mark: a mark taken while an event was half
    written, and an event torn by restart_apiserver's kill with the restarted server's first event after it on the
    same line, once failed the full suite with 'JSONDecodeError: Extra data'."""
    import json

    from tests.simcluster import SimCluster

    def event(n: int) -> str:
        return json.dumps({"kind": "Event", "auditID": str(n)}, separators=(",", ":"))

    log = tmp_path / "audit.log"
    log.write_text(event(1) + "\n" + event(2)[:10] + event(3) + "\n" + event(4) + "\n")
    fake = type("Logged", (), {"audit_log": log})()

    def ids(mark: int) -> list[str]:
        return [e["auditID"] for e in SimCluster.audit_events(fake, mark)]

    assert ids(0) == ["1", "3", "4"]
    assert ids(5) == ["3", "4"]  # a mark inside event 1
    assert ids(len(event(1)) + 1) == ["3", "4"]  # a mark at a line's start


def test_the_components_get_ports_all_different_even_where_the_kernel_hands_one_out_twice():
    """A CI run once had Kueue's and JobSet's health ports coincide, it seems: JobSet could not bind and exited,
    Kueue answered its readiness probe, and cluster-up reported success. Ports taken one at a time, each socket
    closed before the next, repeat among 500 almost always (487 to 495 distinct in five tries)."""
    names = [f"component-{i}" for i in range(500)]
    ports = devcluster.free_ports(names)
    assert list(ports) == names
    assert len(set(ports.values())) == len(names)


def test_a_component_that_exits_after_its_readiness_was_seen_fails_cluster_up_with_its_log(tmp_path):
    """The same CI run's JobSet was gone when cluster-up returned 0; the wait then watched only the component it
    waited for. Now every started component is watched, and up checks them all once more before it returns."""
    import shutil

    sh, sleep = shutil.which("sh"), shutil.which("sleep")
    cp = devcluster.ControlPlane(tmp_path, {"kueue": sleep, "jobset": sh}, {})
    cp.start("kueue", ["60"])
    try:
        cp.confirm_running()  # one running component: nothing to report
        cp.start("jobset", ["-c", "echo 'listen tcp 127.0.0.1:40001: bind: address already in use'; exit 1"])
        with pytest.raises(devcluster.ClusterError, match=r"(?s)^jobset exited .*address already in use"):
            cp.wait("Kueue's ClusterQueue", lambda: False, timeout=30, component="kueue")
        with pytest.raises(devcluster.ClusterError, match="^jobset exited"):
            cp.confirm_running()
    finally:
        cp.stop("kueue")
