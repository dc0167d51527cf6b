"""The launcher against a real control plane (issue 10): kube-apiserver, the Job controller, the
scheduler and the Eviction API are upstream Kubernetes 1.34; kwok plays the kubelet, and a pod's
exit code and run time come from its annotations (tests/simcluster.py). One behaviour a test.

Re-record the Job and pod objects that tests/launcher/test_state.py reads and fake_kube.py replays:
    VLMJOBS_RECORD=1 .venv/bin/pytest -m cluster tests/launcher/test_launcher_on_cluster.py
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from jobs.contract import UserError
from launcher import chain, kube, render, state
from scripts.cluster import SIM_EXIT_CODE, SIM_RUN_SECONDS, SIM_START_SECONDS, SIM_STOP_SECONDS
from tests.launcher.conftest import IMAGE, make

pytestmark = pytest.mark.cluster
RECORDED = Path(__file__).parent / "recorded"
RWX = "runs-shared"
# Pods that take their time to stop after SIGTERM, as ranks writing a checkpoint do (grace 300 s in production).
SLOW_STOP = {SIM_STOP_SECONDS: "20"}
SLOW_GRACE = {"kubernetes.termination_grace_period_seconds": 30}  # a ReadWriteMany claim for the multi-node stages (the prepared namespace's is ReadWriteOnce)

BASE = {
    "name": "sim",
    "model": {"name_or_path": "llava-hf/llava-1.5-7b-hf", "family": "llava"},
    "data": {"sft": {"path": "HuggingFaceM4/ChartQA", "format": "chartqa"}},
    "stages": ["prepare", "sft"],
    "resources": {"gpus": 1, "gpu_product": "NVIDIA-H100-80GB-HBM3", "cpu": "1", "memory": "1Gi", "shm": "64Mi"},
    "kubernetes": {
        "image": IMAGE,
        "target_version": "1.34",
        "hf_token_secret": None,
        "backoff_limit": 0,
        "max_disruption_restarts": 2,
        "termination_grace_period_seconds": 5,
        "pod_annotations": {SIM_RUN_SECONDS: "1"},
    },
}


def recipe(namespace: str, annotations: dict | None = None, **overrides):
    overrides = {"kubernetes.namespace": namespace, **overrides}
    if annotations:
        overrides["kubernetes.pod_annotations"] = {SIM_RUN_SECONDS: "1", **annotations}
    return make(BASE, **overrides)


def group(namespace: str, annotations: dict | None = None, **overrides):
    """sft on two nodes of one GPU, on a ReadWriteMany claim."""
    return recipe(namespace, annotations, **{"sft.resources": {"nodes": 2}, "kubernetes.pvc": RWX, **overrides})


class Lines(list):
    def __init__(self):
        super().__init__()
        self.changed = threading.Condition()

    def append(self, line: str) -> None:
        with self.changed:
            super().append(line)
            self.changed.notify_all()

    def wait_for(self, test, timeout: float) -> str:
        """The first line for which ``test`` holds, waiting up to ``timeout`` seconds for it."""
        with self.changed:
            found = self.changed.wait_for(lambda: next((x for x in self if test(x)), None), timeout)
        assert found, f"no such line within {timeout}s in {list(self)}"
        return found


@pytest.fixture
def ns(real_cluster, real_namespace):
    """The prepared namespace, with a ReadWriteMany claim beside its ReadWriteOnce one."""
    claim = render.render_pvc(real_namespace, RWX, size="1Ti", access_mode="ReadWriteMany")
    real_cluster.kubectl_run("apply", "-f", "-", stdin=json.dumps(claim))
    return real_namespace


def on(real_cluster, namespace: str, kubeconfig: Path | None = None) -> kube.Cluster:
    """A Cluster whose output lines are kept in ``.lines``, with waits shortened for the tests."""
    lines = Lines()
    c = kube.Cluster(
        real_cluster.api_client(kubeconfig), namespace, out=lines.append, poll_s=0.2, watch_s=10, log_drain_s=2,
        log_idle_s=3, pods_gone_timeout_s=60, retry_base_s=0.5, retry_cap_s=2, retry_give_up_s=60,
    )  # fmt: skip
    c.lines = lines
    return c


def assert_preempted_then_succeeded(lines: Lines, kind: str, name: str, done: str) -> None:
    """The launcher's report of a stage Kueue preempted once and admitted again: queued (Suspended), Running, the
    eviction said to be a preemption and no failure, Suspended, Running, ``done`` (the kind's own word: a Job is
    Complete, a JobSet Completed), and a plain success, not one "after N restart(s)"."""
    preempted = lines.wait_for(lambda x: x.startswith(f"==> {kind} {name}: evicted by Kueue ("), 0)
    assert "Preempted" in preempted and preempted.endswith("preempted, not failed; waiting to be admitted again")
    said = [x.removeprefix(f"==> {kind} {name}: ") for x in lines]
    states = [x for x in said if x in ("Suspended", "Running", done, "Failed")]
    assert states == ["Suspended", "Running", "Suspended", "Running", done], lines  # queued, then preempted
    assert lines[-1] == "==> sft: succeeded", lines


def record(name: str, cluster: kube.Cluster, job: str) -> None:
    """With VLMJOBS_RECORD=1: the Job and its pods as the API returns them, for test_state.py."""
    if os.environ.get("VLMJOBS_RECORD") != "1":
        return
    RECORDED.mkdir(exist_ok=True)
    objects = {"job": cluster.get_job(job), "pods": cluster.list_pods(job)}
    (RECORDED / f"{name}.json").write_text(json.dumps(objects, indent=1, sort_keys=True) + "\n")


@contextlib.contextmanager
def beside(fn, *args):
    """Run ``fn`` in a thread while the body runs; its exception is raised at the end."""
    error: list[BaseException] = []

    def run():
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            error.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    thread.join(timeout=120)
    if error:
        raise error[0]


def running_pod(cluster: kube.Cluster, job: str, index: int = 0, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pod in cluster.list_pods(job):
            meta = pod["metadata"]
            if (
                pod["status"].get("phase") == "Running"
                and not meta.get("deletionTimestamp")
                and int(meta.get("annotations", {}).get(render.COMPLETION_INDEX_ANNOTATION, 0)) == index
            ):
                return pod
        time.sleep(0.2)
    raise AssertionError(f"no running pod of index {index} of Job {job} within {timeout}s")


def evict(cluster: kube.Cluster, job: str, index: int = 0) -> str:
    """Evict the running pod of ``index`` through the Eviction API, as a node drain does."""
    name = running_pod(cluster, job, index)["metadata"]["name"]
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": cluster.namespace}}
    cluster.core.create_namespaced_pod_eviction(name, cluster.namespace, body)
    return name


# ---------------------------------------------------------------------------------------------
# One node: the Job retries by itself


def test_a_one_node_stage_runs_to_success(real_cluster, ns):
    c = on(real_cluster, ns)
    chain.run_stage(c, recipe(ns), "sft", IMAGE, logs=False)
    assert c.lines[0] == f"==> sft: created Job {ns}/sim-sft" and c.lines[-1] == "==> sft: succeeded"
    assert f"==> Job {ns}/sim-sft: Complete" in c.lines
    record("one-node-complete", c, "sim-sft")


def test_exit_2_fails_at_once_through_the_pod_failure_policy(real_cluster, ns):
    c = on(real_cluster, ns)
    with pytest.raises(
        kube.JobFailed,
        match=rf"^stage sft: Job {ns}/sim-sft failed: PodFailurePolicy: Container stage for pod {ns}/sim-sft-\w+ "
        r"failed with exit code 2 matching FailJob rule at index 1 \(the stage exited 2: a recipe or data error, "
        r"which a retry cannot fix\); its log: vlmjobs logs --stage=sft --run=sim; to run it again: "
        r"vlmjobs delete --run=sim --stage=sft$",
    ) as info:
        chain.run_stage(c, recipe(ns, {SIM_EXIT_CODE: "2"}, **{"kubernetes.backoff_limit": 3}), "sft", IMAGE, logs=False)
    assert info.value.exit_code == 2 and len(c.list_pods("sim-sft")) == 1
    record("exit-2", c, "sim-sft")


def test_exit_3_a_regressed_run_fails_at_once_and_the_chain_exits_3(real_cluster, ns):
    """Issue 22: a stage that exits 3 (evaluate: the run scored worse than the recipe's last good night) fails its Job
    at the first pod through the podFailurePolicy, as a retry would score the same, and the chain passes the 3 on."""
    c = on(real_cluster, ns)
    with pytest.raises(
        kube.JobFailed,
        match=rf"^stage sft: Job {ns}/sim-sft failed: PodFailurePolicy: Container stage for pod {ns}/sim-sft-\w+ "
        r"failed with exit code 3 matching FailJob rule at index 1 \(the stage exited 3: the run scored worse than the "
        r"recipe's last good night; the chain stops, and its model is not merged or pushed\); its log",
    ) as info:
        chain.run_stage(c, recipe(ns, {SIM_EXIT_CODE: "3"}, **{"kubernetes.backoff_limit": 3}), "sft", IMAGE, logs=False)
    assert info.value.exit_code == 3 and len(c.list_pods("sim-sft")) == 1


def test_exit_2_before_kubernetes_1_31_is_a_user_error_the_launcher_reads_from_the_pod(real_cluster, ns):
    """Issue 26 (6): a 1.29 target has no podFailurePolicy (not GA before 1.31), so the Job, rendered with
    backoffLimit 0 for the launcher to retry, fails as BackoffLimitExceeded whatever the exit code; the launcher reads
    the pod's exit code 2 and stops, though kubernetes.backoff_limit would allow a restart."""
    c = on(real_cluster, ns)
    old = recipe(ns, {SIM_EXIT_CODE: "2"}, **{"kubernetes.target_version": "1.29", "kubernetes.backoff_limit": 1})
    assert "podFailurePolicy" not in render.render_stage(old, "sft", IMAGE)[0]["spec"]
    with pytest.raises(
        kube.JobFailed,
        match=rf"^stage sft: Job {ns}/sim-sft failed: BackoffLimitExceeded: Job has reached the specified backoff "
        r"limit \(the stage exited 2: a recipe or data error, which a retry cannot fix\); its log",
    ) as info:
        chain.run_stage(c, old, "sft", IMAGE, logs=False)
    assert info.value.exit_code == 2 and len(c.list_pods("sim-sft")) == 1
    assert [line for line in c.lines if "restarting" in line] == []
    record("exit-2-target-1.29", c, "sim-sft")


def test_exit_1_is_retried_by_the_job_up_to_backoff_limit(real_cluster, ns):
    c = on(real_cluster, ns)
    with pytest.raises(
        kube.JobFailed,
        match=rf"^stage sft: Job {ns}/sim-sft failed: BackoffLimitExceeded: Job has reached the specified backoff "
        rf"limit; pod sim-sft-\w+ failed with exit code 1 \(stage exit codes 1\); its log",
    ) as info:
        chain.run_stage(c, recipe(ns, {SIM_EXIT_CODE: "1"}, **{"kubernetes.backoff_limit": 1}), "sft", IMAGE, logs=False)
    assert info.value.exit_code == 1 and len(c.list_pods("sim-sft")) == 2
    assert [line for line in c.lines if line.startswith("==> sft: restarting")] == []  # the Job retried, not us
    record("exit-1-backoff-limit", c, "sim-sft")


def test_an_eviction_is_not_counted_against_backoff_limit(real_cluster, ns):
    c = on(real_cluster, ns)
    evicted = []

    def evict_the_running_pod():
        running_pod(c, "sim-sft")
        record("one-node-running", c, "sim-sft")  # what the fake server plays as a running Job
        evicted.append(evict(c, "sim-sft"))

    with beside(evict_the_running_pod):
        chain.run_stage(c, recipe(ns, {SIM_RUN_SECONDS: "4"}), "sft", IMAGE, logs=False)  # backoff_limit 0
    assert c.lines[-1] == "==> sft: succeeded"
    assert [p["metadata"]["name"] for p in c.list_pods("sim-sft")] != evicted  # a new pod did the work
    assert c.get_job("sim-sft")["status"].get("failed", 0) == 0
    record("one-node-evicted-then-complete", c, "sim-sft")


def test_active_deadline_ends_the_stage_as_a_failure(real_cluster, ns):
    c = on(real_cluster, ns)
    r = recipe(ns, {SIM_RUN_SECONDS: "60", **SLOW_STOP}, **{"kubernetes.active_deadline_seconds": 3, **SLOW_GRACE})
    with pytest.raises(
        kube.JobFailed,
        match=rf"^stage sft: Job {ns}/sim-sft failed: DeadlineExceeded: Job was active longer than specified "
        r"deadline; its log",
    ) as info:
        chain.run_stage(c, r, "sft", IMAGE, logs=False)
    assert info.value.exit_code == 1
    assert [line for line in c.lines if "restarting" in line] == []
    record("group-deadline", c, "sim-sft")


# ---------------------------------------------------------------------------------------------
# Several nodes are a JobSet (issue 21), restarted by the JobSet controller, not the launcher: the launcher's own group
# restarts and their tests are gone; the launcher's JobSets against that controller: test_launcher_kueue_on_cluster.py.


def test_a_suspended_job_is_waited_on_not_recreated(real_cluster, ns):
    """As Kueue suspends a Job: its pods are deleted; the launcher waits until it is resumed."""
    c = on(real_cluster, ns)
    # The launcher's own reads of the pods (run_stage follows in this thread; the suspender reads in its own).
    read_while_terminating = threading.Event()
    list_pods = c.list_pods

    def reading_pods(job: str) -> list[dict]:
        pods = list_pods(job)
        if threading.current_thread() is threading.main_thread() and pods:
            suspended = state.condition(c.get_job(job), "Suspended")
            if suspended and all(p["metadata"].get("deletionTimestamp") for p in pods):
                read_while_terminating.set()
        return pods

    c.list_pods = reading_pods

    def suspend_then_resume():
        running_pod(c, "sim-sft", 0)
        uid = c.get_job("sim-sft")["metadata"]["uid"]
        c.batch.patch_namespaced_job("sim-sft", ns, {"spec": {"suspend": True}})
        c.lines.wait_for(lambda line: line.endswith(": Suspended"), 30)
        # The launcher has read the suspended Job's pods while they terminate (SLOW_STOP), and kept waiting.
        assert read_while_terminating.wait(30), "the launcher never read the pods of the suspended Job"
        record("group-suspended", c, "sim-sft")
        c.batch.patch_namespaced_job("sim-sft", ns, {"spec": {"suspend": False}})
        assert c.get_job("sim-sft")["metadata"]["uid"] == uid

    # Ranks that take 5 s to stop: long enough to be read while they terminate, and the resumed Job's new pods,
    # which wait for the old ones to be gone, start 15 s sooner than after SLOW_STOP's 20 s.
    ranks = {SIM_RUN_SECONDS: "4", SIM_STOP_SECONDS: "5"}
    with beside(suspend_then_resume):
        chain.run_stage(c, recipe(ns, ranks, **SLOW_GRACE), "sft", IMAGE, logs=False)
    assert [line for line in c.lines if "restarting" in line or "created" in line] == [f"==> sft: created Job {ns}/sim-sft"]
    assert c.lines[-1] == "==> sft: succeeded"


def test_a_multi_node_stage_on_a_read_write_once_claim_is_refused_before_anything_is_created(real_cluster, ns):
    c = on(real_cluster, ns)
    r = group(ns, **{"kubernetes.pvc": "vlmjobs-runs"})
    with pytest.raises(
        UserError,
        match=rf"^sft: 2 nodes cannot share PersistentVolumeClaim {ns}/vlmjobs-runs \(ReadWriteOnce\): a multi-node "
        r"stage needs ReadWriteMany \(make k8s K8S_ARGS=--access_mode=ReadWriteMany, on a storage class that offers it\)$",
    ):
        chain.run_stage(c, r, "sft", IMAGE, logs=False)
    assert c.get_job("sim-sft") is None


# ---------------------------------------------------------------------------------------------
# Pods that do not start


def test_an_unschedulable_pod_is_reported_with_the_schedulers_reason(real_cluster, ns):
    c = on(real_cluster, ns)
    r = recipe(ns, **{"resources.gpu_product": "NVIDIA-B200"})

    def follow():
        with contextlib.suppress(kube.JobDeleted):
            chain.run_stage(c, r, "sft", IMAGE, logs=False)

    with beside(follow):
        line = c.lines.wait_for(lambda x: "cannot be scheduled" in x, 60)
        record("unschedulable", c, "sim-sft")
        c.delete_job("sim-sft")
    assert line.startswith("warning: pod sim-sft-")
    assert "cannot be scheduled: Unschedulable: 0/" in line and "didn't match Pod's node affinity/selector" in line


def test_a_pod_stuck_in_container_creating_is_reported(real_cluster, ns):
    c = on(real_cluster, ns)
    c.creating_too_long_s = 2
    r = recipe(ns, {SIM_START_SECONDS: "120"})

    def follow():
        with contextlib.suppress(kube.JobDeleted):
            chain.run_stage(c, r, "sft", IMAGE, logs=False)

    with beside(follow):
        line = c.lines.wait_for(lambda x: "ContainerCreating for" in x, 60)
        c.delete_job("sim-sft")
    assert line.startswith("warning: pod sim-sft-") and line.endswith("shows which")


# ---------------------------------------------------------------------------------------------
# The control plane going away mid-follow


def test_an_api_server_restart_mid_follow_is_survived_without_a_request_storm(real_cluster, ns):
    """Issue 10, defects 2 and 3: the watch breaks, then its version is older than the new watch
    cache (410); the launcher waits and re-lists instead of hammering the API server."""
    c = on(real_cluster, ns)

    def restart():
        running_pod(c, "sim-sft")
        real_cluster.restart_apiserver()

    mark = real_cluster.audit_mark()
    with beside(restart):
        chain.run_stage(c, recipe(ns, {SIM_RUN_SECONDS: "15"}), "sft", IMAGE, logs=False)
    assert c.lines[-1] == "==> sft: succeeded"
    ours = [  # the test's own requests: the admin's client certificate, not a controller's
        (e["verb"], e["requestURI"]) for e in real_cluster.audit_events(mark)
        if e["stage"] == "ResponseComplete" and e.get("objectRef", {}).get("namespace") == ns
        and not e["user"]["username"].startswith("system:serviceaccount:")
    ]  # fmt: skip
    print(f"{len(ours)} requests: {ours}")
    assert 3 <= len([r for r in ours if "/jobs" in r[1]]) <= 15, ours


def test_logs_resume_after_a_dropped_stream_without_losing_or_repeating_a_line(real_cluster, ns):
    """kwok serves one log file to every simulated container (append_pod_log); an API server
    restart drops the stream, which resumes from the last line's time."""
    c = on(real_cluster, ns)
    c.log_drain_s = 30  # the restart, then kwok's stream that outlives its pod (log_idle_s)
    r = recipe(ns, {SIM_RUN_SECONDS: "12"})
    marker = f"step-{time.time_ns()}"

    def speak():
        running_pod(c, "sim-sft")
        real_cluster.append_pod_log(f"{marker} 1", f"{marker} 2")
        c.lines.wait_for(lambda x: x == f"{marker} 2", 30)
        real_cluster.restart_apiserver()
        real_cluster.append_pod_log(f"{marker} 3")

    with beside(speak):
        chain.run_stage(c, r, "sft", IMAGE, logs=True)
    assert [line for line in c.lines if line.startswith(marker)] == [f"{marker} 1", f"{marker} 2", f"{marker} 3"]


# ---------------------------------------------------------------------------------------------
# The CLI's other verbs, and the driver's own rights


def test_the_driver_runs_the_chain_with_its_own_token_and_role(real_cluster, ns, tmp_path):
    """The RBAC of k8s/rbac.yaml, through a token of the vlmjobs-driver ServiceAccount (TokenRequest),
    in a namespace enforcing the restricted Pod Security Standard. kwok runs no container, so the
    driver's chain runs here, with the credentials its pod would have."""
    admin = on(real_cluster, ns)
    namespace = admin.core.read_namespace(ns)
    assert namespace.metadata.labels["pod-security.kubernetes.io/enforce"] == "restricted"
    driver = on(real_cluster, ns, real_cluster.token_kubeconfig(ns, render.DRIVER_SERVICE_ACCOUNT, tmp_path / "kc"))
    r = group(ns)
    chain.pipeline(driver, r, IMAGE, logs=True)
    assert driver.lines[-1] == "==> pipeline done: prepare, sft of run sim in /runs/sim"
    assert [line for line in driver.lines if "forbidden" in line.lower()] == []
    # sft on two nodes is a JobSet (issue 21), which the driver's Role may create: its pods are its child Job's
    assert f"==> sft: created JobSet {ns}/sim-sft (2 nodes)" in driver.lines
    assert len(admin.list_pods("sim-prepare")) == 1 and len(admin.list_pods(render.group_job_name(r, "sft"))) == 2
