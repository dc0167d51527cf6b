"""Kubernetes manifests as plain dicts, built by small pure functions from the recipe.

    render_stage(recipe, "sft", image)   -> [Job], or [JobSet] for a multi-node stage
    render_driver_job(recipe, image)     -> the CPU Job that drives the chain in the cluster
    render_cronjob(recipe, image)        -> the nightly pipeline
    render_cluster_setup(...)            -> namespace, PVC, the driver's RBAC, Secret template, Kueue queue

Nothing here talks to a cluster or reads a kubeconfig; YAML appears only in ``dump``. A key whose
value would be None is left out. Every stage Job runs ``commands.stage_argv``/``stage_env``, the
very command the local runner runs, with the recipe resolved for the cluster (run.root on the PVC).

Failure handling, per Job:
- one node: the Job retries by itself (``backoffLimit``), a ``podFailurePolicy`` fails it at once
  when the stage exits 2 (a recipe or data error) and does not count pod disruptions (preemption,
  eviction, node drain) against the retries. With a pod failure policy the controller also waits
  for a failed pod to terminate before it starts the next (podReplacementPolicy is then Failed),
  so two pods never write the same checkpoints.
- several nodes: a JobSet of one Indexed Job of a pod per node (``render_jobset``). A lost rank leaves
  its peers blocked in NCCL until the collective timeout, and per-index retries would restart that
  rank alone into a group that is no longer there. So the group's Job fails at its first pod
  failure (``backoffLimit: 0``; its podFailurePolicy names a disruption or an exit 2 in its
  failure message) and the JobSet controller recreates the group, every rank resuming from the
  newest checkpoint on the shared volume: exit 2 and the deadline end it, a disruption restarts
  it without counting, any other failure counts against ``failurePolicy.maxRestarts`` (=
  ``kubernetes.backoff_limit``). The launcher only follows and reports (restarts from
  ``status.restarts``). ``successPolicy`` is not needed: the group succeeds when every rank has.
- a target older than 1.31 (podFailurePolicy not GA): a one-node stage's Job gets ``backoffLimit: 0``
  and the launcher retries it (``state.next_step``), since without the policy the Job would retry a
  recipe error and count preemptions.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import yaml

from jobs.contract import EXIT_REGRESSED, EXIT_USER_ERROR, UserError
from jobs.recipe import DNS1123_LABEL, MAX_RUN_ID, STAGES, TRAINING_STAGES, VLLM_SERVER_URL_ENV, Kubernetes, Recipe
from jobs.stage_resources import StageResources, resolve
from launcher import features
from launcher.commands import NODE_RANK_ENV, stage_argv, stage_env
from launcher.patch import strategic_merge

APP = "vlmjobs"
CONTAINER = "stage"  # the container name, which the pod failure policy's exit-code rule names
LABEL_NAME = "app.kubernetes.io/name"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_COMPONENT = "app.kubernetes.io/component"  # the stage as the recipe names it, "pipeline" or "nightly"
LABEL_RUN = "app.kubernetes.io/instance"  # the run id: one run, many Jobs
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"  # Kueue suspends a Job carrying it and admits it through that LocalQueue
LABEL_PRIORITY = "kueue.x-k8s.io/priority-class"  # the WorkloadPriorityClass of the Job's Workload
ANNOTATION_FINGERPRINT = "vlmjobs.io/recipe-fingerprint"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"  # GA with Indexed Jobs (1.24)
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set by the Job controller on its pods (1.27)
UID = GID = 1000  # the image's non-root user (images/Dockerfile)
DRIVER = "pipeline"
DRIVER_SERVICE_ACCOUNT = "vlmjobs-driver"
NIGHTLY = "nightly"
DATED_SUFFIX = len("-20250131")  # the nightly driver appends the date to the run id
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set by NVIDIA's GPU feature discovery
# GPU feature discovery on a node whose GPUs are shared (time-slicing, MPS): each GPU is advertised as this many
# replicas, and with renameByDefault the product gets this suffix.
GPU_REPLICAS_LABEL = "nvidia.com/gpu.replicas"
SHARED_SUFFIX = "-SHARED"
# The Job controller's label on its pods (1.27), read by the nightly driver through the downward API: its Job
# carries the night it was scheduled for (CRONJOB_SCHEDULED_ANNOTATION), which no pod carries.
DRIVER_JOB_ENV = "VLMJOBS_DRIVER_JOB"
CRONJOB_SCHEDULED_ANNOTATION = "batch.kubernetes.io/cronjob-scheduled-timestamp"  # set by the CronJob controller (GA 1.32)
# A CronJob's name is at most 52 characters: its Jobs add "-<11 digits>" and must stay labels.
MAX_CRONJOB_NAME = 52
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
QUANTITY = re.compile(r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
IMAGE_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# Shutting down: the kubelet SIGKILLs at terminationGracePeriodSeconds; torch's agent must forward
# SIGTERM, wait for the ranks' checkpoint and exit before that, so it gets the period less this.
AGENT_EXIT_MARGIN_S = 15


# ---------------------------------------------------------------------------------------------
# Names


def job_name(recipe: Recipe, stage: str) -> str:
    """``<run>-<stage>`` with '_' as '-': at most 43 + 11 characters, see recipe.MAX_RUN_ID."""
    return f"{recipe.run_id}-{stage.replace('_', '-')}"


def driver_name(recipe: Recipe) -> str:
    return f"{recipe.run_id}-{DRIVER}"


def cronjob_name(recipe: Recipe) -> str:
    return f"{recipe.run_id}-{NIGHTLY}"


def check_label(key: str, value: str, max_len: int = 63) -> None:
    if not DNS1123_LABEL.match(value) or len(value) > max_len:
        raise UserError(
            f"{key}: {value!r} is not a DNS-1123 label of at most {max_len} characters "
            "(lower-case letters, digits and '-', starting with a letter and ending with a letter or digit)"
        )


def check_subdomain(key: str, value: str) -> None:
    if not DNS1123_SUBDOMAIN.match(value) or len(value) > 253:
        raise UserError(
            f"{key}: {value!r} is not a DNS-1123 name (lower-case letters, digits, '-' and '.', at most 253 characters)"
        )


def check_names(recipe: Recipe) -> None:
    """Every name the manifests carry, each with the recipe key that sets it."""
    k = recipe.kubernetes
    # run.id is checked with the rest of the recipe (jobs.recipe), where it names the run folder too
    check_label("kubernetes.namespace", k.namespace)
    check_subdomain("kubernetes.pvc", k.pvc)
    for key in ("hf_token_secret", "service_account", "priority_class"):
        if getattr(k, key) is not None:
            check_subdomain(f"kubernetes.{key}", getattr(k, key))
    if k.queue is not None:
        check_label("kubernetes.queue", k.queue)
    if k.priority is not None:
        check_subdomain("kubernetes.priority", k.priority)
    if k.admission_timeout <= 0:
        raise UserError("kubernetes.admission_timeout: must be more than 0 (seconds a Job may wait for Kueue)")
    for i, secret in enumerate(k.image_pull_secrets):
        check_subdomain(f"kubernetes.image_pull_secrets[{i}]", secret)
    if not k.mount_path.startswith("/") or k.mount_path.rstrip("/") in ("", "/dev", "/dev/shm"):
        raise UserError(f"kubernetes.mount_path: {k.mount_path!r} must be an absolute folder of its own, e.g. /runs")
    for key in ("backoff_limit", "max_disruption_restarts"):
        if getattr(k, key) < 0:
            raise UserError(f"kubernetes.{key}: must be 0 or more")
    for key in ("active_deadline_seconds", "termination_grace_period_seconds"):
        if getattr(k, key) <= 0:
            raise UserError(f"kubernetes.{key}: must be more than 0")
    if k.ttl_seconds_after_finished < 0:
        raise UserError("kubernetes.ttl_seconds_after_finished: must be 0 or more")
    for key, value in k.pod_annotations.items():
        check_annotation(f"kubernetes.pod_annotations.{key}", key, value)
    if k.hf_write_token_secret is not None:
        check_subdomain("kubernetes.hf_write_token_secret", k.hf_write_token_secret)
    if k.nightly_deadline_hours <= 0:
        raise UserError("kubernetes.nightly_deadline_hours: must be more than 0")
    check_pod_template(k.pod_template)


def check_pod_template(template: dict) -> None:
    """A patch of the pod template: metadata and spec only, and containers named as ours (a new name would add a
    container with no image, which the API server refuses with a message naming neither the recipe nor the key)."""
    where = "kubernetes.pod_template"
    unknown = sorted(set(template) - {"metadata", "spec"})
    if unknown:
        raise UserError(f"{where}: {', '.join(unknown)}: a pod template patch has only metadata and spec")
    for i, container in enumerate((template.get("spec") or {}).get("containers") or []):
        if not isinstance(container, dict) or container.get("name") != CONTAINER:
            raise UserError(
                f"{where}.spec.containers[{i}]: name it {CONTAINER!r}, the one container every vlmjobs pod runs"
            )


QUALIFIED_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def check_annotation(where: str, key: str, value) -> None:
    """An annotation key is a qualified name (an optional DNS subdomain and '/', then at most 63
    characters); its value is text."""
    prefix, _, name = key.rpartition("/")
    if not QUALIFIED_NAME.match(name) or (prefix and (not DNS1123_SUBDOMAIN.match(prefix) or len(prefix) > 253)):
        raise UserError(f"{where}: {key!r} is not an annotation key (e.g. example.com/name)")
    if not isinstance(value, str):
        raise UserError(f'{where}: annotation values are text; quote it ("{value}")')


def check_resources(stage: str, res: StageResources) -> None:
    where = f"{stage}.resources (or resources)"
    for key in ("cpu", "memory", "shm"):
        if not QUANTITY.match(str(getattr(res, key))):
            raise UserError(f'{where}.{key}: {getattr(res, key)!r} is not a Kubernetes quantity (e.g. "8", "64Gi")')
    if res.gpus < 0 or res.nodes < 1:
        raise UserError(f"{where}: gpus must be 0 or more and nodes 1 or more (got gpus={res.gpus}, nodes={res.nodes})")
    if res.nodes > 1 and res.gpus < 1:
        raise UserError(f"{where}.nodes: {res.nodes} nodes need gpus of 1 or more per node")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", res.gpu_resource):
        raise UserError(f"{where}.gpu_resource: {res.gpu_resource!r} is not an extended resource name "
                        "(e.g. nvidia.com/gpu, or nvidia.com/mig-1g.10gb for a MIG slice)")
    if res.gpu_product is not None and not re.fullmatch(
        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", res.gpu_product
    ):
        raise UserError(f"{where}.gpu_product: {res.gpu_product!r} is not a label value (e.g. NVIDIA-H100-80GB-HBM3)")


def check_image(image: str, key: str = "kubernetes.image") -> str:
    """A pinned image reference: a tag other than latest, or a digest."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    if digest:
        if not IMAGE_DIGEST.match(digest):
            raise UserError(f"{key}: {image!r} has a malformed digest (expected @sha256:<64 hex digits>)")
        return image
    if ":" not in last:
        raise UserError(f"{key}: {image!r} has no tag; pin it with a version tag or a digest (@sha256:...)")
    tag = last.split(":", 1)[1]
    if tag == "latest":
        raise UserError(
            f"{key}: {image!r} is not pinned; use a version tag or a digest (@sha256:...), never latest"
        )
    if tag.endswith("-unknown"):
        raise UserError(
            f"kubernetes.image: no git revision to tag the default image with ({image}); "
            "set kubernetes.image or $VLMJOBS_REVISION"
        )
    return image


