"""Every manifest the launcher can render, against the official Kubernetes schemas in strict mode
(kubernetes_validate, offline: unknown keys and wrong types fail) for 1.29 through 1.34, and
against the GA table for the recipe's target version. Recipes in recipes/ are globbed, so a new
recipe is covered by being added; each is also rendered multi-node."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from jobs import recipe as recipes
from jobs.contract import UserError
from launcher import features, render, setup
from tests.launcher.conftest import IMAGE, MULTI, SINGLE, make

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = ("1.29", "1.30", "1.31", "1.32", "1.33", "1.34")
SHIPPED = sorted(ROOT.glob("recipes/*.yaml"))
MULTI_NODE = {"resources.gpus": 8, "resources.nodes": 2}


JOBSET_SCHEMA = json.loads((Path(__file__).parent / "crds" / "jobset-v0.11.1-jobset-v1alpha2.json").read_text())


def validate(manifest: dict) -> None:
    """Kubernetes' own objects against its schemas; a JobSet against JobSet v0.11.1's CRD and its Job against Kubernetes'."""
    if manifest["kind"] == "JobSet":
        try:
            jsonschema.validate(manifest, JOBSET_SCHEMA)
        except jsonschema.ValidationError as e:
            pytest.fail(f"JobSet {manifest['metadata']['name']} invalid at {'/'.join(map(str, e.path))}: {e.message}")
        for replicated in manifest["spec"]["replicatedJobs"]:
            name = f"{manifest['metadata']['name']}-{replicated['name']}-0"
            validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, **replicated["template"]["metadata"]},
                      "spec": replicated["template"]["spec"]})
        return
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            at = "/".join(map(str, e.path))
            pytest.fail(
                f"{manifest['kind']} {manifest['metadata']['name']} invalid for Kubernetes {version} at {at}: {e.message}"
            )


def all_manifests(recipe: recipes.Recipe) -> list[dict]:
    image = render.resolve_image(recipe)
    manifests = [m for stage in recipe.stages for m in render.render_stage(recipe, stage, image)]
    return manifests + [render.render_driver_job(recipe, image), render.render_cronjob(recipe, image)]


def assert_ga(manifests: list[dict], target: str) -> None:
    for manifest in manifests:
        too_new = [f for f in features.used_by(manifest) if not features.is_ga(f, target)]
        assert too_new == [], f"{manifest['kind']} {manifest['metadata']['name']} uses {too_new}, not GA in {target}"


@pytest.fixture(autouse=True)
def revision(monkeypatch):
    monkeypatch.setenv("VLMJOBS_REVISION", "0123456789ab")  # the default image's tag, without git


def test_recipes_are_shipped():
    assert SHIPPED, "no recipes/*.yaml found"


@pytest.mark.parametrize("layout", ["single-node", "multi-node"])
@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_stage_of_every_shipped_recipe_is_schema_valid_and_ga(path, layout):
    recipe = recipes.load(path, MULTI_NODE if layout == "multi-node" else {})
    manifests = all_manifests(recipe)
    for manifest in manifests:
        validate(manifest)
    assert_ga(manifests, recipe.kubernetes.target_version)


@pytest.mark.parametrize("layout", ["single-node", "multi-node"])
def test_grpo_with_its_vllm_server_pod_is_a_schema_valid_jobset(layout):
    from tests.launcher.test_golden import OPEN_R1_GRPO, VLLM_SERVER

    recipe = recipes.load(OPEN_R1_GRPO, {**VLLM_SERVER, **(MULTI_NODE if layout == "multi-node" else {})})
    (jobset,) = render.render_stage(recipe, "grpo", render.resolve_image(recipe))
    assert [r["name"] for r in jobset["spec"]["replicatedJobs"]] == ["vllm", "node"]
    validate(jobset)  # startupPolicy and successPolicy as JobSet v0.11.1's CRD spells them; both Jobs as Kubernetes'
    assert_ga([jobset], recipe.kubernetes.target_version)


