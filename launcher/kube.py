"""Talking to the cluster with the official client: create, follow, logs, status, delete.

Objects travel as plain dicts both ways (the manifests from ``render``; answers read with
``_preload_content=False``, watch events from their ``raw_object``), so nothing here depends on
the client's model classes. Every API
error is wrapped with what was being done to which object, ``from`` the ApiException: 403 and
409 keep their own exceptions (``Forbidden`` names the missing RBAC verb and resource;
``AlreadyExists`` is a path, not a failure), 5xx and connection errors are ``ApiUnavailable``
(exit 1: worth a retry), and a failed Job is ``JobFailed`` with its condition messages and exit 2
when the stage exited 2.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from jobs.contract import EXIT_FAILURE, EXIT_USER_ERROR, UserError
from launcher.render import COMPLETION_INDEX_ANNOTATION, CONTAINER, JOB_NAME_LABEL

POLL_S = 5.0  # between pod checks while following; the tests shorten it

# Waiting reasons of a container that will not start by itself; reported once, as a warning.
STUCK_REASONS = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
)
RESOURCES = {  # kind -> (API group for the message, plural)
    "Job": ("batch", "jobs"),
    "Pod": ("", "pods"),
    "Pod log": ("", "pods/log"),
    "Service": ("", "services"),
}


# ---------------------------------------------------------------------------------------------
# Errors


class KubeError(Exception):
    """An API call or a Job went wrong; carries kind/namespace/name and the exit code to use."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, kind: str, namespace: str, name: str | None = None):
        super().__init__(message)
        self.kind, self.namespace, self.name = kind, namespace, name


class Forbidden(KubeError):
    """403: the user or ServiceAccount lacks an RBAC verb on a resource."""

    exit_code = EXIT_USER_ERROR  # fixed by an admin, not by retrying

    def __init__(self, message: str, *, verb: str, resource: str, **where):
        super().__init__(message, **where)
        self.verb, self.resource = verb, resource


class AlreadyExists(KubeError):
    """409 on create."""


class NotFound(KubeError):
    """404."""


class Gone(KubeError):
    """410: a watch asked for a version the API server no longer keeps."""


class ApiUnavailable(KubeError):
    """5xx, or no answer at all: the cluster, not the request, is at fault."""


class JobFailed(KubeError):
    """The Job ended Failed; ``conditions`` holds its condition messages."""

    def __init__(self, message: str, *, conditions: tuple[str, ...], exit_code: int, **where):
        super().__init__(message, **where)
        self.conditions = conditions
        self.exit_code = exit_code


class JobDeleted(KubeError):
    """The Job disappeared while it was being followed."""


def _status_message(e) -> str:
    try:
        return json.loads(e.body).get("message") or e.reason
    except (TypeError, ValueError, AttributeError):
        return str(e.reason or e).strip()


def _where(kind: str, namespace: str, name: str | None) -> str:
    return f"{kind} {namespace}/{name}" if name else f"{kind}s in namespace {namespace}"


# ---------------------------------------------------------------------------------------------
# Reading Jobs and pods (pure)