def resolve_image(recipe: Recipe) -> str:
    from launcher.image import default_image

    return check_image(recipe.kubernetes.image or default_image())


def cluster_recipe(recipe: Recipe, image: str | None = None) -> Recipe:
    """The recipe as a Job sees it: run folders on the PVC, the run id pinned, and the image pinned
    (so that a driver in the cluster renders the stage Jobs with the image it was given)."""
    k = recipe.kubernetes
    run = dataclasses.replace(recipe.run, id=recipe.run_id, root=k.mount_path)
    kubernetes = dataclasses.replace(k, image=image) if image else k
    return dataclasses.replace(recipe, run=run, kubernetes=kubernetes)


def retried_by_launcher(recipe: Recipe, res: StageResources) -> bool:
    """True when a one-node stage's Job fails at its first pod failure and the launcher restarts it (module
    docstring); a multi-node stage's JobSet is restarted by the JobSet controller."""
    return not res.jobset and not features.is_ga("podFailurePolicy", recipe.kubernetes.target_version)


# ---------------------------------------------------------------------------------------------
# Pieces


def labels(recipe: Recipe, part: str) -> dict[str, str]:
    return {
        LABEL_NAME: APP,
        LABEL_PART_OF: APP,
        LABEL_COMPONENT: part,
        LABEL_RUN: recipe.run_id,
        LABEL_MANAGED_BY: APP,
    }


