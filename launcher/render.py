"""Kubernetes manifests as plain dicts, built by small pure functions from the recipe.

    render_stage(recipe, "sft", image)   -> [Job] or [Job, Service] for a multi-node stage
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
- several nodes: a lost rank leaves its peers blocked in NCCL until the collective timeout, and
  per-index retries (``backoffLimitPerIndex``) would restart that rank alone into a group that
  is no longer there. So the group fails as one: ``backoffLimit: 0`` fails the Job at the first
  pod failure and the Job controller stops the other pods; the launcher (submit, pipeline or
  the in-cluster driver) then deletes the Job and creates it again, and every rank resumes from
  the newest checkpoint on the shared volume. This is JobSet's ``failurePolicy.maxRestarts``
  done with a plain Job: exit 2 ends it, a disruption restarts it without counting (up to
  ``kubernetes.max_disruption_restarts``), any other failure counts against ``backoff_limit``.
  The launcher also restarts the group as soon as one pod is being disrupted (``DisruptionTarget``),
  rather than waiting for the disrupted rank's peers to time out; what counts is ``state.next_step``. ``successPolicy`` is not needed: the
  group succeeds when every rank has (the default).
- a target older than 1.31 (podFailurePolicy not GA): every stage Job is handled like a
  multi-node one (``backoffLimit: 0`` and retries by the launcher), since without the policy
  the Job would retry a recipe error and count preemptions.
"""

from __future__ import annotations

import dataclasses
import re

import yaml

from jobs.contract import EXIT_REGRESSED, EXIT_USER_ERROR, UserError
from jobs.recipe import DNS1123_LABEL, MAX_RUN_ID, STAGES, Recipe, Resources
from launcher import features
from launcher.commands import NODE_RANK_ENV, RENDEZVOUS_PORT, stage_argv, stage_env

APP = "vlmjobs"
CONTAINER = "stage"  # the container name, which the pod failure policy's exit-code rule names
LABEL_NAME = "app.kubernetes.io/name"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_COMPONENT = "app.kubernetes.io/component"  # the stage as the recipe names it, "pipeline" or "nightly"
LABEL_RUN = "app.kubernetes.io/instance"  # the run id: one run, many Jobs
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
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


QUALIFIED_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def check_annotation(where: str, key: str, value) -> None:
    """An annotation key is a qualified name (an optional DNS subdomain and '/', then at most 63
    characters); its value is text."""
    prefix, _, name = key.rpartition("/")
    if not QUALIFIED_NAME.match(name) or (prefix and (not DNS1123_SUBDOMAIN.match(prefix) or len(prefix) > 253)):
        raise UserError(f"{where}: {key!r} is not an annotation key (e.g. example.com/name)")
    if not isinstance(value, str):
        raise UserError(f'{where}: annotation values are text; quote it ("{value}")')


def check_resources(stage: str, res: Resources) -> None:
    where = f"{stage}.resources (or resources)"
    for key in ("cpu", "memory", "shm"):
        if not QUANTITY.match(str(getattr(res, key))):
            raise UserError(f'{where}.{key}: {getattr(res, key)!r} is not a Kubernetes quantity (e.g. "8", "64Gi")')
    if res.gpus < 0 or res.nodes < 1:
        raise UserError(f"{where}: gpus must be 0 or more and nodes 1 or more (got gpus={res.gpus}, nodes={res.nodes})")
    if res.nodes > 1 and res.gpus < 1:
        raise UserError(f"{where}.nodes: {res.nodes} nodes need gpus of 1 or more per node")
    if res.gpu_product is not None and not re.fullmatch(
        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", res.gpu_product
    ):
        raise UserError(f"{where}.gpu_product: {res.gpu_product!r} is not a label value (e.g. NVIDIA-H100-80GB-HBM3)")


