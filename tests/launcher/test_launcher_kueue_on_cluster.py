"""The launcher's own manifests and following against the real Kueue and JobSet controllers (issue 21): what the
launcher renders for a recipe goes through the LocalQueue of a namespace where Kueue manages every Job and JobSet,
and what it reports is checked against what the engines decided, read back from their objects. The engines'
behaviour on hand-written manifests is in test_kueue_jobset_on_cluster.py; kwok plays the kubelet (a pod's exit code
and run time come from its annotations, tests/simcluster.py). Few tests, each showing several things: the control
plane is slow on a shared machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from jobs import recipe as recipes
from jobs.contract import EXIT_FAILURE, EXIT_USER_ERROR
from launcher import chain, kube, render, state
from scripts.cluster import CLUSTER_QUEUE, JOBSET_API, LOCAL_QUEUE, SIM_EXIT_CODE, SIM_FAIL_INDEX, SIM_RUN_SECONDS
from tests.conftest import ROOT, subprocess_env
from tests.launcher.conftest import IMAGE
from tests.launcher.test_launcher_on_cluster import RWX, Lines, assert_preempted_then_succeeded, group, on, recipe
from tests.simcluster import wait_for

pytestmark = pytest.mark.cluster
H100_FLAVOR = "nvidia-h100-80gb-hbm3"  # scripts/cluster.py names a flavor after its product, lower-cased
QUEUED = {"kubernetes.queue": LOCAL_QUEUE}

# One launcher process: run_stage of the recipe given as JSON, its lines on stdout, as `vlmjobs run --stage` would.
LAUNCHER = """
import json, sys
from kubernetes import config
from jobs import recipe as recipes
from launcher import chain, kube
kubeconfig, namespace, recipe, image = sys.argv[1:]
c = kube.Cluster(config.new_client_from_config(config_file=kubeconfig), namespace, out=lambda x: print(x, flush=True),
                 poll_s=0.2, watch_s=10, log_drain_s=2)
