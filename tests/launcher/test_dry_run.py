"""Every rendered manifest, checked by the real API server (issue 10): a server-side dry run with strict
field validation, so an unknown or misspelt field fails here, and each stage's pod dry-run in a namespace
that enforces the restricted Pod Security Standard, so admission (PodSecurity, ServiceAccount, LimitRanger,
Priority, ...) judges the pods the Job controller will create. The official schemas stay in test_schemas.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jobs import recipe as recipes
from jobs.recipe import STAGES, TRAINING_STAGES
from jobs.stage_resources import resolve
from launcher import render
from tests.launcher.conftest import IMAGE

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
K8S_FILES = ("namespace.yaml", "pvc.yaml", "rbac.yaml", "templates/hf-token-secret.yaml")

pytestmark = pytest.mark.cluster


def dry_run(api, manifest: dict) -> dict:
    """Create ``manifest`` with dryRun=All and fieldValidation=Strict; the object as the server would store it."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    kind, namespace = manifest["kind"], manifest["metadata"].get("namespace")
    create = {
        "Job": client.BatchV1Api(api).create_namespaced_job,
        "CronJob": client.BatchV1Api(api).create_namespaced_cron_job,
        "Service": client.CoreV1Api(api).create_namespaced_service,
        "Pod": client.CoreV1Api(api).create_namespaced_pod,
    }[kind]
    try:
        response = create(namespace, manifest, dry_run="All", field_validation="Strict", _preload_content=False)
    except ApiException as e:
        pytest.fail(f"{kind} {manifest['metadata']['name']} refused by the API server: {e.status} {e.body}")
    return json.loads(response.data)


def group_job(jobset: dict) -> dict:
    """The Job the JobSet controller makes of the JobSet's one replicated Job (<jobset>-<replicatedJob>-0)."""
    (replicated,) = jobset["spec"]["replicatedJobs"]
    meta = {**replicated["template"]["metadata"], "name": f"{jobset['metadata']['name']}-{replicated['name']}-0",
            "namespace": jobset["metadata"]["namespace"]}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": replicated["template"]["spec"]}


def stage_pod(job: dict) -> dict:
    """The pod the Job controller would create from the Job's template."""
    template = job["spec"]["template"]
    metadata = {**template["metadata"], "name": f"{job['metadata']['name']}-dry", "namespace": job["metadata"]["namespace"]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def variants(path: Path, namespace: str):
    """(name, recipe): the recipe as shipped, and its training stages on two nodes."""
    yield "one-node", recipes.load(path, {"kubernetes.namespace": namespace})
    yield "two-nodes", recipes.load(path, {"kubernetes.namespace": namespace, "resources.nodes": 2})


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_stage_of_every_shipped_recipe_is_accepted_and_its_pods_admitted(path, real_cluster, real_namespace):
    api = real_cluster.api_client()
    checked = []
    for variant, recipe in variants(path, real_namespace):
        for stage in recipe.stages:
            manifests = render.render_stage(recipe, stage, IMAGE)
            # A multi-node stage's JobSet (a CRD) is checked against its schema in test_schemas.py; its Job, as the
            # JobSet controller creates it, here
            job = group_job(manifests[0]) if manifests[0]["kind"] == "JobSet" else manifests[0]
            stored_job = dry_run(api, job)
            assert stored_job["metadata"]["name"] == job["metadata"]["name"]
            # what the launcher relies on survives the server's defaulting
            assert stored_job["spec"]["backoffLimit"] == job["spec"]["backoffLimit"]
            assert stored_job["spec"].get("podFailurePolicy") == job["spec"].get("podFailurePolicy")
            pod = dry_run(api, stage_pod(job))
            assert pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False
            multi = resolve(recipe, stage).nodes > 1
            assert (job["spec"].get("completionMode") == "Indexed") == multi
            assert (manifests[0]["kind"] == "JobSet") == multi and len(manifests) == 1
            checked.append((variant, stage, multi))
    assert {s for _, s, _ in checked} == set(recipes.load(path).stages) and set(STAGES) >= {s for _, s, _ in checked}
    assert any(multi for *_, multi in checked) == any(s in TRAINING_STAGES for _, s, _ in checked)


def test_driver_job_and_nightly_cronjob_are_accepted_and_the_drivers_pod_admitted(real_cluster, real_namespace):
    api = real_cluster.api_client()
    for path in RECIPES:
        recipe = recipes.load(path, {"kubernetes.namespace": real_namespace})
        driver = render.render_driver_job(recipe, IMAGE)
        dry_run(api, driver)
        dry_run(api, stage_pod(driver))
        stored = dry_run(api, render.render_cronjob(recipe, IMAGE))
        assert stored["spec"]["timeZone"] == recipe.kubernetes.nightly_time_zone


def test_a_pod_breaking_the_restricted_standard_is_refused_in_the_prepared_namespace(real_cluster, real_namespace):
    # the namespace really enforces: the check above would be empty if PodSecurity let everything in
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    recipe = recipes.load(RECIPES[0], {"kubernetes.namespace": real_namespace})
    pod = stage_pod(render.render_stage(recipe, recipe.stages[0], IMAGE)[0])
    pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    with pytest.raises(ApiException) as refused:
        client.CoreV1Api(real_cluster.api_client()).create_namespaced_pod(real_namespace, pod, dry_run="All")
    assert refused.value.status == 403
    message = json.loads(refused.value.body)["message"]
    assert 'violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false' in message


def test_the_k8s_files_apply_as_make_k8s_apply_applies_them(real_cluster, real_namespace):
    docs = []
    for name in K8S_FILES:
        for doc in yaml.safe_load_all((ROOT / "k8s" / name).read_text()):
            doc = json.loads(json.dumps(doc).replace('"vlmjobs"', json.dumps(real_namespace)))  # into this test's namespace
            docs.append(doc)
    assert {d["kind"] for d in docs} == {"Namespace", "PersistentVolumeClaim", "ServiceAccount", "Role", "RoleBinding", "Secret"}
    text = "\n---\n".join(yaml.safe_dump(d) for d in docs)
    done = real_cluster.kubectl_run("apply", "--dry-run=server", "--validate=strict", "-f", "-", stdin=text, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("(server dry run)") == len(docs)
