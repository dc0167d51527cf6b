"""Nightly operations on the real control plane (issue 22): the CronJob controller and the Job controller of
Kubernetes 1.34, kubectl's kustomize, Pod Security admission and the scheduler, with kwok as the kubelet
(tests/simcluster.py). kwok runs no container: what a driver pod would run, the test runs with that pod's
credentials and environment (its downward API resolved as the kubelet resolves it). Few tests, each showing
several things, since the control plane is slow on a shared machine."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from jobs import recipe as recipes
from jobs.recipe import RECIPE_ENV, Kubernetes
from launcher import chain, cli, kube, render, setup, state
from scripts.cluster import SIM_RUN_SECONDS
from tests.launcher.conftest import IMAGE, SINGLE, make
from tests.launcher.test_nightly import PLATFORM
from tests.simcluster import wait_for

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
SCHEDULED = "batch.kubernetes.io/cronjob-scheduled-timestamp"  # the CronJob controller's (cronjob/utils.go)


def sim(namespace: str, **overrides) -> recipes.Recipe:
    return make(SINGLE, **{
        "kubernetes.namespace": namespace, "kubernetes.priority_class": None, "kubernetes.queue": None,
        "kubernetes.image_pull_secrets": [], "kubernetes.pod_annotations": {SIM_RUN_SECONDS: "1"}, **overrides,
    })  # fmt: skip


def connect(real_cluster, namespace: str, kubeconfig: Path | None = None) -> kube.Cluster:
    lines: list[str] = []
    c = kube.Cluster(real_cluster.api_client(kubeconfig), namespace, out=lines.append, poll_s=0.3, log_drain_s=1,
                     pods_gone_timeout_s=60)  # fmt: skip
    c.lines = lines
    return c


def running_pods(c: kube.Cluster, job: str) -> list[dict]:
    return [p for p in c.list_pods(job) if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]


def downward_env(container: dict, pod: dict) -> dict[str, str]:
    """The container's environment as the kubelet gives it: values, and metadata.labels['...'] of the pod."""
    values = {}
    for v in container["env"]:
        if "value" in v:
            values[v["name"]] = v["value"]
        else:
            values[v["name"]] = pod["metadata"]["labels"][v["valueFrom"]["fieldRef"]["fieldPath"].split("'")[1]]
    return values


def minutely_nightly(real_cluster, namespace: str, *, suspend: bool) -> tuple[recipes.Recipe, kube.Cluster, object, str]:
    """The recipe's nightly CronJob, due every minute, created (suspended or not) with its simulated driver container
    running until deleted (kwok's exit after run-seconds), as a driver following stages does: (recipe, the admin's
    Cluster, its BatchV1Api, the CronJob's name)."""
    from kubernetes import client

    recipe = sim(namespace, stages=["prepare"], **{"kubernetes.nightly_schedule": "* * * * *"})
    admin = connect(real_cluster, namespace)
    batch = client.BatchV1Api(admin.api)
    cron = render.render_cronjob(recipe, IMAGE)
    cron["spec"]["suspend"] = suspend
    cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["annotations"] = {SIM_RUN_SECONDS: "600"}
    batch.create_namespaced_cron_job(namespace, cron)
    return recipe, admin, batch, render.cronjob_name(recipe)


def made_as_the_controller_makes_it(real_cluster, namespace: str, nightly: str, night: datetime) -> dict:
    """A Job of the CronJob for ``night`` as its controller would have made it (kubectl create job --from, with the
    scheduled-time annotation and the controller's name), created."""
    name = f"{nightly}-{int(night.timestamp()) // 60}"
    made = json.loads(real_cluster.kubectl_run("-n", namespace, "create", "job", name, f"--from=cronjob/{nightly}",
                                               "--dry-run=client", "-o", "json").stdout)  # fmt: skip
    made["metadata"]["annotations"][SCHEDULED] = night.strftime("%Y-%m-%dT%H:%M:%SZ")
    real_cluster.kubectl_run("apply", "-f", "-", stdin=json.dumps(made))
    return made


