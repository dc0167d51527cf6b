"""launcher.state on Job and pod objects recorded from the real control plane (tests/launcher/recorded/,
written by test_launcher_on_cluster.py with VLMJOBS_RECORD=1), and its decisions table-driven."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from launcher import state

RECORDED = Path(__file__).parent / "recorded"


def recorded(name: str) -> tuple[dict, list[dict]]:
    objects = json.loads((RECORDED / f"{name}.json").read_text())
    return objects["job"], objects["pods"]


# (recording, group, state, over, succeeded, cause, the pod it names starts with)
CASES = [
    ("one-node-complete", False, "Complete", True, True, "", None),
    ("exit-2", False, "Failed", True, False, "user-error", "sim-sft-"),
    ("exit-2-target-1.29", False, "Failed", True, False, "user-error", "sim-sft-"),
    ("exit-1-backoff-limit", False, "Failed", True, False, "crash", "sim-sft-"),
    ("one-node-evicted-then-complete", False, "Complete", True, True, "", None),
    ("group-deadline", True, "Failed", True, False, "deadline", None),
    ("group-crashed-rank", True, "Failed", True, False, "crash", "sim-sft-1-"),
    ("group-suspended", True, "Suspended", False, False, "", None),
]


@pytest.mark.parametrize("name,group,job_state,over,succeeded,cause,pod", CASES, ids=[c[0] for c in CASES])
def test_reading_a_recorded_job(name, group, job_state, over, succeeded, cause, pod):
    job, pods = recorded(name)
    reading = state.read(job, pods, group=group)
    assert (reading.state, reading.over, reading.succeeded, reading.cause) == (job_state, over, succeeded, cause)
    assert (reading.pod or "").startswith(pod or "") and bool(reading.pod) == bool(pod)


def test_exit_2_on_a_target_before_1_31_ends_the_stage_without_a_restart():
    """Issue 26 (6): without podFailurePolicy (a 1.29 target) the Job fails as BackoffLimitExceeded whatever its
    pod's exit code, and the launcher, which retries such Jobs, decides from the pod: exit 2 is a user error, not
    restarted, though backoff_limit allows one. Real objects: the 1.29-rendered Job on the control plane."""
    from jobs.stage_resources import resolve
    from launcher import render
    from tests.launcher.conftest import SINGLE, make

    job, pods = recorded("exit-2-target-1.29")
    assert "podFailurePolicy" not in job["spec"] and state.failure(job)["reason"] == "BackoffLimitExceeded"
    old = make(SINGLE, **{"kubernetes.target_version": "1.29", "kubernetes.backoff_limit": 1})
    restartable = render.retried_by_launcher(old, resolve(old, "sft"))
    assert restartable, "before 1.31 the launcher, not the Job, retries a one-node stage"
    reading = state.read(job, pods)
    assert (reading.cause, reading.exit_codes) == ("user-error", (2,))
    step = state.next_step(reading, restartable=restartable, failures=0, disruptions=0, backoff_limit=1,
                           max_disruption_restarts=2)
    assert step.action == "failed"


def test_a_failed_job_says_its_reason_once():
    """Failed copies FailureTarget's reason and message (issue 10, defect 4)."""
    job, _ = recorded("exit-1-backoff-limit")
    assert state.failure_message(job) == "BackoffLimitExceeded: Job has reached the specified backoff limit"


def test_the_controllers_deletions_carry_no_disruption_target():
    """What the crashed-rank reading rests on: the peer the Job controller deletes is not 'disrupted'."""
    job, pods = recorded("group-crashed-rank")
    assert state.failure(job)["reason"] == "BackoffLimitExceeded"
    assert [p for p in pods if state.disruption(p)] == []


def test_a_suspended_group_whose_pods_are_deleted_is_not_broken():
    job, pods = recorded("group-suspended")
    assert state.condition(job, "Suspended")["reason"] == "JobSuspended"
    assert state.read(job, pods, group=True).over is False


