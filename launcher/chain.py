"""Stages as Jobs, one after another on the shared volume.

    run_stage(cluster, recipe, "sft", image)   create the stage's Job (or find it), follow it to its end
    pipeline(cluster, recipe, image)           the recipe's stages in order
    submit_driver(cluster, recipe, image)      the same chain, driven by a CPU Job in the cluster

A stage starts only once the previous one succeeded and its pods terminated (a ReadWriteOnce
volume attaches to one node at a time). A stage whose Job already succeeded is skipped; the stage
itself also skips when its ``_SUCCESS.json`` matches (e.g. after the Job's TTL removed it). A Job
that already exists is followed, never duplicated; a suspended one (queued by Kueue) is waited on.
A multi-node stage is a JobSet (``run_group``), restarted by the JobSet controller and only followed
here. Restarting a one-node Job here happens only on targets older than 1.31 (no podFailurePolicy):
delete the failed Job, wait until it and its pods are gone, create it again (``state.next_step``).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

from jobs.contract import EXIT_FAILURE, EXIT_REGRESSED, EXIT_USER_ERROR, UserError
from jobs.recipe import Recipe
from jobs.stage_resources import StageResources
from launcher import kube, render, state
from launcher.kube import AlreadyExists, Cluster, JobFailed, StoppedMidway


def _hint(recipe: Recipe, stage: str) -> str:
    if stage == render.DRIVER:
        return f"its log: kubectl logs -n {recipe.kubernetes.namespace} job/{render.driver_name(recipe)}"
    run = recipe.run_id
    return f"its log: vlmjobs logs --stage={stage} --run={run}; to run it again: vlmjobs delete --run={run} --stage={stage}"


def _failed(
    cluster: Cluster, recipe: Recipe, stage: str, name: str, reading: state.Reading, restarts: str = "", kind: str = "Job"
) -> JobFailed:
    details = reading.message or "no reason given"
    if reading.cause == "regressed":
        cause = (f"the stage exited {EXIT_REGRESSED}: the run scored worse than the recipe's last good night; the chain "
                 "stops, and its model is not merged or pushed")
    elif reading.user_error:
        cause = "the stage exited 2: a recipe or data error, which a retry cannot fix"
    elif reading.exit_codes:
        cause = f"stage exit codes {', '.join(map(str, sorted(set(reading.exit_codes))))}"
    else:
        cause = ""
    text = f"stage {stage}: {kind} {cluster.namespace}/{name} failed{restarts}: {details}"
    text += f" ({cause}); {_hint(recipe, stage)}" if cause else f"; {_hint(recipe, stage)}"
    return JobFailed(
        text,
        conditions=(reading.message,) if reading.message else (),
        exit_code=EXIT_REGRESSED if reading.cause == "regressed" else EXIT_USER_ERROR if reading.user_error else EXIT_FAILURE,
        kind=kind,
        namespace=cluster.namespace,
        name=name,
    )


def _refuse_unshareable_claim(cluster: Cluster, recipe: Recipe, stage: str, nodes: int) -> None:
    """A multi-node stage on a claim only one node can mount would sit in ContainerCreating: refuse it first."""
    if nodes < 2:
        return
    pvc = cluster.get_pvc(recipe.kubernetes.pvc)
    refusal = state.shared_claim_refusal(pvc, stage, nodes) if pvc else None
    if refusal:
        raise UserError(refusal)


def _create(cluster: Cluster, manifest: dict, stage: str) -> dict:
    """Create the stage's Job; a Job that exists already is returned as it is."""
    name = manifest["metadata"]["name"]
    try:
        job = cluster.create_job(manifest)
        cluster.out(f"==> {stage}: created Job {cluster.namespace}/{name}")
    except AlreadyExists:
        job = cluster.get_job(name) or manifest
        cluster.out(f"==> {stage}: Job {cluster.namespace}/{name} already exists: {state.job_state(job)}")
    return job