def selector(run_id: str | None = None, part: str | None = None) -> str:
    """The label selector of vlmjobs' Jobs: all of them, one run's, or one stage's of a run."""
    chosen = {LABEL_PART_OF: APP, LABEL_RUN: run_id, LABEL_COMPONENT: part}
    return ",".join(f"{key}={value}" for key, value in chosen.items() if value)


def kueue_labels(recipe: Recipe) -> dict[str, str]:
    """What makes Kueue manage a Job (or JobSet): its LocalQueue and its WorkloadPriorityClass. On every Job vlmjobs
    creates, the driver and the nightly CronJob's included: where Kueue manages Jobs without a queue name too, an
    unlabelled one would wait in no queue for ever."""
    k = recipe.kubernetes
    chosen = {LABEL_QUEUE: k.queue, LABEL_PRIORITY: k.priority}
    return {key: value for key, value in chosen.items() if value}


def metadata(recipe: Recipe, name: str, part: str, *, queue: bool = False) -> dict:
    meta_labels = labels(recipe, part)
    if queue:
        meta_labels.update(kueue_labels(recipe))
    return {
        "name": name,
        "namespace": recipe.kubernetes.namespace,
        "labels": meta_labels,
        "annotations": {ANNOTATION_FINGERPRINT: recipe.fingerprint()},
    }


def pod_security_context() -> dict:
    """The restricted Pod Security Standard, with fsGroup so that the PVC is writable by the user."""
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": GID,
        "fsGroup": GID,
        "fsGroupChangePolicy": "OnRootMismatch",  # chown a large PVC once, not at every start
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


def container_resources(res: StageResources) -> dict:
    """CPU and memory requests; a memory limit equal to the request, since /dev/shm (tmpfs) is
    charged to it and a runaway DataLoader should fail this pod, not its neighbours; no CPU limit,
    which would throttle the data workers; GPUs as a limit (an extended resource's request follows)."""
    limits = {"memory": res.memory}
    if res.gpus:
        limits[res.gpu_resource] = str(res.gpus)
    return {"requests": {"cpu": res.cpu, "memory": res.memory}, "limits": limits}


def hf_home(mount_path: str) -> str:
    """The Hugging Face cache on the shared volume: each model and data set is downloaded once, not once a pod.
    images/Dockerfile sets the same for the default mount path."""
    return f"{mount_path.rstrip('/')}/.cache/huggingface"