def test_a_nightly_driver_pod_retried_after_midnight_continues_its_nights_run(real_cluster, real_namespace, tmp_path,
                                                                              monkeypatch, capsys):  # fmt: skip
    """The CronJob controller's Job carries the scheduled time; a Job of last night (made as the controller makes it,
    annotation included, with kubectl create job --from) has its driver pod deleted today; the retried pod, run with
    its downward-API environment and the driver's ServiceAccount token, continues last night's run id and creates
    no second pipeline."""
    ns = real_namespace
    recipe, admin, batch, nightly = minutely_nightly(real_cluster, ns, suspend=False)
    last = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=2)
    batch.patch_namespaced_cron_job_status(
        nightly, ns, {"status": {"lastScheduleTime": last.strftime("%Y-%m-%dT%H:%M:%SZ")}},
        _content_type="application/merge-patch+json",
    )  # fmt: skip

    def started() -> list[dict]:
        return [j for j in admin.list_jobs(render.selector(recipe.run_id, render.DRIVER))
                if j["metadata"].get("ownerReferences", [{}])[0].get("name") == nightly]  # fmt: skip

    (by_controller,) = wait_for("a Job of the CronJob", started, timeout=60)
    batch.patch_namespaced_cron_job(nightly, ns, {"spec": {"suspend": True}})  # one start is all this test needs
    scheduled = by_controller["metadata"]["annotations"][SCHEDULED]
    minutes = int(by_controller["metadata"]["name"].removeprefix(f"{nightly}-"))  # the controller's name: the same time
    assert datetime.fromisoformat(scheduled).timestamp() == minutes * 60
    assert by_controller["spec"]["activeDeadlineSeconds"] == 22 * 3600

    # Last night's Job, 23:59 UTC yesterday
    yesterday = (datetime.now(timezone.utc) - timedelta(days=1)).replace(hour=23, minute=59, second=0, microsecond=0)
    last_night = made_as_the_controller_makes_it(real_cluster, ns, nightly, yesterday)
    name = last_night["metadata"]["name"]

    driver_token = real_cluster.token_kubeconfig(ns, render.DRIVER_SERVICE_ACCOUNT, tmp_path / "driver-kubeconfig")
    container = last_night["spec"]["template"]["spec"]["containers"][0]
    runs = []
    for attempt in ("first pod", "pod retried after the first was deleted"):
        (pod,) = wait_for(f"the driver's {attempt} running", lambda: running_pods(admin, name), timeout=90)
        for key, value in downward_env(container, pod).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("KUBECONFIG", str(driver_token))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        cli.pipeline(dated=True, logs=False)  # the pod's command, `vlmjobs pipeline --dated`, its recipe from its env
        runs.append((pod["metadata"]["name"], capsys.readouterr().out.splitlines()))
        admin.core.delete_namespaced_pod(pod["metadata"]["name"], ns)  # the driver pod lost: the Job makes another

    (first_pod, first_lines), (second_pod, second_lines) = runs
    run = f"{recipe.run_id}-{yesterday:%Y%m%d}"  # last night's run, though the day changed
    assert first_pod != second_pod
    assert first_lines[0] == f"==> prepare: created Job {ns}/{run}-prepare"
    assert second_lines[0] == f"==> prepare: Job {ns}/{run}-prepare already exists: Complete"
    assert second_lines[-1].startswith(f"==> pipeline done: prepare of run {run} in ")
    stage_jobs = [j["metadata"]["name"] for j in admin.list_jobs(render.selector()) if
                  j["metadata"]["labels"][render.LABEL_COMPONENT] != render.DRIVER]  # fmt: skip
    assert stage_jobs == [f"{run}-prepare"], "one pipeline"


