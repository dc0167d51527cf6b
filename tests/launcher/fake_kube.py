"""A small Kubernetes API server on loopback, for what the real control plane cannot be made to do
on demand (issue 10): answer a watch with a 5xx or a 429 with Retry-After, fail a request with 403
or 409 at a chosen point, or play a Job's statuses in a chosen order for the launcher's own
mechanics (what it creates, in which order, what it skips). What the Job controller does
(retries, podFailurePolicy, disruptions, FailureTarget, deadlines, suspension) is tested on the
real control plane instead (test_launcher_on_cluster.py, tests/simcluster.py).

The Job statuses it plays are the real controller's: ``running()``, ``complete()`` and
``recorded(...)`` replay the objects that test_launcher_on_cluster.py recorded from the real
control plane (recorded/*.json, with VLMJOBS_RECORD=1); a failed one comes with its pods and the
controller's own reasons and messages (FailureTarget beside Failed). What it still writes by hand
are pods (``pod``) for the launcher's mechanics, in states a test chooses at a moment it chooses:
the pods whose log lines a test streams (kwok runs no container and serves one log to all), a
rank marked disrupted in the middle of an attempt, a pod that stays terminating for ever, and a
pod waiting on ImagePullBackOff (the simulated kubelet pulls no image). Their real counterparts, where the
simulated cluster has one, are in test_launcher_on_cluster.py.

The official client really sends and parses the calls: create/get/list/watch/delete Jobs, list
and get pods, stream a pod's log, create/patch/delete Services, and the error answers. Time moves
when the client watches: a created Job starts with an empty status; the statuses its scripted
``Attempt`` goes through are sent as MODIFIED events (newline-delimited JSON, chunked) to the next
watch, and from then on GET answers the last of them.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
RECORDED = Path(__file__).parent / "recorded"


class _QuietServer(ThreadingHTTPServer):
    """A client hanging up on a watch or log stream is expected here, not a traceback in the test output."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass(frozen=True)
class Recording:
    """A Job's last status and its pods, as the real control plane returned them."""

    status: dict
    pods: list[dict]


def recorded(name: str, job: str = "", namespace: str = "vlmjobs") -> Recording:
    """recorded/<name>.json, renamed to Job ``job`` in ``namespace``: the Job controller's messages
    name its pods (``Container stage for pod <namespace>/<job>-xxxxx failed with exit code 2 ...``),
    and a replay names the Job the test follows instead of the one recorded."""
    text = (RECORDED / f"{name}.json").read_text()
    meta = json.loads(text)["job"]["metadata"]
    if job:  # names and messages alike: the recorded namespace (t-<hex>) and Job name (sim-sft) occur only as such
        text = re.sub(rf"\b{re.escape(meta['name'])}\b", job, text.replace(meta["namespace"], namespace))
    objects = json.loads(text)
    return Recording(objects["job"]["status"], objects["pods"])


def complete() -> dict:
    return recorded("one-node-complete").status


def running() -> dict:
    return recorded("one-node-running").status


def pod(name: str, phase: str, *, exit_code: int | None = None, index: int | None = None, disrupted: str | None = None,
        waiting: str | None = None, deleting: bool = False, created: str = "2025-01-01T00:00:00Z") -> dict:  # fmt: skip
    """A pod as the API returns it; its job-name label is set when the attempt is installed."""
    status: dict = {"phase": phase}
    if exit_code is not None:
        status["containerStatuses"] = [
            {
                "name": "stage",
                "state": {"terminated": {"exitCode": exit_code, "reason": "Error" if exit_code else "Completed"}},
            }
        ]
    if waiting:
        status["containerStatuses"] = [
            {"name": "stage", "state": {"waiting": {"reason": waiting, "message": f"{waiting} for the test"}}}
        ]
    if disrupted:
        status["conditions"] = [
            {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler", "message": disrupted}
        ]
    meta: dict = {"name": name, "creationTimestamp": created, "labels": {}, "annotations": {}}
    if index is not None:
        meta["annotations"]["batch.kubernetes.io/job-completion-index"] = str(index)
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T01:00:00Z"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": status}