def container_env(recipe: Recipe, stage: str, res: StageResources) -> list[dict]:
    k = recipe.kubernetes
    env = [{"name": name, "value": value} for name, value in stage_env(recipe).items()]
    env += [
        {"name": "HF_HOME", "value": hf_home(k.mount_path)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # log lines reach `kubectl logs` as they are printed
    ]
    env += token_env(recipe, stage)
    if res.gpus > 1 or res.nodes > 1:
        grace = max(k.termination_grace_period_seconds - AGENT_EXIT_MARGIN_S, 1)
        env.append({"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(grace)})
    if res.nodes > 1:
        index = {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
        env.append({"name": NODE_RANK_ENV, "valueFrom": {"fieldRef": index}})
    if res.server:  # GRPOConfig.vllm_server_base_url, which jobs.grpo sets from it
        env.append({"name": VLLM_SERVER_URL_ENV, "value": vllm_server_url(recipe, stage)})
    return env


def token_env(recipe: Recipe, stage: str) -> list[dict]:
    """HF_TOKEN where it is needed: the read token, optional (a run on public models needs no Secret, and a gated one
    fails at its download with jobs.hub's message naming HF_TOKEN); the write token, required, only for a merge_push that
    pushes."""
    k = recipe.kubernetes
    if stage == "merge_push" and recipe.merge_push.push:
        name = k.hf_write_token_secret or k.hf_token_secret
        if not name:
            raise UserError("merge_push.push: pushing needs a write token; set kubernetes.hf_write_token_secret "
                            "(or kubernetes.hf_token_secret) to the Secret that holds it")
        return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": k.hf_token_key}}}]
    if not k.hf_token_secret:
        return []
    secret = {"name": k.hf_token_secret, "key": k.hf_token_key, "optional": True}
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": secret}}]


def volumes(recipe: Recipe, res: StageResources) -> tuple[list[dict], list[dict]]:
    k = recipe.kubernetes
    vols = [
        {"name": "runs", "persistentVolumeClaim": {"claimName": k.pvc}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm}},  # DataLoader workers and NCCL
    ]
    mounts = [{"name": "runs", "mountPath": k.mount_path}, {"name": "dshm", "mountPath": "/dev/shm"}]
    return vols, mounts


def scheduling(recipe: Recipe, res: StageResources) -> dict:
    """Where the pod may run: GPU pods on GPU nodes of the product asked for; CPU pods stay off them. A training
    stage stays off GPUs shared by time-slicing or MPS unless resources.shared_gpu (a node without the replicas label
    shares nothing); any other stage takes the product whatever its sharing suffix."""
    training = res.stage in TRAINING_STAGES
    k = recipe.kubernetes
    spec: dict = {}
    if res.gpus:
        exclusive = training and not res.shared_gpu
        if res.gpu_product and exclusive:
            spec["nodeSelector"] = {GPU_PRODUCT_LABEL: res.gpu_product}  # the exact name: never ...-SHARED
        if exclusive:
            # terms are ORed, a term's expressions ANDed; Lt compares the label as an integer
            terms = [[{"key": GPU_REPLICAS_LABEL, "operator": "DoesNotExist"}],
                     [{"key": GPU_REPLICAS_LABEL, "operator": "Lt", "values": ["2"]}]]  # fmt: skip
        elif res.gpu_product:
            product = res.gpu_product.removesuffix(SHARED_SUFFIX)
            products = [product, product + SHARED_SUFFIX]
            terms = [[{"key": GPU_PRODUCT_LABEL, "operator": "In", "values": products}]]
        else:
            terms = []
        if terms:
            required = {"nodeSelectorTerms": [{"matchExpressions": term} for term in terms]}
            spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}}
        spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    if k.priority_class:
        spec["priorityClassName"] = k.priority_class
    if k.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in k.image_pull_secrets]
    return spec


def pod_failure_policy(recipe: Recipe, *, ignore_disruptions: bool) -> dict | None:
    """Exit 2 (a user error) and 3 (the run regressed: evaluate, and the driver that ran it) fail the Job at once;
    disruptions are not counted, where the Job retries by itself."""
    if not features.is_ga("podFailurePolicy", recipe.kubernetes.target_version):
        return None
    rules = []
    if ignore_disruptions:
        # First, so that a preempted pod is never judged by the exit code it was killed with.
        rules.append({"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]})
    rules.append(
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_USER_ERROR, EXIT_REGRESSED]},
        }
    )
    return {"rules": rules}


def main_address(recipe: Recipe, stage: str) -> str:
    """The pod of rank 0, by the hostname JobSet gives it (network.enableDNSHostnames):
    <jobset>-<replicatedJob>-<job index>-<pod index>.<subdomain, the JobSet's name>."""
    name = job_name(recipe, stage)
    return f"{name}-{GROUP_JOB}-0-0.{name}"


# ---------------------------------------------------------------------------------------------
# Objects


def stage_resources(recipe: Recipe, stage: str) -> StageResources:
    """What the stage's pods ask for (jobs.stage_resources), resolved once per rendering and checked."""
    if stage not in STAGES:
        raise UserError(f"--stage: {stage!r} is not a stage (stages: {', '.join(STAGES)})")
    if stage not in recipe.stages:
        raise UserError(f"--stage: {stage} is not in the recipe's stages ({', '.join(recipe.stages)})")
    res = resolve(recipe, stage)
    check_resources(stage, res)
    return res