def condition(obj: dict, kind: str) -> dict | None:
    for c in obj.get("status", {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def job_state(job: dict) -> str:
    """Complete, Failed, Suspended (e.g. queued by Kueue), Running, or Pending."""
    for kind in ("Complete", "Failed", "Suspended"):
        if condition(job, kind):
            return kind
    return "Running" if job.get("status", {}).get("active") else "Pending"


def is_finished(job: dict) -> bool:
    return job_state(job) in ("Complete", "Failed")


def failure_messages(job: dict) -> tuple[str, ...]:
    return tuple(
        f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ")
        for c in job.get("status", {}).get("conditions") or []
        if c.get("type") in ("Failed", "FailureTarget") and c.get("status") == "True"
    )


def stage_exit_codes(pods: list[dict]) -> tuple[int, ...]:
    codes = []
    for pod in pods:
        for status in pod.get("status", {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated")
            if status.get("name") == CONTAINER and terminated and terminated.get("exitCode"):
                codes.append(int(terminated["exitCode"]))
    return tuple(codes)


def disrupted(pod: dict) -> bool:
    return condition(pod, "DisruptionTarget") is not None


def pod_done(pod: dict) -> bool:
    return pod.get("status", {}).get("phase") in ("Succeeded", "Failed")


def completion_index(pod: dict) -> int:
    return int(pod.get("metadata", {}).get("annotations", {}).get(COMPLETION_INDEX_ANNOTATION, 0))


@dataclass(frozen=True)
class Outcome:
    """How a Job attempt ended, read from the Job and its pods."""

    succeeded: bool
    reason: str = ""
    messages: tuple[str, ...] = ()
    exit_codes: tuple[int, ...] = ()
    disrupted: bool = False

    @property
    def user_error(self) -> bool:
        return EXIT_USER_ERROR in self.exit_codes

    @property
    def deadline(self) -> bool:
        return self.reason == "DeadlineExceeded"


def outcome(job: dict, pods: list[dict]) -> Outcome:
    if job_state(job) == "Complete":
        return Outcome(True)
    failed = condition(job, "Failed") or condition(job, "FailureTarget") or {}
    return Outcome(
        False,
        reason=failed.get("reason", ""),
        messages=failure_messages(job),
        exit_codes=stage_exit_codes(pods),
        disrupted=any(disrupted(p) for p in pods),
    )


def broken_group(pods: list[dict]) -> str | None:
    """Why a multi-node group cannot go on while its Job still runs: a rank failed, is being
    deleted, or is being disrupted. Its peers would otherwise wait in NCCL until the timeout."""
    for pod in pods:
        name = pod["metadata"]["name"]
        if pod.get("status", {}).get("phase") == "Failed":
            return f"pod {name} failed"
        disruption = condition(pod, "DisruptionTarget")
        if disruption:
            return f"pod {name} is being disrupted ({disruption.get('message') or disruption.get('reason', '')})"
        if pod.get("metadata", {}).get("deletionTimestamp"):
            return f"pod {name} is being deleted"
    return None


def status_table(jobs: list[dict]) -> str:
    """One line per Job: run, stage, state, pods active/succeeded/failed, and why it failed."""
    from launcher.render import LABEL_COMPONENT, LABEL_RUN

    rows = [("RUN", "STAGE", "STATE", "ACTIVE", "SUCCEEDED", "FAILED", "JOB", "MESSAGE")]
    for job in sorted(
        jobs,
        key=lambda j: (j["metadata"].get("labels", {}).get(LABEL_RUN, ""), j["metadata"].get("creationTimestamp", "")),
    ):
        meta, status = job["metadata"], job.get("status", {})
        rows.append((
            meta.get("labels", {}).get(LABEL_RUN, ""),
            meta.get("labels", {}).get(LABEL_COMPONENT, ""),
            job_state(job),
            str(status.get("active", 0)),
            str(status.get("succeeded", 0)),
            str(status.get("failed", 0)),
            meta["name"],
            "; ".join(failure_messages(job)),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows).rstrip()


# ---------------------------------------------------------------------------------------------
# The client


def connect(*, in_cluster: bool | None = None):
    """An ApiClient from the pod's ServiceAccount in a cluster, else from $KUBECONFIG or ~/.kube/config.
    Its own Configuration: nothing global is set, and $KUBECONFIG is read now, not at import."""
    from kubernetes import client, config

    if in_cluster is None:
        in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    configuration = client.Configuration()
    try:
        if in_cluster:
            config.load_incluster_config(client_configuration=configuration)
        else:
            path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
            config.load_kube_config(config_file=path, client_configuration=configuration)
    except config.ConfigException as e:
        where = "the pod's ServiceAccount" if in_cluster else "$KUBECONFIG or ~/.kube/config"
        raise UserError(f"no Kubernetes credentials in {where}: {e}") from e
    return client.ApiClient(configuration)


@dataclass
class Cluster:
    """One namespace of one cluster. ``out`` receives progress and log lines, one per call."""

    api: Any  # kubernetes.client.ApiClient
    namespace: str
    out: Callable[[str], None] = field(default=lambda line: print(line, flush=True))
    poll_s: float = field(default_factory=lambda: POLL_S)  # between pod checks
    watch_s: int = 60  # one watch request's server-side timeout; pods are checked between
    pods_gone_timeout_s: float = 900.0  # waiting for a finished Job's pods to terminate
    log_drain_s: float = 30.0  # after the Job ends, for the rest of its pod's log
    _reported: set = field(default_factory=set, init=False, repr=False)  # stuck pods already warned about

    def __post_init__(self):
        from kubernetes import client

        self.batch = client.BatchV1Api(self.api)
        self.core = client.CoreV1Api(self.api)

    # -- one call, with its errors wrapped ------------------------------------------------------

    def _call(self, verb: str, kind: str, name: str | None, fn: Callable, *args, **kwargs):
        import urllib3
        from kubernetes.client.exceptions import ApiException

        where = _where(kind, self.namespace, name)
        ids = {"kind": kind, "namespace": self.namespace, "name": name}
        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            message = _status_message(e)
            group, resource = RESOURCES[kind]
            if e.status == 403:
                qualified = f"{resource}.{group}" if group else resource
                raise Forbidden(
                    f"cannot {verb} {where}: forbidden ({message}); the Role bound to your user or ServiceAccount "
                    f"needs verb '{verb}' on resource '{qualified}' in namespace {self.namespace} (k8s/rbac.yaml)",
                    verb=verb,
                    resource=qualified,
                    **ids,
                ) from e
            if e.status == 409:
                raise AlreadyExists(f"{where} already exists", **ids) from e
            if e.status == 404:
                raise NotFound(f"{where} not found", **ids) from e
            if e.status == 410:
                raise Gone(f"cannot {verb} {where}: {message}", **ids) from e
            if not e.status or e.status >= 500:
                raise ApiUnavailable(f"cannot {verb} {where}: API server error {e.status} ({message})", **ids) from e
            raise KubeError(f"cannot {verb} {where}: {e.status} {message}", **ids) from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise ApiUnavailable(f"cannot {verb} {where}: no answer from the API server ({e})", **ids) from e

    @staticmethod
    def _json(response) -> dict:
        try:
            return json.loads(response.data)
        finally:
            response.release_conn()

    # -- the calls every kind shares ---------------------------------------------------------------

    def _create(self, kind: str, create: Callable, manifest: dict) -> dict:
        name = manifest["metadata"]["name"]
        return self._json(self._call("create", kind, name, create, self.namespace, manifest, _preload_content=False))

    def _delete(self, kind: str, delete: Callable, name: str, **options) -> bool:
        """False where there was nothing to delete."""
        try:
            self._json(self._call("delete", kind, name, delete, name, self.namespace, _preload_content=False, **options))
        except NotFound:
            return False
        return True

    def _list(self, kind: str, list_: Callable, label_selector: str) -> list[dict]:
        answer = self._call("list", kind, None, list_, self.namespace, label_selector=label_selector, _preload_content=False)
        return self._json(answer).get("items", [])

    # -- Jobs ------------------------------------------------------------------------------------

    def get_job(self, name: str) -> dict | None:
        try:
            answer = self._call("get", "Job", name, self.batch.read_namespaced_job, name, self.namespace, _preload_content=False)
        except NotFound:
            return None
        return self._json(answer)

    def create_job(self, manifest: dict) -> dict:
        return self._create("Job", self.batch.create_namespaced_job, manifest)

    def delete_job(self, name: str) -> bool:
        """Delete with foreground propagation: the Job goes once its pods are gone. False if absent."""
        return self._delete("Job", self.batch.delete_namespaced_job, name, propagation_policy="Foreground")

    def list_jobs(self, label_selector: str) -> list[dict]:
        return self._list("Job", self.batch.list_namespaced_job, label_selector)

    def watch_job(self, name: str, resource_version: str) -> Iterator[dict]:
        """Events on one Job from ``resource_version`` on, for up to ``watch_s`` seconds."""
        from kubernetes import watch

        stream = watch.Watch().stream(
            self.batch.list_namespaced_job,
            self.namespace,
            field_selector=f"metadata.name={name}",
            resource_version=resource_version,
            timeout_seconds=self.watch_s,
            allow_watch_bookmarks=True,
            # Not deserialize=False: with it, kubernetes 37.0.2 fails on an ERROR event (410) with
            # KeyError 'raw_object' inside Watch.stream. We read event["raw_object"], a plain dict.
        )
        while True:
            try:
                event = self._call("watch", "Job", name, next, stream)
            except StopIteration:
                return
            yield event

    # -- pods and logs ---------------------------------------------------------------------------

    def list_pods(self, job: str) -> list[dict]:
        return self._list("Pod", self.core.list_namespaced_pod, f"{JOB_NAME_LABEL}={job}")

    def stream_log(self, pod: str, *, follow: bool = True) -> Iterator[str]:
        """The stage container's log, line by line, as the kubelet sends it."""
        response = self._call(
            "get", "Pod log", pod, self.core.read_namespaced_pod_log, pod, self.namespace,
            container=CONTAINER, follow=follow, _preload_content=False,
        )  # fmt: skip
        buffer = b""
        try:
            for chunk in response.stream(4096):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
            if buffer:
                yield buffer.decode("utf-8", "replace")
        finally:
            response.release_conn()

    # -- Services --------------------------------------------------------------------------------

    def create_service(self, manifest: dict) -> dict:
        return self._create("Service", self.core.create_namespaced_service, manifest)

    def delete_service(self, name: str) -> bool:
        return self._delete("Service", self.core.delete_namespaced_service, name)

    # -- following -------------------------------------------------------------------------------

    def follow(self, name: str, *, logs: bool = True, group: bool = False) -> Outcome:
        """Follow a Job to its end: its state changes, and its pod's log when ``logs`` (the pod of
        index 0 for a group). ``group``: end early, failed, when one rank of a multi-node Job goes
        (see ``broken_group``). Raises JobDeleted if the Job disappears meanwhile."""
        job = self.get_job(name)
        if job is None:
            raise JobDeleted(
                f"Job {self.namespace}/{name} does not exist (deleted, or removed by its TTL)",
                kind="Job",
                namespace=self.namespace,
                name=name,
            )
        stop = threading.Event()
        pump = threading.Thread(target=self._pump_logs, args=(name, stop), daemon=True) if logs else None
        if pump:
            pump.start()
        try:
            state = None

            def announce(job: dict) -> None:
                nonlocal state
                if job_state(job) != state:
                    state = job_state(job)
                    self.out(f"==> Job {self.namespace}/{name}: {state}")

            while True:
                announce(job)
                if is_finished(job):
                    return outcome(job, self.list_pods(name))
                pods = self.list_pods(name)
                self._report_stuck(pods)
                reason = broken_group(pods) if group else None
                if reason:
                    went = any(disrupted(p) or p["metadata"].get("deletionTimestamp") for p in pods)
                    return Outcome(
                        False,
                        reason="GroupBroken",
                        messages=(reason,),
                        exit_codes=stage_exit_codes(pods),
                        disrupted=went,
                    )
                try:
                    for event in self.watch_job(name, job["metadata"].get("resourceVersion", "")):
                        kind, obj = event["type"], event["raw_object"]
                        if kind == "DELETED":
                            raise JobDeleted(
                                f"Job {self.namespace}/{name} was deleted while being followed",
                                kind="Job",
                                namespace=self.namespace,
                                name=name,
                            )
                        if kind == "BOOKMARK":
                            job["metadata"]["resourceVersion"] = obj["metadata"]["resourceVersion"]
                            continue
                        job = obj
                        announce(job)
                        if is_finished(job):
                            break
                except Gone:
                    job = self.get_job(name) or job  # our version is too old to watch from: read it anew
        finally:
            stop.set()
            if pump:
                pump.join(timeout=self.log_drain_s)

    def _report_stuck(self, pods: list[dict]) -> None:
        for pod in pods:
            for status in pod.get("status", {}).get("containerStatuses") or []:
                waiting = (status.get("state") or {}).get("waiting") or {}
                key = (pod["metadata"]["name"], waiting.get("reason"))
                if waiting.get("reason") in STUCK_REASONS and key not in self._reported:
                    self._reported.add(key)
                    message = f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
                    self.out(f"warning: pod {self.namespace}/{key[0]}: {message}")

    def _pump_logs(self, job: str, stop: threading.Event) -> None:
        """Stream the leader pod's log; when a retry starts a new pod, stream that one too."""
        streamed: set[str] = set()
        while True:
            try:
                pods = [
                    p for p in self.list_pods(job) if completion_index(p) == 0 and p["metadata"]["name"] not in streamed
                ]
                started = [p for p in pods if p.get("status", {}).get("phase") in ("Running", "Succeeded", "Failed")]
                if started:
                    pod = max(started, key=lambda p: p["metadata"].get("creationTimestamp", ""))
                    streamed.add(pod["metadata"]["name"])
                    for line in self.stream_log(pod["metadata"]["name"]):
                        self.out(line)
                    continue
            except KubeError as e:
                print(f"warning: no logs: {e}", file=sys.stderr, flush=True)
                return
            if stop.is_set():
                return
            stop.wait(self.poll_s)

    def print_log(self, job: str, *, index: int = 0, follow: bool = True) -> None:
        """The log of the Job's newest pod of completion ``index``."""
        if self.get_job(job) is None:
            raise NotFound(
                f"Job {self.namespace}/{job} not found (vlmjobs status lists the Jobs)",
                kind="Job",
                namespace=self.namespace,
                name=job,
            )
        pods = [p for p in self.list_pods(job) if completion_index(p) == index]
        if not pods:
            raise NotFound(
                f"Job {self.namespace}/{job} has no pod of index {index} yet", kind="Pod", namespace=self.namespace
            )
        pod = max(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))
        for line in self.stream_log(pod["metadata"]["name"], follow=follow):
            self.out(line)

    def wait_pods_terminated(self, name: str) -> None:
        """Until no pod of the Job is still running or terminating: a ReadWriteOnce volume
        attaches to one node at a time, and the next stage must not race the last one's writes."""
        deadline = time.monotonic() + self.pods_gone_timeout_s
        while True:
            left = [
                p["metadata"]["name"]
                for p in self.list_pods(name)
                if not pod_done(p) or p["metadata"].get("deletionTimestamp")
            ]
            if not left:
                return
            if time.monotonic() > deadline:
                waited = f"{self.pods_gone_timeout_s:.0f}s"
                message = f"Job {self.namespace}/{name}: pods {', '.join(left)} still not terminated after {waited}"
                raise KubeError(message, kind="Job", namespace=self.namespace, name=name)
            time.sleep(self.poll_s)

    def wait_job_gone(self, name: str) -> None:
        """Until a deleted Job (and so, with foreground deletion, its pods) no longer exists."""
        deadline = time.monotonic() + self.pods_gone_timeout_s
        while self.get_job(name) is not None:
            if time.monotonic() > deadline:
                raise KubeError(
                    f"Job {self.namespace}/{name} still there {self.pods_gone_timeout_s:.0f}s after deletion",
                    kind="Job",
                    namespace=self.namespace,
                    name=name,
                )
            time.sleep(self.poll_s)
