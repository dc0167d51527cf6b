"""What a Job and its pods say happened, and what the launcher does next: Kubernetes' semantics in one place.

Pure functions of the objects as the API returns them (plain dicts); no client, no clock of their
own. What they rely on, from the Job controller of Kubernetes 1.34 (pkg/controller/job/
job_controller.go, pod_failure_policy.go, success_policy.go) and the API server:

- **Ending is two steps.** When a Job has failed (``backoffLimit`` spent, a ``FailJob`` rule of
  its ``podFailurePolicy``, ``activeDeadlineSeconds``), the controller first adds the interim
  condition ``FailureTarget`` with the reason and message, deletes the pods still running, and
  adds ``Failed`` (a copy of the reason and message) only once they have terminated, which takes
  up to their grace period. Success likewise: ``SuccessCriteriaMet``, then ``Complete``. So the
  interim condition is the outcome already, and its message is said once.
- **The controller's deletions are consequences, not causes.** The pods it deletes when the Job
  fails get a ``deletionTimestamp`` and no ``DisruptionTarget``. The cause is a pod that failed
  by itself (phase Failed, not being deleted: exit 1, OOM, an NCCL error) or a pod taken away,
  which carries ``DisruptionTarget`` (set by the Eviction API, the scheduler's preemption, a node
  drain or taint; never by the Job controller).
- **Suspended is waiting.** A suspended Job (``spec.suspend``: Kueue queues Jobs this way) has its
  pods deleted and the ``Suspended`` condition; whoever suspended it resumes it. Recreating it
  would lose its place in the queue.
- ``status.active`` leaves out the pods being deleted; ``status.terminating`` counts them.
- A pod the scheduler cannot place has ``PodScheduled=False``, reason ``Unschedulable`` and a
  message naming what every node lacked. One that stays ``ContainerCreating`` is stuck on its
  volumes or its sandbox (the reason is in its Events).

A multi-node stage is one Indexed Job with ``backoffLimit: 0`` that the launcher restarts whole
(render.py's docstring); ``next_step`` is that policy: exit 2, exit 3 and the deadline end the stage, a
disruption restarts it without counting, anything else counts against ``backoff_limit``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from jobs.contract import EXIT_REGRESSED, EXIT_USER_ERROR, UserError
from jobs.recipe import RECIPE_ENV, from_dict
from launcher.render import ANNOTATION_FINGERPRINT, COMPLETION_INDEX_ANNOTATION, CONTAINER, CRONJOB_SCHEDULED_ANNOTATION

# Waiting reasons of a container that will not start by itself; each reported once.
STUCK_REASONS = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
)
# A pod ContainerCreating longer than this is reported (an image pull of a large CUDA image can take minutes).
CREATING_TOO_LONG_S = 300.0


# ---------------------------------------------------------------------------------------------
# Conditions and states


def condition(obj: dict, kind: str) -> dict | None:
    """The condition ``kind`` of a Job or pod when it is True."""
    for c in obj.get("status", {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def failure(job: dict) -> dict | None:
    """``Failed``, or the interim ``FailureTarget`` the controller sets while pods terminate."""
    return condition(job, "Failed") or condition(job, "FailureTarget")


def succeeded(job: dict) -> bool:
    return bool(condition(job, "Complete") or condition(job, "SuccessCriteriaMet"))


def job_state(job: dict) -> str:
    """Complete, Failed, Suspended (e.g. queued by Kueue), Running, Terminating or Pending.
    Complete and Failed include their interim conditions: nothing the Job does changes them."""
    if succeeded(job):
        return "Complete"
    if failure(job):
        return "Failed"
    if condition(job, "Suspended"):
        return "Suspended"
    status = job.get("status", {})
    if status.get("active"):
        return "Running"
    if status.get("terminating"):
        return "Terminating"
    return "Pending"


def is_finished(job: dict) -> bool:
    return job_state(job) in ("Complete", "Failed")


def failure_message(job: dict) -> str:
    """The failure's ``reason: message``, once (``Failed`` repeats its ``FailureTarget``)."""
    c = failure(job) or {}
    return f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ")