def _refuse_another_recipe(cluster: Cluster, recipe: Recipe, image: str, stage: str, job: dict, manifest: dict) -> None:
    """A Job (or JobSet) of this run made from a different recipe is not this recipe's result (a Complete one would be reported as
    its success): refused, naming the keys that differ."""
    fingerprint = manifest["metadata"]["annotations"][render.ANNOTATION_FINGERPRINT]
    changes = state.recipe_changes(job, fingerprint, render.cluster_recipe(recipe, image).to_dict())
    if changes is None:
        return
    run = recipe.run_id
    raise UserError(
        f"{stage}: {manifest['kind']} {cluster.namespace}/{manifest['metadata']['name']} of run {run} was made from another recipe "
        f"({len(changes)} key{'s' * (len(changes) > 1)} differ: {', '.join(changes)}); run it under a new id "
        f"(--run={run}-2) or delete the run's Jobs first (vlmjobs delete --run={run})"
    )


JOBSET_INSTALL = "kubectl apply --server-side -f https://github.com/kubernetes-sigs/jobset/releases/download/v0.11.1/manifests.yaml"


def _layout(res: StageResources) -> str:
    """"2 nodes", "2 nodes, a vLLM server on 1 GPU", "1 node, a vLLM server on 2 GPUs": what the JobSet holds."""
    nodes = f"{res.nodes} node{'s' * res.multi_node}"
    server = f", a vLLM server on {res.server.gpus} GPU{'s' * (res.server.gpus > 1)}" if res.server else ""
    return nodes + server


def run_group(cluster: Cluster, recipe: Recipe, stage: str, image: str, res: StageResources, manifest: dict, *,
              follow: bool, logs: bool) -> None:
    """A multi-node stage, or grpo with its vLLM server: create its JobSet (or find it), follow it to its end; the JobSet
    controller restarts the group, so a launcher stopped and started again (or none: submit --detach) changes nothing."""
    name = manifest["metadata"]["name"]
    _refuse_unshareable_claim(cluster, recipe, stage, res.nodes)  # whatever the cluster serves: the recipe's to fix
    if not cluster.serves(kube.JOBSET_GROUP, kube.JOBSET_VERSION):
        runs = f"runs as a JobSet ({_layout(res)})" if res.server else f"runs on {res.nodes} nodes as a JobSet"
        raise UserError(f"stage {stage} {runs}, but the cluster serves no "
                        f"{render.JOBSET_API} (JobSet is not installed); an admin installs it with: {JOBSET_INSTALL}")
    jobset = cluster.get_jobset(name)
    if jobset is None:
        try:
            jobset = cluster.create_jobset(manifest)
            cluster.out(f"==> {stage}: created JobSet {cluster.namespace}/{name} ({_layout(res)})")
        except AlreadyExists:
            jobset = cluster.get_jobset(name) or manifest
    else:
        # its recipe is in the child Job's template: compared as a Job's would be
        group = next(r for r in jobset["spec"]["replicatedJobs"] if r["name"] == render.GROUP_JOB)  # not the vLLM server
        child = {"metadata": jobset["metadata"], "spec": group["template"]["spec"]}
        _refuse_another_recipe(cluster, recipe, image, stage, child, manifest)
        cluster.out(f"==> {stage}: JobSet {cluster.namespace}/{name} already exists: {state.jobset_state(jobset)}")
    if not follow:
        return
    group_job = render.group_job_name(recipe, stage)
    jobset = cluster.follow_jobset(name, group_job=group_job, logs=logs,
                                   admission_timeout_s=recipe.kubernetes.admission_timeout)  # fmt: skip
    restarts = state.jobset_restarts(jobset)[0]
    if state.jobset_state(jobset) == "Completed":
        cluster.wait_pods_terminated(group_job)
        if res.server:  # deleted by JobSet once the trainer succeeded: its GPUs are free when its pod is gone
            cluster.wait_pods_terminated(render.server_job_name(recipe, stage))
        cluster.out(f"==> {stage}: succeeded" + (f" after {restarts} restart(s)" if restarts else ""))
        return
    failed = state.first_failed_job(jobset) or group_job
    child = cluster.get_job(failed)
    said = (state.condition(jobset, "Failed") or {}).get("message", "")
    reading = state.read(child, cluster.list_pods(failed), group=True) if child else state.Reading("Failed", over=True)
    reading = dataclasses.replace(reading, message="; ".join(filter(None, [said, reading.message])))
    raise _failed(cluster, recipe, stage, name, reading, f" after {restarts} restart(s)" if restarts else "", kind="JobSet")


