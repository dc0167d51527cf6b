"""Nightly operations without a cluster (issue 22): the night a driver runs for, its deadline, the token Secrets
where they are needed, kubernetes.pod_template, GPU sharing and MIG, a resubmitted run whose recipe changed, and
the image tag make nightly pins. What a real control plane says about the same is in test_nightly_on_cluster.py."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone

import pytest

from jobs.contract import UserError
from launcher import chain, image, render, setup, state
from tests.launcher.conftest import IMAGE, MULTI, SINGLE, make
from tests.launcher.fake_kube import complete


def pod(manifest: dict) -> dict:
    return manifest["spec"]["template"]["spec"]


def env(manifest: dict) -> dict:
    return {e["name"]: e for e in pod(manifest)["containers"][0]["env"]}


# ---------------------------------------------------------------------------------------------
# One run per scheduled night


LATER = datetime(2026, 12, 9, 3, 0, tzinfo=timezone.utc)  # days after the night: a driver pod retried since


@pytest.mark.parametrize(
    "name, job, night",
    [
        # the CronJob controller writes the scheduled time in the CronJob's time zone (cronjob/utils.go, RFC 3339)
        ("scheduled before midnight in Los Angeles, after it in UTC",
         {"metadata": {"annotations": {"batch.kubernetes.io/cronjob-scheduled-timestamp": "2026-12-05T23:59:00-08:00"},
                       "creationTimestamp": "2026-12-06T08:01:00Z"}}, "20261205"),
        # kubectl create job --from=cronjob/... sets no scheduled time: the Job's creation, in the recipe's zone
        ("made by hand", {"metadata": {"creationTimestamp": "2026-12-06T07:30:00Z"}}, "20261205"),
        ("no Job: a driver outside the cluster", None, "20261208"),
    ],
)  # fmt: skip
def test_the_night_comes_from_the_drivers_job_not_the_clock(name, job, night):
    assert state.night_of(job, "America/Los_Angeles", LATER) == night


def test_the_nightly_driver_reads_its_job_through_the_downward_api_and_ends_before_the_next_night(single):
    cron = render.render_cronjob(single, IMAGE)
    job = cron["spec"]["jobTemplate"]
    assert env(job)[render.DRIVER_JOB_ENV]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}
    }
    assert job["spec"]["activeDeadlineSeconds"] == 22 * 3600, "not 7 days x 5 stages: Forbid would block a month"
    shorter = render.render_cronjob(make(SINGLE, **{"kubernetes.nightly_deadline_hours": 6}), IMAGE)
    assert shorter["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] == 6 * 3600
    one_off = render.render_driver_job(single, IMAGE)  # vlmjobs pipeline --in-cluster: as long as its stages may take
    assert one_off["spec"]["activeDeadlineSeconds"] == single.kubernetes.active_deadline_seconds * len(single.stages)
    assert render.DRIVER_JOB_ENV not in env(one_off)


def test_a_nightly_drivers_stages_end_with_its_night_a_job_and_a_jobsets_jobs_alike():
    """state.ends_at: the Job controller's deadline, from the driver Job's start; render.within bounds each stage by it."""
    driver = {"spec": {"activeDeadlineSeconds": 22 * 3600}, "status": {"startTime": "2026-12-06T03:00:05Z"}}
    assert state.ends_at(driver) == datetime(2026, 12, 7, 1, 0, 5, tzinfo=timezone.utc)
    assert state.ends_at({"spec": {"activeDeadlineSeconds": 60}, "status": {}}) is None  # not started: no bound yet
    assert state.ends_at(None) is None
    recipe = make(MULTI)
    (job,) = render.render_stage(make(SINGLE), "sft", IMAGE)
    (group,) = render.render_stage(recipe, "sft", IMAGE)
    assert group["kind"] == "JobSet"
    assert render.within(job, 3600.7)["spec"]["activeDeadlineSeconds"] == 3600
    assert render.within(job, 10**9)["spec"]["activeDeadlineSeconds"] == job["spec"]["activeDeadlineSeconds"]
    assert render.within(job, -5)["spec"]["activeDeadlineSeconds"] == 1, "a night already over: the stage fails at once"
    bounded = render.within(group, 900)
    assert [j["template"]["spec"]["activeDeadlineSeconds"] for j in bounded["spec"]["replicatedJobs"]] == [900]
    assert group["spec"]["replicatedJobs"][0]["template"]["spec"]["activeDeadlineSeconds"] != 900, "a copy, not the manifest"
    assert bounded["metadata"] == group["metadata"], "the same run's Jobs: recipe and fingerprint unchanged"


# ---------------------------------------------------------------------------------------------
# Secrets where they are needed


def test_the_read_token_is_optional_and_only_a_pushing_merge_push_needs_the_write_token():
    recipe = make(SINGLE, **{"kubernetes.hf_write_token_secret": "hf-write"})
    read = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}}}
    for stage in recipe.stages:  # a run on public models starts without any Secret
        assert env(render.render_job(recipe, stage, IMAGE))["HF_TOKEN"] == read, stage
    pushing = make(SINGLE, **{"kubernetes.hf_write_token_secret": "hf-write", "merge_push.push": True,
                              "merge_push.repo_id": "org/model"})  # fmt: skip
    assert env(render.render_job(pushing, "merge_push", IMAGE))["HF_TOKEN"] == {
        "name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-write", "key": "token"}}
    }, "required: a push without its token should not start"
    assert env(render.render_job(pushing, "sft", IMAGE))["HF_TOKEN"] == read, "the write token only where it pushes"
    nothing = make(SINGLE, **{"kubernetes.hf_token_secret": None, "merge_push.push": True, "merge_push.repo_id": "org/m"})
    assert "HF_TOKEN" not in env(render.render_job(nothing, "sft", IMAGE))
    with pytest.raises(UserError, match=r"^merge_push\.push: pushing needs a write token; set kubernetes\.hf_write_token_secret"):
        render.render_job(nothing, "merge_push", IMAGE)


# ---------------------------------------------------------------------------------------------
# kubernetes.pod_template


PLATFORM = {  # what a platform team adds: an RDMA pool's toleration, a zone preference, NCCL's interface
    "metadata": {"labels": {"team": "vision"}},
    "spec": {
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "preference": {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In",
                                                                 "values": ["zone-a"]}]}}]}},
        # tolerations has no merge key in PodSpec: the patch's list replaces ours, so it repeats the GPU one
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                        {"key": "example.com/rdma", "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [{"name": "stage", "env": [{"name": "NCCL_SOCKET_IFNAME", "value": "eth1"}]}],
    },
}  # fmt: skip


def test_the_pod_template_patch_is_applied_last_to_every_pod_the_recipe_renders(single):
    recipe = make(SINGLE, **{"kubernetes.pod_template": PLATFORM})
    plain = render.render_job(single, "sft", IMAGE)
    for manifest in [render.render_job(recipe, "sft", IMAGE), render.render_cronjob(recipe, IMAGE)["spec"]["jobTemplate"]]:
        spec = pod(manifest)
        assert spec["tolerations"] == PLATFORM["spec"]["tolerations"]
        assert manifest["spec"]["template"]["metadata"]["labels"]["team"] == "vision"
        assert env(manifest)["NCCL_SOCKET_IFNAME"] == {"name": "NCCL_SOCKET_IFNAME", "value": "eth1"}
        assert spec["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 50
    patched = render.render_job(recipe, "sft", IMAGE)
    # what the patch does not name is kept: our env (the new variable goes first, where the API server's strategic
    # merge puts it: test_nightly_on_cluster compares with kubectl's), the GPU node affinity, the security context
    assert [e["name"] for e in pod(patched)["containers"][0]["env"]] == ["NCCL_SOCKET_IFNAME"] + [
        e["name"] for e in pod(plain)["containers"][0]["env"]]  # fmt: skip
    node_affinity = pod(patched)["affinity"]["nodeAffinity"]
    assert node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] == pod(plain)["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]  # fmt: skip
    assert pod(patched)["securityContext"] == pod(plain)["securityContext"]


@pytest.mark.parametrize(
    "name, template, message",
    [
        ("a second container", {"spec": {"containers": [{"name": "sidecar", "env": []}]}},
         r"^kubernetes\.pod_template\.spec\.containers\[0\]: name it 'stage'"),
        ("a Job key", {"backoffLimit": 1}, r"^kubernetes\.pod_template: backoffLimit: a pod template patch has only metadata and spec$"),
        ("an env var without its name", {"spec": {"containers": [{"name": "stage", "env": [{"value": "x"}]}]}},
         r"^kubernetes\.pod_template: an item of a list merged by 'name' has no 'name'"),
    ],
)  # fmt: skip
def test_a_pod_template_that_cannot_apply_is_refused_in_one_line(name, template, message):
    with pytest.raises(UserError, match=message):
        render.render_job(make(SINGLE, **{"kubernetes.pod_template": template}), "sft", IMAGE)


# ---------------------------------------------------------------------------------------------
# GPU sharing and MIG


def required_terms(manifest: dict) -> list[list[dict]]:
    required = pod(manifest).get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    return [term["matchExpressions"] for term in (required or {}).get("nodeSelectorTerms", [])]


def test_training_stays_off_shared_gpus_and_other_stages_take_the_product_whatever_its_suffix(single):
    sft = render.render_job(single, "sft", IMAGE)
    assert pod(sft)["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert required_terms(sft) == [
        [{"key": "nvidia.com/gpu.replicas", "operator": "DoesNotExist"}],
        [{"key": "nvidia.com/gpu.replicas", "operator": "Lt", "values": ["2"]}],
    ]
    evaluate = render.render_job(single, "evaluate", IMAGE)
    assert "nodeSelector" not in pod(evaluate)
    assert required_terms(evaluate) == [[{"key": "nvidia.com/gpu.product", "operator": "In",
                                          "values": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-80GB-HBM3-SHARED"]}]]  # fmt: skip
    allowed = render.render_job(make(SINGLE, **{"sft.resources": {"shared_gpu": True}}), "sft", IMAGE)
    assert required_terms(allowed) == required_terms(evaluate)


def test_a_mig_slice_is_asked_as_its_own_resource():
    recipe = make(SINGLE, **{"evaluate.resources": {"gpu_resource": "nvidia.com/mig-1g.5gb", "gpu_product": None}})
    limits = pod(render.render_job(recipe, "evaluate", IMAGE))["containers"][0]["resources"]["limits"]
    assert limits == {"memory": "64Gi", "nvidia.com/mig-1g.5gb": "1"}
    with pytest.raises(UserError, match=r"evaluate\.resources \(or resources\)\.gpu_resource: 'mig-1g' is not an extended resource name"):
        render.render_job(make(SINGLE, **{"evaluate.resources": {"gpu_resource": "mig-1g"}}), "evaluate", IMAGE)


# ---------------------------------------------------------------------------------------------
# A resubmitted run whose recipe changed


def test_a_run_resubmitted_with_a_changed_recipe_is_refused_naming_the_keys(server, cluster):
    server.add_job(render.render_job(make(SINGLE), "sft", IMAGE), complete())
    changed = make(SINGLE, **{"sft.args.learning_rate": 1e-5, "seed": 7})
    with pytest.raises(UserError, match=(
        r"^sft: Job vlmjobs/llava-chartqa-sft of run llava-chartqa was made from another recipe \(2 keys differ: "
        r"seed, sft\.args\.learning_rate\); run it under a new id \(--run=llava-chartqa-2\) or delete the run's Jobs "
        r"first \(vlmjobs delete --run=llava-chartqa\)$")):  # fmt: skip
        chain.run_stage(cluster, changed, "sft", IMAGE)
    chain.run_stage(cluster, make(SINGLE), "sft", IMAGE)  # the same recipe: its Complete Job is its result
    assert cluster.lines[-1] == "==> sft: succeeded"


def test_a_job_made_before_a_schema_key_was_added_is_the_same_recipe():
    """An upgrade of vlmjobs mid-run adds keys at their defaults: the fingerprint changes, the recipe does not."""
    import json

    from jobs.recipe import RECIPE_ENV

    manifest = render.render_job(make(SINGLE), "sft", IMAGE)
    container = pod(manifest)["containers"][0]
    recipe_env = next(e for e in container["env"] if e["name"] == RECIPE_ENV)
    older = json.loads(recipe_env["value"])
    del older["kubernetes"]["pod_template"]  # as a Job made before issue 22 carries it
    recipe_env["value"] = json.dumps(older)
    manifest["metadata"]["annotations"][render.ANNOTATION_FINGERPRINT] = "made-before"
    now = render.cluster_recipe(make(SINGLE), IMAGE).to_dict()
    assert state.recipe_changes(manifest, "fingerprint-now", now) is None
    now["seed"] = 1
    assert state.recipe_changes(manifest, "fingerprint-now", now) == ["seed"]


# ---------------------------------------------------------------------------------------------
# Set-up and schedule apart; the image make nightly pins


def test_the_kustomize_base_is_the_set_up_only():
    files = setup.files(render_defaults(), size="1Ti", access_mode="ReadWriteOnce", storage_class=None, cluster_queue="q")
    (base,) = files["kustomization.yaml"][1]
    assert base["resources"] == ["namespace.yaml", "pvc.yaml", "rbac.yaml"]  # no Secret template, no CronJob
    (nightly,) = files["nightly/kustomization.yaml"][1]
    assert nightly["resources"] == ["cronjob.yaml"]


def render_defaults():
    from jobs.recipe import Kubernetes

    return Kubernetes()


def git(repo, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_make_nightly_refuses_an_image_tag_of_uncommitted_changes_and_says_what_it_pulls(tmp_path, monkeypatch, capsys):
    from launcher import cli

    repo = tmp_path / "checkout"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "recipe.yaml").write_text(
        "name: nightly-test\nmodel: {name_or_path: llava-hf/llava-1.5-7b-hf, family: llava}\n"
        "data: {sft: {path: HuggingFaceM4/ChartQA, format: chartqa}}\nstages: [prepare, sft]\n"
    )
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "recipe")
    monkeypatch.setattr(image, "PROJECT_ROOT", repo)
    monkeypatch.delenv("VLMJOBS_REVISION", raising=False)
    head = git(repo, "rev-parse", "--short=12", "HEAD")
    cli.cronjob(str(repo / "recipe.yaml"), out=str(tmp_path / "cronjob.yaml"))
    pulled = f"{image.REGISTRY}/vlmjobs:{image.image_tag()}"
    assert pulled.endswith(head)
    assert capsys.readouterr().err == (
        f"wrote {tmp_path / 'cronjob.yaml'}: the CronJob will pull {pulled} (schedule '0 2 * * *', Etc/UTC)\n"
    )
    assert f"image: {pulled}" in (tmp_path / "cronjob.yaml").read_text()
    (repo / "recipe.yaml").write_text((repo / "recipe.yaml").read_text() + "seed: 1\n")
    with pytest.raises(UserError, match=rf"^cronjob: {pulled} is tagged with commit {head}, but this checkout has "
                                        r"uncommitted changes that no image under that tag holds; commit them"):  # fmt: skip
        cli.cronjob(str(repo / "recipe.yaml"))
    cli.cronjob(str(repo / "recipe.yaml"), **{"kubernetes.image": IMAGE})  # an image named by the user is theirs
