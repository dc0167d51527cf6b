"""The simulated cluster of scripts/cluster.py itself (issue 10): the real control plane's parts are there
and enforce (RBAC, Pod Security, volume binding), and kwok plays the kubelet as the annotations choose:
exit codes, run times, one failing rank of an Indexed Job, graceful deletion."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from scripts import cluster as devcluster
from scripts.cluster import SIM_EXIT_CODE, SIM_FAIL_INDEX, SIM_RUN_SECONDS, SIM_STOP_SECONDS
from tests.simcluster import wait_for

pytestmark = pytest.mark.cluster

SECURE = {  # the restricted Pod Security Standard
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURE = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def job_manifest(name: str, annotations: dict[str, str], *, completions: int = 1, grace: int = 30, **spec) -> dict:
    pod_spec = {
        "restartPolicy": "Never",
        "securityContext": SECURE,
        "terminationGracePeriodSeconds": grace,
        "containers": [{"name": "stage", "image": "example.com/sim:1", "securityContext": CONTAINER_SECURE}],
    }
    job_spec = {"backoffLimit": 0, "completions": completions, "parallelism": completions, **spec}
    if completions > 1:
        job_spec["completionMode"] = "Indexed"
    job_spec["template"] = {"metadata": {"annotations": annotations}, "spec": pod_spec}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": job_spec}


class PodLog:
    """Every state each pod of the namespace went through, from a watch (pods vanish once they end)."""

    def __init__(self, api, namespace: str):
        from kubernetes import client, watch

        self.seen: list[dict] = []
        self._watch = watch.Watch()
        stream = self._watch.stream(client.CoreV1Api(api).list_namespaced_pod, namespace, timeout_seconds=300)
        self._thread = threading.Thread(target=self._record, args=(stream,), daemon=True)
        self._thread.start()

    def _record(self, stream) -> None:
        try:
            for event in stream:
                self.seen.append(event)
        except Exception:  # the stream ends with the test (or the API server)  # noqa: BLE001
            pass

    def states(self, index: str) -> list[tuple[str, str, int | None, bool]]:
        """(event, phase, exit code, being deleted) of the pod of completion ``index``, in order."""
        out = []
        for event in list(self.seen):
            pod = event["raw_object"]
            if pod["metadata"].get("annotations", {}).get("batch.kubernetes.io/job-completion-index", "0") != index:
                continue
            statuses = pod.get("status", {}).get("containerStatuses") or [{}]
            terminated = (statuses[0].get("state") or {}).get("terminated") or {}
            out.append((event["type"], pod["status"].get("phase"), terminated.get("exitCode"),
                        bool(pod["metadata"].get("deletionTimestamp"))))  # fmt: skip
        return out

    def stop(self):
        self._watch.stop()


@pytest.fixture
def clients(real_cluster):
    from kubernetes import client

    api = real_cluster.api_client()
    return client.CoreV1Api(api), client.BatchV1Api(api), api


def test_gpu_and_cpu_nodes_are_ready_with_their_products(clients):
    core, _, _ = clients
    nodes = {n.metadata.name: n for n in core.list_node().items}
    assert set(nodes) == {n[0] for n in devcluster.NODES}
    for name, product, gpus, *_ in devcluster.NODES:
        node = nodes[name]
        assert {c.type: c.status for c in node.status.conditions}["Ready"] == "True"
        assert node.status.allocatable.get("nvidia.com/gpu") == (str(gpus) if product else None)
        assert node.metadata.labels.get("nvidia.com/gpu.product") == product


def test_the_pvc_of_a_prepared_namespace_is_bound_by_the_volume_controller(clients, real_namespace):
    core, _, _ = clients
    pvc = wait_for(
        "PVC bound",
        lambda: (p := core.read_namespaced_persistent_volume_claim("vlmjobs-runs", real_namespace)).status.phase == "Bound"
        and p,
    )
    assert pvc.spec.storage_class_name == devcluster.STORAGE_CLASS  # the default class, given by admission
    assert pvc.metadata.annotations["pv.kubernetes.io/bind-completed"] == "yes"  # kube-controller-manager's mark


def test_a_pod_exits_with_the_code_and_after_the_time_its_annotations_choose(clients, real_namespace):
    core, batch, _ = clients
    batch.create_namespaced_job(real_namespace, job_manifest("exit-3", {SIM_EXIT_CODE: "3", SIM_RUN_SECONDS: "2"}))
    pod = wait_for(
        "pod failed",
        lambda: next((p for p in core.list_namespaced_pod(real_namespace, label_selector="job-name=exit-3").items
                      if p.status.phase == "Failed"), None),  # fmt: skip
    )
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (3, "Error")
    assert (terminated.finished_at - terminated.started_at).total_seconds() >= 2
    job = wait_for("Job failed", lambda: (j := batch.read_namespaced_job("exit-3", real_namespace)).status.failed and j)
    assert {c.type for c in job.status.conditions} >= {"FailureTarget", "Failed"}


def test_one_rank_of_an_indexed_job_fails_while_the_others_run_on_until_deleted(clients, real_namespace):
    core, batch, api = clients
    pods = PodLog(api, real_namespace)
    chosen = {SIM_FAIL_INDEX: "1", SIM_EXIT_CODE: "1", SIM_RUN_SECONDS: "2", SIM_STOP_SECONDS: "1"}
    batch.create_namespaced_job(real_namespace, job_manifest("group", chosen, completions=2))
    wait_for("the Job failed", lambda: (batch.read_namespaced_job("group", real_namespace).status.failed or 0) >= 1)
    wait_for("rank 0 gone", lambda: pods.states("0") and pods.states("0")[-1][0] == "DELETED")
    pods.stop()
    rank1, rank0 = pods.states("1"), pods.states("0")
    assert rank1[-1] == ("MODIFIED", "Failed", 1, False), rank1  # the failed pod stays, as the kubelet leaves it
    # rank 0 was still running when rank 1 failed; the Job controller deleted it, and it ended on SIGTERM
    assert ("MODIFIED", "Running", None, True) in rank0, rank0
    assert ("MODIFIED", "Failed", 143, True) in rank0, rank0
    assert rank0[-1][0] == "DELETED"


def test_a_deleted_pod_goes_at_the_end_of_its_grace_period_when_it_does_not_exit_sooner(clients, real_namespace):
    core, batch, _ = clients
    batch.create_namespaced_job(
        real_namespace, job_manifest("slow-stop", {SIM_RUN_SECONDS: "3600", SIM_STOP_SECONDS: "600"}, grace=4)
    )
    running = wait_for(
        "pod running",
        lambda: next((p for p in core.list_namespaced_pod(real_namespace, label_selector="job-name=slow-stop").items
                      if p.status.phase == "Running"), None),  # fmt: skip
    )
    deleted = time.monotonic()
    core.delete_namespaced_pod(running.metadata.name, real_namespace)
    time.sleep(1)
    assert core.read_namespaced_pod(running.metadata.name, real_namespace).metadata.deletion_timestamp
    wait_for(
        "pod gone",
        lambda: running.metadata.name not in [p.metadata.name for p in core.list_namespaced_pod(real_namespace).items],
    )
    assert 3 <= time.monotonic() - deleted < 30


def test_rbac_lets_the_driver_do_its_job_and_nothing_more(real_cluster, real_namespace, tmp_path):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    config = real_cluster.token_kubeconfig(real_namespace, "vlmjobs-driver", tmp_path / "driver.kubeconfig")
    driver = real_cluster.api_client(config)
    batch, core = client.BatchV1Api(driver), client.CoreV1Api(driver)
    batch.list_namespaced_job(real_namespace)
    core.list_namespaced_pod(real_namespace)
    for forbidden in (
        lambda: core.list_namespaced_secret(real_namespace),
        lambda: batch.list_namespaced_job("default"),
        lambda: core.list_node(),
    ):
        with pytest.raises(ApiException) as refused:
            forbidden()
        assert refused.value.status == 403
        assert "system:serviceaccount:" + real_namespace + ":vlmjobs-driver" in refused.value.body


def test_the_audit_log_counts_requests(real_cluster):
    from kubernetes import client

    api = real_cluster.api_client()
    agent = f"counted/{uuid.uuid4().hex[:8]}"
    api.user_agent = agent
    mark = real_cluster.audit_mark()
    for _ in range(3):
        client.CoreV1Api(api).list_namespace()
    events = [e for e in real_cluster.audit_events(mark) if e.get("userAgent") == agent]
    assert [(e["verb"], e["objectRef"]["resource"], e["responseStatus"]["code"]) for e in events] == [
        ("list", "namespaces", 200)
    ] * 3


def test_the_api_server_restarts_on_the_same_port_with_its_state(real_cluster, real_namespace):
    from kubernetes import client

    before = (real_cluster.server, real_cluster.control_plane.pid("kube-apiserver"))
    real_cluster.restart_apiserver()
    after = (real_cluster.server, real_cluster.control_plane.pid("kube-apiserver"))
    assert after[0] == before[0] and after[1] != before[1], (before, after)
    namespace = client.CoreV1Api(real_cluster.api_client()).read_namespace(real_namespace)  # etcd kept it
    assert namespace.metadata.labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_an_api_server_restarted_from_another_thread_outlives_that_thread(real_cluster):
    # a test restarts it from a helper thread while following in the main one; the new process must not be
    # tied to the helper thread's life
    helper = threading.Thread(target=real_cluster.restart_apiserver)
    helper.start()
    helper.join()
    time.sleep(3)
    assert real_cluster.control_plane.healthy("kube-apiserver")


def test_a_followed_log_shows_new_lines_and_ends_when_the_container_exits(clients, real_cluster, real_namespace):
    core, batch, _ = clients
    batch.create_namespaced_job(real_namespace, job_manifest("logs", {SIM_RUN_SECONDS: "6"}))
    pod = wait_for(
        "pod running",
        lambda: next((p for p in core.list_namespaced_pod(real_namespace, label_selector="job-name=logs").items
                      if p.status.phase == "Running"), None),  # fmt: skip
    )
    marker = f"line {uuid.uuid4().hex}"
    threading.Timer(1, real_cluster.append_pod_log, args=(marker,)).start()
    response = core.read_namespaced_pod_log(
        pod.metadata.name, real_namespace, container="stage", follow=True, _preload_content=False
    )
    text = b"".join(response.stream(1024)).decode()  # through the API server and kwok's kubelet endpoint
    assert marker in text.splitlines()
    # the stream ended by itself, as the kubelet ends it: the container had exited
    assert core.read_namespaced_pod(pod.metadata.name, real_namespace).status.phase == "Succeeded"


def test_cluster_up_reuses_a_running_control_plane_and_down_leaves_no_process(tmp_path):
    # make cluster-up / cluster-down, in a folder of their own
    import subprocess
    import sys
    from pathlib import Path

    from tests.simcluster import NO_GO, go_missing

    if go_missing():
        pytest.skip(NO_GO)
    state = tmp_path / "cluster"

    def cli(*args: str) -> subprocess.CompletedProcess:
        script = Path(devcluster.__file__)
        return subprocess.run([sys.executable, str(script), f"--state={state}", *args], capture_output=True, text=True)

    try:
        first = cli("up")
        assert first.returncode == 0, first.stderr
        (printed,) = [line.split("=", 1)[1] for line in first.stdout.splitlines() if "export KUBECONFIG=" in line]
        assert Path(printed).resolve() == state / "kubeconfig"
        cp = devcluster.ControlPlane.load(state)
        pids = {c: cp.pid(c) for c in devcluster.COMPONENTS}
        assert all(pids.values()), pids
        assert (state / "bin" / "kubectl").resolve() == Path(cp.bins["kubectl"]).resolve()
        again = cli("up")
        assert again.returncode == 0, again.stderr
        assert {c: cp.pid(c) for c in devcluster.COMPONENTS} == pids, "a running control plane is reused"
    finally:
        down = cli("down")
    assert down.returncode == 0, down.stderr
    assert not state.exists()
    for component, pid in pids.items():
        assert not running(pid), f"{component} (pid {pid}) still running"


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited child its new parent, init, has not reaped yet)."""
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
