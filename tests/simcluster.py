"""The real control plane of scripts/cluster.py, for the tests marked ``cluster`` (issue 10).

    def test_something(real_cluster, real_namespace):    # a fresh namespace, prepared like make k8s-apply
        kube = launcher.kube.Cluster(real_cluster.api_client(), real_namespace)
        ...
        real_cluster.restart_apiserver()                  # same port, etcd kept

    def test_queued(real_cluster, queued_namespace):     # the same, and Kueue enforced there (see below)
        job["metadata"]["labels"][QUEUE_LABEL] = LOCAL_QUEUE
        real_cluster.workload_of(queued_namespace, "Job", name)   # Kueue's Workload of a Job or JobSet

The ``real_cluster`` fixture (session-scoped) starts etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kwok, JobSet and Kueue once per session in a temporary folder, or reuses the one running in
$VLMJOBS_CLUSTER_STATE (e.g. .cache/cluster after make cluster-up; never stopped by the tests).
Kueue (scripts/cluster.py, platform_objects) has a ClusterQueue CLUSTER_QUEUE whose GPU quota, one flavor a
product, is the simulated nodes' capacity; WorkloadPriorityClasses ``low`` and ``high``; waitForPodsReady on.
The tests import these names (CLUSTER_QUEUE, LOCAL_QUEUE, QUEUE_LABEL, SIM_*, ...) from scripts.cluster itself.
In a ``queued_namespace`` (LocalQueue LOCAL_QUEUE, and the enforcing label) Kueue manages every Job and
JobSet: one without the queue label stays suspended. In a ``real_namespace`` only labelled ones are queued.
Without a Go toolchain to build them the cluster tests are skipped, except under CI=true, where a
skipped cluster test is a failure (the hook in tests/conftest.py).

What a simulated pod does is chosen by its annotations, set through the recipe's
``kubernetes.pod_annotations`` (the SIM_* names of scripts/cluster.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from scripts import cluster as devcluster

STATE_ENV = "VLMJOBS_CLUSTER_STATE"
NO_GO = (
    "cluster tests need Go >= 1.24 to build etcd, kube-apiserver & co. (https://go.dev/dl; or the binaries "
    "on PATH / in $KUBEBUILDER_ASSETS): install it and run make test"
)


AUDIT_EVENT_START = b'{"kind":"Event",'  # how the API server's JSON audit backend starts each event


@dataclass
class SimCluster:
    """What the tests get: where the control plane is, and the few things they do to it."""

    control_plane: devcluster.ControlPlane

    @property
    def kubeconfig(self) -> Path:
        """The admin's kubeconfig (a client certificate in system:masters)."""
        return self.control_plane.kubeconfig

    @property
    def server(self) -> str:
        """The API server's URL, https://127.0.0.1:<port>."""
        return self.control_plane.server

    @property
    def audit_log(self) -> Path:
        """The API server's audit log: one JSON event per request (Metadata level; node leases left out)."""
        return self.control_plane.audit_log

    @property
    def kubectl(self) -> str:
        return self.control_plane.bins["kubectl"]

    def restart_apiserver(self, extra_args: list[str] | None = None) -> None:
        """Stop kube-apiserver and start it on the same port with the same etcd; ``extra_args`` (kept for
        later restarts until replaced) add flags, e.g. ["--watch-cache=false"]."""
        self.control_plane.restart_apiserver(extra_args)

    def api_client(self, kubeconfig: Path | None = None):
        """A kubernetes.client.ApiClient of the admin (or of ``kubeconfig``)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    def kubectl_run(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.kubectl, f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    # -- audit log: counting requests

    def audit_mark(self) -> int:
        """Where the audit log ends now; audit_events(mark) reads what was logged after it."""
        return self.audit_log.stat().st_size if self.audit_log.exists() else 0

    def audit_events(self, mark: int = 0) -> list[dict]:
        """The events logged after ``mark``. The API server writes its log in pieces, so a mark taken mid-line starts
        inside an event (its rest is skipped); a server killed mid-line (restart_apiserver) leaves a torn event that
        the restarted one's first event follows on the same line (the whole event at its end is kept)."""
        with open(self.audit_log, "rb") as f:
            if mark:
                f.seek(mark - 1)
                if f.read(1) != b"\n":
                    f.readline()  # the rest of an event logged before the mark
            lines = [line for line in f.read().splitlines() if line.strip()]
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                start = line.rfind(AUDIT_EVENT_START)
                if start > 0:
                    events.append(json.loads(line[start:]))
        return events

    # -- logs: what the simulated containers print

    def append_pod_log(self, *lines: str) -> None:
        """Lines every simulated container's log then shows (kwok serves one log to all of them), as the
        kubelet would stream a container's new output."""
        with open(self.control_plane.pod_log, "a") as f:
            for line in lines:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}Z"
                f.write(f"{stamp} stdout F {line}\n")

    # -- namespaces as make k8s-apply prepares them

    def prepare_namespace(self, namespace: str, *, queued: bool = False) -> None:
        """The namespace (Pod Security restricted), the PVC and the driver's RBAC, rendered as make k8s
        renders k8s/ and applied with kubectl as make k8s-apply applies it. ``queued``: also the LocalQueue
        LOCAL_QUEUE, and the label by which Kueue manages every Job and JobSet there."""
        from jobs.recipe import Kubernetes
        from launcher import setup

        files = setup.files(
            Kubernetes(namespace=namespace),
            size="1Ti",
            access_mode="ReadWriteOnce",
            storage_class=None,
            cluster_queue="unused",
        )
        text = "\n---\n".join(setup.text(*files[name]) for name in ("namespace.yaml", "pvc.yaml", "rbac.yaml"))
        self.kubectl_run("apply", "-f", "-", stdin=text)
        if queued:
            key, value = devcluster.ENFORCED_NAMESPACE_LABEL
            self.kubectl_run("label", "namespace", namespace, f"{key}={value}")
            path, manifest = devcluster.local_queue(namespace)
            self.control_plane.create(path, manifest)
        self.wait_until_admission_knows(namespace)

    def wait_until_admission_knows(self, namespace: str) -> None:
        """Kueue's Job webhook reads a Job's namespace from its informer cache (managedJobsNamespaceSelector) and
        refuses Jobs in one it has not seen yet ("Namespace ... not found"), for the moment a loaded machine
        takes to deliver the event; a namespace is ready once a server-side dry run of a Job passes admission."""
        probe = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "admission-probe", "namespace": namespace},
            "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "c"}]}}},
        }
        path = f"/apis/batch/v1/namespaces/{namespace}/jobs?dryRun=All"
        wait_for(f"admission of Jobs in namespace {namespace}",
                 lambda: self.control_plane.api("POST", path, probe)[0] in (200, 201), 30)  # fmt: skip

    def delete_namespace(self, namespace: str) -> None:
        self.kubectl_run("delete", "namespace", namespace, "--wait=false", "--ignore-not-found", check=False)

    @contextlib.contextmanager
    def namespace(self, prefix: str = "t", *, queued: bool = False) -> Iterator[str]:
        """A fresh namespace prepared like make k8s-apply's (``queued``: see prepare_namespace), deleted afterwards."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.prepare_namespace(name, queued=queued)
        try:
            yield name
        finally:
            self.delete_namespace(name)

    # -- Kueue and JobSet

    def get(self, path: str) -> dict | None:
        """An object by its API path as the admin reads it; None when it does not exist."""
        code, body = self.control_plane.api("GET", path)
        if code == 404:
            return None
        assert code == 200, f"GET {path}: {code} {body}"
        return body

    def workloads(self, namespace: str) -> list[dict]:
        return self.get(f"{devcluster.KUEUE_API}/namespaces/{namespace}/workloads")["items"]

    def workload_of(self, namespace: str, kind: str, name: str) -> dict | None:
        """Kueue's Workload of the Job or JobSet ``name`` (the one it owns), or None while there is none."""
        return next(
            (w for w in self.workloads(namespace)
             if any(o["kind"] == kind and o["name"] == name for o in w["metadata"].get("ownerReferences", []))),
            None,
        )  # fmt: skip

    def token_kubeconfig(self, namespace: str, service_account: str, path: Path) -> Path:
        """A kubeconfig holding a token of ``service_account`` (TokenRequest), as a pod of it gets one."""
        token = self.kubectl_run(
            "-n", namespace, "create", "token", service_account, "--duration=1h"
        ).stdout.strip()
        config = json.loads(self.kubeconfig.read_text())
        config["users"] = [{"name": service_account, "user": {"token": token}}]
        config["contexts"][0]["context"] = {"cluster": "vlmjobs-sim", "user": service_account, "namespace": namespace}
        path.write_text(json.dumps(config))
        return path


def start(tmp_root: Path) -> tuple[SimCluster, bool]:
    """(the cluster, whether this session started it and so stops it). Raises devcluster.ClusterError."""
    reuse = os.environ.get(STATE_ENV)
    if reuse:
        return SimCluster(devcluster.up(Path(reuse))), False
    return SimCluster(devcluster.up(tmp_root / "cluster", quiet=True, tied=True)), True


def go_missing() -> bool:
    """No Go to build the binaries with, and they are neither cached nor on the machine."""
    import shutil

    if shutil.which("go"):
        return False
    return any(
        not devcluster.cached_binary(b).is_file() and devcluster.found_binary(b) is None for b in devcluster.BINARIES
    )


def wait_for(what: str, check, timeout: float = 90):
    """check()'s first true answer, polled; a test failure naming ``what`` after ``timeout`` seconds (generous: the
    control plane shares two cores with the rest of the suite)."""
    import pytest

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.3)
    pytest.fail(f"{what}: not within {timeout:.0f} s")
