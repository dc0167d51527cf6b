"""The rendered Job, piece by piece: one behaviour per test. Goldens (test_golden.py) hold the
whole manifests; schemas and GA versions are in test_schemas.py."""

from __future__ import annotations

import json

import pytest

from jobs.contract import UserError
from jobs.recipe import RECIPE_ENV
from jobs.stage_resources import resolve
from launcher import render
from launcher.commands import stage_argv
from tests.launcher.conftest import IMAGE, MULTI, SINGLE, make


def job(recipe, stage="sft", image=IMAGE) -> dict:
    return render.render_stage(recipe, stage, image)[0]


def container(manifest: dict) -> dict:
    return manifest["spec"]["template"]["spec"]["containers"][0]


def pod_spec(manifest: dict) -> dict:
    return manifest["spec"]["template"]["spec"]


def env(manifest: dict) -> dict:
    return {e["name"]: e for e in container(manifest)["env"]}


def nones(value, path="") -> list[str]:
    if value is None:
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in nones(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in nones(v, f"{path}[{i}]")]
    return []


def test_job_is_named_after_run_and_stage(single):
    assert job(single, "merge_push")["metadata"]["name"] == "llava-chartqa-merge-push"


def test_job_labels_name_the_app_stage_and_run(single):
    labels = job(single, "merge_push")["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "vlmjobs"
    assert labels["app.kubernetes.io/part-of"] == "vlmjobs"
    assert labels["app.kubernetes.io/component"] == "merge_push"
    assert labels["app.kubernetes.io/instance"] == "llava-chartqa"


def test_annotation_holds_the_fingerprint_of_the_recipe_the_job_runs(single):
    manifest = job(single)
    assert (
        manifest["metadata"]["annotations"][render.ANNOTATION_FINGERPRINT]
        == render.cluster_recipe(single, IMAGE).fingerprint()
    )
    assert manifest["spec"]["template"]["metadata"]["annotations"] == manifest["metadata"]["annotations"]


def test_no_key_is_none_in_any_stage(single, multi):
    for recipe in (single, multi):
        for stage in recipe.stages:
            for manifest in render.render_stage(recipe, stage, IMAGE):
                assert nones(manifest) == []


def test_container_runs_the_local_runners_command_with_the_recipe_resolved_for_the_cluster(single):
    manifest = job(single)
    resolved = render.cluster_recipe(single, IMAGE)
    assert container(manifest)["command"] == stage_argv(resolved, "sft")
    passed = json.loads(env(manifest)[RECIPE_ENV]["value"])
    assert passed["run"] == {"id": "llava-chartqa", "root": "/runs", "keep": None}
    assert passed["kubernetes"]["image"] == IMAGE


def test_image_is_the_pinned_one(single):
    assert container(job(single))["image"] == IMAGE


@pytest.mark.parametrize(
    "name, image, message",
    [
        (
            "latest",
            "ghcr.io/vlmjobs/vlmjobs:latest",
            r"^kubernetes\.image: 'ghcr\.io/vlmjobs/vlmjobs:latest' is not pinned; use a version tag or a digest \(@sha256:\.\.\.\), never latest$",
        ),
        (
            "untagged",
            "ghcr.io/vlmjobs/vlmjobs",
            r"^kubernetes\.image: 'ghcr\.io/vlmjobs/vlmjobs' has no tag; pin it with a version tag or a digest",
        ),
        ("registry port is no tag", "registry:5000/vlmjobs", r"has no tag"),
        ("bad digest", "ghcr.io/vlmjobs/vlmjobs@sha256:abc", r"has a malformed digest"),
        ("no git revision", "ghcr.io/vlmjobs/vlmjobs:0.1.0-unknown", r"no git revision to tag the default image with"),
    ],
)
def test_unpinned_images_are_refused(single, name, image, message):
    with pytest.raises(UserError, match=message):
        job(single, image=image)


def test_a_digest_pins_the_image(single):
    digest = "ghcr.io/vlmjobs/vlmjobs@sha256:" + "a" * 64
    assert container(job(single, image=digest))["image"] == digest


def test_default_image_is_the_projects_at_this_revision(single, monkeypatch):
    monkeypatch.setenv("VLMJOBS_REVISION", "feedbeef0001")
    recipe = make(SINGLE, **{"kubernetes.image": None})
    assert render.resolve_image(recipe) == "ghcr.io/vlmjobs/vlmjobs:0.1.0-feedbeef0001"


def test_gpus_are_limits_and_cpu_memory_are_requests(single):
    resources = container(job(single))["resources"]
    assert resources == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "1"},
    }


