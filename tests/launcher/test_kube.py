"""launcher.kube over real HTTP: the official client against the loopback API server."""

from __future__ import annotations

import pytest

from launcher import kube, render
from tests.launcher.conftest import IMAGE
from tests.launcher.fake_kube import Attempt, complete, pod, recorded, running

FORBIDDEN = 'jobs.batch is forbidden: User "system:serviceaccount:vlmjobs:default" cannot create resource "jobs" in API group "batch" in the namespace "vlmjobs"'


def job_of(recipe, stage="sft") -> dict:
    return render.render_stage(recipe, stage, IMAGE)[0]


def test_create_sends_the_rendered_manifest_and_returns_the_created_job(cluster, server, single):
    manifest = job_of(single)
    created = cluster.create_job(manifest)
    assert server.calls("POST", "/jobs")[0].body == manifest
    assert created["metadata"]["uid"] == "uid-1"


def test_create_of_an_existing_job_is_already_exists(cluster, server, single):
    server.add_job(job_of(single), running())
    with pytest.raises(kube.AlreadyExists, match=r"^Job vlmjobs/llava-chartqa-sft already exists$"):
        cluster.create_job(job_of(single))


def test_forbidden_names_the_missing_verb_and_resource(cluster, server, single):
    server.fail("POST", r"/jobs$", 403, FORBIDDEN)
    with pytest.raises(
        kube.Forbidden,
        match=r"^cannot create Job vlmjobs/llava-chartqa-sft: forbidden \(jobs\.batch is forbidden: .*\); the Role bound to your user or ServiceAccount needs verb 'create' on resource 'jobs\.batch' in namespace vlmjobs \(k8s/rbac\.yaml\)$",
    ) as info:
        cluster.create_job(job_of(single))
    assert (info.value.verb, info.value.resource, info.value.exit_code) == ("create", "jobs.batch", 2)


def test_server_errors_are_unavailable_and_worth_a_retry(cluster, server, single):
    server.fail("POST", r"/jobs$", 503, "etcdserver: leader changed")
    with pytest.raises(
        kube.ApiUnavailable,
        match=r"^cannot create Job vlmjobs/llava-chartqa-sft: API server error 503 \(etcdserver: leader changed\)$",
    ) as info:
        cluster.create_job(job_of(single))
    assert info.value.exit_code == 1


def test_the_api_exception_is_kept_as_the_cause(cluster, server, single):
    from kubernetes.client.exceptions import ApiException

    server.fail("POST", r"/jobs$", 500, "boom")
    with pytest.raises(kube.ApiUnavailable) as info:
        cluster.create_job(job_of(single))
    assert isinstance(info.value.__cause__, ApiException) and info.value.__cause__.status == 500


def test_no_server_is_unavailable(single):
    from kubernetes import client

    dead = kube.Cluster(
        client.ApiClient(client.Configuration(host="http://127.0.0.1:9")),
        "vlmjobs",
        out=lambda line: None,
        retry_base_s=0.01,
        retry_give_up_s=0.05,
    )
    with pytest.raises(kube.ApiUnavailable, match=r"^cannot get Job vlmjobs/x: no answer from the API server"):
        dead.get_job("x")


def test_get_of_a_missing_job_is_none(cluster):
    assert cluster.get_job("nothing-here") is None


def test_follow_reports_each_state_until_complete(cluster, server, single):
    server.script("llava-chartqa-sft", Attempt(statuses=[running(), complete()]))
    cluster.create_job(job_of(single))
    result = cluster.follow("llava-chartqa-sft", logs=False)
    assert result.succeeded
    assert cluster.lines == [
        "==> Job vlmjobs/llava-chartqa-sft: Pending",
        "==> Job vlmjobs/llava-chartqa-sft: Running",
        "==> Job vlmjobs/llava-chartqa-sft: Complete",
    ]