def render_job(recipe: Recipe, stage: str, image: str, res: StageResources | None = None) -> dict:
    """The Job of one stage; ``recipe`` as given by the user (it is resolved for the cluster here), ``res`` its
    resources when the caller resolved them already."""
    res = res or stage_resources(recipe, stage)
    check_names(recipe)
    check_image(image)
    resolved = cluster_recipe(recipe, image)
    k = resolved.kubernetes
    name = job_name(resolved, stage)
    multi_node = res.multi_node
    argv = stage_argv(resolved, stage, res=res, main_address=main_address(resolved, stage) if multi_node else None)
    vols, mounts = volumes(resolved, res)
    container = {
        "name": CONTAINER,
        "image": image,
        "command": argv,
        "env": container_env(resolved, stage, res),
        "resources": container_resources(res),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
    }
    pod_spec = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": vols,
        "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": k.termination_grace_period_seconds,
        "automountServiceAccountToken": False,  # a stage never talks to the API server
        **scheduling(resolved, res),
    }
    if k.service_account:
        pod_spec["serviceAccountName"] = k.service_account
    meta = metadata(resolved, name, stage, queue=True)
    spec: dict = {}
    if res.jobset:  # Indexed: JobSet gives an Indexed Job's pods their hostnames
        spec.update(completionMode="Indexed", completions=res.nodes, parallelism=res.nodes)
    # A group's Job fails at its first lost rank and its JobSet restarts the whole group (render_jobset)
    spec["backoffLimit"] = 0 if res.jobset or retried_by_launcher(resolved, res) else k.backoff_limit
    if res.jobset:
        policy = group_pod_failure_policy(resolved)
    else:
        policy = pod_failure_policy(resolved, ignore_disruptions=not retried_by_launcher(resolved, res))
    if policy:
        spec["podFailurePolicy"] = policy
    spec["activeDeadlineSeconds"] = k.active_deadline_seconds
    spec["ttlSecondsAfterFinished"] = k.ttl_seconds_after_finished
    template_meta = {"labels": labels(resolved, stage), "annotations": {**k.pod_annotations, **meta["annotations"]}}
    spec["template"] = patched_template(k, {"metadata": template_meta, "spec": pod_spec})
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def render_stage(recipe: Recipe, stage: str, image: str) -> list[dict]:
    """What ``submit`` creates for a stage, in order, after checking the target version."""
    res = stage_resources(recipe, stage)
    job = render_job(recipe, stage, image, res)
    features.check([job], recipe.kubernetes.target_version)
    return [render_jobset(recipe, stage, job, res) if res.jobset else job]


def within(manifest: dict, seconds_left: float) -> dict:
    """The stage's Job (or JobSet's Jobs) with a deadline no later than ``seconds_left`` from now: a nightly driver's
    stages end with its night (state.ends_at). The recipe is unchanged, so a retried driver's Jobs are the same run's."""
    bounded = copy.deepcopy(manifest)
    specs = ([job["template"]["spec"] for job in bounded["spec"]["replicatedJobs"]] if bounded["kind"] == "JobSet"
             else [bounded["spec"]])
    for spec in specs:
        spec["activeDeadlineSeconds"] = max(1, min(spec.get("activeDeadlineSeconds") or math.inf, math.floor(seconds_left)))
    return bounded


# ---------------------------------------------------------------------------------------------
# Multi-node stages: a JobSet (jobset.x-k8s.io/v1alpha2, JobSet v0.11) of one Indexed Job of a pod per node. The JobSet
# controller, not the launcher, restarts the group: on the server, it survives the launcher (submit --detach, a
# restarted driver) and keeps the Kueue Workload (Kueue admits the JobSet whole and never sees it deleted).

JOBSET_API = "jobset.x-k8s.io/v1alpha2"
GROUP_JOB = "node"  # the replicated Job's name, in the pods' hostnames
# The Job controller's messages when a podFailurePolicy FailJob rule matches (kubernetes v1.34
# pkg/controller/job/pod_failure_policy.go: "Container %s for pod %s/%s failed with exit code %v matching %v rule at
# index %d" and "Pod %s/%s has condition %v matching %v rule at index %d"); the JobSet's rules match them (Go regexp,
# unanchored) to tell a recipe error from a disruption, both failing the child Job with reason PodFailurePolicy.
USER_ERROR_MESSAGE = rf"^Container {CONTAINER} for pod \S+ failed with exit code {EXIT_USER_ERROR} matching FailJob rule"
DISRUPTION_MESSAGE = r"^Pod \S+ has condition DisruptionTarget matching FailJob rule"