# ---------------------------------------------------------------------------------------------
# Pods


def name_of(obj: dict) -> str:
    return obj["metadata"]["name"]


def completion_index(pod: dict) -> int:
    return int(pod.get("metadata", {}).get("annotations", {}).get(COMPLETION_INDEX_ANNOTATION, 0))


def terminated(pod: dict) -> dict | None:
    """The stage container's ``state.terminated``, once it has ended."""
    for status in pod.get("status", {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            return (status.get("state") or {}).get("terminated")
    return None


def exit_code(pod: dict) -> int | None:
    ended = terminated(pod)
    return int(ended["exitCode"]) if ended and ended.get("exitCode") is not None else None


def exit_codes(pods: list[dict]) -> tuple[int, ...]:
    """The non-zero exit codes of the stage container, one a pod."""
    return tuple(code for code in map(exit_code, pods) if code)


def disruption(pod: dict) -> dict | None:
    return condition(pod, "DisruptionTarget")


def deleting(pod: dict) -> bool:
    return bool(pod.get("metadata", {}).get("deletionTimestamp"))


def pod_done(pod: dict) -> bool:
    return pod.get("status", {}).get("phase") in ("Succeeded", "Failed")


def failed_by_itself(pod: dict) -> bool:
    """Failed, and not because someone deleted or disrupted it."""
    return pod.get("status", {}).get("phase") == "Failed" and not deleting(pod) and not disruption(pod)


def _finished_at(pod: dict) -> str:
    return (terminated(pod) or {}).get("finishedAt") or pod["metadata"].get("creationTimestamp", "")


def pod_failure(pod: dict) -> str:
    """``pod NAME failed with exit code N (Reason)``, or ``was disrupted (...)``."""
    gone = disruption(pod)
    if gone:
        why = f"{gone.get('reason', '')}: {gone.get('message', '')}".strip(": ")
        return f"pod {name_of(pod)} was disrupted" + (f" ({why})" if why else "")
    code, reason = exit_code(pod), (terminated(pod) or {}).get("reason") or pod.get("status", {}).get("reason")
    text = f"pod {name_of(pod)} failed"
    if code is not None:
        text += f" with exit code {code}"
    return text + (f" ({reason})" if reason and reason not in ("Error", "Failed") else "")


# ---------------------------------------------------------------------------------------------
# Job + pods -> what happened


@dataclass(frozen=True)
class Reading:
    """What a Job attempt says: ``over`` once nothing more will come of it (or, for a group, once
    it cannot go on); then ``succeeded``, or ``cause`` of the failure and the ``pod`` it began with."""

    state: str
    over: bool = False
    succeeded: bool = False
    cause: str = ""  # user-error, regressed, deadline, disruption, crash (another failure), or "" while it goes on
    message: str = ""  # one line: why it failed
    pod: str | None = None
    exit_codes: tuple[int, ...] = ()

    @property
    def user_error(self) -> bool:
        return self.cause == "user-error"

    @property
    def disrupted(self) -> bool:
        return self.cause == "disruption"


def read(job: dict, pods: list[dict], *, group: bool = False) -> Reading:
    """Job + its pods -> a Reading. ``group``: a multi-node stage, over as soon as a rank is
    being disrupted (its peers would wait in NCCL until the collective timeout)."""
    state = job_state(job)
    if state == "Complete":
        return Reading(state, over=True, succeeded=True)
    codes = exit_codes(pods)
    ended = failure(job)
    if ended is None:
        taken = [p for p in pods if disruption(p)] if group else []
        if taken:
            return Reading(state, over=True, cause="disruption", message=pod_failure(taken[0]), pod=name_of(taken[0]))
        return Reading(state)
    message = failure_message(job)
    if ended.get("reason") == "DeadlineExceeded":
        return Reading(state, over=True, cause="deadline", message=message, exit_codes=codes)
    crashed = sorted((p for p in pods if failed_by_itself(p)), key=_finished_at)
    taken = [p for p in pods if disruption(p)]
    if EXIT_REGRESSED in codes:  # evaluate: the run worked and scored worse than the last good night; no retry helps
        culprit = next((name_of(p) for p in crashed if exit_code(p) == EXIT_REGRESSED), None)
        return Reading(state, over=True, cause="regressed", message=message, pod=culprit, exit_codes=codes)
    if EXIT_USER_ERROR in codes or ended.get("reason") == "PodFailurePolicy":
        culprit = next((name_of(p) for p in crashed if exit_code(p) == EXIT_USER_ERROR), None)
        return Reading(state, over=True, cause="user-error", message=message, pod=culprit, exit_codes=codes)
    # A rank taken away makes its peers fail too (NCCL errors): the disruption is the cause.
    for cause, culprits in (("disruption", taken), ("crash", crashed)):
        if culprits:
            first = culprits[0]
            message = f"{message}; {pod_failure(first)}"
            return Reading(state, over=True, cause=cause, message=message, pod=name_of(first), exit_codes=codes)
    return Reading(state, over=True, cause="crash", message=message, exit_codes=codes)


# ---------------------------------------------------------------------------------------------
# What to do about it


@dataclass(frozen=True)
class Step:
    action: str  # succeeded, failed, restart
    counted: bool = False  # a restart that spends one of backoff_limit
    why: str = ""


def next_step(
    reading: Reading,
    *,
    restartable: bool,
    failures: int,
    disruptions: int,
    backoff_limit: int,
    max_disruption_restarts: int,
) -> Step:
    """After an attempt is over: done, failed for good, or restart (the launcher's retry of a group,
    counted or not). ``restartable``: the launcher, not the Job, retries this stage (a group, or a
    target without podFailurePolicy), and the Job was not found failed already."""
    if reading.succeeded:
        return Step("succeeded")
    if reading.user_error or reading.cause in ("deadline", "regressed") or not restartable:
        return Step("failed")
    if reading.disrupted:
        if disruptions < max_disruption_restarts:
            why = f"disruption {disruptions + 1} of at most {max_disruption_restarts}, not counted as a failure"
            return Step("restart", counted=False, why=why)
        return Step("failed")
    if failures < backoff_limit:
        return Step("restart", counted=True, why=f"failure {failures + 1} of at most {backoff_limit} retries")
    return Step("failed")


# ---------------------------------------------------------------------------------------------
# A Job made from another recipe


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):  # an empty mapping adds no key: {} -> {lr: 1} differs in .lr alone
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def recipe_changes(job: dict, fingerprint: str, recipe: dict) -> list[str] | None:
    """None when ``job`` was made from the recipe of ``fingerprint`` (render's annotation); else the dotted keys whose
    values differ between the recipe the Job runs (its container's $VLMJOBS_RECIPE) and ``recipe`` (resolved alike)."""
    annotations = job.get("metadata", {}).get("annotations") or {}
    if annotations.get(ANNOTATION_FINGERPRINT, fingerprint) == fingerprint:
        return None
    containers = job.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or [{}]
    text = next((e.get("value") for e in containers[0].get("env") or [] if e.get("name") == RECIPE_ENV), None)
    if text is None:
        return ["(the Job carries no recipe to compare)"]
    old = json.loads(text)
    try:  # a key added to the schema since the Job was made takes its default there too: not a change of recipe
        old = from_dict(old, origin="the Job's recipe").to_dict()
    except UserError:  # a key since removed: compared as it is
        pass
    old, new = _flat(old), _flat(recipe)
    changes = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    return changes or None


# ---------------------------------------------------------------------------------------------
# The night a nightly driver runs for


def night_of(job: dict | None, time_zone: str, now: datetime) -> str:
    """YYYYMMDD of the night the driver's Job was scheduled for, the same for every pod the Job retries (a driver
    restarted after midnight continues that night's run instead of starting a second pipeline): the CronJob
    controller's ``batch.kubernetes.io/cronjob-scheduled-timestamp`` (RFC 3339 in the CronJob's time zone); a Job
    made by hand (``kubectl create job --from=cronjob/...`` sets none) is dated by its creation in ``time_zone``;
    with no Job (a driver outside the cluster), ``now``."""
    from zoneinfo import ZoneInfo

    meta = (job or {}).get("metadata", {})
    scheduled = (meta.get("annotations") or {}).get(CRONJOB_SCHEDULED_ANNOTATION)
    if scheduled:
        return datetime.fromisoformat(scheduled).strftime("%Y%m%d")
    created = meta.get("creationTimestamp")
    moment = parse_time(created) if created else now
    return moment.astimezone(ZoneInfo(time_zone)).strftime("%Y%m%d")


def ends_at(job: dict | None) -> datetime | None:
    """When the Job controller ends ``job`` for its deadline (status.startTime + spec.activeDeadlineSeconds), or None
    without either. A nightly driver's stage Jobs are bounded by it: the driver killed at its deadline would otherwise
    leave a stage running into the next night, holding GPUs that night's run then waits for."""
    if not job:
        return None
    started, deadline = job.get("status", {}).get("startTime"), job.get("spec", {}).get("activeDeadlineSeconds")
    if not started or not deadline:
        return None
    return parse_time(started) + timedelta(seconds=deadline)


def nights_not_started(cronjob: dict, events: list[dict], jobs: list[dict]) -> list[str]:
    """Why the CronJob's recent nights did not start, from what the CronJob controller recorded on it (its events, kept
    an hour by default): ``JobAlreadyActive``, a night still running when the next was due (concurrencyPolicy
    Forbid), naming that night; ``MissSchedule``, a start missed by more than startingDeadlineSeconds (the controller
    was down or the CronJob suspended). One line each, newest last."""
    name = name_of(cronjob)
    by_name = {name_of(job): job for job in jobs}
    lines = []
    for event in sorted(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or ""):
        when = event.get("lastTimestamp") or event.get("eventTime") or "?"
        times = f"{event.get('count', 1)} times, last at {when}" if event.get("count", 1) > 1 else f"at {when}"
        if event.get("reason") == "JobAlreadyActive":
            running = [by_name.get(ref.get("name"), {"metadata": {"name": ref.get("name")}})
                       for ref in cronjob.get("status", {}).get("active") or []]
            nights = ", ".join(f"the night of {_scheduled(job)} (Job {name_of(job)})" for job in running) or "the previous night"
            lines.append(f"{name}: a night did not start ({times}): {nights} was still running, and concurrencyPolicy "
                         "Forbid keeps one night at a time (kubernetes.nightly_deadline_hours bounds a night)")
        elif event.get("reason") == "MissSchedule":
            lines.append(f"{name}: a night did not start ({times}): {event.get('message', '')} (more than "
                         "startingDeadlineSeconds late: the CronJob controller was down or the CronJob suspended)")
    return lines


def _scheduled(job: dict) -> str:
    meta = job.get("metadata", {})
    return (meta.get("annotations") or {}).get(CRONJOB_SCHEDULED_ANNOTATION) or meta.get("creationTimestamp") or "?"


# ---------------------------------------------------------------------------------------------
# Pods that do not start, and claims a group cannot share


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def pod_problems(pods: list[dict], now: datetime, *, creating_too_long_s: float = CREATING_TOO_LONG_S) -> list[tuple]:
    """(key, line) for each pod that will not start by itself: unschedulable, an image that cannot
    be pulled, or ContainerCreating for too long. The key is stable, so a caller says each once."""
    problems = []
    for pod in pods:
        if deleting(pod) or pod_done(pod):
            continue
        name = name_of(pod)
        unscheduled = next(
            (c for c in pod.get("status", {}).get("conditions") or [] if c.get("type") == "PodScheduled"), None
        )
        if unscheduled and unscheduled.get("status") == "False":
            why = f"{unscheduled.get('reason', '')}: {unscheduled.get('message', '')}".strip(": ")
            problems.append(((name, "PodScheduled"), f"pod {name} cannot be scheduled: {why}"))
        for status in pod.get("status", {}).get("containerStatuses") or []:
            waiting = (status.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason in STUCK_REASONS:
                problems.append(((name, reason), f"pod {name}: {reason}: {waiting.get('message', '')}".rstrip(": ")))
            elif reason == "ContainerCreating" and unscheduled and unscheduled.get("lastTransitionTime"):
                waited = (now - parse_time(unscheduled["lastTransitionTime"])).total_seconds()
                if waited > creating_too_long_s:
                    problems.append((
                        (name, reason),
                        f"pod {name} has been ContainerCreating for {waited:.0f}s: a volume that cannot attach or "
                        f"mount (a ReadWriteOnce claim in use on another node?) or its sandbox; "
                        f"kubectl describe pod {name} shows which",
                    ))  # fmt: skip
    return problems


def shared_claim_refusal(pvc: dict, stage: str, nodes: int) -> str | None:
    """Why ``nodes`` pods on different nodes cannot all mount the claim, or None: every rank
    reads and writes the run folder, and ReadWriteOnce(Pod) attaches to one node at a time."""
    modes = pvc.get("spec", {}).get("accessModes") or []
    if nodes < 2 or "ReadWriteMany" in modes:
        return None
    return (
        f"{stage}: {nodes} nodes cannot share PersistentVolumeClaim {pvc['metadata'].get('namespace')}/{name_of(pvc)} "
        f"({', '.join(modes) or 'no access mode'}): a multi-node stage needs ReadWriteMany "
        "(make k8s K8S_ARGS=--access_mode=ReadWriteMany, on a storage class that offers it)"
    )


# ---------------------------------------------------------------------------------------------
# Resuming a dropped log stream


def _timestamp_key(stamp: str) -> tuple[str, int]:
    """RFC3339Nano drops trailing zeros, so '...05.1Z' > '...05.09Z' is compared as numbers."""
    base, _, frac = stamp.rstrip("Z").partition(".")
    return base, int(frac.ljust(9, "0")[:9] or 0)


@dataclass
class LogCursor:
    """Where a followed log got to, from the timestamps the kubelet puts on each line
    (``timestamps=true``): the stream resumes from ``since_time()`` (whole seconds, all the API
    takes), and ``fresh`` drops the lines of that second already shown, so none is repeated or lost."""

    last: tuple[str, int] | None = None
    seen_at_last: int = 0  # lines shown with exactly the last timestamp
    replayed: int = 0  # lines of the last timestamp met again in this stream

    def since_time(self) -> str | None:
        return f"{self.last[0]}Z" if self.last else None

    def fresh(self, stamped: str) -> str | None:
        """The line without its timestamp if not shown yet, else None."""
        stamp, _, text = stamped.partition(" ")
        key = _timestamp_key(stamp)
        if self.last is not None and key < self.last:
            return None
        if key == self.last:
            self.replayed += 1
            if self.replayed <= self.seen_at_last:
                return None
            self.seen_at_last += 1
            return text
        self.last, self.seen_at_last, self.replayed = key, 1, 1
        return text

    def resumed(self) -> None:
        """A new stream starts: the lines of the last second come again and are counted anew."""
        self.replayed = 0


# ---------------------------------------------------------------------------------------------
# Kueue: why a suspended Job waits (its Workload, kueue.x-k8s.io/v1beta2 as Kueue v0.17 serves and stores it)
#
# Kueue's job webhook suspends a Job that carries a queue-name label and its controller creates a Workload owned by the
# Job (an ownerReference to its uid). The scheduler writes why it is not admitted into the Workload's ``QuotaReserved``
# condition (False: reason Pending with "couldn't assign flavors to pod set main: insufficient quota ...", Inadmissible
# for a missing or stopped queue, Waiting under waitForPodsReady's blockAdmission); with quota reserved, ``Admitted``
# waits for admission checks. An evicted Workload (``Evicted``: Preempted, PodsReadyTimeout...) is requeued and its Job
# suspended until admitted again; only a deactivated one (``spec.active: false``, by an admin or after
# waitForPodsReady's requeuing limit: Evicted reason Deactivated...) is never admitted again by itself.


@dataclass(frozen=True)
class Admission:
    """Why a suspended Job waits (``line``, said when it changes), and ``ended``: why waiting is over without it;
    ``left_s``: the seconds until admission_timeout ends it, so that the follower looks again then, not a watch late."""

    line: str
    ended: str | None = None
    left_s: float = float("inf")


def owned_workload(owner: dict, workloads: list[dict]) -> dict | None:
    """The Workload Kueue made for ``owner`` (a Job or JobSet): the one whose ownerReference is its uid."""
    uid = owner.get("metadata", {}).get("uid")
    for workload in workloads:
        if any(ref.get("uid") == uid for ref in workload["metadata"].get("ownerReferences") or []):
            return workload
    return None


def _any_condition(obj: dict, kind: str) -> dict | None:
    for c in obj.get("status", {}).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return None


def _said(c: dict) -> str:
    return f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ")


def admission(job: dict, workload: dict | None, *, queued: bool, now: datetime, timeout_s: float) -> Admission:
    """Why the suspended ``job`` is not running, from its Workload (None: none found, or no Kueue to read), and whether
    the wait ends: its Workload deactivated, or suspended longer than ``timeout_s`` (kubernetes.admission_timeout)
    since the Job's ``Suspended`` condition last changed (its creation where it has none yet)."""
    if workload is None:
        line = ("waiting for Kueue to create its Workload" if queued
                else "suspended, with no Kueue Workload: resumed by whoever suspended it")
    else:
        name = workload["metadata"]["name"]
        evicted = condition(workload, "Evicted")
        if workload.get("spec", {}).get("active") is False or (evicted and evicted.get("reason", "").startswith("Deactivated")):
            why = _said(evicted) if evicted else "spec.active is false"
            return Admission(f"Kueue deactivated Workload {name}", ended=f"Kueue deactivated Workload {name} ({why}); "
                             "it is not admitted again unless reactivated (spec.active: true)")
        reserved, admitted = _any_condition(workload, "QuotaReserved"), _any_condition(workload, "Admitted")
        if evicted:
            line = f"evicted by Kueue ({_said(evicted)}): preempted, not failed; waiting to be admitted again"
        elif reserved and reserved.get("status") == "True":
            line = (f"admitted by Kueue (Workload {name}); resuming" if admitted and admitted.get("status") == "True"
                    else f"quota reserved by Kueue, waiting for admission checks ({_said(admitted or {}) or 'no reason given'})")
        else:
            line = f"not admitted by Kueue yet (Workload {name}): {_said(reserved or {}) or 'not yet considered'}"
    since = (condition(job, "Suspended") or {}).get("lastTransitionTime") or job["metadata"].get("creationTimestamp")
    waited = (now - parse_time(since)).total_seconds() if since else 0.0
    if waited > timeout_s:
        return Admission(line, ended=f"suspended for {waited:.0f} s, more than kubernetes.admission_timeout "
                                     f"({timeout_s:g} s): {line}")
    return Admission(line, left_s=timeout_s - waited)


# ---------------------------------------------------------------------------------------------
# JobSet (jobset.x-k8s.io/v1alpha2, JobSet v0.11: pkg/constants/constants.go for its reasons and messages)


def jobset_state(jobset: dict) -> str:
    """Completed, Failed, Suspended (Kueue suspends a JobSet through spec.suspend) or Running. The controller sets
    Completed (AllJobsCompleted) or Failed (FailJobSetFailurePolicyAction, ReachedMaxRestarts, FailedJobs) once."""
    if condition(jobset, "Completed"):
        return "Completed"
    if condition(jobset, "Failed"):
        return "Failed"
    if condition(jobset, "Suspended") or jobset.get("spec", {}).get("suspend"):
        return "Suspended"
    return "Running"


def jobset_restarts(jobset: dict) -> tuple[int, int]:
    """(restarts, those counted against failurePolicy.maxRestarts) as the controller counts them."""
    status = jobset.get("status", {})
    return int(status.get("restarts") or 0), int(status.get("restartsCountTowardsMax") or 0)


def first_failed_job(jobset: dict) -> str | None:
    """The child Job the JobSet failed for, which its Failed message names: "... (first failed job: <name>)"."""
    message = (condition(jobset, "Failed") or {}).get("message", "")
    found = re.search(r"\(first failed job: ([^)]+)\)", message)
    return found.group(1) if found else None
