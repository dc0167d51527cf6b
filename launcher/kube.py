"""Talking to the cluster with the official client: create, follow, logs, status, delete.

Objects travel as plain dicts both ways (the manifests from ``render``; answers read with
``_preload_content=False``, watch events from their ``raw_object``), so nothing here depends on
the client's model classes. What a Job and its pods mean is ``launcher.state``; this module only
fetches them. Every API error is wrapped with what was being done to which object, ``from`` the
ApiException: 403 and 409 keep their own exceptions (``Forbidden`` names the missing RBAC verb
and resource; ``AlreadyExists`` is a path, not a failure), 5xx, 429 and connection errors are
``ApiUnavailable`` (exit 1: worth a retry), and a failed Job is ``JobFailed`` with its condition
message and exit 2 when the stage exited 2.

Following a Job survives the control plane: reads and watches are retried with a bounded backoff
(``Retry-After`` honoured), every request has a client-side timeout (a half-open connection
cannot hang it) and every watch a server-side one, and a watch answered 410 Gone (its version
compacted, or an API server restarted) starts again from a fresh list's resourceVersion, never
from the Job's own, which is as old as the Job's last change.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from jobs.contract import EXIT_FAILURE, EXIT_USER_ERROR, UserError
from launcher import state
from launcher.render import CONTAINER, JOB_NAME_LABEL, LABEL_QUEUE

POLL_S = 5.0  # between pod checks while following; the tests shorten it
LOG_PUMP = "vlmjobs-log-pump"  # the thread that prints a followed Job's log (launcher.cli exits past it on Ctrl-C)
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0  # one answer; a watch or log stream waits longer (their own timeouts)
# What the generated read_namespaced_pod_log accepts (the client picks the JSON one; the kubelet sends text either way)
LOG_ACCEPTS = ["text/plain", "application/json", "application/yaml", "application/vnd.kubernetes.protobuf", "application/cbor"]
RETRIED_VERBS = ("get", "list", "watch")  # safe to send again; a create or delete is not retried blindly
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"  # Kueue v0.17 serves v1beta1 and v1beta2, stores v1beta2
JOBSET_GROUP, JOBSET_VERSION = "jobset.x-k8s.io", "v1alpha2"  # JobSet v0.11 serves v1alpha2 only
RESOURCES = {  # kind -> (API group for the message, plural)
    "Job": ("batch", "jobs"),
    "Pod": ("", "pods"),
    "Pod log": ("", "pods/log"),
    "Service": ("", "services"),
    "PersistentVolumeClaim": ("", "persistentvolumeclaims"),
    "Workload": (KUEUE_GROUP, "workloads"),
    "JobSet": (JOBSET_GROUP, "jobsets"),
    "API": ("", "apis"),
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


class NotAdmitted(KubeError):
    """A suspended Job's wait ended without admission: its Kueue Workload deactivated, or admission_timeout passed.
    The Job and its Workload are left as they are (its place in the queue too)."""


class StoppedMidway(KeyboardInterrupt):
    """Ctrl-C or SIGTERM where stopping leaves something undone that the user must know of (a group's failed
    attempt deleted, the next not yet created): its message says what, in place of 'what was created runs on'."""

    def __init__(self, message: str, interrupted: KeyboardInterrupt):
        super().__init__(message)
        self.signum = getattr(interrupted, "signum", 2)  # SIGINT, as a plain KeyboardInterrupt is


def _status_message(e) -> str:
    try:
        return json.loads(e.body).get("message") or e.reason
    except (TypeError, ValueError, AttributeError):
        return str(e.reason or e).strip()


def _where(kind: str, namespace: str, name: str | None) -> str:
    return f"{kind} {namespace}/{name}" if name else f"{kind}s in namespace {namespace}"


# ---------------------------------------------------------------------------------------------
# Showing Jobs (what they mean is launcher.state)


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
            state.job_state(job),
            str(status.get("active", 0)),
            str(status.get("succeeded", 0)),
            str(status.get("failed", 0)),
            meta["name"],
            state.failure_message(job),
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
class Backoff:
    """Waits between attempts: doubling from ``base_s`` up to ``cap_s`` (or the server's
    Retry-After), giving up ``give_up_s`` after the first failure of a run of failures."""

    base_s: float = 1.0
    cap_s: float = 30.0
    give_up_s: float = 600.0  # a control-plane upgrade takes minutes, not hours
    failures: int = 0
    since: float | None = None

    def wait(self, error: KubeError, out: Callable[[str], None], *, retry_after: float | None = None) -> None:
        """Sleep before the next attempt, or raise ``error`` when retrying has gone on too long."""
        now = time.monotonic()
        self.since = self.since if self.since is not None else now
        if now - self.since > self.give_up_s:
            raise error
        delay = min(self.base_s * 2**self.failures, self.cap_s)
        if retry_after is not None:
            delay = min(max(retry_after, delay), self.cap_s)
        self.failures += 1
        out(f"warning: {error}; retrying in {delay:g}s")
        time.sleep(delay)

    def reset(self) -> None:
        self.failures, self.since = 0, None


def _retry_after(error: BaseException) -> float | None:
    headers = getattr(error.__cause__, "headers", None) or {}
    try:
        return float(headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None


@dataclass
class Cluster:
    """One namespace of one cluster. ``out`` receives progress and log lines, one per call."""

    api: Any  # kubernetes.client.ApiClient
    namespace: str
    out: Callable[[str], None] = field(default=lambda line: print(line, flush=True))
    poll_s: float = field(default_factory=lambda: POLL_S)  # between pod checks
    # One watch request's server-side timeout; the pods are read between two, so a pod that
    # cannot be scheduled is reported within this.
    watch_s: int = 30
    read_timeout_s: float = READ_TIMEOUT_S  # for one answer: a half-open connection fails, then is retried
    log_idle_s: float = 300.0  # a followed log silent this long is reconnected (a half-open connection)
    pods_gone_timeout_s: float = 900.0  # waiting for a finished Job's pods to terminate
    log_drain_s: float = 30.0  # after the Job ends, for the rest of its pod's log
    retry_base_s: float = 1.0  # the first wait after a transient API error, doubled each time
    retry_cap_s: float = 30.0
    retry_give_up_s: float = 600.0
    creating_too_long_s: float = state.CREATING_TOO_LONG_S  # then a pod in ContainerCreating is reported
    _reported: set = field(default_factory=set, init=False, repr=False)  # problems already said
    _admission_said: dict = field(default_factory=dict, init=False, repr=False)  # Job -> why it waits, as last said

    def __post_init__(self):
        from kubernetes import client

        self.batch = client.BatchV1Api(self.api)
        self.core = client.CoreV1Api(self.api)

    def backoff(self) -> Backoff:
        return Backoff(self.retry_base_s, self.retry_cap_s, self.retry_give_up_s)

    # -- one call, with its errors wrapped ------------------------------------------------------

    def _call(self, verb: str, kind: str, name: str | None, fn: Callable, *args, **kwargs):
        """One request, its errors wrapped; a read that meets a transient error is sent again."""
        kwargs.setdefault("_request_timeout", (CONNECT_TIMEOUT_S, self.read_timeout_s))
        backoff = self.backoff()
        while True:
            try:
                return self._call_once(verb, kind, name, fn, *args, **kwargs)
            except ApiUnavailable as e:
                if verb not in RETRIED_VERBS:
                    raise
                backoff.wait(e, self.out, retry_after=_retry_after(e))

    def _call_once(self, verb: str, kind: str, name: str | None, fn: Callable, *args, **kwargs):
        import urllib3
        from kubernetes.client.exceptions import ApiException

        where = _where(kind, self.namespace, name)
        ids = {"kind": kind, "namespace": self.namespace, "name": name}
        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            raise self._wrapped(e, verb, where, kind, ids) from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise ApiUnavailable(f"cannot {verb} {where}: no answer from the API server ({e})", **ids) from e

    def _wrapped(self, e, verb: str, where: str, kind: str, ids: dict) -> KubeError:
        message = _status_message(e)
        group, resource = RESOURCES[kind]
        if e.status == 403:
            qualified = f"{resource}.{group}" if group else resource
            return Forbidden(
                f"cannot {verb} {where}: forbidden ({message}); the Role bound to your user or ServiceAccount "
                f"needs verb '{verb}' on resource '{qualified}' in namespace {self.namespace} (k8s/rbac.yaml)",
                verb=verb,
                resource=qualified,
                **ids,
            )
        if e.status == 409:
            return AlreadyExists(f"{where} already exists", **ids)
        if e.status == 404:
            return NotFound(f"{where} not found", **ids)
        if e.status == 410:
            return Gone(f"cannot {verb} {where}: {message}", **ids)
        if e.status == 429:  # API Priority and Fairness: come back after Retry-After
            return ApiUnavailable(f"cannot {verb} {where}: too many requests ({message})", **ids)
        if not e.status or e.status >= 500:
            return ApiUnavailable(f"cannot {verb} {where}: API server error {e.status} ({message})", **ids)
        return KubeError(f"cannot {verb} {where}: {e.status} {message}", **ids)

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

    def _list(self, kind: str, list_: Callable, **selectors) -> dict:
        answer = self._call("list", kind, None, list_, self.namespace, _preload_content=False, **selectors)
        return self._json(answer)

    # -- Jobs ------------------------------------------------------------------------------------

    def get_job(self, name: str) -> dict | None:
        try:
            answer = self._call("get", "Job", name, self.batch.read_namespaced_job, name, self.namespace, _preload_content=False)
        except NotFound:
            return None
        return self._json(answer)

    def list_job(self, name: str) -> tuple[dict | None, str]:
        """The Job (None if absent) and the list's resourceVersion: the version to watch from,
        as new as the API server's, where the Job's own is only as new as its last change."""
        answer = self._list("Job", self.batch.list_namespaced_job, field_selector=f"metadata.name={name}")
        items = answer.get("items") or [None]
        return items[0], answer.get("metadata", {}).get("resourceVersion", "")

    def create_job(self, manifest: dict) -> dict:
        return self._create("Job", self.batch.create_namespaced_job, manifest)

    def delete_job(self, name: str) -> bool:
        """Delete with foreground propagation: the Job goes once its pods are gone. False if absent."""
        return self._delete("Job", self.batch.delete_namespaced_job, name, propagation_policy="Foreground")

    def list_jobs(self, label_selector: str) -> list[dict]:
        return self._list("Job", self.batch.list_namespaced_job, label_selector=label_selector).get("items", [])

    def list_cronjobs(self, label_selector: str) -> list[dict]:
        return self._list("CronJob", self.batch.list_namespaced_cron_job, label_selector=label_selector).get("items", [])

    def list_events(self, kind: str, name: str) -> list[dict]:
        """The events recorded on one object (core/v1, as controllers' recorders write them)."""
        selector = f"involvedObject.kind={kind},involvedObject.name={name}"
        return self._list("Event", self.core.list_namespaced_event, field_selector=selector).get("items", [])

    def watch_job(self, name: str, resource_version: str, timeout_s: int) -> Iterator[dict]:
        """Events on one Job from ``resource_version`` on, for up to ``timeout_s`` seconds."""
        from kubernetes import watch

        stream = watch.Watch().stream(
            self.batch.list_namespaced_job,
            self.namespace,
            field_selector=f"metadata.name={name}",
            resource_version=resource_version,
            timeout_seconds=timeout_s,  # the server ends the watch; with it, Watch does not retry by itself
            allow_watch_bookmarks=True,
            # The server is silent up to timeout_seconds (bookmarks aside): more than that is a dead connection.
            _request_timeout=(CONNECT_TIMEOUT_S, timeout_s + self.read_timeout_s),
            # Not deserialize=False: with it, kubernetes 37.0.2 fails on an ERROR event (410) with
            # KeyError 'raw_object' inside Watch.stream. We read event["raw_object"], a plain dict.
        )
        try:
            while True:
                try:
                    event = self._call_once("watch", "Job", name, next, stream)
                except StopIteration:
                    return
                yield event
        finally:
            stream.close()

    # -- pods, claims and logs -------------------------------------------------------------------

    def list_pods(self, job: str) -> list[dict]:
        return self._list("Pod", self.core.list_namespaced_pod, label_selector=f"{JOB_NAME_LABEL}={job}").get(
            "items", []
        )

    def get_pod(self, name: str) -> dict | None:
        try:
            answer = self._call("get", "Pod", name, self.core.read_namespaced_pod, name, self.namespace, _preload_content=False)
        except NotFound:
            return None
        return self._json(answer)

    def get_pvc(self, name: str) -> dict | None:
        read = self.core.read_namespaced_persistent_volume_claim
        try:
            answer = self._call("get", "PersistentVolumeClaim", name, read, name, self.namespace, _preload_content=False)
        except NotFound:
            return None
        return self._json(answer)

    def _open_log(self, pod: str, *, follow: bool, timestamps: bool, since_time: str | None, _request_timeout):
        """The log request, open, for ``stream_log`` to read. The generated read_namespaced_pod_log has no sinceTime
        (PodLogOptions has), so the request is built with the client's public param_serialize, as the generated method
        builds it, with sinceTime added to its query."""
        from kubernetes.client.exceptions import ApiException

        query = [("container", CONTAINER), ("follow", follow)]
        query += [("timestamps", True)] if timestamps else []
        query += [("sinceTime", since_time)] if since_time else []
        request = self.api.param_serialize(
            method="GET", resource_path="/api/v1/namespaces/{namespace}/pods/{name}/log",
            path_params={"namespace": self.namespace, "name": pod}, query_params=query,
            header_params={"Accept": self.api.select_header_accept(LOG_ACCEPTS)}, auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*request, _request_timeout=_request_timeout)
        if not 200 <= response.status <= 299:  # the generated client raises these as ApiException too
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response.response  # urllib3's, read as a stream

    def stream_log(
        self, pod: str, *, follow: bool = True, timestamps: bool = False, since_time: str | None = None
    ) -> Iterator[str]:
        """The stage container's log, line by line, as the kubelet sends it. A stream that breaks
        (an API server restart, an idle timeout) ends with ApiUnavailable."""
        import urllib3

        opened = self._call("get", "Pod log", pod, self._open_log, pod, follow=follow, timestamps=timestamps,
                            since_time=since_time,
                            _request_timeout=(CONNECT_TIMEOUT_S, self.log_idle_s if follow else self.read_timeout_s))  # fmt: skip
        buffer = b""
        try:
            for chunk in opened.stream(4096):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
            if buffer:
                yield buffer.decode("utf-8", "replace")
        except (urllib3.exceptions.HTTPError, OSError) as e:
            where = _where("Pod log", self.namespace, pod)
            raise ApiUnavailable(f"log stream of {where} broke ({e})", kind="Pod log", namespace=self.namespace,
                                 name=pod) from e  # fmt: skip
        finally:
            opened.release_conn()

    def follow_log(self, pod: str) -> None:
        """A pod's log to its end: a stream that drops while the pod runs is opened again from
        the last line's time (LogCursor), so no line is lost or said twice."""
        cursor = state.LogCursor()
        backoff = self.backoff()
        while True:
            try:
                for line in self.stream_log(pod, timestamps=True, since_time=cursor.since_time()):
                    text = cursor.fresh(line)
                    if text is not None:
                        self.out(text)
                        backoff.reset()
                dropped = None
            except ApiUnavailable as e:
                dropped = e
            now = self.get_pod(pod)
            if now is None or state.pod_done(now):
                # The stream ends when the container does; one last read catches what a drop may have lost.
                cursor.resumed()
                with contextlib.suppress(ApiUnavailable, NotFound):
                    for line in self.stream_log(pod, follow=False, timestamps=True, since_time=cursor.since_time()):
                        text = cursor.fresh(line)
                        if text is not None:
                            self.out(text)
                return
            cursor.resumed()
            if dropped is not None:
                backoff.wait(dropped, lambda line: print(line, file=sys.stderr, flush=True))
            else:  # ended cleanly while the pod still shows Running: its container just exited
                time.sleep(self.poll_s)

    # -- Services --------------------------------------------------------------------------------

    def create_service(self, manifest: dict) -> dict:
        return self._create("Service", self.core.create_namespaced_service, manifest)

    def delete_service(self, name: str) -> bool:
        return self._delete("Service", self.core.delete_namespaced_service, name)

    def set_owner(self, service: str, owner_references: list[dict]) -> dict:
        """Give a Service its owner once that exists (a merge patch of ownerReferences)."""
        body = {"metadata": {"ownerReferences": owner_references}}
        patch = self.core.patch_namespaced_service
        answer = self._call("patch", "Service", service, patch, service, self.namespace, body,
                            _content_type="application/merge-patch+json", _preload_content=False)  # fmt: skip
        return self._json(answer)

    # -- following -------------------------------------------------------------------------------

    def follow(
        self, name: str, *, logs: bool = True, group: bool = False, admission_timeout_s: float = float("inf")
    ) -> state.Reading:
        """Follow a Job until its attempt is over (``state.read``): its state changes, pods that do
        not start, and its pod's log when ``logs`` (the pod of index 0 for a group). While the Job is
        suspended, why (its Kueue Workload), read at every turn (``watch_s``, cut short to end the wait at
        ``admission_timeout_s``). Raises JobDeleted if the Job disappears meanwhile, NotAdmitted when its
        Workload is deactivated or it stays suspended longer than ``admission_timeout_s``."""
        job, version = self.list_job(name)
        if job is None:
            raise self._deleted(name, "does not exist (deleted, or removed by its TTL)")
        said = None
        backoff = self.backoff()
        with self._log_pump(name, logs):
            while True:
                pods = self.list_pods(name)
                reading = state.read(job, pods, group=group)
                said = self._announce(name, job, said)
                self._report_problems(pods)
                if reading.over:
                    return reading
                turn_s = self.watch_s
                if state.job_state(job) == "Suspended":
                    turn_s = self._turn_s(self._report_admission(name, job, admission_timeout_s))
                try:
                    with contextlib.closing(self.watch_job(name, version, turn_s)) as events:
                        for event in events:
                            kind, obj = event["type"], event["raw_object"]
                            if kind == "DELETED":
                                raise self._deleted(name, "was deleted while being followed")
                            version = obj["metadata"]["resourceVersion"]
                            if kind == "BOOKMARK":
                                continue
                            job = obj
                            said = self._announce(name, job, said)
                            if said == "Suspended":  # preempted (or queued again): why, at once
                                if self._report_admission(name, job, admission_timeout_s) < turn_s:
                                    break  # the next turn ends when admission_timeout does, not this one
                            # A pod's change shows in the Job's status (active, ready, terminating):
                            # read the pods now, while a disrupted rank still carries its condition.
                            if state.read(job, self.list_pods(name), group=group).over:
                                break
                    backoff.reset()
                except (Gone, ApiUnavailable) as e:
                    # Compacted, or the API server restarted or is overloaded: wait, then start
                    # again from a fresh list (its version, not the Job's own, which may be as old).
                    backoff.wait(e, self.out, retry_after=_retry_after(e))
                    job, version = self.list_job(name)
                    if job is None:
                        raise self._deleted(name, "was deleted while being followed") from e

    # -- JobSets (multi-node stages) -------------------------------------------------------------

    def serves(self, group: str, version: str) -> bool:
        """Whether the cluster serves the API ``group/version`` (discovery): False where its CRD is not installed."""
        from kubernetes import client

        objects = client.CustomObjectsApi(self.api)
        try:
            self._call("get", "API", f"{group}/{version}", objects.get_api_resources, group, version, _preload_content=False)
        except NotFound:
            return False
        return True

    def _jobsets(self):
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    def get_jobset(self, name: str) -> dict | None:
        get = self._jobsets().get_namespaced_custom_object
        try:
            answer = self._call("get", "JobSet", name, get, JOBSET_GROUP, JOBSET_VERSION, self.namespace, "jobsets", name,
                                _preload_content=False)  # fmt: skip
        except NotFound:
            return None
        return self._json(answer)

    def create_jobset(self, manifest: dict) -> dict:
        create = self._jobsets().create_namespaced_custom_object
        name = manifest["metadata"]["name"]
        answer = self._call("create", "JobSet", name, create, JOBSET_GROUP, JOBSET_VERSION, self.namespace, "jobsets",
                            manifest, _preload_content=False)  # fmt: skip
        return self._json(answer)

    def list_jobsets(self, label_selector: str) -> list[dict]:
        """The JobSets of a selector; none where the cluster serves no JobSet."""
        if not self.serves(JOBSET_GROUP, JOBSET_VERSION):
            return []
        list_ = self._jobsets().list_namespaced_custom_object
        answer = self._call("list", "JobSet", None, list_, JOBSET_GROUP, JOBSET_VERSION, self.namespace, "jobsets",
                            label_selector=label_selector, _preload_content=False)  # fmt: skip
        return self._json(answer).get("items", [])

    def delete_jobset(self, name: str) -> bool:
        """Delete with foreground propagation: its Jobs, pods and Service go first. False if absent."""
        delete = self._jobsets().delete_namespaced_custom_object
        try:
            self._json(self._call("delete", "JobSet", name, delete, JOBSET_GROUP, JOBSET_VERSION, self.namespace,
                                  "jobsets", name, propagation_policy="Foreground", _preload_content=False))
        except NotFound:
            return False
        return True

    def follow_jobset(self, name: str, *, group_job: str, logs: bool = True,
                      admission_timeout_s: float = float("inf")) -> dict:  # fmt: skip
        """Follow a JobSet until it has Completed or Failed, and return it: its state, the restarts its controller
        makes (status.restarts), pods of its group Job that do not start, rank 0's log (``group_job``'s pod of index
        0, across restarts), and while suspended why (its Kueue Workload). Read every ``poll_s``."""
        said, restarts = None, (0, 0)
        with self._log_pump(group_job, logs):
            while True:
                jobset = self.get_jobset(name)
                if jobset is None:
                    raise JobDeleted(f"JobSet {self.namespace}/{name} was deleted while being followed", kind="JobSet",
                                     namespace=self.namespace, name=name)
                now = state.jobset_state(jobset)
                if now != said:
                    said = now
                    self.out(f"==> JobSet {self.namespace}/{name}: {now}")
                if state.jobset_restarts(jobset) != restarts:
                    restarts = state.jobset_restarts(jobset)
                    limit = jobset["spec"].get("failurePolicy", {}).get("maxRestarts", 0)
                    self.out(f"==> JobSet {self.namespace}/{name}: restarted by JobSet, restart {restarts[0]} "
                             f"({restarts[1]} of at most {limit} counted; disruptions are not): every rank resumes "
                             "from the last checkpoint")
                if now in ("Completed", "Failed"):
                    return jobset
                left_s = float("inf")
                if now == "Suspended":
                    left_s = self._report_admission(name, jobset, admission_timeout_s)
                else:
                    self._report_problems(self.list_pods(group_job))
                time.sleep(min(self.poll_s, left_s))  # read again when admission_timeout ends the wait, not later

    def list_workloads(self) -> list[dict] | None:
        """Kueue's Workloads in the namespace; None where the cluster serves none (no Kueue installed)."""
        from kubernetes import client

        objects = client.CustomObjectsApi(self.api)
        try:
            answer = self._call("list", "Workload", None, objects.list_namespaced_custom_object, KUEUE_GROUP,
                                KUEUE_VERSION, self.namespace, "workloads", _preload_content=False)  # fmt: skip
        except NotFound:
            return None
        except Forbidden as e:  # following goes on without Kueue's reasons; the driver's Role has this verb
            if "workloads" not in self._reported:
                self._reported.add("workloads")
                self.out(f"warning: {e}")
            return None
        return self._json(answer).get("items", [])

    def _report_admission(self, name: str, job: dict, timeout_s: float) -> float:
        """Say why the suspended Job waits when that changes; raise NotAdmitted when the wait is over, else return
        the seconds until ``timeout_s`` ends it."""
        workloads = self.list_workloads()
        queued = bool(job["metadata"].get("labels", {}).get(LABEL_QUEUE))
        workload = state.owned_workload(job, workloads or [])
        now = datetime.now(timezone.utc)
        said = state.admission(job, workload, queued=queued and workloads is not None, now=now, timeout_s=timeout_s)
        if said.line != self._admission_said.get(name):
            self._admission_said[name] = said.line
            self.out(f"==> {job.get('kind', 'Job')} {self.namespace}/{name}: {said.line}")
        if said.ended:
            kind = job.get("kind", "Job")
            raise NotAdmitted(f"{kind} {self.namespace}/{name} not admitted: {said.ended}; the {kind} and its Workload "
                              f"are left queued (vlmjobs delete to withdraw it)", kind=kind, namespace=self.namespace,
                              name=name)
        return said.left_s

    def _turn_s(self, admission_left_s: float) -> int:
        """A watch turn that ends once admission_timeout has ended the wait, not up to ``watch_s`` later: the server
        takes whole seconds, at least one (0 would be its own default)."""
        return max(1, math.ceil(min(self.watch_s, admission_left_s)))

    def _deleted(self, name: str, how: str) -> JobDeleted:
        return JobDeleted(f"Job {self.namespace}/{name} {how}", kind="Job", namespace=self.namespace, name=name)

    def _announce(self, name: str, job: dict, said: str | None) -> str:
        now = state.job_state(job)
        if now != said:
            self.out(f"==> Job {self.namespace}/{name}: {now}")
        return now

    def _report_problems(self, pods: list[dict]) -> None:
        for key, line in state.pod_problems(pods, datetime.now(timezone.utc), creating_too_long_s=self.creating_too_long_s):
            if key not in self._reported:
                self._reported.add(key)
                self.out(f"warning: {line}")

    @contextlib.contextmanager
    def _log_pump(self, job: str, logs: bool) -> Iterator[None]:
        """While the block runs, ``job``'s log is printed by a thread (``_pump_logs``) when ``logs``; after it, the
        log's rest, for up to ``log_drain_s``."""
        stop = threading.Event()
        pump = threading.Thread(target=self._pump_logs, args=(job, stop), name=LOG_PUMP, daemon=True) if logs else None
        if pump:
            pump.start()
        interrupted = False
        try:
            yield
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop now, not after the log's rest
            interrupted = True
            raise
        finally:
            stop.set()
            if pump and not interrupted:
                pump.join(timeout=self.log_drain_s)

    def _pump_logs(self, job: str, stop: threading.Event) -> None:
        """Follow the leader pod's log; when a retry starts a new pod, follow that one too."""
        followed: set[str] = set()
        while True:
            try:
                started = [
                    p
                    for p in self.list_pods(job)
                    if state.completion_index(p) == 0
                    and state.name_of(p) not in followed
                    and p.get("status", {}).get("phase") in ("Running", "Succeeded", "Failed")
                ]
                if started:
                    pod = max(started, key=lambda p: p["metadata"].get("creationTimestamp", ""))
                    followed.add(state.name_of(pod))
                    self.follow_log(state.name_of(pod))
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
        pods = [p for p in self.list_pods(job) if state.completion_index(p) == index]
        if not pods:
            raise NotFound(
                f"Job {self.namespace}/{job} has no pod of index {index} yet", kind="Pod", namespace=self.namespace
            )
        pod = state.name_of(max(pods, key=lambda p: p["metadata"].get("creationTimestamp", "")))
        if follow:
            self.follow_log(pod)
        else:
            for line in self.stream_log(pod, follow=False):
                self.out(line)

    def wait_pods_terminated(self, name: str) -> None:
        """Until no pod of the Job is still running or terminating: a ReadWriteOnce volume
        attaches to one node at a time, and the next stage must not race the last one's writes."""
        deadline = time.monotonic() + self.pods_gone_timeout_s
        while True:
            left = [
                state.name_of(p)
                for p in self.list_pods(name)
                if not state.pod_done(p) or state.deleting(p)
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