def group_pod_failure_policy(recipe: Recipe) -> dict | None:
    """The group's Job fails at once, naming why: a rank taken away (first, so that a preempted pod is never judged by
    the exit code it was killed with) or a rank that exited 2. Any other failure fails it by backoffLimit 0."""
    if not features.is_ga("podFailurePolicy", recipe.kubernetes.target_version):
        return None
    disrupted = {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    user_error = {"action": "FailJob",
                  "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_USER_ERROR]}}
    return {"rules": [disrupted, user_error]}


def jobset_failure_policy(recipe: Recipe) -> dict:
    """Exit 2 and the deadline fail the JobSet at once; a disruption restarts the group uncounted; any other failure
    (a crash, OOM, an NCCL error) restarts it, up to kubernetes.backoff_limit times. BlockingRecreate: the old pods are
    gone before the new ones start, so two attempts never write the same checkpoints."""
    return {
        "maxRestarts": recipe.kubernetes.backoff_limit,
        "restartStrategy": "BlockingRecreate",
        "rules": [
            {"name": "userError", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"],
             "onJobFailureMessagePatterns": [USER_ERROR_MESSAGE]},
            {"name": "deadline", "action": "FailJobSet", "onJobFailureReasons": ["DeadlineExceeded"]},
            {"name": "disruption", "action": "RestartJobSetAndIgnoreMaxRestarts",
             "onJobFailureReasons": ["PodFailurePolicy"], "onJobFailureMessagePatterns": [DISRUPTION_MESSAGE]},
        ],
    }


def render_jobset(recipe: Recipe, stage: str, job: dict, res: StageResources | None = None) -> dict:
    """The stage's JobSet around its group Job (``render_job``'s), and grpo's vLLM server beside it where ``res`` has
    one: the JobSet carries the name, the Kueue labels (Kueue admits the JobSet whole, the server's GPUs with the
    trainer's) and the TTL; JobSet creates the headless Service that gives the pods their hostnames."""
    resolved = cluster_recipe(recipe)
    child_spec = {key: value for key, value in job["spec"].items() if key != "ttlSecondsAfterFinished"}
    child_meta = {"labels": labels(resolved, stage), "annotations": dict(job["metadata"]["annotations"])}
    group = {"name": GROUP_JOB, "replicas": 1, "template": {"metadata": child_meta, "spec": child_spec}}
    spec: dict = {
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},  # rank 0 is found before ready
        "failurePolicy": jobset_failure_policy(resolved),
        "replicatedJobs": [group],
    }
    if res is not None and res.server:
        server_spec = server_job_spec(recipe, stage, res, child_meta["annotations"])
        server = {"name": SERVER_JOB, "replicas": 1, "template": {"metadata": child_meta, "spec": server_spec}}
        # The server first, the trainer once the server's pod is ready (its readiness probe: the model loaded and
        # served), so that the trainer's wait for it (GRPOConfig.vllm_server_timeout, 240 s) is not spent on the
        # server's download and start-up. JobSet resumes the replicated Jobs in this order after Kueue's admission too.
        spec["replicatedJobs"] = [server, group]
        spec["startupPolicy"] = {"startupPolicyOrder": "InOrder"}
        # The server never exits by itself: the trainer's success is the stage's, and JobSet then deletes the server
        spec["successPolicy"] = {"operator": "All", "targetReplicatedJobs": [GROUP_JOB]}
    spec["ttlSecondsAfterFinished"] = resolved.kubernetes.ttl_seconds_after_finished
    return {"apiVersion": JOBSET_API, "kind": "JobSet", "metadata": job["metadata"], "spec": spec}


# ---------------------------------------------------------------------------------------------
# GRPO's vLLM server (grpo.vllm_server, vllm_mode server): `trl vllm-serve` in a pod of its own GPUs, in the stage's
# JobSet. TRL 1.16's `trl vllm-serve` runs vLLM's own server (`vllm serve`) with the flags its trainer needs: the NCCL
# weight-transfer engine, over which the trainer's main process pushes the weights before its first generation and
# after every step, and vLLM's development endpoints (/init_weight_transfer_engine, /update_weights). The trainer
# asks the server's /health until it answers, joins the weight-transfer group as its master, on its own pod's address
# and GRPOConfig.vllm_group_port (51216), which the server's workers dial: pod to pod, no Service port needed.

SERVER_JOB = "vllm"  # the server's replicated Job, in its pod's hostname
VLLM_PORT = 8000  # trl vllm-serve's and GRPOConfig.vllm_server_port's default
VLLM_HEALTH = "/health"  # vLLM's server answers 200 here once the model is loaded (TRL's client polls it too)
SERVER_CACHE = "/cache"  # the model's download and vLLM's compile caches: the server reads no shared volume


def vllm_server_address(recipe: Recipe, stage: str) -> str:
    """The server's pod by the hostname JobSet gives it: <jobset>-vllm-0-0.<subdomain, the JobSet's name>."""
    name = job_name(recipe, stage)
    return f"{name}-{SERVER_JOB}-0-0.{name}"


def vllm_server_url(recipe: Recipe, stage: str) -> str:
    return f"http://{vllm_server_address(recipe, stage)}:{VLLM_PORT}"


def vllm_server_argv(recipe: Recipe, res: StageResources) -> list[str]:
    """`trl vllm-serve` of the model GRPO starts from, as its hub id: where GRPO starts from SFT's output on the
    volume, the trainer pushes those weights before the server generates (jobs.recipe._vllm_server_errors)."""
    model, server = recipe.model, res.server
    revision = ["--revision", model.revision] if model.revision else []
    return ["trl", "vllm-serve", "--model", model.name_or_path, *revision,
            "--tensor-parallel-size", str(server.gpus), "--gpu-memory-utilization", f"{server.gpu_memory_utilization:g}",
            "--dtype", model.dtype, "--host", "0.0.0.0", "--port", str(VLLM_PORT)]  # fmt: skip


def server_job_spec(recipe: Recipe, stage: str, res: StageResources, annotations: dict) -> dict:
    """The server's Job: one pod, failing the group at its first failure as a rank does (its JobSet restarts the
    trainer and the server together, the trainer resuming from its last checkpoint)."""
    server = res.server
    image = check_image(server.image, "grpo.vllm_server.image")
    resolved = cluster_recipe(recipe)
    k = resolved.kubernetes
    pod_res = dataclasses.replace(res, gpus=server.gpus, nodes=1, cpu=server.cpu, memory=server.memory, shm=server.shm,
                                  server=None)
    env = [
        {"name": "HOME", "value": SERVER_CACHE},  # vLLM, Triton and torch.compile cache under $HOME: uid 1000 has none
        {"name": "HF_HOME", "value": f"{SERVER_CACHE}/huggingface"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *token_env(resolved, stage),  # a gated model's download
    ]
    container = {
        "name": CONTAINER,  # as every vlmjobs pod's, so that kubernetes.pod_template and the failure policy apply
        "image": image,
        "command": vllm_server_argv(resolved, res),
        "env": env,
        "ports": [{"name": "http", "containerPort": VLLM_PORT}],
        # Ready once the model is loaded and served; no liveness probe: a long generation batch must not restart it
        "readinessProbe": {"httpGet": {"path": VLLM_HEALTH, "port": VLLM_PORT}, "periodSeconds": 10, "failureThreshold": 3},
        "resources": container_resources(pod_res),
        "volumeMounts": [{"name": "cache", "mountPath": SERVER_CACHE}, {"name": "dshm", "mountPath": "/dev/shm"}],
        "securityContext": container_security_context(),
    }
    pod_spec = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [{"name": "cache", "emptyDir": {}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": server.shm}}],
        "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": 30,  # nothing to save
        "automountServiceAccountToken": False,
        **scheduling(resolved, pod_res),
    }
    if k.service_account:
        pod_spec["serviceAccountName"] = k.service_account
    template_meta = {"labels": labels(resolved, stage), "annotations": {**k.pod_annotations, **annotations}}
    spec: dict = {"completionMode": "Indexed", "completions": 1, "parallelism": 1, "backoffLimit": 0}
    policy = group_pod_failure_policy(resolved)
    if policy:
        spec["podFailurePolicy"] = policy
    spec["activeDeadlineSeconds"] = k.active_deadline_seconds
    spec["template"] = patched_template(k, {"metadata": template_meta, "spec": pod_spec})
    return spec


def group_job_name(recipe: Recipe, stage: str) -> str:
    """The JobSet's child Job (JobSet names it <jobset>-<replicatedJob>-<index>): its pods carry its job-name label."""
    return f"{job_name(recipe, stage)}-{GROUP_JOB}-0"


def server_job_name(recipe: Recipe, stage: str) -> str:
    """The vLLM server's Job in the stage's JobSet."""
    return f"{job_name(recipe, stage)}-{SERVER_JOB}-0"


def driver_job_spec(recipe: Recipe, image: str, *, dated: bool) -> tuple[dict, dict]:
    """(pod template labels, Job spec) of the driver: ``vlmjobs pipeline`` on a little CPU."""
    resolved = cluster_recipe(recipe, image)
    k = resolved.kubernetes
    command = ["python", "-m", "launcher.cli", "pipeline"] + (["--dated"] if dated else [])
    env = [{"name": n, "value": v} for n, v in stage_env(resolved).items()] + [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if dated:  # the night comes from the driver's Job (state.night_of), the same for every retry of its pod
        job_name_label = {"fieldPath": f"metadata.labels['{JOB_NAME_LABEL}']"}
        env.append({"name": DRIVER_JOB_ENV, "valueFrom": {"fieldRef": job_name_label}})
    container = {
        "name": CONTAINER,
        "image": image,
        "command": command,
        "env": env,
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": container_security_context(),
    }
    pod_spec = {
        "restartPolicy": "Never",
        "serviceAccountName": DRIVER_SERVICE_ACCOUNT,
        "automountServiceAccountToken": True,  # the driver creates and watches the stage Jobs
        "containers": [container],
        "securityContext": pod_security_context(),
        # Stopping the driver stops nothing it started: the stage Jobs run on, and a new driver follows them.
        "terminationGracePeriodSeconds": 30,
    }
    if k.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in k.image_pull_secrets]
    spec: dict = {"backoffLimit": k.backoff_limit}  # a restarted driver picks up where the last one was
    policy = pod_failure_policy(resolved, ignore_disruptions=True)
    if policy:
        spec["podFailurePolicy"] = policy
    if dated:  # a night ends before the next is due, which concurrencyPolicy Forbid would otherwise keep from starting
        spec["activeDeadlineSeconds"] = round(k.nightly_deadline_hours * 3600)
    else:
        spec["activeDeadlineSeconds"] = k.active_deadline_seconds * max(len(resolved.stages), 1)
    spec["ttlSecondsAfterFinished"] = k.ttl_seconds_after_finished
    template_labels = labels(resolved, DRIVER)
    spec["template"] = patched_template(k, {"metadata": {"labels": template_labels}, "spec": pod_spec})
    return template_labels, spec


def patched_template(k: Kubernetes, template: dict) -> dict:
    """The pod template with kubernetes.pod_template applied last (launcher.patch: Kubernetes' strategic merge)."""
    if not k.pod_template:
        return template
    try:
        return strategic_merge(template, k.pod_template)
    except ValueError as e:
        raise UserError(f"kubernetes.pod_template: {e}") from None


def render_driver_job(recipe: Recipe, image: str) -> dict:
    check_names(recipe)
    check_image(image)
    resolved = cluster_recipe(recipe, image)
    _, spec = driver_job_spec(recipe, image, dated=False)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(resolved, driver_name(resolved), DRIVER, queue=True),
        "spec": spec,
    }
    features.check([job], recipe.kubernetes.target_version)
    return job


def render_cronjob(recipe: Recipe, image: str) -> dict:
    """The nightly pipeline: a driver Job a night, each on the run id plus the date (run.id-YYYYMMDD)."""
    check_names(recipe)
    check_image(image)
    if len(recipe.run_id) + DATED_SUFFIX > MAX_RUN_ID:
        raise UserError(
            f"run.id: {recipe.run_id!r} is too long for the nightly pipeline, which appends -YYYYMMDD: "
            f"at most {MAX_RUN_ID - DATED_SUFFIX} characters"
        )
    check_label("CronJob name", cronjob_name(recipe), MAX_CRONJOB_NAME)
    resolved = cluster_recipe(recipe, image)
    k = resolved.kubernetes
    template_labels, spec = driver_job_spec(recipe, image, dated=True)
    cronjob = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": metadata(resolved, cronjob_name(resolved), NIGHTLY),
        "spec": {
            "schedule": k.nightly_schedule,
            "timeZone": k.nightly_time_zone,
            "concurrencyPolicy": "Forbid",  # a night that runs long is not joined by the next
            "startingDeadlineSeconds": 3600,  # a night missed by more than an hour (controller down) is skipped
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {"metadata": {"labels": {**template_labels, **kueue_labels(resolved)}}, "spec": spec},
        },
    }
    features.check([cronjob], recipe.kubernetes.target_version)
    return cronjob


# ---------------------------------------------------------------------------------------------
# The cluster set-up (k8s/): applied once by an admin with `make k8s-apply`


def render_namespace(namespace: str) -> dict:
    """The namespace, enforcing the restricted Pod Security Standard that every pod here meets."""
    check_label("kubernetes.namespace", namespace)
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": namespace,
            "labels": {
                LABEL_PART_OF: APP,
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/warn": "restricted",
            },
        },
    }