def test_a_night_due_while_the_last_one_runs_does_not_start_and_status_says_why(real_cluster, real_namespace, monkeypatch,
                                                                                capsys):  # fmt: skip
    """Last night's driver still running (its Job in the CronJob's status.active, as the controller keeps it) when
    tonight is due: the real CronJob controller starts nothing under Forbid and records JobAlreadyActive on the
    CronJob; `vlmjobs status` says which night is in the way."""
    ns = real_namespace
    recipe, admin, batch, nightly = minutely_nightly(real_cluster, ns, suspend=True)  # until last night is in place
    yesterday = (datetime.now(timezone.utc) - timedelta(days=1)).replace(second=0, microsecond=0)
    name = made_as_the_controller_makes_it(real_cluster, ns, nightly, yesterday)["metadata"]["name"]
    uid = admin.get_job(name)["metadata"]["uid"]
    due = (datetime.now(timezone.utc) - timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    batch.patch_namespaced_cron_job_status(nightly, ns, {"status": {
        "lastScheduleTime": due, "active": [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "namespace": ns, "uid": uid}]}},
        _content_type="application/merge-patch+json")  # fmt: skip
    batch.patch_namespaced_cron_job(nightly, ns, {"spec": {"suspend": False}})

    def skipped() -> list[dict]:
        return [e for e in admin.list_events("CronJob", nightly) if e["reason"] == "JobAlreadyActive"]

    wait_for("the CronJob controller's JobAlreadyActive", skipped, timeout=60)
    owned = [j["metadata"]["name"] for j in admin.list_jobs(render.selector(recipe.run_id, render.DRIVER))]
    assert owned == [name], "no second night while the first runs"
    monkeypatch.setenv("KUBECONFIG", str(real_cluster.kubeconfig))
    cli.status(namespace=ns)
    said = [line for line in capsys.readouterr().out.splitlines() if "did not start" in line]
    assert len(said) == 1 and said[0].startswith(f"{nightly}: a night did not start (")
    assert f"the night of {yesterday:%Y-%m-%dT%H:%M:%SZ} (Job {name}) was still running" in said[0]


def test_the_kustomize_base_applies_twice_cleanly_keeps_a_real_secret_and_installs_no_cronjob(real_cluster, tmp_path):
    namespace = f"k-{uuid.uuid4().hex[:8]}"
    base = tmp_path / "k8s"
    setup.write(base, Kubernetes(namespace=namespace), size="1Ti", access_mode="ReadWriteOnce", storage_class=None,
                cluster_queue="cq")  # fmt: skip
    kubectl = real_cluster.kubectl_run
    for folder in (ROOT / "k8s", base):  # the committed base, and this test's copy of it in a namespace of its own
        kinds = [doc["kind"] for doc in yaml.safe_load_all(kubectl("kustomize", str(folder)).stdout)]
        assert sorted(kinds) == ["Namespace", "PersistentVolumeClaim", "Role", "RoleBinding", "ServiceAccount"]
    try:
        first = kubectl("apply", "-k", str(base), check=False)
        assert first.returncode == 0, first.stderr
        kubectl("-n", namespace, "create", "secret", "generic", "hf-token", "--from-literal=token=hf_real_token")
        dry = kubectl("apply", "-k", str(base), "--dry-run=server", "--validate=strict", check=False)
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.count("(server dry run)") == 5
        again = kubectl("apply", "-k", str(base), check=False)
        assert again.returncode == 0 and again.stderr == "", again.stderr
        assert [line.rsplit(" ", 1)[1] for line in again.stdout.splitlines()] == ["unchanged"] * 5
        token = kubectl("-n", namespace, "get", "secret", "hf-token", "-o", "jsonpath={.data.token}").stdout
        assert token == "aGZfcmVhbF90b2tlbg==", "the real token survives (base64 of hf_real_token)"
        assert kubectl("-n", namespace, "get", "cronjobs", "-o", "name").stdout == "", "make k8s-apply schedules nothing"
        # make nightly: the CronJob apart, from the recipe
        recipe_file = tmp_path / "recipe.yaml"
        recipe_file.write_text(yaml.safe_dump(SINGLE))
        cli.cronjob(str(recipe_file), out=str(base / "nightly" / "cronjob.yaml"), **{
            "kubernetes.namespace": namespace, "kubernetes.nightly_schedule": "30 1 * * *"})  # fmt: skip
        scheduled = kubectl("apply", "-k", str(base / "nightly"), check=False)
        assert scheduled.returncode == 0, scheduled.stderr
        cronjob = json.loads(kubectl("-n", namespace, "get", "cronjobs", "-o", "json").stdout)["items"]
        assert [(c["spec"]["schedule"], c["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"])
                for c in cronjob] == [("30 1 * * *", IMAGE)]  # fmt: skip
    finally:
        real_cluster.delete_namespace(namespace)