def test_follow_watches_by_name_from_the_version_of_its_list(cluster, server, single):
    """Issue 10 (defect 2): the list's resourceVersion, not the Job's own, which is only as new as its last change."""
    created = cluster.create_job(job_of(single))
    cluster.follow("llava-chartqa-sft", logs=False)
    watch = [r for r in server.calls("GET", "/jobs") if r.query.get("watch") == ["true"]][0]
    assert watch.query["fieldSelector"] == ["metadata.name=llava-chartqa-sft"]
    assert watch.query["resourceVersion"] == ["1"] != [created["metadata"]["resourceVersion"]]


def test_follow_streams_the_pods_log_line_by_line(cluster, server, single):
    server.script(
        "llava-chartqa-sft",
        Attempt(
            pods=[pod("sft-a", "Succeeded", exit_code=0)],
            logs={"sft-a": ["step 1/2 loss 1.5", "step 2/2 loss 1.2", "sft: done"]},
        ),
    )
    cluster.create_job(job_of(single))
    cluster.follow("llava-chartqa-sft")
    log = [line for line in cluster.lines if not line.startswith("==>")]
    assert log == ["step 1/2 loss 1.5", "step 2/2 loss 1.2", "sft: done"]
    assert server.calls("GET", "/pods/sft-a/log")[0].query["follow"] == ["true"]


def test_a_reopened_log_asks_for_the_lines_since_the_last_ones_time(cluster, server, single):
    """The log request carries sinceTime, which the generated client's read_namespaced_pod_log has no argument for
    (issue 23: built with the client's public param_serialize, not its private serializer)."""
    server.script("llava-chartqa-sft", Attempt(pods=[pod("sft-a", "Succeeded", exit_code=0)], logs={"sft-a": ["sft: done"]}))
    cluster.create_job(job_of(single))
    lines = list(cluster.stream_log("sft-a", follow=False, timestamps=True, since_time="2026-01-01T00:00:05Z"))
    assert lines and lines[-1].endswith("sft: done")
    query = server.calls("GET", "/pods/sft-a/log")[0].query
    assert query == {"container": ["stage"], "follow": ["false"], "timestamps": ["true"],
                     "sinceTime": ["2026-01-01T00:00:05Z"]}


def test_follow_of_a_job_deleted_meanwhile_raises(cluster, server, single):
    server.script("llava-chartqa-sft", Attempt(statuses=[running()], deleted=True))
    cluster.create_job(job_of(single))
    with pytest.raises(kube.JobDeleted, match=r"^Job vlmjobs/llava-chartqa-sft was deleted while being followed$"):
        cluster.follow("llava-chartqa-sft", logs=False)


def test_follow_of_a_missing_job_raises(cluster):
    with pytest.raises(kube.JobDeleted, match=r"^Job vlmjobs/gone does not exist \(deleted, or removed by its TTL\)$"):
        cluster.follow("gone", logs=False)


def test_follow_rereads_the_job_when_its_version_is_too_old_to_watch(cluster, server, single):
    server.script("llava-chartqa-sft", Attempt(statuses=[complete()]))
    cluster.create_job(job_of(single))
    server.gone_once.add("llava-chartqa-sft")
    assert cluster.follow("llava-chartqa-sft", logs=False).succeeded
    assert len([r for r in server.calls("GET", "/jobs") if r.query.get("watch") == ["true"]]) == 2


def test_a_server_error_while_watching_is_retried_after_a_pause(cluster, server, single):
    """Issue 10 (defect 3). A 5xx answering a watch: the real API server gives none on demand."""
    server.script("llava-chartqa-sft", Attempt(statuses=[complete()]))
    cluster.create_job(job_of(single))
    server.fail("GET", r"/jobs\?watch$", 500, "watch cache not ready")
    assert cluster.follow("llava-chartqa-sft", logs=False).succeeded
    assert "warning: cannot watch Job vlmjobs/llava-chartqa-sft: API server error 500 (watch cache not ready); retrying in 0.01s" in cluster.lines