@dataclass
class Attempt:
    """What happens to a Job once created: the statuses it goes through, its pods, their logs."""

    statuses: list[dict] = field(default_factory=lambda: [running(), complete()])  # the real controller's
    pods: list[dict] = field(default_factory=lambda: [pod("p-0", "Succeeded", exit_code=0)])
    logs: dict[str, list[str]] = field(default_factory=dict)
    deleted: bool = False  # the Job is deleted (by someone else) after its statuses


@dataclass
class Fault:
    method: str
    path: str  # a regex on the URL path, which ends in "?watch" for a watch
    status: int  # 0: no answer for ``message`` seconds, then the connection closes
    message: str
    times: int = 1
    retry_after: float | None = None


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: dict | None


def workload(job: dict, *conditions: dict, active: bool = True, queue: str = "gpu-queue") -> dict:
    """A Kueue Workload for ``job`` (a Job or JobSet) as Kueue v0.17's integrations write it (kueue.x-k8s.io/v1beta2:
    named job-<job>-<hash>, owned by it, its uid in the job-uid label), with ``conditions`` (``kueue_condition``).
    Kueue is not running here: its scheduler's decisions are played (test_kueue.py checks their shape against the
    CRD's schema); that Kueue writes them so is the cluster tests' to show."""
    name, uid = job["metadata"]["name"], job["metadata"]["uid"]
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "Workload",
        "metadata": {
            "name": f"job-{name}-3b1c2",
            "namespace": job["metadata"]["namespace"],
            "uid": f"wl-{uid}",
            "resourceVersion": "1",
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {"kueue.x-k8s.io/job-uid": uid},
            "ownerReferences": [{"apiVersion": job.get("apiVersion", "batch/v1"), "kind": job.get("kind", "Job"),
                                 "name": name, "uid": uid,
                                 "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {
            "active": active,
            "queueName": queue,
            "podSets": [{"name": "main", "count": 1, "template": job["spec"].get("template", {})}],
        },
        "status": {"conditions": list(conditions)},
    }


def kueue_condition(kind: str, status: bool, reason: str, message: str, at: str = "2025-01-01T00:00:01Z") -> dict:
    """A Workload condition as Kueue writes it (metav1.Condition)."""
    return {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message,
            "lastTransitionTime": at, "observedGeneration": 1}


class FakeKube:
    def __init__(self, namespace: str = "vlmjobs"):
        self.namespace = namespace
        self.jobs: dict[str, dict] = {}
        self.workloads: list[dict] | None = None  # None: no Kueue CRDs served (404)
        self.jobset_served = True  # False: no JobSet CRD (discovery answers 404)
        self.jobsets: dict[str, dict] = {}
        self.jobset_statuses: dict[str, list[dict]] = {}  # name -> the statuses its next GETs answer, one each
        self.pending: dict[str, list[tuple[str, dict]]] = {}  # job -> events not yet watched
        self.attempts: dict[str, list[Attempt]] = {}
        self.pods: dict[str, list[dict]] = {}
        self.logs: dict[str, list[str]] = {}
        self.services: dict[str, dict] = {}
        self.cronjobs: list[dict] = []
        self.events: list[dict] = []  # core/v1 Events, listed by their involvedObject's kind and name
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.gone_once: set[str] = set()  # jobs whose next watch from a version answers 410
        # True: a watch stays open after its events until its timeoutSeconds, as the API server's does (else it ends
        # at once, so that a test's turns cost nothing)
        self.watch_holds = False
        self._versions = itertools.count(100)
        self._uids = itertools.count(1)
        self.lock = threading.RLock()
        self.server = _QuietServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    # -- scripting ------------------------------------------------------------------------------

    def script(self, job: str, *attempts: Attempt) -> None:
        self.attempts[job] = list(attempts)

    def add_job(self, manifest: dict, status: dict, attempt: Attempt | None = None) -> dict:
        """A Job that exists before the test's client comes (created by someone else)."""
        with self.lock:
            obj = self._store(manifest)
            obj["status"] = status
            self._install(obj["metadata"]["name"], attempt or Attempt(statuses=[]))
            return obj

    def fail(self, method: str, path: str, status: int, message: str = "", times: int = 1, retry_after=None) -> None:
        self.faults.append(Fault(method, path, status, message, times, retry_after))

    def calls(self, method: str, path_part: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and path_part in r.path]

    # -- state ----------------------------------------------------------------------------------

    def _store(self, manifest: dict) -> dict:
        obj = json.loads(json.dumps(manifest))
        meta = obj.setdefault("metadata", {})
        meta.update(
            uid=f"uid-{next(self._uids)}",
            resourceVersion=str(next(self._versions)),
            creationTimestamp="2025-01-01T00:00:00Z",
        )
        obj.setdefault("status", {})
        self.jobs[meta["name"]] = obj
        return obj

    def _install(self, name: str, attempt: Attempt) -> None:
        events = []
        for status in attempt.statuses:
            obj = json.loads(json.dumps(self.jobs[name]))
            obj["status"] = status
            obj["metadata"]["resourceVersion"] = str(next(self._versions))
            events.append(("MODIFIED", obj))
        if attempt.deleted:
            events.append(("DELETED", events[-1][1] if events else self.jobs[name]))
        self.pending[name] = events
        pods = json.loads(json.dumps(attempt.pods))
        for p in pods:
            p["metadata"]["labels"][JOB_NAME_LABEL] = name
        self.pods[name] = pods
        self.logs.update(attempt.logs)

    # -- HTTP -----------------------------------------------------------------------------------

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> dict | None:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length)) if length else None

            def _send(self, status: int, obj: dict, headers: dict | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str, headers: dict | None = None) -> None:
                self._send(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": message,
                        "reason": reason,
                        "code": code,
                    },
                    headers,
                )

            def _stream(self, chunks: list[bytes], content_type: str, hold_s: float = 0.0) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for chunk in chunks:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                time.sleep(hold_s)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                body = self._body() if method in ("POST", "DELETE", "PATCH") else None
                with fake.lock:
                    fake.requests.append(Request(method, url.path, query, body))
                    for fault in fake.faults:
                        target = url.path + ("?watch" if query.get("watch") == ["true"] else "")
                        if fault.times and fault.method == method and re.search(fault.path, target):
                            fault.times -= 1
                            if fault.status == 0:  # a half-open connection: no answer at all
                                fake.lock.release()
                                try:
                                    time.sleep(float(fault.message))
                                finally:
                                    fake.lock.acquire()
                                self.close_connection = True
                                return None
                            reasons = {
                                403: "Forbidden",
                                409: "AlreadyExists",
                                429: "TooManyRequests",
                                500: "InternalError",
                                503: "ServiceUnavailable",
                            }
                            return self._status(
                                fault.status,
                                reasons.get(fault.status, "Unknown"),
                                fault.message or f"fault {fault.status}",
                                {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None,
                            )
                jobs = re.fullmatch(r"/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+))?", url.path)
                pods = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods(?:/([^/]+)(/log)?)?", url.path)
                services = re.fullmatch(r"/api/v1/namespaces/([^/]+)/services(?:/([^/]+))?", url.path)
                workloads = re.fullmatch(r"/apis/kueue.x-k8s.io/v1beta2/namespaces/([^/]+)/workloads", url.path)
                if workloads and fake.workloads is not None:
                    with fake.lock:
                        items = json.loads(json.dumps(fake.workloads))
                    return self._send(200, {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadList",
                                            "metadata": {"resourceVersion": "1"}, "items": items})
                if re.fullmatch(r"/apis/batch/v1/namespaces/([^/]+)/cronjobs", url.path):
                    return self._send(200, {"kind": "CronJobList", "metadata": {"resourceVersion": "1"},
                                            "items": json.loads(json.dumps(fake.cronjobs))})
                if re.fullmatch(r"/api/v1/namespaces/([^/]+)/events", url.path):
                    wanted = dict(term.split("=", 1) for term in query.get("fieldSelector", [""])[0].split(",") if term)
                    items = [e for e in fake.events if all(
                        e["involvedObject"].get(key.removeprefix("involvedObject.")) == value for key, value in wanted.items())]
                    return self._send(200, {"kind": "EventList", "metadata": {"resourceVersion": "1"}, "items": items})
                if url.path == "/apis/jobset.x-k8s.io/v1alpha2":
                    if not fake.jobset_served:
                        return self._status(404, "NotFound", "the server could not find the requested resource")
                    return self._send(200, {"kind": "APIResourceList", "groupVersion": "jobset.x-k8s.io/v1alpha2",
                                            "resources": [{"name": "jobsets", "namespaced": True, "kind": "JobSet",
                                                           "verbs": ["create", "get", "list", "watch", "delete"]}]})
                jobsets = re.fullmatch(r"/apis/jobset.x-k8s.io/v1alpha2/namespaces/([^/]+)/jobsets(?:/([^/]+))?", url.path)
                if jobsets and fake.jobset_served:
                    return self._jobsets(method, jobsets.group(2), body)
                if jobs:
                    return self._jobs(method, jobs.group(2), query, body)
                if pods and pods.group(2) and not pods.group(3):
                    return self._pod(pods.group(2))
                if pods:
                    return self._pods(pods.group(2), query)
                if services:
                    return self._services(method, services.group(2), body)
                return self._status(404, "NotFound", f"no route {method} {url.path}")

            def _jobsets(self, method: str, name: str | None, body: dict | None) -> None:
                """A JobSet's statuses play one a GET, as its controller would write them between two reads."""
                with fake.lock:
                    if method == "POST":
                        name = body["metadata"]["name"]
                        if name in fake.jobsets:
                            return self._status(409, "AlreadyExists", f'jobsets.jobset.x-k8s.io "{name}" already exists')
                        obj = json.loads(json.dumps(body))
                        obj["metadata"].update(uid=f"uid-{next(fake._uids)}", resourceVersion=str(next(fake._versions)),
                                               creationTimestamp="2025-01-01T00:00:00Z")
                        obj["status"] = {"restarts": 0}
                        fake.jobsets[name] = obj
                        return self._send(201, obj)
                    if method == "GET" and name is None:
                        items = list(fake.jobsets.values())
                        return self._send(200, {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSetList",
                                                "metadata": {"resourceVersion": "1"}, "items": items})
                    if name not in fake.jobsets:
                        return self._status(404, "NotFound", f'jobsets.jobset.x-k8s.io "{name}" not found')
                    if method == "DELETE":
                        return self._send(200, fake.jobsets.pop(name))
                    if fake.jobset_statuses.get(name):
                        fake.jobsets[name]["status"] = fake.jobset_statuses[name].pop(0)
                    return self._send(200, fake.jobsets[name])

            def _jobs(self, method: str, name: str | None, query: dict, body: dict | None) -> None:
                if method == "POST":
                    with fake.lock:
                        name = body["metadata"]["name"]
                        if name in fake.jobs:
                            return self._status(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
                        obj = fake._store(body)
                        queue = fake.attempts.get(name) or []
                        fake._install(name, queue.pop(0) if queue else Attempt())
                    return self._send(201, obj)
                if method == "DELETE":
                    with fake.lock:
                        if name not in fake.jobs:
                            return self._status(404, "NotFound", f'jobs.batch "{name}" not found')
                        uid = fake.jobs.pop(name)["metadata"]["uid"]
                        fake.pending.pop(name, None)
                        fake.pods[name] = []
                        # The garbage collector: what the Job owned goes with it.
                        for dependent in [
                            n
                            for n, svc in fake.services.items()
                            if any(o.get("uid") == uid for o in svc["metadata"].get("ownerReferences", []))
                        ]:
                            del fake.services[dependent]
                    return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                if name:
                    with fake.lock:
                        if name not in fake.jobs:
                            return self._status(404, "NotFound", f'jobs.batch "{name}" not found')
                        return self._send(200, fake.jobs[name])
                if query.get("watch") == ["true"]:
                    return self._watch(query)
                selector = dict(part.split("=", 1) for part in query.get("labelSelector", [""])[0].split(",") if part)
                by_name = query.get("fieldSelector", ["="])[0].split("=", 1)[1]
                with fake.lock:
                    items = [
                        j
                        for j in fake.jobs.values()
                        if all(j["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())
                        and by_name in ("", j["metadata"]["name"])
                    ]
                return self._send(
                    200,
                    {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {"resourceVersion": "1"}, "items": items},
                )

            def _watch(self, query: dict) -> None:
                name = query["fieldSelector"][0].split("=", 1)[1]
                with fake.lock:
                    if name in fake.gone_once and query.get("resourceVersion"):
                        fake.gone_once.discard(name)
                        error = {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "status": "Failure",
                            "reason": "Expired",
                            "message": "too old resource version",
                            "code": 410,
                        }
                        return self._stream(
                            [json.dumps({"type": "ERROR", "object": error}).encode() + b"\n"], "application/json"
                        )
                    events = fake.pending.pop(name, [])
                    for kind, obj in events:
                        if kind == "DELETED":
                            fake.jobs.pop(name, None)
                        else:
                            fake.jobs[name] = obj
                lines = [json.dumps({"type": kind, "object": obj}).encode() + b"\n" for kind, obj in events]
                hold_s = float(query["timeoutSeconds"][0]) if fake.watch_holds else 0.0
                return self._stream(lines, "application/json", hold_s)

            def _pod(self, name: str) -> None:
                with fake.lock:
                    found = [p for ps in fake.pods.values() for p in ps if p["metadata"]["name"] == name]
                if not found:
                    return self._status(404, "NotFound", f'pods "{name}" not found')
                return self._send(200, found[0])

            def _pods(self, name: str | None, query: dict) -> None:
                if name:  # the log; with timestamps, one a nanosecond, as the kubelet would stamp them
                    with fake.lock:
                        lines = list(fake.logs.get(name, []))
                    if query.get("timestamps") == ["true"]:
                        lines = [f"2025-01-01T00:00:00.{i + 1}Z {line}" for i, line in enumerate(lines)]
                    return self._stream([line.encode() + b"\n" for line in lines], "text/plain")
                selector = query.get("labelSelector", [""])[0]
                job = selector.split("=", 1)[1] if selector.startswith(JOB_NAME_LABEL + "=") else None
                with fake.lock:
                    items = list(fake.pods.get(job, [])) if job else [p for ps in fake.pods.values() for p in ps]
                return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})

            def _services(self, method: str, name: str | None, body: dict | None) -> None:
                with fake.lock:
                    if method == "PATCH":
                        if name not in fake.services:
                            return self._status(404, "NotFound", f'services "{name}" not found')
                        fake.services[name]["metadata"].update(body["metadata"])
                        return self._send(200, fake.services[name])
                    if method == "POST":
                        name = body["metadata"]["name"]
                        if name in fake.services:
                            return self._status(409, "AlreadyExists", f'services "{name}" already exists')
                        fake.services[name] = body
                        return self._send(201, body)
                    if method == "DELETE":
                        if fake.services.pop(name, None) is None:
                            return self._status(404, "NotFound", f'services "{name}" not found')
                        return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                return self._status(405, "MethodNotAllowed", method)

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_DELETE(self):
                self._route("DELETE")

            def do_PATCH(self):
                self._route("PATCH")

        return Handler

    def start(self) -> FakeKube:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