@pytest.mark.parametrize("target", ["1.29", "1.31"])  # before and after the pod failure policy is GA
@pytest.mark.parametrize("base", [SINGLE, MULTI], ids=["single", "multi"])
def test_test_recipes_are_schema_valid(base, target):
    for manifest in all_manifests(make(base, **{"kubernetes.target_version": target})):
        validate(manifest)


@pytest.mark.parametrize("target", VERSIONS)
@pytest.mark.parametrize("base", [SINGLE, MULTI], ids=["single", "multi"])
def test_test_recipes_use_only_features_ga_at_their_target(base, target):
    assert_ga(all_manifests(make(base, **{"kubernetes.target_version": target})), target)


def test_cluster_setup_is_schema_valid():
    for _, (_, manifests) in setup.files(
        recipes.Kubernetes(), size="1Ti", access_mode="ReadWriteMany", storage_class="nfs", cluster_queue="cq"
    ).items():
        for manifest in manifests:
            if manifest["apiVersion"].startswith("kueue.x-k8s.io/"):
                assert manifest["spec"] == {"clusterQueue": "cq"}  # a CRD: not in the Kubernetes schemas
                continue
            if manifest["kind"] == "Kustomization":  # kubectl's own file, no API object: test_nightly_on_cluster applies it
                continue
            validate(manifest)


def test_committed_k8s_folder_is_what_make_k8s_writes():
    for relative, (header, manifests) in setup.files(
        recipes.Kubernetes(), size="1Ti", access_mode="ReadWriteOnce", storage_class=None, cluster_queue="cluster-queue"
    ).items():
        path = ROOT / "k8s" / relative
        assert path.read_text() == setup.text(header, manifests), f"{path} is stale: run make k8s"


def test_secret_template_holds_no_token():
    template = yaml.safe_load((ROOT / "k8s/templates/hf-token-secret.yaml").read_text())
    assert template["stringData"] == {"token": render.HF_TOKEN_PLACEHOLDER}


def test_a_target_older_than_a_feature_the_manifest_uses_is_refused_in_one_line():
    manifest = render.render_stage(make(SINGLE), "sft", IMAGE)[0]
    manifest["spec"]["successPolicy"] = {"rules": [{"succeededIndexes": "0"}]}
    with pytest.raises(
        UserError,
        match=r'^kubernetes\.target_version 1\.31: Job llava-chartqa-sft uses successPolicy, GA in Kubernetes 1\.33 \(JobSuccessPolicy\); set kubernetes\.target_version to "1\.33" or newer$',
    ):
        features.check([manifest], "1.31", launcher=False)


def test_a_target_older_than_what_the_launcher_needs_is_refused():
    with pytest.raises(
        UserError,
        match=r'^kubernetes\.target_version 1\.26: the launcher uses the pod label batch\.kubernetes\.io/job-name, GA in Kubernetes 1\.27 .*; set kubernetes\.target_version to "1\.27" or newer$',
    ):
        render.render_stage(make(SINGLE, **{"kubernetes.target_version": "1.26"}), "sft", IMAGE)


def test_a_multi_node_stage_before_indexed_jobs_were_ga_names_them():
    with pytest.raises(UserError, match=r"and completionMode: Indexed, emptyDir\.sizeLimit"):
        render.render_stage(make(MULTI, **{"kubernetes.target_version": "1.23"}), "sft", IMAGE)


def test_a_malformed_target_version_is_refused():
    with pytest.raises(
        UserError, match=r'^kubernetes\.target_version: \'latest\' is not a Kubernetes version \(write it as "1\.31"\)$'
    ):
        render.render_stage(make(SINGLE, **{"kubernetes.target_version": "latest"}), "sft", IMAGE)


def test_pod_failure_policy_is_used_from_the_release_it_became_ga():
    assert (
        "podFailurePolicy"
        not in render.render_stage(make(SINGLE, **{"kubernetes.target_version": "1.30"}), "sft", IMAGE)[0]["spec"]
    )
    assert (
        "podFailurePolicy"
        in render.render_stage(make(SINGLE, **{"kubernetes.target_version": "1.31"}), "sft", IMAGE)[0]["spec"]
    )
