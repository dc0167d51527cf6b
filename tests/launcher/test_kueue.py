"""Kueue as the way in (issue 21): every Job carries its LocalQueue and WorkloadPriorityClass, and a suspended stage
says why Kueue has not admitted it, from its Workload, until admitted, deactivated or past admission_timeout.

The Workloads are played by the fake server (Kueue's scheduler is not running here), shaped as Kueue v0.17 writes them
and checked against its CRD's v1beta2 schema (crds/, from the sigs.k8s.io/kueue@v0.17.0 module); the Job statuses are
the real Job controller's (recorded/group-suspended.json: a Job suspended while its pods terminate)."""

from __future__ import annotations

import copy
import json
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jsonschema
import pytest

from launcher import kube, render
from tests.launcher.conftest import IMAGE, MULTI, SINGLE, make
from tests.launcher.fake_kube import Attempt, complete, kueue_condition, recorded, running, workload

SCHEMA = json.loads((Path(__file__).parent / "crds" / "kueue-v0.17.0-workload-v1beta2.json").read_text())
NO_QUOTA = ("couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in flavor h100, "
            "request > maximum capacity (8 > 4)")
JOB = "llava-chartqa-sft"


def suspended(since: datetime) -> dict:
    """The Job controller's status of a suspended Job (recorded), suspended at ``since``."""
    status = copy.deepcopy(recorded("group-suspended").status)
    status["conditions"][0]["lastTransitionTime"] = since.strftime("%Y-%m-%dT%H:%M:%SZ")
    status["terminating"] = 0
    return status


def queued_job(server, attempt: Attempt, *, since: datetime | None = None) -> dict:
    """The stage's Job as Kueue's webhook leaves it: suspended, waiting for admission."""
    manifest = render.render_stage(make(SINGLE), "sft", IMAGE)[0]
    manifest["spec"]["suspend"] = True
    return server.add_job(manifest, suspended(since or datetime.now(timezone.utc)), attempt)


def test_the_played_workloads_are_valid_against_kueues_crd(server):
    job = queued_job(server, Attempt(statuses=[]))
    for conditions in ([kueue_condition("QuotaReserved", False, "Pending", NO_QUOTA)],
                       [kueue_condition("Evicted", True, "Preempted", "Preempted to accommodate a workload (UID: x)")]):
        jsonschema.validate(workload(job, *conditions), SCHEMA)
    with pytest.raises(jsonschema.ValidationError):  # the schema is strict enough to catch a wrong shape
        jsonschema.validate({**workload(job), "spec": {"active": "yes"}}, SCHEMA)


def test_every_job_joins_the_queue_with_its_priority():
    recipe = make(SINGLE, **{"kubernetes.priority": "research-low"})
    wanted = {"kueue.x-k8s.io/queue-name": "gpu-queue", "kueue.x-k8s.io/priority-class": "research-low"}
    jobs = [render.render_stage(recipe, stage, IMAGE)[0] for stage in recipe.stages]
    jobs.append(render.render_driver_job(recipe, IMAGE))
    for job in jobs:
        assert wanted.items() <= job["metadata"]["labels"].items(), job["metadata"]["name"]
    cronjob = render.render_cronjob(recipe, IMAGE)
    assert wanted.items() <= cronjob["spec"]["jobTemplate"]["metadata"]["labels"].items()