chain.run_stage(c, recipes.from_dict(json.loads(recipe), {}, origin="test"), "sft", image, logs=False)
"""


@pytest.fixture
def qns(real_cluster, queued_namespace):
    """The queued namespace, with a ReadWriteMany claim for the multi-node stages."""
    claim = render.render_pvc(queued_namespace, RWX, size="1Ti", access_mode="ReadWriteMany")
    real_cluster.kubectl_run("apply", "-f", "-", stdin=json.dumps(claim))
    return queued_namespace


def launcher_killed_midway(real_cluster, namespace: str, r: recipes.Recipe) -> list[str]:
    """Start run_stage in a process of its own, SIGKILL it once the JobSet's ranks run; its lines."""
    lines = Lines()
    args = [sys.executable, "-c", LAUNCHER, str(real_cluster.kubeconfig), namespace, json.dumps(r.to_dict()), IMAGE]
    proc = subprocess.Popen(args, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        lines.wait_for(lambda x: x == f"==> JobSet {namespace}/{r.run_id}-sft: Running", 90)
        pods = f"/api/v1/namespaces/{namespace}/pods?labelSelector=job-name={render.group_job_name(r, 'sft')}"
        wait_for("a rank running", lambda: [p for p in real_cluster.get(pods)["items"]
                                            if p["status"].get("phase") == "Running"], 60)  # fmt: skip
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no handler runs: as a laptop's launcher lost, or a driver pod's node gone
        proc.wait(timeout=30)
        reader.join(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    return list(lines)


def admitted(real_cluster, namespace: str, job: str) -> dict:
    """The Job's Workload once Kueue has admitted it."""
    def found():
        workload = real_cluster.workload_of(namespace, "Job", job)
        return workload if workload and state.condition(workload, "Admitted") else None

    return wait_for(f"Job {job}'s Workload admitted", found, 60)


def admitted_once(real_cluster, namespace: str, name: str) -> dict:
    """The JobSet's Workload: admitted through the LocalQueue onto the H100 flavor, for two pods."""
    workload = real_cluster.workload_of(namespace, "JobSet", name)
    assert state.condition(workload, "Admitted") or state.condition(workload, "Finished"), workload["status"]
    admission = workload["status"]["admission"]
    assert admission["clusterQueue"] == CLUSTER_QUEUE
    (pod_set,) = admission["podSetAssignments"]
    assert pod_set["count"] == 2 and pod_set["flavors"]["nvidia.com/gpu"] == H100_FLAVOR
    return workload


def test_a_two_node_stage_is_a_queued_jobset_whose_restarts_the_controller_decides_across_a_killed_launcher(
    real_cluster, qns
):
    """The launcher renders sft on 2 nodes as a JobSet in the LocalQueue; it is killed while the ranks run and started
    again. A crashing rank 1 is restarted by the JobSet controller once (backoff_limit 1) and the stage fails with
    its exit code; a rank exiting 2 fails the stage at once, reported as exit 2. The new launcher finds the JobSet,
    creates nothing, and reports what the controller's status says. An evicted rank restarts the group uncounted."""
    ns = qns
    # a rank that crashes (exit 1), restarted as a group up to backoff_limit
    crash = group(ns, {SIM_EXIT_CODE: "1", SIM_FAIL_INDEX: "1", SIM_RUN_SECONDS: "2"},
                  **QUEUED, **{"run.id": "crash", "kubernetes.backoff_limit": 1})  # fmt: skip
    first = launcher_killed_midway(real_cluster, ns, crash)
    assert first[0] == f"==> sft: created JobSet {ns}/crash-sft (2 nodes)", first
    c = on(real_cluster, ns)
    with pytest.raises(kube.JobFailed) as failed:
        chain.run_stage(c, crash, "sft", IMAGE, logs=False)
    print("killed launcher:", *first, "new launcher:", *c.lines, failed.value, sep="\n")
    assert c.lines[0].startswith(f"==> sft: JobSet {ns}/crash-sft already exists: "), c.lines
    assert not [x for x in c.lines if "created" in x]
    jobset = real_cluster.get(f"{JOBSET_API}/namespaces/{ns}/jobsets/crash-sft")
    assert (state.condition(jobset, "Failed") or {}).get("reason") == "ReachedMaxRestarts", jobset["status"]
    assert state.jobset_restarts(jobset) == (1, 1)  # the controller's count: one restart, counted
    message = str(failed.value)
    assert message.startswith(f"stage sft: JobSet {ns}/crash-sft failed after 1 restart(s): "), message
    assert "exit code 1" in message and "(stage exit codes 1)" in message, message
    assert failed.value.exit_code == EXIT_FAILURE
    crash_workload = admitted_once(real_cluster, ns, "crash-sft")

    # a rank that exits 2: a user error, which no restart fixes, though backoff_limit would allow three
    usererr = group(ns, {SIM_EXIT_CODE: "2", SIM_FAIL_INDEX: "1", SIM_RUN_SECONDS: "2"},
                    **QUEUED, **{"run.id": "usererr", "kubernetes.backoff_limit": 3})  # fmt: skip
    first = launcher_killed_midway(real_cluster, ns, usererr)
    assert first[0] == f"==> sft: created JobSet {ns}/usererr-sft (2 nodes)", first
    c = on(real_cluster, ns)
    with pytest.raises(kube.JobFailed) as failed:
        chain.run_stage(c, usererr, "sft", IMAGE, logs=False)
    print("killed launcher:", *first, "new launcher:", *c.lines, failed.value, sep="\n")
    jobset = real_cluster.get(f"{JOBSET_API}/namespaces/{ns}/jobsets/usererr-sft")
    assert (state.condition(jobset, "Failed") or {}).get("reason") == "FailJobSetFailurePolicyAction", jobset["status"]
    assert state.jobset_restarts(jobset) == (0, 0)
    message = str(failed.value)
    assert message.startswith(f"stage sft: JobSet {ns}/usererr-sft failed: "), message
    assert "(the stage exited 2: a recipe or data error, which a retry cannot fix)" in message, message
    assert failed.value.exit_code == EXIT_USER_ERROR
    admitted_once(real_cluster, ns, "usererr-sft")
    # vlmjobs deleted no Workload: the crashed run's is the one Kueue made for its JobSet at the start
    assert real_cluster.workload_of(ns, "JobSet", "crash-sft")["metadata"]["uid"] == crash_workload["metadata"]["uid"]

    # a rank evicted (a node drained): the group restarts, not counted, so backoff_limit 0 still completes
    drain = group(ns, {SIM_RUN_SECONDS: "5"}, **QUEUED, **{"run.id": "drain", "kubernetes.backoff_limit": 0})
    c = on(real_cluster, ns)
    evicted: list[str] = []

    def evict_rank_1():
        c.lines.wait_for(lambda x: x == f"==> JobSet {ns}/drain-sft: Running", 90)
        pods = f"/api/v1/namespaces/{ns}/pods?labelSelector=job-name={render.group_job_name(drain, 'sft')}"
        (rank_1,) = wait_for("rank 1 running", lambda: [
            p for p in real_cluster.get(pods)["items"] if p["status"].get("phase") == "Running"
            and p["metadata"]["annotations"].get(render.COMPLETION_INDEX_ANNOTATION) == "1"], 60)  # fmt: skip
        name = rank_1["metadata"]["name"]
        eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": ns}}
        c.core.create_namespaced_pod_eviction(name, ns, eviction)
        evicted.append(name)

    evictor = threading.Thread(target=evict_rank_1, daemon=True)
    evictor.start()
    chain.run_stage(c, drain, "sft", IMAGE, logs=False)
    evictor.join(timeout=10)
    print(*c.lines, sep="\n")
    assert evicted, "rank 1 was not evicted"
    assert c.lines[-1] == "==> sft: succeeded after 1 restart(s)", c.lines
    restarted = f"==> JobSet {ns}/drain-sft: restarted by JobSet, restart 1 (0 of at most 0 counted; disruptions "
    assert restarted + "are not): every rank resumes from the last checkpoint" in c.lines, c.lines
    jobset = real_cluster.get(f"{JOBSET_API}/namespaces/{ns}/jobsets/drain-sft")
    assert state.jobset_restarts(jobset) == (1, 0), jobset["status"]  # the controller's: restarted, uncounted


def test_a_stage_whose_gpu_no_node_has_is_reported_with_kueues_reason_and_ends_at_admission_timeout(real_cluster, qns):
    ns = qns
    r = recipe(ns, **QUEUED, **{"resources.gpu_product": "NVIDIA-B200", "kubernetes.admission_timeout": 8})
    c = on(real_cluster, ns)
    started = time.monotonic()
    said_at: list[float] = []

    def stamp(line: str, out=c.out) -> None:
        if "not admitted by Kueue yet" in line and "couldn't assign flavors" in line and not said_at:
            said_at.append(time.monotonic() - started)
        out(line)

    c.out = stamp
    with pytest.raises(kube.NotAdmitted) as ended:
        chain.run_stage(c, r, "sft", IMAGE, logs=False)
    waited = time.monotonic() - started
    print(*c.lines, ended.value, f"reason after {said_at} s, ended after {waited:.1f} s", sep="\n")
    assert said_at and said_at[0] < 30, c.lines  # the reason, within half a minute
    workload = real_cluster.workload_of(ns, "Job", "sim-sft")
    reserved = next(x for x in workload["status"]["conditions"] if x["type"] == "QuotaReserved")
    # the launcher's line is Kueue's own reason and message, as the Workload says it
    # (a first line may say "not yet considered": read before Kueue's scheduler looked at the Workload)
    line = next(x for x in c.lines if "not admitted by Kueue yet" in x and "couldn't assign flavors" in x)
    said = f"(Workload {workload['metadata']['name']}): {reserved['reason']}: {reserved['message']}"
    assert line.endswith(said), line
    assert reserved["status"] == "False" and "couldn't assign flavors to pod set main" in reserved["message"]
    message = str(ended.value)
    assert message.startswith(f"Job {ns}/sim-sft not admitted: suspended for "), message
    assert "more than kubernetes.admission_timeout (8 s): not admitted by Kueue yet" in message, message
    assert message.endswith("are left queued (vlmjobs delete to withdraw it)"), message
    # the launcher counts from the Job's suspension, a timestamp in whole seconds: up to 1 s before the test's clock
    assert 8 - 1 <= waited < 8 + 10, waited
    job = real_cluster.get(f"/apis/batch/v1/namespaces/{ns}/jobs/sim-sft")
    assert job["spec"]["suspend"] is True  # left as it is, in the queue
    assert real_cluster.workload_of(ns, "Job", "sim-sft")["metadata"]["uid"] == workload["metadata"]["uid"]


def test_the_driver_and_the_nightly_job_are_admitted_through_the_local_queue_and_the_driver_reads_workloads(
    real_cluster, qns, tmp_path
):
    """In a namespace where Kueue manages every Job, the driver Job and the CronJob's Job carry the queue name and
    are admitted; with the driver's ServiceAccount token, its chain's stages are admitted too, it reads their
    Workloads (its Role), and it may not change them (nothing broader)."""
    from kubernetes import client

    ns = qns
    r = recipe(ns, {SIM_RUN_SECONDS: "2"}, **QUEUED, stages=["prepare"],
               **{"kubernetes.nightly_schedule": "* * * * *"})  # fmt: skip
    admin = on(real_cluster, ns)
    chain.submit_driver(admin, r, IMAGE, follow=False)
    driver_job = render.driver_name(r)
    driver_workload = admitted(real_cluster, ns, driver_job)
    assert driver_workload["status"]["admission"]["clusterQueue"] == CLUSTER_QUEUE
    wait_for("the driver's pod running", lambda: [
        p for p in admin.list_pods(driver_job) if p["status"].get("phase") == "Running"], 60)  # fmt: skip

    # the nightly CronJob's Job, made by the CronJob controller (a schedule missed a minute ago starts one now)
    batch = client.BatchV1Api(admin.api)
    cron = render.render_cronjob(r, IMAGE)
    batch.create_namespaced_cron_job(ns, cron)
    nightly = cron["metadata"]["name"]
    last = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=2)
    batch.patch_namespaced_cron_job_status(
        nightly, ns, {"status": {"lastScheduleTime": last.strftime("%Y-%m-%dT%H:%M:%SZ")}},
        _content_type="application/merge-patch+json",
    )  # fmt: skip
    (by_controller,) = wait_for("a Job of the CronJob", lambda: [
        j for j in admin.list_jobs(render.selector(r.run_id, render.DRIVER))
        if (j["metadata"].get("ownerReferences") or [{}])[0].get("name") == nightly], 60)  # fmt: skip
    batch.patch_namespaced_cron_job(nightly, ns, {"spec": {"suspend": True}})
    night_job = by_controller["metadata"]["name"]
    night_workload = admitted(real_cluster, ns, night_job)
    assert night_workload["status"]["admission"]["clusterQueue"] == CLUSTER_QUEUE

    # the driver's own credentials: its chain runs in the queue, and it reads the Workloads
    token = real_cluster.token_kubeconfig(ns, render.DRIVER_SERVICE_ACCOUNT, tmp_path / "driver-kubeconfig")
    driver = on(real_cluster, ns, token)
    chain.pipeline(driver, r, IMAGE, logs=False)
    assert driver.lines[-1] == "==> pipeline done: prepare of run sim in /runs/sim", driver.lines
    assert [x for x in driver.lines if "forbidden" in x.lower() or x.startswith("warning")] == [], driver.lines
    # Kueue marks the Workload Finished after the Job controller marks the Job complete, which the launcher reads
    (stage_workload,) = wait_for("the stage's Workload finished", lambda: [
        w for w in [real_cluster.workload_of(ns, "Job", render.job_name(r, "prepare"))] if state.condition(w, "Finished")])
    assert stage_workload["status"]["admission"]["clusterQueue"] == CLUSTER_QUEUE
    seen = {w["metadata"]["name"] for w in driver.list_workloads()}
    assert {driver_workload["metadata"]["name"], stage_workload["metadata"]["name"]} <= seen
    workloads = "workloads.kueue.x-k8s.io"
    for verb, what, allowed in (("list", workloads, "yes"), ("delete", workloads, "no"), ("patch", workloads, "no"),
                                ("list", "clusterqueues.kueue.x-k8s.io", "no")):  # fmt: skip
        asked = [real_cluster.kubectl, f"--kubeconfig={token}", "auth", "can-i", verb, what, "-n", ns]
        answer = subprocess.run(asked, capture_output=True, text=True, timeout=60).stdout.strip()
        assert answer == allowed, (verb, what, answer)


def test_a_two_node_stage_preempted_by_a_higher_priority_run_is_reported_as_preempted_readmitted_and_completes(
    real_cluster, qns
):
    """Quota for 8 A100s (one node's worth): the launcher's low-priority sft on 2 nodes of 4 is admitted and runs;
    another run's high-priority sft on 8 arrives. Kueue suspends the JobSet (preemption), the launcher says so and
    waits, not failing it; once the high run is done the low one is admitted again and completes, its Workload the
    one Kueue made at the start and its JobSet never restarted by a failure."""
    ns = qns
    a100 = {"resources.gpu_product": "NVIDIA-A100-SXM4-40GB", "resources.gpus": 4}
    low = group(ns, {SIM_RUN_SECONDS: "12"}, **QUEUED, **a100, **{"run.id": "low", "kubernetes.priority": "low"})
    high = recipe(ns, {SIM_RUN_SECONDS: "3"}, **QUEUED,
                  **{**a100, "run.id": "high", "resources.gpus": 8, "kubernetes.priority": "high"})  # fmt: skip
    c = on(real_cluster, ns)
    outcome: list[BaseException | None] = []

    def follow_low():
        try:
            chain.run_stage(c, low, "sft", IMAGE, logs=False)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.append(e)

    follower = threading.Thread(target=follow_low, daemon=True)
    follower.start()
    c.lines.wait_for(lambda x: x == f"==> JobSet {ns}/low-sft: Running", 90)
    pods = f"/api/v1/namespaces/{ns}/pods?labelSelector=job-name={render.group_job_name(low, 'sft')}"
    wait_for("low's ranks running", lambda: sum(p["status"].get("phase") == "Running"
                                                 for p in real_cluster.get(pods)["items"]) == 2, 60)  # fmt: skip
    low_workload = real_cluster.workload_of(ns, "JobSet", "low-sft")
    assert state.condition(low_workload, "Admitted")

    other = on(real_cluster, ns)
    chain.run_stage(other, high, "sft", IMAGE, logs=False)  # waits in the queue until low is preempted, then runs
    assert other.lines[-1] == "==> sft: succeeded", other.lines
    follower.join(timeout=120)
    print(*c.lines, sep="\n")
    assert outcome == [None], outcome
    assert_preempted_then_succeeded(c.lines, "JobSet", f"{ns}/low-sft", "Completed")
    jobset = real_cluster.get(f"{JOBSET_API}/namespaces/{ns}/jobsets/low-sft")
    assert state.jobset_restarts(jobset) == (0, 0), jobset["status"]
    final = real_cluster.workload_of(ns, "JobSet", "low-sft")
    assert final["metadata"]["uid"] == low_workload["metadata"]["uid"]  # the same Workload, never deleted
    assert state.condition(final, "Finished")
    # Kueue's own record that it was preempted once, as the launcher said (readmission resets its Evicted condition)
    evictions = [(e["reason"], e["count"]) for e in final["status"].get("schedulingStats", {}).get("evictions", [])]
    assert evictions == [("Preempted", 1)], final["status"]