def test_a_job_in_failure_target_counts_as_failed_already():
    """The interim condition, before Failed (issue 10, defect 4)."""
    job, pods = recorded("group-crashed-rank")
    interim = [c for c in job["status"]["conditions"] if c["type"] not in ("Failed",)]
    job = {**job, "status": {**job["status"], "conditions": interim}}
    assert state.job_state(job) == "Failed" and state.read(job, pods, group=True).cause == "crash"


def test_pods_terminating_are_not_pending():
    """Issue 10, defect 4: status.active leaves out the pods being deleted (here, of a suspended Job)."""
    job, _ = recorded("group-suspended")
    unsuspended = {**job, "status": {**job["status"], "conditions": []}}
    assert (job["status"].get("active", 0), job["status"]["terminating"]) == (0, 2)
    assert state.job_state(unsuspended) == "Terminating"


def test_an_unschedulable_pod_is_a_problem_with_the_schedulers_message():
    _, pods = recorded("unschedulable")
    ((key, line),) = state.pod_problems(pods, datetime.now(timezone.utc))
    assert key[1] == "PodScheduled" and "cannot be scheduled: Unschedulable: 0/" in line


STEP_CASES = [
    # name, cause, restartable, failures, disruptions -> action, counted
    ("success", "", True, 0, 0, "succeeded", False),
    ("exit 2 is never restarted", "user-error", True, 0, 0, "failed", False),
    ("the deadline is never restarted", "deadline", True, 0, 0, "failed", False),
    ("a crash restarts, counted", "crash", True, 0, 0, "restart", True),
    ("a crash past backoff_limit fails", "crash", True, 1, 0, "failed", False),
    ("a disruption restarts, not counted", "disruption", True, 1, 0, "restart", False),
    ("disruptions are bounded too", "disruption", True, 0, 2, "failed", False),
    ("a Job that retries by itself is not restarted", "crash", False, 0, 0, "failed", False),
]


@pytest.mark.parametrize("name,cause,restartable,failures,disruptions,action,counted", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_next_step(name, cause, restartable, failures, disruptions, action, counted):
    reading = state.Reading("Complete" if not cause else "Failed", over=True, succeeded=not cause, cause=cause)
    step = state.next_step(
        reading, restartable=restartable, failures=failures, disruptions=disruptions, backoff_limit=1,
        max_disruption_restarts=2,
    )  # fmt: skip
    assert (step.action, step.counted) == (action, counted)


def test_a_resumed_log_repeats_no_line_and_loses_none():
    """Issue 10, defect 6: the stream resumes from the second of the last line; lines of that second
    already shown are dropped, those after are new (timestamps as the kubelet writes them)."""
    cursor = state.LogCursor()
    first = ["2026-01-01T00:00:05.1Z a", "2026-01-01T00:00:05.1Z b", "2026-01-01T00:00:05.25Z c"]
    assert [cursor.fresh(line) for line in first] == ["a", "b", "c"]
    assert cursor.since_time() == "2026-01-01T00:00:05Z"
    cursor.resumed()
    again = ["2026-01-01T00:00:05.1Z a", "2026-01-01T00:00:05.1Z b", "2026-01-01T00:00:05.25Z c",
             "2026-01-01T00:00:05.25Z d", "2026-01-01T00:00:06Z e"]  # fmt: skip
    assert [cursor.fresh(line) for line in again] == [None, None, None, "d", "e"]


def test_a_suspended_jobs_wait_says_how_long_admission_timeout_leaves_it():
    """The follower's next look is bounded by ``left_s``: from the Suspended condition's last change (its creation
    where it has none), none without a timeout."""
    job, _ = recorded("group-suspended")
    since = state.parse_time(state.condition(job, "Suspended")["lastTransitionTime"])
    ten_later = since + timedelta(seconds=10)
    assert state.admission(job, None, queued=True, now=ten_later, timeout_s=60).left_s == 50
    assert state.admission(job, None, queued=True, now=ten_later, timeout_s=float("inf")).left_s == float("inf")
    created = {**job, "status": {}}
    created_at = state.parse_time(job["metadata"]["creationTimestamp"])
    assert state.admission(created, None, queued=True, now=created_at + timedelta(seconds=25), timeout_s=60).left_s == 35