def test_prepare_runs_on_cpu_away_from_gpu_nodes(single):
    manifest = job(single, "prepare")
    assert "nvidia.com/gpu" not in container(manifest)["resources"]["limits"]
    assert "nodeSelector" not in pod_spec(manifest) and "tolerations" not in pod_spec(manifest)


def test_gpu_pods_select_the_product_and_tolerate_the_gpu_taint(single):
    spec = pod_spec(job(single))
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_shm_is_a_memory_backed_empty_dir_of_the_recipes_size(single):
    spec = pod_spec(job(single))
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in spec["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container(job(single))["volumeMounts"]


def test_pvc_is_mounted_at_the_run_root_with_hf_home_on_it(single):
    manifest = job(single)
    assert {"name": "runs", "persistentVolumeClaim": {"claimName": "vlmjobs-runs"}} in pod_spec(manifest)["volumes"]
    assert {"name": "runs", "mountPath": "/runs"} in container(manifest)["volumeMounts"]
    assert env(manifest)["HF_HOME"]["value"] == "/runs/.cache/huggingface"


def test_hf_token_comes_from_the_secret_never_a_value(single):
    token = env(job(single))["HF_TOKEN"]  # optional: a missing Secret does not block public models (test_nightly.py)
    assert token == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}}}


def test_no_token_secret_means_no_hf_token(single):
    assert "HF_TOKEN" not in env(job(make(SINGLE, **{"kubernetes.hf_token_secret": None})))


def test_priority_pull_secrets_and_queue_come_from_the_recipe(single):
    manifest = job(single)
    assert pod_spec(manifest)["priorityClassName"] == "batch-high"
    assert pod_spec(manifest)["imagePullSecrets"] == [{"name": "ghcr-pull"}]
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"


def test_optional_scheduling_keys_are_left_out_when_unset():
    spec = pod_spec(
        job(
            make(
                SINGLE,
                **{"kubernetes.priority_class": None, "kubernetes.image_pull_secrets": [], "kubernetes.queue": None},
            )
        )
    )
    assert "priorityClassName" not in spec and "imagePullSecrets" not in spec and "serviceAccountName" not in spec


def test_job_retries_by_itself_never_on_exit_2_or_3_and_not_counting_disruptions(single):
    """Exit 2 is a user error; 3 a run that regressed against the recipe's last good night (issue 22): a retry of
    either ends the same."""
    spec = job(single)["spec"]
    assert pod_spec(job(single))["restartPolicy"] == "Never"
    assert spec["backoffLimit"] == 3
    assert spec["podFailurePolicy"] == {
        "rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": {"containerName": "stage", "operator": "In", "values": [2, 3]}},
        ]
    }


def test_deadlines_ttl_and_grace_period_come_from_the_recipe(single):
    manifest = job(single)
    assert manifest["spec"]["activeDeadlineSeconds"] == 7 * 24 * 3600
    assert manifest["spec"]["ttlSecondsAfterFinished"] == 3 * 24 * 3600
    assert pod_spec(manifest)["terminationGracePeriodSeconds"] == 300


def test_pods_meet_the_restricted_pod_security_standard_and_can_write_the_pvc(single):
    manifest = job(single)
    assert pod_spec(manifest)["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container(manifest)["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }


def test_stage_pods_get_no_api_token(single):
    assert pod_spec(job(single))["automountServiceAccountToken"] is False


def test_several_gpus_launch_one_process_each_through_accelerate():
    manifest = job(make(SINGLE, **{"resources.gpus": 8}))
    assert container(manifest)["command"] == [
        "python", "-m", "launcher.distributed", "--multi_gpu", "--num_processes", "8", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "jobs.sft",
    ]  # fmt: skip
    assert env(manifest)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"] == "285"


def group_job(jobset: dict) -> dict:
    """The JobSet's one replicated Job, as a Job (its template's spec)."""
    (replicated,) = jobset["spec"]["replicatedJobs"]
    return {"spec": replicated["template"]["spec"]}