def test_a_request_left_unanswered_times_out(cluster, server, single):
    """Issue 10 (defect 3): a half-open connection (the real API server always answers) fails the
    request after the client-side timeout, and urllib3's retries and then the launcher's are spent."""
    server.add_job(job_of(single), complete())
    server.fail("GET", r"/jobs/llava-chartqa-sft$", 0, "2", times=100)
    cluster.read_timeout_s = 0.2
    with pytest.raises(kube.ApiUnavailable, match=r"^cannot get Job vlmjobs/llava-chartqa-sft: no answer from the API server \(.*Read timed out\. \(read timeout=0\.2\)"):
        cluster.get_job("llava-chartqa-sft")


def test_a_server_error_that_lasts_ends_the_follow_as_unavailable(cluster, server, single):
    cluster.create_job(job_of(single))
    server.fail("GET", r"/jobs$", 503, "etcdserver: leader changed", times=1000)
    with pytest.raises(kube.ApiUnavailable, match=r"^cannot (watch|list) Jobs? .*API server error 503 \(etcdserver: leader changed\)$"):
        cluster.follow("llava-chartqa-sft", logs=False)


def test_too_many_requests_are_retried_past_urllib3s_own_retries(cluster, server, single):
    """Issue 10 (defect 3): API Priority and Fairness answers 429 with Retry-After. urllib3 honours
    Retry-After three times by itself; a fourth 429 reaches the launcher, which waits and goes on."""
    server.script("llava-chartqa-sft", Attempt(statuses=[complete()]))
    cluster.create_job(job_of(single))
    server.fail("GET", r"/jobs\?watch$", 429, "too many requests, please try again later", times=4, retry_after=0)
    assert cluster.follow("llava-chartqa-sft", logs=False).succeeded
    assert len([r for r in server.calls("GET", "/jobs") if r.query.get("watch") == ["true"]]) == 5
    assert [line for line in cluster.lines if "retrying" in line] == [
        "warning: cannot watch Job vlmjobs/llava-chartqa-sft: too many requests (too many requests, please try "
        "again later); retrying in 0.01s"
    ]


def test_a_retry_after_longer_than_the_launchers_backoff_is_waited_out(server, api, single, monkeypatch):
    """Issue 26 (5): API Priority and Fairness asks for 7 s; the launcher's own first wait would be 1 s. After
    urllib3's three waits of 7 s the fourth 429 reaches the launcher, which waits 7 s too. No time passes: every
    sleep in this process (urllib3's and the launcher's) is recorded instead of slept."""
    import time

    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    lines = []
    cluster = kube.Cluster(api, "vlmjobs", out=lines.append, poll_s=0.01, watch_s=5, pods_gone_timeout_s=0.5,
                           log_drain_s=5)  # the launcher's own backoff: 1 s first, doubling up to 30 s
    server.script("llava-chartqa-sft", Attempt(statuses=[complete()]))
    cluster.create_job(job_of(single))
    server.fail("GET", r"/jobs\?watch$", 429, "too many requests, please try again later", times=4, retry_after=7)
    assert cluster.follow("llava-chartqa-sft", logs=False).succeeded
    assert [line for line in lines if "retrying" in line] == [
        "warning: cannot watch Job vlmjobs/llava-chartqa-sft: too many requests (too many requests, please try "
        "again later); retrying in 7s"
    ]
    assert [s for s in slept if s >= 1] == [7, 7, 7, 7], "urllib3's three waits, then the launcher's"


def test_a_pod_that_cannot_pull_its_image_is_reported(cluster, server, single):
    server.script(
        "llava-chartqa-sft",
        Attempt(statuses=[running(), complete()], pods=[pod("sft-a", "Pending", waiting="ImagePullBackOff")]),
    )
    cluster.create_job(job_of(single))
    cluster.follow("llava-chartqa-sft", logs=False)
    assert "warning: pod sft-a: ImagePullBackOff: ImagePullBackOff for the test" in cluster.lines


