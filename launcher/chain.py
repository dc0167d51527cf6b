"""Stages as Jobs, one after another on the shared volume.

    run_stage(cluster, recipe, "sft", image)   create the stage's Job (or find it), follow it to its end
    pipeline(cluster, recipe, image)           the recipe's stages in order
    submit_driver(cluster, recipe, image)      the same chain, driven by a CPU Job in the cluster

A stage starts only once the previous one succeeded and its pods terminated (a ReadWriteOnce
volume attaches to one node at a time). A stage whose Job already succeeded is skipped; the stage
itself also skips when its ``_SUCCESS.json`` matches (e.g. after the Job's TTL removed it). A Job
that already exists is followed, never duplicated. Restarting a multi-node group (render.py's
docstring) happens here: delete the failed Job, wait until it and its pods are gone, create it again.
"""

from __future__ import annotations

from jobs.contract import EXIT_FAILURE, EXIT_USER_ERROR
from jobs.recipe import Recipe
from launcher import render
from launcher.kube import AlreadyExists, Cluster, JobFailed, Outcome, job_state, outcome


def _hint(recipe: Recipe, stage: str) -> str:
    if stage == render.DRIVER:
        return f"its log: kubectl logs -n {recipe.kubernetes.namespace} job/{render.driver_name(recipe)}"
    run = recipe.run_id
    return f"its log: vlmjobs logs --stage={stage} --run={run}; to run it again: vlmjobs delete --run={run} --stage={stage}"


def _failed(cluster: Cluster, recipe: Recipe, stage: str, name: str, result: Outcome, restarts: str = "") -> JobFailed:
    details = "; ".join(result.messages) or result.reason or "no reason given"
    if result.user_error:
        cause = "the stage exited 2: a recipe or data error, which a retry cannot fix"
    elif result.exit_codes:
        cause = f"stage exit codes {', '.join(map(str, sorted(set(result.exit_codes))))}"
    else:
        cause = ""
    text = f"stage {stage}: Job {cluster.namespace}/{name} failed{restarts}: {details}"
    text += f" ({cause}); {_hint(recipe, stage)}" if cause else f"; {_hint(recipe, stage)}"
    return JobFailed(
        text,
        conditions=result.messages,
        exit_code=EXIT_USER_ERROR if result.user_error else EXIT_FAILURE,
        kind="Job",
        namespace=cluster.namespace,
        name=name,
    )


def _create(cluster: Cluster, manifests: list[dict], stage: str) -> dict:
    """Create the Job, then its Service owned by it; a Job that exists already is returned as it is."""
    job_manifest, *dependents = manifests
    name = job_manifest["metadata"]["name"]
    try:
        job = cluster.create_job(job_manifest)
        cluster.out(f"==> {stage}: created Job {cluster.namespace}/{name}")
        created = True
    except AlreadyExists:
        job = cluster.get_job(name) or job_manifest
        cluster.out(f"==> {stage}: Job {cluster.namespace}/{name} already exists: {job_state(job)}")
        created = False
    for dependent in dependents:
        service = render.owned_by(dependent, job) if job.get("metadata", {}).get("uid") else dependent
        try:
            cluster.create_service(service)
        except AlreadyExists:
            if not created:
                continue  # it belongs to the Job that exists
            # Left by an earlier attempt whose Job is gone; the garbage collector may not have got to it.
            cluster.delete_service(service["metadata"]["name"])
            cluster.create_service(service)
    return job


def run_stage(
    cluster: Cluster, recipe: Recipe, stage: str, image: str, *, follow: bool = True, logs: bool = True
) -> None:
    """Run one stage's Job to success, or raise JobFailed (exit code 2 for a user error)."""
    manifests = render.render_stage(recipe, stage, image)
    name = manifests[0]["metadata"]["name"]
    k = recipe.kubernetes
    job = cluster.get_job(name)
    if job is None:
        job = _create(cluster, manifests, stage)
    else:
        cluster.out(f"==> {stage}: Job {cluster.namespace}/{name} already exists: {job_state(job)}")
    # A Job that had failed before we came is reported, not retried: its retries are spent, and
    # running it again is the user's call (vlmjobs delete, then again).
    found_failed = job_state(job) == "Failed"
    if not follow:
        return
    restart_by_launcher = render.retried_by_launcher(recipe, stage)
    group = recipe.resources_for(stage).nodes > 1
    failures = disruptions = 0
    while True:
        state = job_state(job)
        if state == "Complete":
            result = Outcome(True)
        elif state == "Failed":
            result = outcome(job, cluster.list_pods(name))
        else:
            result = cluster.follow(name, logs=logs, group=group)
        if result.succeeded:
            cluster.wait_pods_terminated(name)
            cluster.out(f"==> {stage}: succeeded")
            return
        restarts = f" after {failures + disruptions} restart(s)" if failures + disruptions else ""
        if result.user_error or result.deadline or not restart_by_launcher or found_failed:
            raise _failed(cluster, recipe, stage, name, result, restarts)
        if result.disrupted and disruptions < k.max_disruption_restarts:
            disruptions += 1
            why = f"disruption {disruptions} of at most {k.max_disruption_restarts}, not counted as a failure"
        elif not result.disrupted and failures < k.backoff_limit:
            failures += 1
            why = f"failure {failures} of at most {k.backoff_limit} retries"
        else:
            raise _failed(cluster, recipe, stage, name, result, restarts)
        cluster.out(
            f"==> {stage}: restarting Job {cluster.namespace}/{name} from its last checkpoint "
            f"({'; '.join(result.messages) or result.reason}; {why})"
        )
        cluster.delete_job(name)
        cluster.wait_job_gone(name)
        job = _create(cluster, manifests, stage)


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
        cluster.out(f"==> pipeline: driver Job {cluster.namespace}/{name} already exists: {job_state(job)}")
    if not follow:
        return
    result = cluster.follow(name, logs=True)
    if not result.succeeded:
        raise _failed(cluster, recipe, render.DRIVER, name, result)