def test_multi_node_stage_is_a_jobset_of_one_indexed_job_of_one_pod_per_node(multi):
    jobset = job(multi)
    assert (jobset["apiVersion"], jobset["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert (replicated["name"], replicated["replicas"]) == ("node", 1)
    spec = replicated["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    # JobSet makes the headless Service and the pods' hostnames; rank 0 is found before it is ready
    assert jobset["spec"]["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}


def test_multi_node_group_fails_as_one_and_jobset_restarts_it(multi):
    jobset = job(multi)
    spec = group_job(jobset)["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["podFailurePolicy"] == {"rules": [
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": "stage", "operator": "In", "values": [2]}},
    ]}
    policy = jobset["spec"]["failurePolicy"]
    assert (policy["maxRestarts"], policy["restartStrategy"]) == (1, "BlockingRecreate")  # kubernetes.backoff_limit
    assert [(r["name"], r["action"]) for r in policy["rules"]] == [
        ("userError", "FailJobSet"), ("deadline", "FailJobSet"), ("disruption", "RestartJobSetAndIgnoreMaxRestarts")]
    assert not render.retried_by_launcher(multi, resolve(multi, "sft"))


def test_the_jobsets_rules_tell_the_job_controllers_failure_messages_apart(multi):
    """The exit-2 message as the real Job controller wrote it (recorded), the disruption one as kubernetes v1.34's
    pod_failure_policy.go formats it; JobSet matches them with Go's regexp (unanchored search, as re.search)."""
    import re

    from tests.launcher.fake_kube import recorded

    exit_2 = recorded("exit-2").status["conditions"][-1]
    assert exit_2["reason"] == "PodFailurePolicy"
    disrupted = "Pod vlmjobs/qwen2vl-chartqa-sft-node-0-1-x7k2p has condition DisruptionTarget matching FailJob rule at index 0"
    crashed = "Job has reached the specified backoff limit"
    rules = {r["name"]: r for r in job(multi)["spec"]["failurePolicy"]["rules"]}

    def matches(rule, reason, message):
        return reason in rule["onJobFailureReasons"] and all(
            re.search(p, message) for p in rule.get("onJobFailureMessagePatterns", []))

    assert matches(rules["userError"], "PodFailurePolicy", exit_2["message"])
    assert not matches(rules["disruption"], "PodFailurePolicy", exit_2["message"])
    assert matches(rules["disruption"], "PodFailurePolicy", disrupted)
    assert not matches(rules["userError"], "PodFailurePolicy", disrupted)
    assert not any(matches(rule, "BackoffLimitExceeded", crashed) for rule in rules.values()), "a crash is counted"


def test_multi_node_ranks_rendezvous_at_rank_0s_jobset_hostname_and_take_their_rank_from_the_index(multi):
    manifest = group_job(job(multi))
    command = container(manifest)["command"]
    assert command[command.index("--num_processes") + 1] == "16"
    assert command[command.index("--machine_rank") + 1] == "$(NODE_RANK)"
    # <jobset>-<replicatedJob>-<job index>-<pod index>.<subdomain: the JobSet's name>
    assert command[command.index("--main_process_ip") + 1] == "qwen2vl-chartqa-sft-node-0-0.qwen2vl-chartqa-sft"
    assert env(manifest)["NODE_RANK"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }


def test_the_jobset_carries_the_kueue_labels_and_its_jobs_do_not():
    recipe = make(MULTI, **{"kubernetes.queue": "gpu-queue", "kubernetes.priority": "research-high"})
    jobset = job(recipe)
    assert jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert jobset["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "research-high"
    child = jobset["spec"]["replicatedJobs"][0]["template"]["metadata"]["labels"]
    assert not any(key.startswith("kueue.x-k8s.io/") for key in child), "Kueue admits the JobSet whole"


def test_single_node_stages_of_a_multi_node_recipe_are_jobs(multi):
    assert [m["kind"] for m in render.render_stage(multi, "evaluate", IMAGE)] == ["Job"]


def test_before_1_31_the_launcher_retries_since_there_is_no_ga_pod_failure_policy():
    spec = job(make(SINGLE, **{"kubernetes.target_version": "1.29"}))["spec"]
    assert "podFailurePolicy" not in spec and spec["backoffLimit"] == 0


def test_a_stage_outside_the_recipe_is_refused():
    with pytest.raises(UserError, match=r"^--stage: dpo is not in the recipe's stages \(prepare, sft\)$"):
        job(make(SINGLE, stages=["prepare", "sft"]), "dpo")


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "kubernetes.namespace",
            "Team_A",
            r"^kubernetes\.namespace: 'Team_A' is not a DNS-1123 label of at most 63 characters",
        ),
        ("kubernetes.pvc", "runs_pvc", r"^kubernetes\.pvc: 'runs_pvc' is not a DNS-1123 name"),
        ("kubernetes.hf_token_secret", "HF", r"^kubernetes\.hf_token_secret: 'HF' is not a DNS-1123 name"),
        ("kubernetes.queue", "gpu.queue", r"^kubernetes\.queue: 'gpu\.queue' is not a DNS-1123 label"),
        ("kubernetes.mount_path", "runs", r"^kubernetes\.mount_path: 'runs' must be an absolute folder of its own"),
        ("resources.memory", "64GB", r"^sft\.resources \(or resources\)\.memory: '64GB' is not a Kubernetes quantity"),
        ("resources.gpu_product", "H100 80GB", r"gpu_product: 'H100 80GB' is not a label value"),
    ],
)
def test_names_and_quantities_are_checked_with_the_key_that_sets_them(key, value, message):
    with pytest.raises(UserError, match=message):
        job(make(SINGLE, **{key: value}))


def with_pod_annotations(base: dict, annotations: dict) -> dict:
    # a dict, not dotted overrides: annotation keys hold dots
    return {**base, "kubernetes": {**base["kubernetes"], "pod_annotations": annotations}}


def test_pod_annotations_reach_every_stage_pod_and_only_the_pods(multi):
    # issue 10: how a test (or a user: safe-to-evict) annotates the pods, e.g. the simulated cluster's exit codes
    chosen = {"sim.vlmjobs.io/exit-code": "2", "cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
    recipe = make(with_pod_annotations(MULTI, chosen))
    for stage in recipe.stages:
        manifest = job(recipe, stage)
        pods_of = manifest if manifest["kind"] == "Job" else group_job(manifest)
        pod_annotations = pods_of["spec"]["template"]["metadata"]["annotations"]
        assert {k: pod_annotations[k] for k in chosen} == chosen, stage
        assert pod_annotations[render.ANNOTATION_FINGERPRINT] == manifest["metadata"]["annotations"][
            render.ANNOTATION_FINGERPRINT
        ]
        assert not set(chosen) & set(manifest["metadata"]["annotations"]), "the Job itself is not annotated"
    driver = render.render_driver_job(recipe, IMAGE)
    assert "annotations" not in driver["spec"]["template"]["metadata"], "the driver's pod is not a stage pod"


def test_pod_annotations_cannot_replace_the_fingerprint(single):
    recipe = make(with_pod_annotations(SINGLE, {render.ANNOTATION_FINGERPRINT: "forged"}))
    manifest = job(recipe)
    assert manifest["spec"]["template"]["metadata"]["annotations"][render.ANNOTATION_FINGERPRINT] != "forged"


def test_pod_annotations_default_to_none():
    assert make(SINGLE).kubernetes.pod_annotations == {}


@pytest.mark.parametrize(
    "annotations, message",
    [
        ({"sim.vlmjobs.io/exit-code": 2}, r'^kubernetes\.pod_annotations\.sim\.vlmjobs\.io/exit-code: annotation values are text; quote it \("2"\)$'),
        ({"bad key": "x"}, r"^kubernetes\.pod_annotations\.bad key: 'bad key' is not an annotation key"),
        ({"Example.com/x": "x"}, r"is not an annotation key"),
        ({"a/b/c": "x"}, r"is not an annotation key"),
    ],
)
def test_pod_annotations_are_checked_with_the_key_that_sets_them(annotations, message):
    with pytest.raises(UserError, match=message):
        job(make(with_pod_annotations(SINGLE, annotations)))


def test_run_ids_that_cannot_name_jobs_are_refused_by_the_recipe():
    with pytest.raises(UserError, match=r"run\.id: 'Run_1' must be a DNS-1123 label of at most 43 characters"):
        make(SINGLE, **{"run.id": "Run_1"})


def test_driver_job_runs_the_pipeline_with_its_service_account_on_cpu(single):
    driver = render.render_driver_job(single, IMAGE)
    spec = driver["spec"]["template"]["spec"]
    assert driver["metadata"]["name"] == "llava-chartqa-pipeline"
    assert spec["serviceAccountName"] == "vlmjobs-driver"
    assert spec["containers"][0]["command"] == ["python", "-m", "launcher.cli", "pipeline"]
    assert "volumes" not in spec and "nvidia.com/gpu" not in spec["containers"][0]["resources"]["limits"]


def test_driver_hands_the_pinned_image_to_the_stage_jobs(single):
    driver = render.render_driver_job(make(SINGLE, **{"kubernetes.image": None}), IMAGE)
    passed = json.loads(driver["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"])
    assert passed["kubernetes"]["image"] == IMAGE


def test_cronjob_runs_a_dated_pipeline_nightly_never_two_at_once(single):
    cron = render.render_cronjob(single, IMAGE)
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["startingDeadlineSeconds"] == 3600
    assert (cron["spec"]["schedule"], cron["spec"]["timeZone"]) == ("0 2 * * *", "Etc/UTC")
    command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command == ["python", "-m", "launcher.cli", "pipeline", "--dated"]


def test_cronjob_refuses_a_run_id_with_no_room_for_the_date():
    with pytest.raises(
        UserError,
        match=r"^run\.id: 'r{40}' is too long for the nightly pipeline, which appends -YYYYMMDD: at most 34 characters$",
    ):
        render.render_cronjob(make(SINGLE, **{"run.id": "r" * 40}), IMAGE)


def test_dump_is_plain_yaml_without_anchors(multi):
    text = render.dump(render.render_stage(multi, "sft", IMAGE) + render.render_driver_rbac("vlmjobs"))
    assert "&id" not in text and "*id" not in text


def test_driver_role_has_exactly_the_verbs_the_launcher_uses():
    role = render.render_driver_rbac("vlmjobs")[1]
    assert {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]} == {
        (("batch",), ("jobs",)): {"create", "get", "list", "watch", "delete"},
        (("",), ("pods",)): {"get", "list", "watch"},
        (("",), ("pods/log",)): {"get"},
        (("jobset.x-k8s.io",), ("jobsets",)): {"create", "get"},
        (("",), ("persistentvolumeclaims",)): {"get"},
        (("kueue.x-k8s.io",), ("workloads",)): {"list"},
    }


# ---------------------------------------------------------------------------------------------
# GRPO's vLLM server (vllm_mode server) as a pod of its own beside the trainer

SERVER_IMAGE = "ghcr.io/vlmjobs/vllm-trl:0.31.0-trl1.16.0"
GRPO_SERVER = {  # llava-1.5-7b's 7.06B parameters; one H100 of 80 GiB per pod
    "stages": ["prepare", "grpo"], "model.parameters": 7_060_000_000, "resources.gpu_memory_gib": 80,
    "grpo.args.use_vllm": True, "grpo.args.vllm_mode": "server", "grpo.vllm_server.image": SERVER_IMAGE,
}  # fmt: skip


def replicated(jobset: dict, name: str) -> dict:
    """One replicated Job of the JobSet, as a Job (its template's spec)."""
    (found,) = [r for r in jobset["spec"]["replicatedJobs"] if r["name"] == name]
    return {"metadata": found["template"]["metadata"], "spec": found["template"]["spec"]}


def test_grpo_with_its_vllm_server_is_a_jobset_that_starts_the_server_first_and_completes_with_the_trainer():
    jobset = job(make(SINGLE, **GRPO_SERVER), "grpo")
    assert (jobset["kind"], jobset["metadata"]["name"]) == ("JobSet", "llava-chartqa-grpo")  # a JobSet on one node too
    assert [r["name"] for r in jobset["spec"]["replicatedJobs"]] == ["vllm", "node"]
    assert [r["replicas"] for r in jobset["spec"]["replicatedJobs"]] == [1, 1]
    assert jobset["spec"]["startupPolicy"] == {"startupPolicyOrder": "InOrder"}  # listed first: started first
    assert jobset["spec"]["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["node"]}
    # Kueue admits the JobSet whole, the server's GPU with the trainer's
    assert jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    for name in ("vllm", "node"):
        assert not any(key.startswith("kueue.x-k8s.io/") for key in replicated(jobset, name)["metadata"]["labels"])
    trainer = replicated(jobset, "node")
    assert (trainer["spec"]["completionMode"], trainer["spec"]["completions"]) == ("Indexed", 1)  # a hostname
    assert container(trainer)["resources"]["limits"]["nvidia.com/gpu"] == "1"  # the recipe's, untouched
    assert not render.retried_by_launcher(make(SINGLE, **GRPO_SERVER), resolve(make(SINGLE, **GRPO_SERVER), "grpo"))


def test_the_vllm_server_pod_runs_trl_vllm_serve_of_the_base_model_on_its_own_gpu_ready_at_health():
    server = replicated(job(make(SINGLE, **GRPO_SERVER), "grpo"), "vllm")
    pod = pod_spec(server)
    main = container(server)
    assert main["image"] == SERVER_IMAGE
    assert main["command"] == [
        "trl", "vllm-serve", "--model", "llava-hf/llava-1.5-7b-hf", "--tensor-parallel-size", "1",
        "--gpu-memory-utilization", "0.9", "--dtype", "auto", "--host", "0.0.0.0", "--port", "8000",
    ]  # fmt: skip
    assert main["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert "livenessProbe" not in main
    # 7.06B x 2 bytes = 14.1 GB, under half of 0.9 x 85.9 GB: one GPU, of the trainer's product, on a GPU node
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # its own cache, not the run's volume (a ReadWriteOnce claim attaches to the trainer's node alone)
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
    assert {e["name"]: e.get("value") for e in main["env"]}["HF_HOME"] == "/cache/huggingface"
    assert env(server)["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert (server["spec"]["backoffLimit"], server["spec"]["completionMode"]) == (0, "Indexed")
    assert server["spec"]["podFailurePolicy"] == group_job(job(make(MULTI)))["spec"]["podFailurePolicy"]
    assert main["securityContext"]["allowPrivilegeEscalation"] is False and pod["securityContext"]["runAsNonRoot"]


def test_the_trainer_is_pointed_at_the_server_pods_stable_name():
    trainer = replicated(job(make(SINGLE, **GRPO_SERVER), "grpo"), "node")
    # <jobset>-<replicatedJob>-<job index>-<pod index>.<subdomain: the JobSet's name>, trl vllm-serve's port
    url = "http://llava-chartqa-grpo-vllm-0-0.llava-chartqa-grpo:8000"
    assert env(trainer)["VLMJOBS_VLLM_SERVER_URL"]["value"] == url


def test_a_larger_model_gets_the_fewest_gpus_a_power_of_two_for_tensor_parallelism_and_its_revision():
    recipe = make(SINGLE, **{**GRPO_SERVER, "model.parameters": 72_000_000_000, "model.revision": "a1b2c3"})
    main = container(replicated(job(recipe, "grpo"), "vllm"))
    # 144 GB of bf16 weights; 0.9 x 85.9 GB = 77.3 GB for vLLM per GPU, half of it for the weights: 38.7 GB; /4 = 36
    assert main["command"][main["command"].index("--tensor-parallel-size") + 1] == "4"
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert main["command"][main["command"].index("--revision") + 1] == "a1b2c3"
    explicit = make(SINGLE, **{**GRPO_SERVER, "grpo.vllm_server.gpus": 2})
    assert container(replicated(job(explicit, "grpo"), "vllm"))["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_colocated_vllm_and_a_users_own_server_render_the_trainer_alone():
    colocate = make(SINGLE, **{**GRPO_SERVER, "grpo.args.vllm_mode": "colocate", "grpo.vllm_server": None})
    own = make(SINGLE, **{**GRPO_SERVER, "grpo.vllm_server": None, "grpo.args.vllm_server_base_url": "http://v:8000"})
    for recipe in (colocate, own):
        manifest = job(recipe, "grpo")
        assert manifest["kind"] == "Job" and "VLMJOBS_VLLM_SERVER_URL" not in env(manifest)


def test_an_unpinned_server_image_is_refused_naming_its_key():
    recipe = make(SINGLE, **{**GRPO_SERVER, "grpo.vllm_server.image": "vllm/vllm-openai:latest"})
    with pytest.raises(UserError, match=r"^grpo\.vllm_server\.image: 'vllm/vllm-openai:latest' is not pinned"):
        job(recipe, "grpo")


def test_the_server_pod_takes_the_recipes_pod_annotations_and_pod_template_patch():
    recipe = make(SINGLE, **{**GRPO_SERVER, "kubernetes.pod_annotations": {"example.com/team": "vision"},
                             "kubernetes.pod_template": {"spec": {"containers": [
                                 {"name": "stage", "env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}]}]}}})  # fmt: skip
    for name in ("vllm", "node"):
        manifest = replicated(job(recipe, "grpo"), name)
        assert manifest["spec"]["template"]["metadata"]["annotations"]["example.com/team"] == "vision"
        assert env(manifest)["NCCL_IB_HCA"]["value"] == "mlx5"  # the weight transfer is NCCL between the two pods
        assert len(pod_spec(manifest)["containers"]) == 1