def test_the_drivers_role_reads_workloads_and_nothing_more_of_kueue():
    role = render.render_driver_rbac("vlmjobs")[1]
    kueue = [rule for rule in role["rules"] if "kueue.x-k8s.io" in rule["apiGroups"]]
    assert kueue == [{"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["list"]}]


def test_a_waiting_stage_says_kueues_reason_then_runs_when_admitted(cluster, server):
    job = queued_job(server, Attempt(statuses=[running(), complete()]))
    server.workloads = [workload(job, kueue_condition("QuotaReserved", False, "Pending", NO_QUOTA))]
    assert cluster.follow(JOB, logs=False, admission_timeout_s=600).succeeded
    assert cluster.lines == [
        f"==> Job vlmjobs/{JOB}: Suspended",
        f"==> Job vlmjobs/{JOB}: not admitted by Kueue yet (Workload job-{JOB}-3b1c2): Pending: {NO_QUOTA}",
        f"==> Job vlmjobs/{JOB}: Running",
        f"==> Job vlmjobs/{JOB}: Complete",
    ]


def test_the_reason_is_read_again_within_a_watch_turn(cluster, server):
    """Kueue changes the Workload, not the Job: its reason is read at every turn of the watch (30 s at most)."""
    # suspended from now, the timeout 3 s: the first turn reads it well within the timeout (however loaded the
    # machine), the watch turn (5 s here) ends past it, so the wait ends at the second read
    job = queued_job(server, Attempt(statuses=[]), since=datetime.now(timezone.utc))
    server.workloads = [workload(job, kueue_condition("QuotaReserved", False, "Pending", NO_QUOTA))]
    assert cluster.watch_s <= 30
    with pytest.raises(kube.NotAdmitted, match=r"more than kubernetes.admission_timeout \(3 s\)"):
        cluster.follow(JOB, logs=False, admission_timeout_s=3)
    lists = server.calls("GET", "/workloads")
    assert len(lists) >= 2, "read again while the Job did not change"


def test_a_preempted_stage_is_reported_preempted_and_waits_for_readmission(cluster, server):
    job = queued_job(server, Attempt(statuses=[running(), complete()]))
    preempted = "Preempted to accommodate a workload (UID: 1f2e, JobUID: 3a4b) due to prioritization in the ClusterQueue"
    server.workloads = [workload(job, kueue_condition("QuotaReserved", False, "Pending", NO_QUOTA),
                                 kueue_condition("Evicted", True, "Preempted", preempted))]
    assert cluster.follow(JOB, logs=False, admission_timeout_s=600).succeeded
    assert f"==> Job vlmjobs/{JOB}: evicted by Kueue (Preempted: {preempted}): preempted, not failed; waiting to be " \
           "admitted again" in cluster.lines


def test_a_deactivated_workload_ends_the_wait_with_its_reason(cluster, server):
    job = queued_job(server, Attempt(statuses=[]))
    why = "The workload is deactivated due to exceeding the maximum number of re-queuing retries"
    server.workloads = [workload(job, kueue_condition("Evicted", True, "DeactivatedDueToRequeuingLimitExceeded", why),
                                 active=False)]
    with pytest.raises(kube.NotAdmitted, match=rf"^Job vlmjobs/{JOB} not admitted: Kueue deactivated Workload "
                                               rf"job-{JOB}-3b1c2 \(DeactivatedDueToRequeuingLimitExceeded: {why}\)") as info:
        cluster.follow(JOB, logs=False, admission_timeout_s=600)
    assert info.value.exit_code == 1
    assert not server.calls("DELETE", "/jobs"), "the Job and its Workload stay: Kueue's, not vlmjobs'"


def test_the_wait_ends_at_admission_timeout_with_kueues_reason(cluster, server):
    job = queued_job(server, Attempt(statuses=[]), since=datetime.now(timezone.utc) - timedelta(hours=2))
    server.workloads = [workload(job, kueue_condition("QuotaReserved", False, "Pending", NO_QUOTA))]
    with pytest.raises(kube.NotAdmitted, match=rf"suspended for 72\d\d s, more than kubernetes.admission_timeout "
                                               rf"\(3600 s\): not admitted by Kueue yet .*: Pending: {re.escape(NO_QUOTA)}"):
        cluster.follow(JOB, logs=False, admission_timeout_s=3600)


def watch_turns(server) -> list[int]:
    """The timeoutSeconds of each watch the follower sent."""
    return [int(r.query["timeoutSeconds"][0]) for r in server.calls("GET", "/jobs") if r.query.get("watch") == ["true"]]


# The API server holds a watch for its whole timeoutSeconds (server.watch_holds); a turn as long as the default (30 s)
# must not carry the wait past admission_timeout (4 s: the first look comes within it however loaded the machine, and
# the wait's end is asserted with 10 s to spare, far from the 30 s of a whole turn).
ADMISSION_TIMEOUT_S, SPARE_S = 4, 10


def ends_at_admission_timeout(follow) -> None:
    """``follow(admission_timeout_s=...)`` raises NotAdmitted, and by the timeout, not a watch turn or read later."""
    started = time.monotonic()
    with pytest.raises(kube.NotAdmitted, match=rf"more than kubernetes.admission_timeout \({ADMISSION_TIMEOUT_S} s\)"):
        follow(admission_timeout_s=ADMISSION_TIMEOUT_S)
    waited = time.monotonic() - started
    assert waited < ADMISSION_TIMEOUT_S + SPARE_S, f"the wait ended {waited:.0f} s after it began"


def test_the_wait_ends_at_admission_timeout_not_at_the_end_of_a_watch_turn(cluster, server):
    server.watch_holds, cluster.watch_s = True, 30
    job = queued_job(server, Attempt(statuses=[]), since=datetime.now(timezone.utc))
    server.workloads = [workload(job, kueue_condition("QuotaReserved", False, "Pending", NO_QUOTA))]
    ends_at_admission_timeout(lambda **timeout: cluster.follow(JOB, logs=False, **timeout))
    assert all(turn <= ADMISSION_TIMEOUT_S for turn in watch_turns(server)), watch_turns(server)


def test_a_stage_preempted_mid_watch_waits_no_longer_than_admission_timeout(cluster, server):
    """Preempted while a whole turn is under way: the turn is cut to what admission_timeout leaves."""
    server.watch_holds, cluster.watch_s = True, 30
    manifest = render.render_stage(make(SINGLE), "sft", IMAGE)[0]
    job = server.add_job(manifest, running(), Attempt(statuses=[suspended(datetime.now(timezone.utc))], pods=[]))
    server.workloads = [workload(job, kueue_condition("QuotaReserved", False, "Pending", NO_QUOTA))]
    ends_at_admission_timeout(lambda **timeout: cluster.follow(JOB, logs=False, **timeout))
    first, *cut = watch_turns(server)  # running: a whole turn; suspended in it: the rest bounded
    assert first == 30 and all(turn <= ADMISSION_TIMEOUT_S for turn in cut), watch_turns(server)


def test_a_multi_node_stages_wait_ends_at_admission_timeout_not_at_the_next_read(cluster, server):
    """A JobSet is read every poll_s (30 s here): its wait ends at admission_timeout all the same."""
    cluster.poll_s = 30
    recipe = make(MULTI, **{"kubernetes.queue": "gpu-queue"})
    jobset = render.render_stage(recipe, "sft", IMAGE)[0]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    suspended_now = {"type": "Suspended", "status": "True", "reason": "SuspendedJobs", "message": "jobset is suspended",
                     "lastTransitionTime": now}
    name = jobset["metadata"]["name"]
    server.jobsets[name] = {**jobset, "metadata": {**jobset["metadata"], "uid": "uid-js", "creationTimestamp": now},
                            "spec": {**jobset["spec"], "suspend": True},
                            "status": {"restarts": 0, "conditions": [suspended_now]}}
    server.workloads = [workload(server.jobsets[name], kueue_condition("QuotaReserved", False, "Pending", NO_QUOTA))]
    ends_at_admission_timeout(lambda **timeout: cluster.follow_jobset(name, group_job=render.group_job_name(recipe, "sft"),
                                                                      logs=False, **timeout))


def test_without_kueue_a_suspended_job_is_waited_on_as_before(cluster, server):
    queued_job(server, Attempt(statuses=[running(), complete()]))  # server.workloads None: no Kueue CRD (404)
    assert cluster.follow(JOB, logs=False, admission_timeout_s=600).succeeded
    assert f"==> Job vlmjobs/{JOB}: suspended, with no Kueue Workload: resumed by whoever suspended it" in cluster.lines


def test_a_running_stage_preempted_by_kueue_is_waited_on_and_completes_not_failed(cluster, server):
    """Kueue preempts a running stage: its Job is suspended (pods terminated), its Workload evicted; the launcher
    reports it preempted, keeps its Job (and its place in the queue), and follows it to the end once readmitted."""
    from launcher import chain

    recipe = make(SINGLE)
    manifest = render.render_stage(recipe, "sft", IMAGE)[0]
    job = server.add_job(manifest, running(), Attempt(statuses=[suspended(datetime.now(timezone.utc)), running(),
                                                                complete()]))
    preempted = "Preempted to accommodate a workload (UID: 1f2e, JobUID: 3a4b) due to prioritization in the ClusterQueue"
    server.workloads = [workload(job, kueue_condition("Evicted", True, "Preempted", preempted),
                                 kueue_condition("QuotaReserved", False, "Pending", NO_QUOTA))]
    chain.run_stage(cluster, recipe, "sft", IMAGE, logs=False)
    assert cluster.lines[-5:] == [
        f"==> Job vlmjobs/{JOB}: Suspended",
        (f"==> Job vlmjobs/{JOB}: evicted by Kueue (Preempted: {preempted}): preempted, not failed; waiting to be "
         "admitted again"),
        f"==> Job vlmjobs/{JOB}: Running",
        f"==> Job vlmjobs/{JOB}: Complete",
        "==> sft: succeeded",
    ]
    assert not server.calls("DELETE", "/jobs") and len(server.calls("POST", "/jobs")) == 0


def test_a_multi_node_stage_waiting_for_kueue_says_why_from_its_jobsets_workload(cluster, server):
    """Kueue admits a JobSet whole: its Workload is the JobSet's, and the suspended JobSet's wait says why."""
    from launcher import chain

    recipe = make(MULTI, **{"kubernetes.queue": "gpu-queue"})
    jobset = render.render_stage(recipe, "sft", IMAGE)[0]
    server.jobsets["qwen2vl-chartqa-sft"] = {**jobset, "metadata": {**jobset["metadata"], "uid": "uid-js"},
                                            "spec": {**jobset["spec"], "suspend": True}, "status": {"restarts": 0}}
    done = {"restarts": 0, "conditions": [{"type": "Completed", "status": "True", "reason": "AllJobsCompleted",
                                           "message": "jobset completed successfully"}]}
    server.jobset_statuses["qwen2vl-chartqa-sft"] = [{"restarts": 0}, {"restarts": 0}, done]  # one a GET
    server.workloads = [workload(server.jobsets["qwen2vl-chartqa-sft"],
                                 kueue_condition("QuotaReserved", False, "Pending", NO_QUOTA))]
    jsonschema.validate(server.workloads[0], SCHEMA)
    chain.run_stage(cluster, recipe, "sft", IMAGE, logs=False)
    assert cluster.lines[:3] == [
        "==> sft: JobSet vlmjobs/qwen2vl-chartqa-sft already exists: Suspended",
        "==> JobSet vlmjobs/qwen2vl-chartqa-sft: Suspended",
        ("==> JobSet vlmjobs/qwen2vl-chartqa-sft: not admitted by Kueue yet (Workload job-qwen2vl-chartqa-sft-3b1c2): "
         f"Pending: {NO_QUOTA}"),
    ]
    assert cluster.lines[-1] == "==> sft: succeeded"