def pod_of(job: dict, namespace: str) -> dict:
    template = job["spec"]["template"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {**template["metadata"], "name": f"dry-{uuid.uuid4().hex[:6]}",
            "namespace": namespace}, "spec": template["spec"]}  # fmt: skip


def test_pod_template_is_kubernetes_strategic_merge_admitted_as_restricted_and_gpus_are_shared_only_where_allowed(
    real_cluster, real_namespace, tmp_path
):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    ns = real_namespace
    core = client.CoreV1Api(real_cluster.api_client())
    plain = render.render_job(sim(ns), "sft", IMAGE)
    (tmp_path / "pod.json").write_text(json.dumps(pod_of(plain, ns)))
    reordering = {"spec": {"containers": [{"name": "stage", "env": [
        {"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "PYTHONUNBUFFERED", "value": "0"},
        {"name": "HF_HOME", "$patch": "delete"}, {"name": "NCCL_IB_HCA", "value": "mlx5"}]}],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}, {"name": "rdma", "emptyDir": {}}],
        "nodeSelector": {"pool": "rdma"}}}  # fmt: skip
    for patch in (PLATFORM, reordering):
        # kubectl's own strategic merge (the Go library, on the Pod's struct tags) is the oracle for launcher.patch
        theirs = json.loads(real_cluster.kubectl_run("patch", "--local", "-f", str(tmp_path / "pod.json"),
                                                     "--type=strategic", "-p", json.dumps(patch), "-o", "json").stdout)  # fmt: skip
        ours = pod_of(render.render_job(sim(ns, **{"kubernetes.pod_template": patch}), "sft", IMAGE), ns)
        for pod in (theirs, ours):
            for variable in pod["spec"]["containers"][0]["env"]:  # the recipe a pod carries holds the patch, in ours only
                if variable["name"] == RECIPE_ENV:
                    variable["value"] = "the recipe"
        assert theirs["spec"] == ours["spec"]
        assert theirs["metadata"]["labels"] == ours["metadata"]["labels"]
    # admitted under the namespace's restricted Pod Security (enforced on pods, so a pod is what is dry-run)
    core.create_namespaced_pod(ns, ours, dry_run="All")
    risky = sim(ns, **{"kubernetes.pod_template": {"spec": {"hostNetwork": True}}})
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(ns, pod_of(render.render_job(risky, "sft", IMAGE), ns), dry_run="All")
    assert 'violates PodSecurity "restricted:latest": host namespaces (hostNetwork=true)' in json.loads(refused.value.body)["message"]

    # 12 H100s: only the time-sliced node has that many; sft may not use it, evaluate may; a MIG slice finds the MIG node
    c = connect(real_cluster, ns)
    twelve = {"gpus": 12, "gpu_product": "NVIDIA-H100-80GB-HBM3"}
    waiting = sim(ns, stages=["prepare", "sft", "evaluate"], **{"resources": {**SINGLE["resources"], **twelve},
                                                     "kubernetes.pod_annotations": {SIM_RUN_SECONDS: "600"}})  # fmt: skip
    mig = sim(ns, stages=["prepare", "evaluate"], **{"run.id": "mig", "kubernetes.pod_annotations": {SIM_RUN_SECONDS: "600"},
                                          "evaluate.resources": {"gpu_resource": "nvidia.com/mig-1g.5gb", "gpu_product": None}})  # fmt: skip
    for r, stage in ((waiting, "sft"), (waiting, "evaluate"), (mig, "evaluate")):
        chain.run_stage(c, r, stage, IMAGE, follow=False)

    def placed(job: str):
        pods = c.list_pods(job)
        if pods and pods[0]["spec"].get("nodeName"):
            return pods[0]["spec"]["nodeName"]
        unscheduled = [cond for p in pods for cond in p["status"].get("conditions") or []
                       if cond["type"] == "PodScheduled" and cond["status"] == "False"]  # fmt: skip
        return unscheduled and unscheduled[0]["message"]

    assert wait_for("evaluate placed", lambda: placed(render.job_name(waiting, "evaluate"))) == "shared-h100-0"
    assert wait_for("the MIG slice placed", lambda: placed(render.job_name(mig, "evaluate"))) == "mig-a100-0"
    refused_sft = wait_for("sft judged by the scheduler", lambda: placed(render.job_name(waiting, "sft")))
    # not placed: the one node with 12 free GPUs does not match a training stage's node affinity/selector
    assert refused_sft.startswith("0/") and "didn't match Pod's node affinity/selector" in refused_sft, refused_sft
    for r, stage in ((waiting, "sft"), (waiting, "evaluate"), (mig, "evaluate")):
        c.delete_job(render.job_name(r, stage))


