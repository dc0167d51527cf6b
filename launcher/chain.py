"""Stages as Jobs, one after another on the shared volume.

    run_stage(cluster, recipe, "sft", image)   create the stage's Job (or find it), follow it to its end
    pipeline(cluster, recipe, image)           the recipe's stages in order
    submit_driver(cluster, recipe, image)      the same chain, driven by a CPU Job in the cluster

A stage starts only once the previous one succeeded and its pods terminated (a ReadWriteOnce
volume attaches to one node at a time). A stage whose Job already succeeded is skipped; the stage
itself also skips when its ``_SUCCESS.json`` matches (e.g. after the Job's TTL removed it). A Job
that already exists is followed, never duplicated; a suspended one (queued by Kueue) is waited on.
Restarting a multi-node group (render.py's docstring) happens here: delete the failed Job, wait
until it and its pods are gone, create it again; whether to is ``state.next_step``.
"""

from __future__ import annotations

from jobs.contract import EXIT_FAILURE, EXIT_REGRESSED, EXIT_USER_ERROR, UserError
from jobs.recipe import Recipe
from launcher import render, state
from launcher.kube import AlreadyExists, Cluster, JobFailed, StoppedMidway


def _hint(recipe: Recipe, stage: str) -> str:
    if stage == render.DRIVER:
        return f"its log: kubectl logs -n {recipe.kubernetes.namespace} job/{render.driver_name(recipe)}"
    run = recipe.run_id
    return f"its log: vlmjobs logs --stage={stage} --run={run}; to run it again: vlmjobs delete --run={run} --stage={stage}"


def _failed(
    cluster: Cluster, recipe: Recipe, stage: str, name: str, reading: state.Reading, restarts: str = ""
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
    text = f"stage {stage}: Job {cluster.namespace}/{name} failed{restarts}: {details}"
    text += f" ({cause}); {_hint(recipe, stage)}" if cause else f"; {_hint(recipe, stage)}"
    return JobFailed(
        text,
        conditions=(reading.message,) if reading.message else (),
        exit_code=EXIT_REGRESSED if reading.cause == "regressed" else EXIT_USER_ERROR if reading.user_error else EXIT_FAILURE,
        kind="Job",
        namespace=cluster.namespace,
        name=name,
    )


def _refuse_unshareable_claim(cluster: Cluster, recipe: Recipe, stage: str) -> None:
    """A multi-node stage on a claim only one node can mount would sit in ContainerCreating: refuse it first."""
    nodes = recipe.resources_for(stage).nodes
    if nodes < 2:
        return
    pvc = cluster.get_pvc(recipe.kubernetes.pvc)
    refusal = state.shared_claim_refusal(pvc, stage, nodes) if pvc else None
    if refusal:
        raise UserError(refusal)


def _create(cluster: Cluster, manifests: list[dict], stage: str) -> dict:
    """Create the stage's Service first (as JobSet does, so that rank 0's name resolves from the
    first pod on), then the Job, then make the Service the Job's, to go with it. A Job that exists
    already is returned as it is."""
    job_manifest, *services = manifests
    name = job_manifest["metadata"]["name"]
    for service in services:
        try:
            cluster.create_service(service)
        except AlreadyExists:
            # Left by an earlier attempt whose Job is gone (the garbage collector may not have got
            # to it yet), or by a launcher stopped between the two creates: start it afresh.
            cluster.delete_service(service["metadata"]["name"])
            cluster.create_service(service)
    try:
        job = cluster.create_job(job_manifest)
        cluster.out(f"==> {stage}: created Job {cluster.namespace}/{name}")
    except AlreadyExists:
        job = cluster.get_job(name) or job_manifest
        cluster.out(f"==> {stage}: Job {cluster.namespace}/{name} already exists: {state.job_state(job)}")
    if job.get("metadata", {}).get("uid"):
        for service in services:
            owned = render.owned_by(service, job)
            cluster.set_owner(owned["metadata"]["name"], owned["metadata"]["ownerReferences"])
    return job


def run_stage(
    cluster: Cluster, recipe: Recipe, stage: str, image: str, *, follow: bool = True, logs: bool = True
) -> None:
    """Run one stage's Job to success, or raise JobFailed (exit code 2 for a user error)."""
    manifests = render.render_stage(recipe, stage, image)
    name = manifests[0]["metadata"]["name"]
    k = recipe.kubernetes
    group = recipe.resources_for(stage).nodes > 1
    job = cluster.get_job(name)
    if job is None:
        _refuse_unshareable_claim(cluster, recipe, stage)
        job = _create(cluster, manifests, stage)
    else:
        cluster.out(f"==> {stage}: Job {cluster.namespace}/{name} already exists: {state.job_state(job)}")
    # A Job that had failed before we came is reported, not retried: its retries are spent, and
    # running it again is the user's call (vlmjobs delete, then again).
    restartable = render.retried_by_launcher(recipe, stage) and not state.is_finished(job)
    if not follow:
        return
    failures = disruptions = 0
    while True:
        if state.is_finished(job):
            reading = state.read(job, cluster.list_pods(name), group=group)
        else:
            reading = cluster.follow(name, logs=logs, group=group)
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
            job = _create(cluster, manifests, stage)
        except KeyboardInterrupt as e:
            raise StoppedMidway(
                f"stopped while restarting stage {stage}: Job {cluster.namespace}/{name} is deleted and not created "
                "again; run the same command again to create it (it resumes from the last checkpoint)",
                e,
            ) from None


def pipeline(cluster: Cluster, recipe: Recipe, image: str, stages: tuple[str, ...] = (), *, logs: bool = True) -> None:
    """The recipe's stages (or ``stages``), in order, each started when the one before is done."""
    chosen = recipe.chosen_stages(stages)
    for stage in chosen:
        render.render_stage(recipe, stage, image)  # every stage renders before the first one starts
    for stage in chosen:
        run_stage(cluster, recipe, stage, image, logs=logs)
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
        cluster.out(f"==> pipeline: driver Job {cluster.namespace}/{name} already exists: {state.job_state(job)}")
    if not follow:
        return
    reading = cluster.follow(name, logs=True)
    if not reading.succeeded:
        raise _failed(cluster, recipe, render.DRIVER, name, reading)