def render_pvc(namespace: str, name: str, *, size: str, access_mode: str, storage_class: str | None = None) -> dict:
    """The shared volume of the run folders. ReadWriteOnce attaches to one node at a time (the
    chain waits for a stage's pod to end before the next starts); multi-node stages need
    ReadWriteMany (NFS, CephFS, Filestore, EFS...), since every rank reads and writes it."""
    if access_mode not in ("ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"):
        raise UserError(f"--access_mode: {access_mode!r} is not ReadWriteOnce, ReadWriteMany or ReadWriteOncePod")
    if not QUANTITY.match(size):
        raise UserError(f"--size: {size!r} is not a Kubernetes quantity (e.g. 2Ti)")
    spec: dict = {"accessModes": [access_mode], "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    meta = {"name": name, "namespace": namespace, "labels": {LABEL_PART_OF: APP}}
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


# What the driver does, and nothing more: each rule names the launcher call that needs it.
DRIVER_RULES = (
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},  # exit codes, terminated pods
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},  # streaming the stages' logs
    # multi-node stages: their JobSets (the JobSet controller makes their Jobs, Service and pods)
    {"apiGroups": ["jobset.x-k8s.io"], "resources": ["jobsets"], "verbs": ["create", "get"]},
    # a multi-node stage is refused on a claim only one node can mount
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get"]},
    # why a suspended stage waits: its Kueue Workload's conditions (read only; Kueue owns them)
    {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["list"]},
)