def run_stage(
    cluster: Cluster, recipe: Recipe, stage: str, image: str, *, follow: bool = True, logs: bool = True,
    ends_at: datetime | None = None,
) -> None:
    """Run one stage's Job to success, or raise JobFailed (exit code 2 for a user error). A Job created before
    ``ends_at`` (a nightly driver's own deadline) ends by then."""
    res = render.stage_resources(recipe, stage)
    manifest, = render.render_stage(recipe, stage, image)
    if ends_at is not None:
        manifest = render.within(manifest, (ends_at - datetime.now(timezone.utc)).total_seconds())
    if res.jobset:
        return run_group(cluster, recipe, stage, image, res, manifest, follow=follow, logs=logs)
    name = manifest["metadata"]["name"]
    k = recipe.kubernetes
    job = cluster.get_job(name)
    if job is None:
        job = _create(cluster, manifest, stage)
    else:
        _refuse_another_recipe(cluster, recipe, image, stage, job, manifest)
        cluster.out(f"==> {stage}: Job {cluster.namespace}/{name} already exists: {state.job_state(job)}")
    # A Job that had failed before we came is reported, not retried: its retries are spent, and
    # running it again is the user's call (vlmjobs delete, then again).
    restartable = render.retried_by_launcher(recipe, res) and not state.is_finished(job)
    if not follow:
        return
    failures = disruptions = 0
    while True:
        if state.is_finished(job):
            reading = state.read(job, cluster.list_pods(name))
        else:
            reading = cluster.follow(name, logs=logs, admission_timeout_s=k.admission_timeout)
        step = state.next_step(
            reading,
            restartable=restartable,
            failures=failures,
            disruptions=disruptions,
            backoff_limit=k.backoff_limit,
            max_disruption_restarts=k.max_disruption_restarts,
        )
        if step.action == "succeeded":
            cluster.wait_pods_terminated(name)
            cluster.out(f"==> {stage}: succeeded")
            return
        if step.action == "failed":
            restarts = f" after {failures + disruptions} restart(s)" if failures + disruptions else ""
            raise _failed(cluster, recipe, stage, name, reading, restarts)
        failures, disruptions = (failures + 1, disruptions) if step.counted else (failures, disruptions + 1)
        cluster.out(
            f"==> {stage}: restarting Job {cluster.namespace}/{name} from its last checkpoint "
            f"({reading.message}; {step.why})"
        )
        try:
            cluster.delete_job(name)
            cluster.wait_job_gone(name)
            job = _create(cluster, manifest, stage)
        except KeyboardInterrupt as e:
            raise StoppedMidway(
                f"stopped while restarting stage {stage}: Job {cluster.namespace}/{name} is deleted and not created "
                "again; run the same command again to create it (it resumes from the last checkpoint)",
                e,
            ) from None


def pipeline(cluster: Cluster, recipe: Recipe, image: str, stages: tuple[str, ...] = (), *, logs: bool = True,
             ends_at: datetime | None = None) -> None:
    """The recipe's stages (or ``stages``), in order, each started when the one before is done, and none running past
    ``ends_at`` (a nightly driver's deadline)."""
    chosen = recipe.chosen_stages(stages)
    for stage in chosen:
        render.render_stage(recipe, stage, image)  # every stage renders before the first one starts
    for stage in chosen:
        run_stage(cluster, recipe, stage, image, logs=logs, ends_at=ends_at)
    cluster.out(
        f"==> pipeline done: {', '.join(chosen)} of run {recipe.run_id} "
        f"in {recipe.kubernetes.mount_path}/{recipe.run_id}"
    )


def submit_driver(cluster: Cluster, recipe: Recipe, image: str, *, follow: bool = True) -> None:
    """Hand the chain to a driver Job in the cluster (this machine may then disconnect)."""
    manifest = render.render_driver_job(recipe, image)
    name = manifest["metadata"]["name"]
    try:
        cluster.create_job(manifest)
        cluster.out(f"==> pipeline: created driver Job {cluster.namespace}/{name}; it runs on if you disconnect")
    except AlreadyExists:
        job = cluster.get_job(name) or {}
        _refuse_another_recipe(cluster, recipe, image, render.DRIVER, job, manifest)
        cluster.out(f"==> pipeline: driver Job {cluster.namespace}/{name} already exists: {state.job_state(job)}")
    if not follow:
        return
    reading = cluster.follow(name, logs=True, admission_timeout_s=recipe.kubernetes.admission_timeout)
    if not reading.succeeded:
        raise _failed(cluster, recipe, render.DRIVER, name, reading)
