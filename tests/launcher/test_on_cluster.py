"""The launcher against the real control plane (issue 10): smoke tests showing that the simulated cluster
plays its part end to end (the real Job, CronJob and TTL controllers, kwok as the kubelet). The deeper
behaviour tests (retries, disruptions, restarts of the API server...) build on the same fixtures."""

from __future__ import annotations

import copy
import time
from datetime import datetime, timedelta, timezone

import pytest

from jobs import recipe as recipes
from launcher import chain, kube, render, state
from scripts.cluster import SIM_EXIT_CODE, SIM_RUN_SECONDS
from tests.launcher.conftest import IMAGE, SINGLE
from tests.simcluster import wait_for

pytestmark = pytest.mark.cluster


def sim_recipe(namespace: str, annotations: dict[str, str], **kubernetes) -> recipes.Recipe:
    data = copy.deepcopy(SINGLE)
    data["kubernetes"].update(namespace=namespace, priority_class=None, queue=None, **kubernetes)
    data["kubernetes"]["pod_annotations"] = annotations
    return recipes.from_dict(data, origin="test")


def connect(real_cluster, namespace: str) -> kube.Cluster:
    lines: list[str] = []
    c = kube.Cluster(real_cluster.api_client(), namespace, out=lines.append, poll_s=0.5, log_drain_s=1)
    c.lines = lines
    return c



def test_a_stage_that_exits_0_completes(real_cluster, real_namespace):
    recipe = sim_recipe(real_namespace, {SIM_EXIT_CODE: "0", SIM_RUN_SECONDS: "1"})
    c = connect(real_cluster, real_namespace)
    chain.run_stage(c, recipe, "sft", IMAGE, logs=False)
    assert c.lines[-1] == "==> sft: succeeded"
    job = c.get_job(render.job_name(recipe, "sft"))
    assert state.job_state(job) == "Complete"
    (pod,) = c.list_pods(job["metadata"]["name"])
    assert pod["spec"]["nodeName"].startswith("gpu-h100-"), "scheduled by the product it asked for"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (pod["status"]["phase"], terminated["exitCode"], terminated["reason"]) == ("Succeeded", 0, "Completed")


def test_a_stage_that_exits_2_fails_at_once_through_the_pod_failure_policy(real_cluster, real_namespace):
    recipe = sim_recipe(real_namespace, {SIM_EXIT_CODE: "2", SIM_RUN_SECONDS: "1"}, backoff_limit=3)
    c = connect(real_cluster, real_namespace)
    with pytest.raises(kube.JobFailed, match=r"the stage exited 2: a recipe or data error") as failed:
        chain.run_stage(c, recipe, "sft", IMAGE, logs=False)
    assert failed.value.exit_code == 2
    name = render.job_name(recipe, "sft")
    job = c.get_job(name)
    reason = state.failure(job)["reason"]  # FailureTarget while the pod terminates, then Failed
    assert reason == "PodFailurePolicy", "the Job controller's own verdict, not the launcher's"
    assert len(c.list_pods(name)) == 1, "no retry despite backoffLimit 3"


def test_the_cronjob_controller_starts_the_nightly_driver_job(real_cluster, real_namespace):
    """The CronJob controller's own start, without waiting for a minute boundary: a CronJob whose status
    says it last started two minutes ago has missed a start within its startingDeadlineSeconds, which the
    controller makes at once when it sees the change (as after a controller outage)."""
    from kubernetes import client

    recipe = sim_recipe(real_namespace, {}, nightly_schedule="* * * * *")
    c = connect(real_cluster, real_namespace)
    batch = client.BatchV1Api(c.api)
    nightly = render.cronjob_name(recipe)
    batch.create_namespaced_cron_job(real_namespace, render.render_cronjob(recipe, IMAGE))
    last = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=2)
    batch.patch_namespaced_cron_job_status(
        nightly, real_namespace, {"status": {"lastScheduleTime": last.strftime("%Y-%m-%dT%H:%M:%SZ")}},
        _content_type="application/merge-patch+json",
    )  # fmt: skip

    def started() -> list[dict]:
        jobs = c.list_jobs(render.selector(recipe.run_id, render.DRIVER))
        return [j for j in jobs if j["metadata"].get("ownerReferences", [{}])[0].get("name") == nightly]

    (job,) = wait_for("a Job of the CronJob", started, timeout=30)
    # Named by the controller for the start it made: <cronjob>-<scheduled time in minutes since the epoch>.
    scheduled = int(job["metadata"]["name"].removeprefix(f"{nightly}-")) * 60
    assert last.timestamp() < scheduled <= time.time()
    assert job["metadata"]["ownerReferences"][0]["controller"] is True
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == render.DRIVER_SERVICE_ACCOUNT
    assert pod["containers"][0]["command"][-2:] == ["pipeline", "--dated"]


def test_the_ttl_controller_removes_a_finished_job(real_cluster, real_namespace):
    recipe = sim_recipe(real_namespace, {SIM_RUN_SECONDS: "1"}, ttl_seconds_after_finished=2)
    c = connect(real_cluster, real_namespace)
    chain.run_stage(c, recipe, "prepare", IMAGE, logs=False)
    name = render.job_name(recipe, "prepare")
    wait_for("the Job removed by its TTL", lambda: c.get_job(name) is None, timeout=60)
    # and its pods with it (the garbage collector, background propagation)
    wait_for("its pods removed", lambda: not c.list_pods(name), timeout=60)