def render_driver_rbac(namespace: str) -> list[dict]:
    meta = {"name": DRIVER_SERVICE_ACCOUNT, "namespace": namespace, "labels": {LABEL_PART_OF: APP}}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [dict(rule) for rule in DRIVER_RULES],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": DRIVER_SERVICE_ACCOUNT},
            "subjects": [{"kind": "ServiceAccount", "name": DRIVER_SERVICE_ACCOUNT, "namespace": namespace}],
        },
    ]


HF_TOKEN_PLACEHOLDER = "<your Hugging Face token: never commit it>"


def render_hf_token_secret(namespace: str, name: str, key: str) -> dict:
    """A template only: its value is a placeholder (kubectl create secret is the way, see k8s/README)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": {LABEL_PART_OF: APP}},
        "type": "Opaque",
        "stringData": {key: HF_TOKEN_PLACEHOLDER},
    }


def render_local_queue(namespace: str, name: str, cluster_queue: str) -> dict:
    """A Kueue LocalQueue (a CRD, so not in the Kubernetes schemas); Jobs join it by the queue-name label."""
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",  # v1beta1 is deprecated in Kueue v0.17
        "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": namespace, "labels": {LABEL_PART_OF: APP}},
        "spec": {"clusterQueue": cluster_queue},
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # no &id001 anchors: every manifest reads on its own
        return True


def dump(manifests: list[dict]) -> str:
    return yaml.dump_all(manifests, Dumper=_Dumper, sort_keys=False, width=120)
