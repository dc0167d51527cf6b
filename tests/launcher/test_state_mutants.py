"""launcher.state read to the last field, so that a changed rule shows (issue 26: the mutants make mutate found surviving).

The inputs are the objects recorded from the real control plane (tests/launcher/recorded/); where no recording has
what a case needs (a DisruptionTarget, an image that cannot be pulled), a recorded pod is changed in the one field the
case is about, with the values Kubernetes writes there (named at each). The expected values are read off the recorded
objects: the Job controller's condition reasons and messages, the pods' names, exit codes and times.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from launcher import state
from launcher.state import Reading

RECORDED = Path(__file__).parent / "recorded"
ROOT = Path(__file__).resolve().parents[2]
# What the Eviction API puts on a pod it evicts (pkg/registry/core/pod/storage/eviction.go, Kubernetes 1.26+).
EVICTED = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI", "message": "Eviction API: evicting"}
BACKOFF = "BackoffLimitExceeded: Job has reached the specified backoff limit"


def recorded(name: str) -> tuple[dict, list[dict]]:
    objects = json.loads((RECORDED / f"{name}.json").read_text())
    return objects["job"], objects["pods"]


def with_condition(obj: dict, condition: dict) -> dict:
    changed = copy.deepcopy(obj)
    changed["status"]["conditions"] = [*changed["status"].get("conditions", []), condition]
    return changed


def without_conditions(job: dict) -> dict:
    return {**job, "status": {**job["status"], "conditions": []}}


def test_a_failed_job_reads_as_its_first_crashed_pod_whatever_order_the_pods_are_listed_in():
    """The first pod to fail (by finishedAt) is the cause; later ones are retries of it."""
    job, pods = recorded("exit-1-backoff-limit")  # sim-sft-jp998 ended 16:13:44, sim-sft-vjzpz 16:13:56
    expected = Reading("Failed", over=True, cause="crash", message=f"{BACKOFF}; pod sim-sft-jp998 failed with exit code 1",
                       pod="sim-sft-jp998", exit_codes=(1, 1))
    assert state.read(job, pods) == expected
    assert state.read(job, pods[::-1]) == expected


def test_pods_that_never_started_are_ordered_by_when_they_were_created():
    """No terminated state to read (a pod failed before its container ran): its creationTimestamp orders it."""
    job, pods = recorded("exit-1-backoff-limit")
    never_ran = copy.deepcopy(pods)
    for pod in never_ran:
        pod["status"]["containerStatuses"] = []
        pod["status"]["reason"] = "Evicted"  # the kubelet's reason for a pod it evicted under node pressure
    assert state.read(job, never_ran[::-1]) == Reading(
        "Failed", over=True, cause="crash", message=f"{BACKOFF}; pod sim-sft-jp998 failed (Evicted)", pod="sim-sft-jp998")


def test_exit_2_under_the_pod_failure_policy_names_the_pod_and_the_controllers_message():
    job, pods = recorded("exit-2")
    assert state.read(job, pods) == Reading(
        "Failed", over=True, cause="user-error", pod="sim-sft-9gk6j", exit_codes=(2,),
        message="PodFailurePolicy: Container stage for pod t-88528b34/sim-sft-9gk6j failed with exit code 2 matching "
                "FailJob rule at index 1")


def test_a_group_past_its_deadline_and_a_crashed_rank_read_exactly():
    job, pods = recorded("group-deadline")
    assert state.read(job, pods, group=True) == Reading(
        "Failed", over=True, cause="deadline", message="DeadlineExceeded: Job was active longer than specified deadline")
    job, pods = recorded("group-crashed-rank")
    assert state.read(job, pods, group=True) == Reading(
        "Failed", over=True, cause="crash", message=f"{BACKOFF}; pod sim-sft-1-h8xgt failed with exit code 1",
        pod="sim-sft-1-h8xgt", exit_codes=(1,))


@pytest.mark.parametrize("name, reading", [
    ("one-node-complete", Reading("Complete", over=True, succeeded=True)),
    ("group-suspended", Reading("Suspended")),
    ("unschedulable", Reading("Running")),  # status.active counts a pod the scheduler has not placed
])
def test_jobs_that_did_not_fail_read_exactly(name, reading):
    job, pods = recorded(name)
    assert state.read(job, pods, group=True) == reading


def test_a_rank_taken_away_ends_a_running_group_at_once_but_not_a_one_node_job():
    job, pods = recorded("group-deadline")
    running = without_conditions(job)  # before the deadline: the Job has not failed
    pods = [pods[0], with_condition(pods[1], EVICTED)]
    assert state.read(running, pods, group=True) == Reading(
        "Terminating", over=True, cause="disruption", pod="sim-sft-1-mht2c",
        message="pod sim-sft-1-mht2c was disrupted (EvictionByEvictionAPI: Eviction API: evicting)")
    assert state.read(running, pods, group=False) == Reading("Terminating")


def test_a_disruption_outranks_the_crashes_it_causes():
    """A rank taken away makes its peers fail: the failed Job is read as disrupted, and restarted uncounted."""
    job, pods = recorded("exit-1-backoff-limit")
    pods = [pods[0], with_condition(pods[1], {"type": "DisruptionTarget", "status": "True"})]
    assert state.read(job, pods) == Reading("Failed", over=True, cause="disruption", pod="sim-sft-vjzpz", exit_codes=(1, 1),
                                            message=f"{BACKOFF}; pod sim-sft-vjzpz was disrupted")


def test_a_pods_own_reason_is_said_unless_it_is_the_generic_error():
    _, pods = recorded("exit-1-backoff-limit")
    killed = copy.deepcopy(pods[0])
    killed["status"]["containerStatuses"][0]["state"]["terminated"] |= {"exitCode": 137, "reason": "OOMKilled"}
    assert state.pod_failure(killed) == "pod sim-sft-jp998 failed with exit code 137 (OOMKilled)"
    assert state.pod_failure(pods[0]) == "pod sim-sft-jp998 failed with exit code 1"
    failed = copy.deepcopy(pods[0])
    failed["status"] |= {"containerStatuses": [], "reason": "Failed"}
    assert state.pod_failure(failed) == "pod sim-sft-jp998 failed"


def test_pod_accessors_on_recorded_pods():
    _, group = recorded("group-crashed-rank")  # rank 0 being deleted by the controller, rank 1 failed by itself
    _, one = recorded("one-node-complete")
    assert [state.completion_index(p) for p in group] == [0, 1] and state.completion_index(one[0]) == 0
    assert [state.exit_code(p) for p in group] == [None, 1] and state.exit_codes(group) == (1,)
    assert state.exit_codes(one) == ()  # exit code 0 is no failure
    assert [state.deleting(p) for p in group] == [True, False]
    assert [state.failed_by_itself(p) for p in group] == [False, True]
    assert [state.pod_done(p) for p in group] == [False, True] and state.pod_done(one[0])
    sidecar = copy.deepcopy(group[1])
    sidecar["status"]["containerStatuses"][0]["name"] = "log-shipper"  # only the stage container's exit counts
    assert state.terminated(sidecar) is None and state.exit_code(sidecar) is None


def test_a_job_or_pod_the_api_has_given_no_status_yet_is_pending():
    created = {"metadata": {"name": "sim-sft"}}
    assert state.job_state(created) == "Pending" and not state.is_finished(created)
    assert state.failure_message(created) == "" and state.failure(created) is None and not state.succeeded(created)
    assert state.read(created, [created]) == Reading("Pending")
    assert not state.deleting(created) and not state.pod_done(created) and state.disruption(created) is None
    assert state.pod_problems([created], datetime.now(timezone.utc)) == []


def test_each_condition_on_its_own_decides_the_state():
    job, _ = recorded("one-node-complete")  # SuccessCriteriaMet, then Complete
    for kept in ("SuccessCriteriaMet", "Complete"):
        alone = {**job, "status": {**job["status"], "conditions": [c for c in job["status"]["conditions"] if c["type"] == kept]}}
        assert state.job_state(alone) == "Complete", kept
    job, _ = recorded("exit-1-backoff-limit")  # FailureTarget, then Failed
    for kept in ("FailureTarget", "Failed"):
        alone = {**job, "status": {**job["status"], "conditions": [c for c in job["status"]["conditions"] if c["type"] == kept]}}
        assert state.job_state(alone) == "Failed" and state.failure_message(alone) == BACKOFF, kept
    false = with_condition(without_conditions(job), {"type": "Failed", "status": "False", "reason": "X"})
    assert state.failure(false) is None  # a condition counts only while True
    assert state.failure_message(with_condition(without_conditions(job), {"type": "Failed", "status": "True",
                                                                          "reason": "DeadlineExceeded"})) == "DeadlineExceeded"


@pytest.mark.parametrize("failures, disruptions, cause, step", [
    (1, 0, "crash", state.Step("restart", counted=True, why="failure 2 of at most 3 retries")),
    (3, 0, "crash", state.Step("failed")),
    (0, 1, "disruption", state.Step("restart", counted=False, why="disruption 2 of at most 3, not counted as a failure")),
    (0, 3, "disruption", state.Step("failed")),
])
def test_next_step_says_which_retry_it_is(failures, disruptions, cause, step):
    reading = Reading("Failed", over=True, cause=cause)
    assert state.next_step(reading, restartable=True, failures=failures, disruptions=disruptions, backoff_limit=3,
                           max_disruption_restarts=3) == step


def scheduled_pod(waiting: dict) -> dict:
    """Rank 1 of the crashed-rank recording as it was before its container started (scheduled 16:25:35)."""
    _, pods = recorded("group-crashed-rank")
    pod = copy.deepcopy(pods[1])
    pod["status"]["phase"] = "Pending"
    pod["status"]["containerStatuses"][0]["state"] = {"waiting": waiting}
    return pod


def test_pods_that_will_not_start_are_each_said_once_with_the_kubelets_words():
    scheduled = datetime(2026, 11, 29, 16, 25, 35, tzinfo=timezone.utc)
    pull = scheduled_pod({"reason": "ErrImagePull", "message": 'failed to pull image "x": not found'})
    assert state.pod_problems([pull], scheduled) == [
        (("sim-sft-1-h8xgt", "ErrImagePull"), 'pod sim-sft-1-h8xgt: ErrImagePull: failed to pull image "x": not found')]
    assert state.pod_problems([scheduled_pod({"reason": "ImagePullBackOff"})], scheduled) == [
        (("sim-sft-1-h8xgt", "ImagePullBackOff"), "pod sim-sft-1-h8xgt: ImagePullBackOff")]
    creating = scheduled_pod({"reason": "ContainerCreating"})
    assert state.pod_problems([creating], scheduled + timedelta(seconds=300)) == []  # the limit itself is still patience
    ((key, line),) = state.pod_problems([creating], scheduled + timedelta(seconds=301))
    assert key == ("sim-sft-1-h8xgt", "ContainerCreating")
    assert line.startswith("pod sim-sft-1-h8xgt has been ContainerCreating for 301s: a volume that cannot attach")
    assert line.endswith("kubectl describe pod sim-sft-1-h8xgt shows which")
    assert state.pod_problems([scheduled_pod({"reason": "PodInitializing"})], scheduled + timedelta(hours=1)) == []
    going = copy.deepcopy(pull)
    going["metadata"]["deletionTimestamp"] = "2026-11-29T16:25:40Z"
    assert state.pod_problems([going], scheduled) == []  # being deleted: nothing to fix


def test_an_unschedulable_pod_is_said_with_the_schedulers_whole_message():
    job, pods = recorded("unschedulable")
    condition = pods[0]["status"]["conditions"][0]
    assert state.pod_problems(pods, datetime.now(timezone.utc)) == [
        (("sim-sft-xvdg5", "PodScheduled"), f"pod sim-sft-xvdg5 cannot be scheduled: Unschedulable: {condition['message']}")]


def test_a_multi_node_stage_needs_a_claim_every_node_can_mount():
    claim = yaml.safe_load((ROOT / "k8s" / "pvc.yaml").read_text())  # what make k8s writes: ReadWriteOnce
    assert state.shared_claim_refusal(claim, "sft", 1) is None
    assert state.shared_claim_refusal(claim, "sft", 2) == (
        "sft: 2 nodes cannot share PersistentVolumeClaim vlmjobs/vlmjobs-runs (ReadWriteOnce): a multi-node stage needs "
        "ReadWriteMany (make k8s K8S_ARGS=--access_mode=ReadWriteMany, on a storage class that offers it)")
    shared = {**claim, "spec": {**claim["spec"], "accessModes": ["ReadWriteMany"]}}
    assert state.shared_claim_refusal(shared, "sft", 4) is None
    unset = {**claim, "spec": {}}
    assert "(no access mode)" in state.shared_claim_refusal(unset, "dpo", 2)


def test_log_timestamps_compare_as_numbers_and_lines_keep_their_spaces():
    """RFC3339Nano drops trailing zeros: .1 is later than .09."""
    cursor = state.LogCursor()
    assert cursor.since_time() is None
    lines = ["2026-01-01T00:00:05.09Z a b", "2026-01-01T00:00:05.1Z c", "2026-01-01T00:00:05.1Z d", "2026-01-01T00:00:05.1Z e"]
    assert [cursor.fresh(line) for line in lines] == ["a b", "c", "d", "e"]
    cursor.resumed()
    again = [*lines, "2026-01-01T00:00:05.1Z f"]
    assert [cursor.fresh(line) for line in again] == [None, None, None, None, "f"]
    cursor.resumed()
    assert [cursor.fresh(line) for line in lines[1:]] == [None, None, None]
    assert cursor.fresh("2026-01-01T00:00:06Z g") == "g" and cursor.since_time() == "2026-01-01T00:00:06Z"


def test_a_failed_job_whose_pods_are_gone_or_deleted_still_reads_failed():
    job, pods = recorded("exit-1-backoff-limit")
    assert state.read(job, []) == Reading("Failed", over=True, cause="crash", message=BACKOFF)
    deleted = copy.deepcopy(pods)
    for pod in deleted:  # pod garbage collection deletes failed pods; their exit codes stay readable meanwhile
        pod["metadata"]["deletionTimestamp"] = "2026-11-29T16:14:00Z"
    assert state.read(job, deleted) == Reading("Failed", over=True, cause="crash", message=BACKOFF, exit_codes=(1, 1))
    policy, _ = recorded("exit-2")  # the policy's reason alone says user error, with no pod left to name
    assert state.read(policy, []) == Reading("Failed", over=True, cause="user-error", message=state.failure_message(policy))
    deadline, _ = recorded("group-deadline")
    _, crashed = recorded("group-crashed-rank")
    assert state.read(deadline, crashed, group=True) == Reading(
        "Failed", over=True, cause="deadline", message="DeadlineExceeded: Job was active longer than specified deadline",
        exit_codes=(1,))


def test_exit_2_is_a_user_error_even_without_the_pod_failure_policys_reason():
    """Before Kubernetes 1.31 (no podFailurePolicy here) the Job fails by its backoff limit; the exit code still says it."""
    job, _ = recorded("exit-1-backoff-limit")
    _, pods = recorded("exit-2")
    assert state.read(job, pods) == Reading("Failed", over=True, cause="user-error", message=BACKOFF, pod="sim-sft-9gk6j",
                                            exit_codes=(2,))


def test_the_first_pod_to_finish_is_the_cause_even_when_created_later():
    job, pods = recorded("exit-1-backoff-limit")
    later = copy.deepcopy(pods)
    later[0]["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = "2026-11-29T16:14:00Z"
    assert state.read(job, later).pod == "sim-sft-vjzpz"


def test_one_node_is_the_default_reading():
    job, pods = recorded("group-deadline")
    assert state.read(without_conditions(job), [pods[0], with_condition(pods[1], EVICTED)]) == Reading("Terminating")


def test_what_a_pod_without_annotations_or_status_says():
    bare = {"metadata": {"name": "sim-sft-x"}}
    assert state.completion_index(bare) == 0 and not state.failed_by_itself(bare)
    assert state.pod_failure(bare) == "pod sim-sft-x failed"
    _, pending = recorded("unschedulable")
    assert not state.failed_by_itself(pending[0])  # not failed at all, though nobody deletes it
    assert state.shared_claim_refusal({"metadata": {"name": "c", "namespace": "n"}}, "sft", 2).startswith(
        "sft: 2 nodes cannot share PersistentVolumeClaim n/c (no access mode)")
    claim = {"metadata": {"name": "c", "namespace": "n"}, "spec": {"accessModes": ["ReadWriteOnce", "ReadOnlyMany"]}}
    assert "(ReadWriteOnce, ReadOnlyMany)" in state.shared_claim_refusal(claim, "sft", 2)


def test_only_complete_and_failed_jobs_are_finished():
    assert [state.is_finished(recorded(name)[0]) for name in
            ("one-node-complete", "exit-2", "group-deadline", "group-suspended", "unschedulable")] == [
        True, True, True, False, False]


def test_a_scheduling_condition_without_a_message_and_pods_after_a_finished_one():
    _, done = recorded("one-node-complete")
    _, pods = recorded("unschedulable")
    quiet = copy.deepcopy(pods[0])
    del quiet["status"]["conditions"][0]["message"]
    assert state.pod_problems([done[0], quiet], datetime.now(timezone.utc)) == [
        (("sim-sft-xvdg5", "PodScheduled"), "pod sim-sft-xvdg5 cannot be scheduled: Unschedulable")]