def test_prune_removes_old_runs_with_their_finished_jobs_and_jobsets_and_keeps_a_run_still_running(
    real_cluster, real_namespace, tmp_path, monkeypatch, capsys
):
    """Four nights in the history, each with its Jobs on the cluster (a two-node stage's JobSet for the first): prune
    --keep=1 --jobs keeps the newest, and the second, whose Job the Job controller still runs; it removes the first and
    the third, their folders and their finished Jobs and JobSet, as the controllers left them."""
    from jobs import history
    from launcher.state import jobset_state

    ns = real_namespace
    root = tmp_path / "runs"
    nights = [f"t-2026120{day}" for day in range(1, 5)]
    for night in nights:
        (root / night).mkdir(parents=True)
        history.append(history.history_path(root, "t"), {"run_id": night, "value": 0.5, "primary_metric": "accuracy"})
    admin = connect(real_cluster, ns)

    def stage(night: str, seconds: str, **overrides) -> recipes.Recipe:
        return sim(ns, **{"run.id": night, "kubernetes.pod_annotations": {SIM_RUN_SECONDS: seconds}, **overrides})

    two_nodes = {"sft.resources": {"nodes": 2, "gpus": 8}}
    (jobset,) = render.render_stage(stage(nights[0], "1", **two_nodes), "sft", IMAGE)
    admin.create_jobset(jobset)
    for night, seconds in zip(nights[1:], ("600", "1", "1")):
        admin.create_job(render.render_job(stage(night, seconds), "prepare", IMAGE))
    wait_for("the first night's JobSet and the third and fourth nights' Jobs finished", lambda: (
        jobset_state(admin.get_jobset(jobset["metadata"]["name"])) == "Completed"
        and all(state.is_finished(admin.get_job(f"{night}-prepare")) for night in nights[2:])), timeout=90)  # fmt: skip

    recipe_path = tmp_path / "t.yaml"
    recipe_path.write_text(yaml.safe_dump(stage(nights[0], "1").to_dict()))
    monkeypatch.setenv("KUBECONFIG", str(real_cluster.kubeconfig))
    cli.prune(str(recipe_path), keep=1, jobs=True, **{"run.root": str(root), "name": "t"})
    said = capsys.readouterr().out.splitlines()
    assert f"kept {root / nights[3]}: one of the newest 1" in said and f"kept {root / nights[1]}: in use" in said
    assert f"deleted JobSet {ns}/{nights[0]}-sft (finished)" in said
    assert f"deleted Job {ns}/{nights[2]}-prepare (finished)" in said
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [nights[1], nights[3]]
    wait_for("the removed runs' Jobs and JobSet gone (foreground deletion)", lambda: not admin.list_jobsets(render.selector())
             and sorted(j["metadata"]["name"] for j in admin.list_jobs(render.selector()))
             == [f"{nights[1]}-prepare", f"{nights[3]}-prepare"], timeout=60)  # fmt: skip