def test_delete_propagates_to_the_pods_in_the_foreground(cluster, server, single):
    server.add_job(job_of(single), complete())
    assert cluster.delete_job("llava-chartqa-sft") is True
    assert server.calls("DELETE", "/jobs/llava-chartqa-sft")[0].query["propagationPolicy"] == ["Foreground"]


def test_delete_of_a_missing_job_is_false(cluster):
    assert cluster.delete_job("nothing-here") is False


def test_delete_forbidden_names_the_verb(cluster, server, single):
    server.add_job(job_of(single), complete())
    server.fail("DELETE", r"/jobs/", 403, "no")
    with pytest.raises(kube.Forbidden, match=r"needs verb 'delete' on resource 'jobs\.batch'"):
        cluster.delete_job("llava-chartqa-sft")


def test_log_of_a_pod_by_completion_index(cluster, server, multi):
    pods = [pod("sft-0", "Succeeded", index=0), pod("sft-1", "Succeeded", index=1)]
    group_job = render.render_stage(multi, "sft", IMAGE)[0]["spec"]["replicatedJobs"][0]["template"]
    server.add_job(
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "qwen2vl-chartqa-sft-node-0", **group_job["metadata"]},
         "spec": group_job["spec"]},
        running(),
        Attempt(statuses=[], pods=pods, logs={"sft-1": ["rank 8 ready"], "sft-0": ["rank 0 ready"]}),
    )
    cluster.print_log("qwen2vl-chartqa-sft-node-0", index=1)
    assert cluster.lines == ["rank 8 ready"]


def test_log_forbidden_names_pods_log(cluster, server, single):
    server.add_job(job_of(single), running(), Attempt(statuses=[], pods=[pod("sft-a", "Running")]))
    server.fail("GET", r"/log$", 403, 'pods "sft-a" is forbidden: cannot get resource "pods/log"')
    with pytest.raises(
        kube.Forbidden,
        match=r"^cannot get Pod log vlmjobs/sft-a: forbidden .*needs verb 'get' on resource 'pods/log' in namespace vlmjobs",
    ):
        cluster.print_log("llava-chartqa-sft")


def test_log_of_a_job_without_pods_yet(cluster, server, single):
    server.add_job(job_of(single), {}, Attempt(statuses=[], pods=[]))
    with pytest.raises(kube.NotFound, match=r"^Job vlmjobs/llava-chartqa-sft has no pod of index 0 yet$"):
        cluster.print_log("llava-chartqa-sft")


def test_status_table_shows_state_pods_and_why_a_job_failed(cluster, server, single):
    """The Job controller's own statuses: a backoff limit of 1 spent by two pods that exited 1."""
    server.add_job(job_of(single, "prepare"), complete())
    failed = recorded("exit-1-backoff-limit", "llava-chartqa-sft")
    server.add_job(job_of(single, "sft"), failed.status, Attempt(statuses=[], pods=failed.pods))
    table = kube.status_table(cluster.list_jobs("app.kubernetes.io/part-of=vlmjobs"))
    assert table.splitlines() == [
        "RUN            STAGE    STATE     ACTIVE  SUCCEEDED  FAILED  JOB                    MESSAGE",
        "llava-chartqa  prepare  Complete  0       1          0       llava-chartqa-prepare  ",
        "llava-chartqa  sft      Failed    0       0          2       llava-chartqa-sft      BackoffLimitExceeded: Job has reached the specified backoff limit",
    ]


def test_waiting_for_pods_that_never_terminate_gives_up_with_their_names(cluster, server, single):
    server.add_job(job_of(single), complete(), Attempt(statuses=[], pods=[pod("sft-a", "Running", deleting=True)]))
    with pytest.raises(
        kube.KubeError, match=r"^Job vlmjobs/llava-chartqa-sft: pods sft-a still not terminated after 0s$"
    ):
        cluster.wait_pods_terminated("llava-chartqa-sft")