def check_image(image: str) -> str:
    """A pinned image reference: a tag other than latest, or a digest."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    if digest:
        if not IMAGE_DIGEST.match(digest):
            raise UserError(f"kubernetes.image: {image!r} has a malformed digest (expected @sha256:<64 hex digits>)")
        return image
    if ":" not in last:
        raise UserError(f"kubernetes.image: {image!r} has no tag; pin it with a version tag or a digest (@sha256:...)")
    tag = last.split(":", 1)[1]
    if tag == "latest":
        raise UserError(
            f"kubernetes.image: {image!r} is not pinned; use a version tag or a digest (@sha256:...), never latest"
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


def retried_by_launcher(recipe: Recipe, stage: str) -> bool:
    """True when the Job fails at its first pod failure and the launcher restarts it (module docstring)."""
    multi_node = recipe.resources_for(stage).nodes > 1
    return multi_node or not features.is_ga("podFailurePolicy", recipe.kubernetes.target_version)


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


def metadata(recipe: Recipe, name: str, part: str, *, queue: bool = False) -> dict:
    meta_labels = labels(recipe, part)
    if queue and recipe.kubernetes.queue:
        meta_labels[LABEL_QUEUE] = recipe.kubernetes.queue
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


def container_resources(res: Resources) -> dict:
    """CPU and memory requests; a memory limit equal to the request, since /dev/shm (tmpfs) is
    charged to it and a runaway DataLoader should fail this pod, not its neighbours; no CPU limit,
    which would throttle the data workers; GPUs as a limit (an extended resource's request follows)."""
    limits = {"memory": res.memory}
    if res.gpus:
        limits[GPU_RESOURCE] = str(res.gpus)
    return {"requests": {"cpu": res.cpu, "memory": res.memory}, "limits": limits}


def hf_home(mount_path: str) -> str:
    """The Hugging Face cache on the shared volume: each model and data set is downloaded once, not once a pod.
    images/Dockerfile sets the same for the default mount path."""
    return f"{mount_path.rstrip('/')}/.cache/huggingface"


def container_env(recipe: Recipe, stage: str, res: Resources) -> list[dict]:
    k = recipe.kubernetes
    env = [{"name": name, "value": value} for name, value in stage_env(recipe).items()]
    env += [
        {"name": "HF_HOME", "value": hf_home(k.mount_path)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # log lines reach `kubectl logs` as they are printed
    ]
    if k.hf_token_secret:
        secret = {"name": k.hf_token_secret, "key": k.hf_token_key}
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": secret}})
    if res.gpus > 1 or res.nodes > 1:
        grace = max(k.termination_grace_period_seconds - AGENT_EXIT_MARGIN_S, 1)
        env.append({"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(grace)})
    if res.nodes > 1:
        index = {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
        env.append({"name": NODE_RANK_ENV, "valueFrom": {"fieldRef": index}})
    return env


def volumes(recipe: Recipe, res: Resources) -> tuple[list[dict], list[dict]]:
    k = recipe.kubernetes
    vols = [
        {"name": "runs", "persistentVolumeClaim": {"claimName": k.pvc}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm}},  # DataLoader workers and NCCL
    ]
    mounts = [{"name": "runs", "mountPath": k.mount_path}, {"name": "dshm", "mountPath": "/dev/shm"}]
    return vols, mounts


def scheduling(recipe: Recipe, res: Resources) -> dict:
    """Where the pod may run: GPU pods on GPU nodes of the product asked for; CPU pods stay off them."""
    k = recipe.kubernetes
    spec: dict = {}
    if res.gpus:
        if res.gpu_product:
            spec["nodeSelector"] = {GPU_PRODUCT_LABEL: res.gpu_product}
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


def service_name(recipe: Recipe, stage: str) -> str:
    return job_name(recipe, stage)


def main_address(recipe: Recipe, stage: str) -> str:
    """The pod of index 0, by the hostname an Indexed Job gives it under the headless Service."""
    return f"{job_name(recipe, stage)}-0.{service_name(recipe, stage)}"


# ---------------------------------------------------------------------------------------------
# Objects


def render_job(recipe: Recipe, stage: str, image: str) -> dict:
    """The Job of one stage; ``recipe`` as given by the user (it is resolved for the cluster here)."""
    if stage not in STAGES:
        raise UserError(f"--stage: {stage!r} is not a stage (stages: {', '.join(STAGES)})")
    if stage not in recipe.stages:
        raise UserError(f"--stage: {stage} is not in the recipe's stages ({', '.join(recipe.stages)})")
    check_names(recipe)
    check_image(image)
    res = recipe.resources_for(stage)
    check_resources(stage, res)
    resolved = cluster_recipe(recipe, image)
    k = resolved.kubernetes
    name = job_name(resolved, stage)
    multi_node = res.nodes > 1
    argv = stage_argv(resolved, stage, main_address=main_address(resolved, stage) if multi_node else None)
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
    if multi_node:
        pod_spec["subdomain"] = service_name(resolved, stage)
    meta = metadata(resolved, name, stage, queue=True)
    spec: dict = {}
    if multi_node:
        spec.update(completionMode="Indexed", completions=res.nodes, parallelism=res.nodes)
    spec["backoffLimit"] = 0 if retried_by_launcher(resolved, stage) else k.backoff_limit
    policy = pod_failure_policy(resolved, ignore_disruptions=not retried_by_launcher(resolved, stage))
    if policy:
        spec["podFailurePolicy"] = policy
    spec["activeDeadlineSeconds"] = k.active_deadline_seconds
    spec["ttlSecondsAfterFinished"] = k.ttl_seconds_after_finished
    template_meta = {"labels": labels(resolved, stage), "annotations": {**k.pod_annotations, **meta["annotations"]}}
    spec["template"] = {"metadata": template_meta, "spec": pod_spec}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def render_service(recipe: Recipe, stage: str) -> dict:
    """The headless Service that gives the pods of a multi-node Job their DNS names. Not-ready
    addresses are published, since ranks must find index 0 before anything is ready. The launcher
    creates it before the Job and then gives it an ownerReference to the Job (its uid), so that it
    goes with the Job."""
    resolved = cluster_recipe(recipe)
    name = service_name(resolved, stage)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": resolved.kubernetes.namespace,
            "labels": labels(resolved, stage),
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_RUN: resolved.run_id, LABEL_COMPONENT: stage},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def owned_by(manifest: dict, job: dict) -> dict:
    """``manifest`` with an ownerReference to the created ``job`` (garbage-collected with it). No
    blockOwnerDeletion: setting it needs update on jobs/finalizers, which the driver's Role lacks."""
    reference = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": job["metadata"]["name"],
        "uid": job["metadata"]["uid"],
    }
    meta = {**manifest["metadata"], "ownerReferences": [reference]}
    return {**manifest, "metadata": meta}


def render_stage(recipe: Recipe, stage: str, image: str) -> list[dict]:
    """What ``submit`` creates for a stage, in order, after checking the target version."""
    manifests = [render_job(recipe, stage, image)]
    if recipe.resources_for(stage).nodes > 1:
        manifests.append(render_service(recipe, stage))
    features.check(manifests, recipe.kubernetes.target_version)
    return manifests


def driver_job_spec(recipe: Recipe, image: str, *, dated: bool) -> tuple[dict, dict]:
    """(pod template labels, Job spec) of the driver: ``vlmjobs pipeline`` on a little CPU."""
    resolved = cluster_recipe(recipe, image)
    k = resolved.kubernetes
    command = ["python", "-m", "launcher.cli", "pipeline"] + (["--dated"] if dated else [])
    container = {
        "name": CONTAINER,
        "image": image,
        "command": command,
        "env": [{"name": n, "value": v} for n, v in stage_env(resolved).items()]
        + [{"name": "PYTHONUNBUFFERED", "value": "1"}],
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
    spec["activeDeadlineSeconds"] = k.active_deadline_seconds * max(len(resolved.stages), 1)
    spec["ttlSecondsAfterFinished"] = k.ttl_seconds_after_finished
    template_labels = labels(resolved, DRIVER)
    spec["template"] = {"metadata": {"labels": template_labels}, "spec": pod_spec}
    return template_labels, spec


def render_driver_job(recipe: Recipe, image: str) -> dict:
    check_names(recipe)
    check_image(image)
    resolved = cluster_recipe(recipe, image)
    _, spec = driver_job_spec(recipe, image, dated=False)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(resolved, driver_name(resolved), DRIVER),
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
            "jobTemplate": {"metadata": {"labels": template_labels}, "spec": spec},
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
    # multi-node rendezvous: created before its Job, then patched to be owned by it
    {"apiGroups": [""], "resources": ["services"], "verbs": ["create", "delete", "patch"]},
    # a multi-node stage is refused on a claim only one node can mount
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get"]},
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
        "apiVersion": "kueue.x-k8s.io/v1beta1",
        "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": namespace, "labels": {LABEL_PART_OF: APP}},
        "spec": {"clusterQueue": cluster_queue},
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # no &id001 anchors: every manifest reads on its own
        return True


def dump(manifests: list[dict]) -> str:
    return yaml.dump_all(manifests, Dumper=_Dumper, sort_keys=False, width=120)
