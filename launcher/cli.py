"""``vlmjobs``: the command line. Each command is also a Make target (see the Makefile).

    vlmjobs run RECIPE [--stages=sft,dpo] [--force] [--sft.args.learning_rate=1e-4 ...]   local chain
    vlmjobs validate RECIPE [overrides]       check a recipe, print the resolved one
    vlmjobs memory RECIPE                     the memory arithmetic of its training stages, before any GPU
    vlmjobs history RECIPE [--plot=PATH]      the recipe's nights (table), a plot of the primary metric over them
    vlmjobs prune RECIPE --keep=N [--jobs]    remove older run folders (and their finished Jobs), never the last good
    vlmjobs tiny-model --family=llava --out=DIR
    vlmjobs synth-data --kind=chartqa --out=DIR [--rows=400]

On a cluster (the current kube context, or the pod's ServiceAccount):
    vlmjobs render RECIPE --stage=sft [--run=ID]       print the stage's manifests; changes nothing
    vlmjobs submit RECIPE --stage=sft [--detach]       create the stage's Job, follow it and its log
    vlmjobs pipeline RECIPE [--in-cluster] [--detach]  the recipe's stages, one Job after another
    vlmjobs status [RECIPE] [--run=ID]                 the runs' Jobs and their states
    vlmjobs logs RECIPE --stage=sft [--run=ID]         a stage's log (index 0 of a multi-node stage)
    vlmjobs delete RECIPE --run=ID [--stage=sft]       delete a run's Jobs (their pods go with them)
    vlmjobs cronjob RECIPE [--out=FILE]                the nightly pipeline's CronJob (make nightly)
    vlmjobs k8s [RECIPE] --out=k8s                     write the cluster set-up manifests (make k8s)

vlmjobs COMMAND --help says more about each.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import sys
from pathlib import Path

from jobs import contract, entry
from jobs import recipe as recipes


def _stages(stages) -> tuple[str, ...]:
    if isinstance(stages, str):
        return tuple(s.strip() for s in stages.split(",") if s.strip())
    return tuple(stages or ())


def run(recipe: str, stages="", force: bool = False, **overrides):
    """Run the recipe's stages (or --stages) on this machine, one after another."""
    from launcher import local

    resolved = recipes.load(str(recipe), overrides)
    recipes.check_passthrough(resolved)
    try:
        local.run(resolved, _stages(stages), force=force)
    except local.StageFailed as e:
        if e.returncode not in (contract.EXIT_SIGINT, contract.EXIT_SIGTERM):  # a stopped stage has said so itself
            print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def validate(recipe: str, **overrides):
    """Check a recipe: its schema, families and formats, the TRL/peft/transformers fields of its args, lora and
    quantization, local model and data paths, hub ids' form, and the metric names; print it resolved, ending with
    the verdict (a YAML comment). Every problem is reported at once, in one line; exit 2 when there is any."""
    import yaml

    resolved = recipes.load(str(recipe), overrides)
    errors = recipes.passthrough_errors(resolved) + recipes.before_gpu_errors(resolved)
    if errors:
        raise contract.UserError(f"{recipes.recipe_origin(resolved)}: {len(errors)} problem{'s' * (len(errors) > 1)}: " + "; ".join(errors))
    print(yaml.safe_dump(resolved.to_dict(), sort_keys=False), end="")
    print(f"# {recipes.recipe_origin(resolved)} is valid: stages {', '.join(resolved.stages)}; checked the schema, TRL, peft and "
          "transformers fields, local paths, hub ids' form and metric names (not whether the hub has them)")


def memory(recipe: str, prompt_tokens: int | None = None, **overrides):
    """The DPO blog's memory arithmetic for the recipe's training stages, from the model's config alone, per GPU (sharded
    over the stage's GPUs under resources.sharding), checked against resources.gpu_memory_gib: exit 2 when a stage does
    not fit, with what would (GPU count with FSDP, method, GPU size, batch). GRPO's generation counts prompts of
    --prompt_tokens (image tokens included; 1,024 unless given)."""
    from jobs import memory as arithmetic

    resolved = recipes.load(str(recipe), overrides)
    if prompt_tokens is not None and (isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or prompt_tokens < 1):
        raise contract.UserError(f"memory: --prompt_tokens={prompt_tokens!r}: give a whole number of tokens, 1 or more")
    misfits, server_misfits, counted = [], [], {}
    for stage in [s for s in recipes.TRAINING_STAGES if s in resolved.stages]:
        whole, counts = arithmetic.for_stage(resolved, stage, prompt_tokens)
        counted[stage] = counts
        method = getattr(resolved, stage).method
        res = resolved.resources_for(stage)
        shards = arithmetic.shard_count(resolved, stage, whole)
        estimate = whole.sharded(shards)
        print(f"{stage} ({method}, {counts['dtype']}): {counts['trainable']:,} of {counts['parameters']:,} parameters trained")
        print(f"  {whole}, before activations" + (f"; the reference {'counted' if whole.reference else 'none: not on the GPU'}"
                                                    if stage in ("dpo", "grpo") else ""))
        if stage == "grpo":
            print(f"  {_generation_line(resolved, whole, counts, assumed=prompt_tokens is None)}")
        gpus = max(res.gpus, 1) * res.nodes
        if shards > 1:
            print(f"  on {gpus} GPUs sharded with FSDP (resources.sharding {res.sharding}): {estimate}")
        elif gpus > 1:
            print(f"  on {gpus} GPUs, each holding all of it (resources.sharding {res.sharding or 'none'})")
        if not res.gpu_memory_gib:
            print(f"  no {stage} GPU size to check against: set resources.gpu_memory_gib")
            continue
        available = arithmetic.gpu_gb(res.gpu_memory_gib)
        gpu, note = _gpu_checked(res)
        if note:
            print(f"  note: {note}")
        if estimate.total < available:
            print(f"  fits in {gpu} ({available:.1f} GB) before activations")
            continue
        misfits.append(f"{stage} needs {estimate.total:.3g} GB" + (" per GPU" if shards > 1 else ""))
        print(f"  does NOT fit in {gpu} ({available:.1f} GB) before activations; what would:")
        for suggestion in _what_would_fit(resolved, stage, whole, available, prompt_tokens):
            print(f"    - {suggestion}")
    if "grpo" in resolved.stages and resolved.grpo.server_pod:  # its own GPUs, after the trainer's
        server_misfits = _vllm_server_memory(resolved, counted["grpo"])
    if misfits or server_misfits:
        training = [f"{'; '.join(misfits)} before activations, more than the GPU checked"] if misfits else []
        raise contract.UserError(f"memory: {'; '.join(training + server_misfits)}; "
                                 "change the recipe as suggested above")


def _generation_line(resolved: recipes.Recipe, estimate, counts: dict, *, assumed: bool) -> str:
    """What the generation part of a GRPO estimate is made of, from the counts memory.for_stage made it from."""
    from jobs import memory as arithmetic

    args = resolved.grpo.args
    if args.get("use_vllm") and args.get("vllm_mode", "colocate") == "server":
        return "generation: on the vLLM server's own GPUs (vllm_mode server), none on the trainer's"
    if args.get("use_vllm"):
        share = args.get("vllm_gpu_memory_utilization", arithmetic.TRL_VLLM_GPU_MEMORY_UTILIZATION)
        return f"generation: colocated vLLM reserves {share:g} of each GPU, {estimate.generation:.3g} GB"
    prompt = f"prompts of {counts['prompt_tokens']:,} tokens" + (
        " assumed (--prompt_tokens=N for yours, image tokens included)" if assumed else "")
    rows, completion = counts["generation_rows"], counts["completion_tokens"]
    return (f"generation: the key-value cache of {rows} completion(s) at once per GPU, {prompt} and up to {completion:,} "
            f"completion tokens: {estimate.generation:.3g} GB")


def _vllm_server_memory(recipe: recipes.Recipe, counts: dict) -> list[str]:
    """GRPO's vLLM server pod (grpo.vllm_server): its GPUs as rendered, checked with the parameters memory.for_stage
    counted from the model's config, and how much of the generation batch its KV cache holds at once (from the same
    counts); the misfit, if any."""
    from jobs import memory as arithmetic
    from jobs.stage_resources import DTYPE_BYTES, resolve

    parameters, rows = counts["parameters"], counts["generation_batch"]
    server = resolve(recipe, "grpo").server
    gpu_memory_gib = recipe.resources_for("grpo").gpu_memory_gib
    print(f"grpo's vLLM server (grpo.vllm_server): {server.gpus} GPU{'s' * (server.gpus > 1)} of its own, {server.basis}")
    if not gpu_memory_gib:
        print("  no GPU size to check it against: set resources.gpu_memory_gib")
        return []
    width = DTYPE_BYTES[recipe.model.dtype]
    estimate = arithmetic.vllm_server(parameters, width, gpu_memory_gib, server.gpu_memory_utilization, server.gpus)
    print(f"  {estimate}")
    # Tensor parallelism splits the key-value heads, and so the cache, over the server's GPUs
    per_gpu = counts["batch_cache_gb"] / server.gpus
    if estimate.cache <= 0:
        at_once = "none: the weights fill vLLM's share"
    elif per_gpu <= estimate.cache:
        at_once = "all at once"
    else:
        at_once = f"about {max(1, math.floor(rows * estimate.cache / per_gpu))} of them at a time (vLLM queues the rest)"
    print(f"  the generation batch's key-value cache ({rows} completions, prompts of {counts['prompt_tokens']:,} "
          f"tokens): {per_gpu:.3g} GB per GPU; {estimate.cache:.3g} GB left: {at_once}")
    share = f"{arithmetic.SERVER_WEIGHTS_SHARE:.0%} of vLLM's share"
    if estimate.fits:
        print(f"  fits: the weights take at most {share}, the rest is the KV cache's")
        return []
    fewest = arithmetic.vllm_server_gpus(parameters, width, gpu_memory_gib, server.gpu_memory_utilization)
    print(f"  does NOT fit: the weights take more than {share}, leaving too little for the KV cache; what would:")
    print(f"    - grpo.vllm_server.gpus: {fewest} (or leave it out: the launcher sizes it so)")
    return [f"grpo's vLLM server needs {fewest} GPUs for its weights and KV cache, not {server.gpus}"]


# Memory of common data-centre GPUs (GiB as their products name it): the sizes suggested when a recipe does not fit.
GPU_SIZES_GIB = (16, 24, 32, 40, 48, 80, 94, 141, 192)


def _gpu_checked(res: recipes.Resources) -> tuple[str, str | None]:
    """How to name the GPU checked, from resources.gpu_memory_gib (the number used), and a note when
    resources.gpu_product names another size."""
    import re

    size = f"{res.gpu_memory_gib:g} GiB"
    named = re.search(r"(\d+)\s*G[Bi]?B", res.gpu_product or "", re.I)
    if not res.gpu_product:
        return f"one GPU of {size} (resources.gpu_memory_gib)", None
    if named and abs(float(named.group(1)) - res.gpu_memory_gib) > 0.1 * res.gpu_memory_gib:
        note = (f"resources.gpu_product {res.gpu_product} names a {named.group(1)} GB GPU, but resources.gpu_memory_gib "
                f"is {res.gpu_memory_gib:g}: checked against {size}")
        return f"one GPU of {size} (resources.gpu_memory_gib)", note
    return f"one {res.gpu_product} of {size}", None


def _what_would_fit(resolved: recipes.Recipe, stage: str, whole, available: float, prompt_tokens: int | None = None) -> list[str]:
    import dataclasses

    from jobs import memory as arithmetic

    train = getattr(resolved, stage)
    res = resolved.resources_for(stage)
    suggestions = []
    fewest = arithmetic.fewest_shards(whole, available)
    if fewest is None:
        suggestions.append(f"generation alone needs {whole.generation:.3g} GB per GPU: fewer completions at once "
                           f"(--{stage}.args.per_device_train_batch_size, steps_per_generation) or shorter ones "
                           f"(--{stage}.args.max_completion_length)")
    elif fewest > 1:
        per_gpu = whole.sharded(fewest).total
        nodes = math.ceil(fewest / GPUS_PER_NODE)
        count = (f"--{stage}.resources.gpus={fewest}" if nodes == 1 else
                 f"--{stage}.resources.nodes={nodes} --{stage}.resources.gpus={math.ceil(fewest / nodes)}")
        suggestions.append(f"{fewest} GPUs of this size with FSDP: {per_gpu:.3g} GB per GPU ({count} "
                           f"--{stage}.resources.sharding=fsdp)")
    lighter = {"full": ("lora", "qlora"), "lora": ("qlora",), "qlora": ()}[train.method]
    for method in lighter:
        other = dataclasses.replace(resolved, **{stage: dataclasses.replace(train, method=method)})
        need = arithmetic.for_stage(other, stage, prompt_tokens)[0].total
        verdict = "fits" if need < available else "does not fit either"
        suggestions.append(f"--{stage}.method={method}: {need:.3g} GB, {verdict}")
    if stage == "dpo" and train.method == "full" and train.reference_logprobs == "recompute":  # no reference copy
        cached = dataclasses.replace(resolved, dpo=dataclasses.replace(train, reference_logprobs="cache"))
        need = arithmetic.for_stage(cached, stage)[0].total
        suggestions.append(f"--dpo.reference_logprobs=cache: {need:.3g} GB, {'fits' if need < available else 'does not fit either'}")
    total = whole.sharded(1).total
    bigger = next((gib for gib in GPU_SIZES_GIB if total < arithmetic.gpu_gb(gib)), None)
    if bigger:
        suggestions.append(f"a GPU of {bigger} GiB or more: --{stage}.resources.gpu_memory_gib={bigger} with a matching gpu_product")
    elif fewest is not None and fewest <= 1:
        suggestions.append(f"no single GPU holds {total:.3g} GB: use LoRA or QLoRA")
    suggestions.append(
        "activations come on top and grow with the batch: a smaller per_device_train_batch_size with a larger "
        f"gradient_accumulation_steps keeps the effective batch (--{stage}.args.per_device_train_batch_size=1), "
        "and activation_checkpointing trades time for their memory (auto: only where the batch needs it)"
    )
    return suggestions


GPUS_PER_NODE = 8  # the usual most GPUs of one node: a larger count is suggested as several nodes


def tiny_model(family: str, out: str, seed: int = 0):
    """Build a tiny random model of a family's real classes, offline, into OUT."""
    from jobs import tiny

    print(f"tiny {family} model in {tiny.build(family, str(out), seed=int(seed))}")


def synth_data(kind: str, out: str, rows: int = 400, seed: int = 0):
    """Write a synthetic data set in a real data set's schema (chartqa, rlaif-v, messages, preference-messages) into OUT."""
    from jobs import synthetic

    print(f"synthetic {kind} data in {synthetic.write(kind, str(out), rows=int(rows), seed=int(seed))}")


# ---------------------------------------------------------------------------------------------
# On a cluster


def _cluster_command(fn):
    """Cluster errors as one line and their exit code (2: user error or missing RBAC; 1: retry-worthy)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from launcher import kube

        try:
            return fn(*args, **kwargs)
        except kube.KubeError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (contract.Interrupted)
            runs_on = "stopped following; what was created runs on (vlmjobs status)"
            print(str(e) if isinstance(e, kube.StoppedMidway) else runs_on, file=sys.stderr)
            _exit(128 + getattr(e, "signum", contract.EXIT_SIGINT - 128))

    return wrapper


def _exit(code: int) -> None:
    """Exit with ``code``. While the log pump (a daemon thread, blocked in the log stream's read) still runs, without the
    interpreter's finalization: finalizing under a daemon thread in a C call can abort the process (seen: Ctrl-C while
    following ended with SIGABRT, -6, instead of 130). The streams are flushed first; nothing else is left to clean."""
    import threading

    from launcher.kube import LOG_PUMP

    if any(thread.name == LOG_PUMP and thread.is_alive() for thread in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _recipe(recipe, run, overrides: dict) -> recipes.Recipe:
    """The recipe file, or $VLMJOBS_RECIPE when none is given (as in the driver's pod)."""
    if run:
        overrides = {**overrides, "run.id": str(run)}
    return recipes.load(str(recipe) if recipe else None, overrides)


def _cluster(resolved: recipes.Recipe, in_cluster: bool | None = None):
    from launcher import kube

    return kube.Cluster(kube.connect(in_cluster=in_cluster), resolved.kubernetes.namespace)


def _stage(resolved: recipes.Recipe, stage) -> str:
    if not stage:
        raise contract.UserError(f"--stage: which stage? ({', '.join(resolved.stages)})")
    return str(stage)


def render(recipe: str = "", stage: str = "", run: str = "", driver: bool = False, **overrides):
    """Print a stage's manifests as YAML (or the pipeline driver's, --driver). Needs no cluster."""
    from launcher import render as rendering

    resolved = _recipe(recipe, run, overrides)
    image = rendering.resolve_image(resolved)
    if driver:
        manifests = [rendering.render_driver_job(resolved, image)]
    else:
        manifests = rendering.render_stage(resolved, _stage(resolved, stage), image)
    print(rendering.dump(manifests), end="")


@_cluster_command
def submit(recipe: str = "", stage: str = "", run: str = "", detach: bool = False, logs: bool = True, **overrides):
    """Create the stage's Job in the current kube context and follow it to its end (--detach: return at once)."""
    from launcher import chain
    from launcher import render as rendering

    resolved = _recipe(recipe, run, overrides)
    stage = _stage(resolved, stage)
    image = rendering.resolve_image(resolved)
    rendering.render_stage(resolved, stage, image)  # refuse before connecting
    chain.run_stage(_cluster(resolved), resolved, stage, image, follow=not detach, logs=logs)


@_cluster_command
def pipeline(
    recipe: str = "",
    stages="",
    run: str = "",
    in_cluster: bool = False,
    detach: bool = False,
    dated: bool = False,
    logs: bool = True,
    **overrides,
):
    """Run the recipe's stages as Jobs, each after the last succeeded. --in-cluster hands the chain
    to a driver Job (this machine may disconnect); --dated appends today's date to the run id (nightly)."""
    from launcher import chain
    from launcher import render as rendering

    resolved = _recipe(recipe, run, overrides)
    ends_at = None
    if dated:
        resolved, ends_at = _dated(resolved)
    image = rendering.resolve_image(resolved)
    if in_cluster:
        chain.submit_driver(_cluster(resolved), resolved, image, follow=not detach)
    else:
        chain.pipeline(_cluster(resolved), resolved, image, _stages(stages), logs=logs, ends_at=ends_at)


def _dated(resolved: recipes.Recipe) -> tuple[recipes.Recipe, datetime.datetime | None]:
    """The recipe under the run id of its night, run.id-YYYYMMDD, and when the night ends: both read from the driver's
    own Job where there is one ($VLMJOBS_DRIVER_JOB, from the downward API), so that every retry of that Job's pod
    continues one run and its stages end with the Job's deadline."""
    from launcher import render as rendering
    from launcher import state

    job_name = os.environ.get(rendering.DRIVER_JOB_ENV)
    job = _cluster(resolved).get_job(job_name) if job_name else None
    now = datetime.datetime.now(datetime.UTC)
    night = state.night_of(job, resolved.kubernetes.nightly_time_zone, now)
    dated = recipes.from_dict(resolved.to_dict(), {"run.id": f"{resolved.run_id}-{night}"}, origin="--dated")
    return dated, state.ends_at(job)


@_cluster_command
def status(recipe: str = "", run: str = "", namespace: str = "", **overrides):
    """The Jobs of one run (--run), or of every run in the namespace (--namespace, else the recipe's), and why a
    nightly CronJob's recent nights did not start."""
    from launcher import kube
    from launcher import render as rendering
    from launcher import state

    if not namespace:
        namespace = _recipe(recipe, "", overrides).kubernetes.namespace if recipe else recipes.Kubernetes().namespace
    cluster = kube.Cluster(kube.connect(), str(namespace))
    jobs = cluster.list_jobs(rendering.selector(str(run) if run else None))
    if not jobs:
        print(f"no vlmjobs Jobs in namespace {namespace}" + (f" for run {run}" if run else ""))
    else:
        print(kube.status_table(jobs))
    for cronjob in cluster.list_cronjobs(rendering.selector(None, rendering.NIGHTLY)):
        night_of = cronjob["metadata"]["labels"].get(rendering.LABEL_RUN, "")
        if run and str(run) != night_of and not str(run).startswith(f"{night_of}-"):
            continue  # the nights of another recipe (a night's run id is the recipe's plus its date)
        for line in state.nights_not_started(cronjob, cluster.list_events("CronJob", state.name_of(cronjob)), jobs):
            print(line)


@_cluster_command
def logs(recipe: str = "", stage: str = "", run: str = "", follow: bool = True, index: int = 0, **overrides):
    """Print a stage's log (the pod of --index in a multi-node stage), following it unless --nofollow."""
    from launcher import render as rendering

    resolved = _recipe(recipe, run, overrides)
    chosen = _stage(resolved, stage)
    jobset = rendering.stage_resources(resolved, chosen).jobset  # its pods are its JobSet's trainer Job's
    job = rendering.group_job_name(resolved, chosen) if jobset else rendering.job_name(resolved, chosen)
    _cluster(resolved).print_log(job, index=int(index), follow=follow)


@_cluster_command
def delete(recipe: str = "", run: str = "", stage: str = "", **overrides):
    """Delete a run's Jobs (one stage's with --stage, the driver's too); their pods and Services go with them."""
    from launcher import render as rendering

    if not run:
        raise contract.UserError("--run: which run? (vlmjobs status lists them)")
    resolved = _recipe(recipe, run, overrides)
    cluster = _cluster(resolved)
    chosen = rendering.selector(resolved.run_id, str(stage) or None)
    jobsets = [jobset["metadata"]["name"] for jobset in cluster.list_jobsets(chosen)]
    for name in jobsets:  # a multi-node stage: its JobSet, which would otherwise make its Job again
        if cluster.delete_jobset(name):
            print(f"deleted JobSet {cluster.namespace}/{name} (its Job, pods and Service go with it)")
    names = [job["metadata"]["name"] for job in cluster.list_jobs(chosen)  # a JobSet's Jobs went with it
             if not any(ref.get("kind") == "JobSet" for ref in job["metadata"].get("ownerReferences") or [])]
    if not names and not jobsets:
        which = f"run {resolved.run_id}" + (f", stage {stage}" if stage else "")
        print(f"no Jobs of {which} in namespace {cluster.namespace}")
        return
    for name in names:
        if cluster.delete_job(name):
            print(f"deleted Job {cluster.namespace}/{name} (its pods and Service go with it)")


def history(recipe: str, plot: str = "", **overrides):
    """The recipe's nights from its history (<run.root>/.history/<name>.jsonl, one line a finished evaluation): each
    night's shipped variant, its primary metric with standard error and samples, regressed or not against the last
    good night, the recipe fingerprint and image, and whether its folder is kept. Writes a plot of the primary metric
    over the nights (--plot, else beside the history as <name>.png)."""
    from jobs import history as nights_of

    resolved = recipes.load(str(recipe), overrides)
    path = nights_of.history_path(resolved.run.root, resolved.name)
    nights = nights_of.read(path)
    if not nights:
        print(f"no nights of {resolved.name} yet: {path} holds none (each run's evaluate adds one)")
        return
    print(nights_of.table(nights, resolved.run.root))
    regressed = sum(bool(n.get("regressed")) for n in nights)
    print(f"{len(nights)} night{'s' * (len(nights) > 1)}, {regressed} regressed; history: {path}")
    figure = Path(str(plot)) if plot else path.with_suffix(".png")
    if nights_of.plot(nights, figure, resolved.name):
        print(f"plot: {figure}")


@_cluster_command
def prune(recipe: str, keep: int = 0, jobs: bool = False, **overrides):
    """Remove the folders of the recipe's runs (those in its history) beyond the newest --keep, never the last good
    run nor one in use (a stage or the local runner running it). --jobs: also delete the removed runs' finished Jobs
    and JobSets in the recipe's namespace, and count a run with an unfinished Job or JobSet as in use (where run.root
    is the cluster's volume, e.g. in a pod that mounts it)."""
    from jobs import history as nights_of

    if not keep:
        raise contract.UserError("--keep: how many of the newest runs to keep? (e.g. --keep=7)")
    resolved = recipes.load(str(recipe), overrides)
    cluster = _cluster(resolved) if jobs else None
    in_use = None
    if cluster is not None:
        from launcher import render as rendering
        from launcher import state

        def in_use(run_id: str) -> bool:
            selector = rendering.selector(run_id)
            running_jobs = any(not state.is_finished(job) for job in cluster.list_jobs(selector))
            # a JobSet restarting its group has no unfinished Job for a moment
            return running_jobs or any(state.jobset_state(js) not in ("Completed", "Failed")
                                       for js in cluster.list_jobsets(selector))

    removed, kept = nights_of.prune(resolved.run.root, resolved.name, int(keep), in_use=in_use)
    root = Path(resolved.run.root)
    for run_id, why in kept.items():
        print(f"kept {root / run_id}: {why}")
    for run_id in removed:
        print(f"removed {root / run_id}")
        if cluster is not None:
            for jobset in cluster.list_jobsets(rendering.selector(run_id)):  # its Jobs go with it
                if cluster.delete_jobset(jobset["metadata"]["name"]):
                    print(f"deleted JobSet {cluster.namespace}/{jobset['metadata']['name']} (finished)")
            for job in cluster.list_jobs(rendering.selector(run_id)):
                if cluster.delete_job(job["metadata"]["name"]):
                    print(f"deleted Job {cluster.namespace}/{job['metadata']['name']} (finished)")
    if not removed:
        print(f"nothing to prune: {len(kept)} run folder{'s' * (len(kept) != 1)} of {resolved.name} kept")


def cronjob(recipe: str = "", run: str = "", out: str = "", **overrides):
    """The nightly pipeline's CronJob (kubernetes.nightly_schedule) as YAML, printed or written to --out (make nightly
    writes k8s/nightly/cronjob.yaml and applies k8s/nightly). Refused while the image is the default one, tagged with
    this checkout's git revision, and the checkout has uncommitted changes: no image under that tag holds them."""
    from launcher import image as images
    from launcher import render as rendering

    resolved = _recipe(recipe, run, overrides)
    image = rendering.resolve_image(resolved)
    named_by_checkout = not resolved.kubernetes.image and not os.environ.get("VLMJOBS_REVISION")
    if named_by_checkout and images.uncommitted():
        raise contract.UserError(
            f"cronjob: {image} is tagged with commit {images.revision()}, but this checkout has uncommitted changes that "
            "no image under that tag holds; commit them and make push-image first (or set kubernetes.image)"
        )
    text = rendering.dump([rendering.render_cronjob(resolved, image)])
    k = resolved.kubernetes
    pulls = f"the CronJob will pull {image} (schedule {k.nightly_schedule!r}, {k.nightly_time_zone})"
    if out:
        Path(str(out)).parent.mkdir(parents=True, exist_ok=True)
        Path(str(out)).write_text(text)
        print(f"wrote {out}: {pulls}", file=sys.stderr)
    else:
        print(text, end="")
        print(pulls, file=sys.stderr)


def k8s(
    recipe: str = "",
    out: str = "k8s",
    size: str = "1Ti",
    access_mode: str = "ReadWriteOnce",
    storage_class: str = "",
    cluster_queue: str = "cluster-queue",
    **overrides,
):
    """Write the cluster set-up (namespace, PVC, the driver's RBAC; examples: HF token Secret,
    Kueue LocalQueue) into OUT, from the recipe's kubernetes section or the defaults."""
    from launcher import setup

    k = _recipe(recipe, "", overrides).kubernetes if recipe else recipes.Kubernetes()
    options = {"size": str(size), "access_mode": str(access_mode), "cluster_queue": str(cluster_queue)}
    for path in setup.write(Path(out), k, storage_class=str(storage_class) or None, **options):
        print(f"wrote {path}")


COMMANDS = {
    "run": run,
    "validate": validate,
    "memory": memory,
    "history": history,
    "prune": prune,
    "tiny-model": tiny_model,
    "synth-data": synth_data,
    "render": render,
    "submit": submit,
    "pipeline": pipeline,
    "status": status,
    "logs": logs,
    "delete": delete,
    "cronjob": cronjob,
    "k8s": k8s,
}


EXAMPLES = {
    "run": "vlmjobs run recipes/tiny-demo.yaml --stages=prepare,sft --sft.args.max_steps=20",
    "validate": "vlmjobs validate recipes/tiny-demo.yaml --sft.args.learning_rate=1e-4",
    "memory": "vlmjobs memory recipes/idefics2-8b-rlaif-v-dpo.yaml --resources.gpu_memory_gib=24",
    "history": "vlmjobs history recipes/tiny-demo.yaml --plot=history.png",
    "prune": "vlmjobs prune recipes/tiny-demo.yaml --keep=7",
    "tiny-model": "vlmjobs tiny-model --family=llava --out=.cache/tiny/llava",
    "synth-data": "vlmjobs synth-data --kind=chartqa --out=.cache/data/chartqa --rows=400",
    "render": "vlmjobs render recipes/idefics2-8b-rlaif-v-dpo.yaml --stage=dpo --run=exp-1",
    "submit": "vlmjobs submit recipes/idefics2-8b-rlaif-v-dpo.yaml --stage=prepare --detach",
    "pipeline": "vlmjobs pipeline recipes/idefics2-8b-rlaif-v-dpo.yaml --in-cluster --detach",
    "status": "vlmjobs status recipes/idefics2-8b-rlaif-v-dpo.yaml --run=exp-1",
    "logs": "vlmjobs logs recipes/idefics2-8b-rlaif-v-dpo.yaml --stage=dpo --run=exp-1",
    "delete": "vlmjobs delete recipes/idefics2-8b-rlaif-v-dpo.yaml --run=exp-1 --stage=dpo",
    "cronjob": "vlmjobs cronjob recipes/idefics2-8b-rlaif-v-dpo.yaml --kubernetes.nightly_schedule='0 3 * * *' --out=k8s/nightly/cronjob.yaml",
    "k8s": "vlmjobs k8s recipes/idefics2-8b-rlaif-v-dpo.yaml --out=k8s --storage_class=standard",
}


def help_text(argv: list[str]) -> str:
    """``vlmjobs --help``: the usage above; ``vlmjobs COMMAND --help``: that command's."""
    from jobs import usage

    name = next((arg for arg in argv if not arg.startswith("-")), "")
    if name not in COMMANDS:
        return f"{__doc__.strip()}\n\n{usage.overrides_and_stages()}"
    lines = [line for line in __doc__.splitlines() if line.strip() == f"vlmjobs {name}" or line.strip().startswith(f"vlmjobs {name} ")]
    return usage.command_help("vlmjobs", name, COMMANDS[name], lines, EXAMPLES[name])


def main():
    from jobs import usage

    argv = sys.argv[1:]
    if not argv or usage.wants_help(argv):  # answered here: Fire would run the command (or page its help)
        usage.print_help(help_text(argv))
        return
    entry.entrypoint({name: _options_checked(name, fn) for name, fn in COMMANDS.items()})


def _options_checked(name: str, fn):
    """A flag that is neither the command's option nor a recipe key (--forse, --detatch) gets "did you mean"
    among both, instead of reaching the recipe as an unknown section."""
    import dataclasses
    import difflib
    import inspect

    params = inspect.signature(fn).parameters
    sections = [f.name for f in dataclasses.fields(recipes.Recipe)]
    options = [p for p, spec in params.items() if spec.default is not spec.empty]

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        for key in kwargs:
            top = key.split(".")[0]
            if key in params or top in sections:
                continue
            close = difflib.get_close_matches(top, options + sections, n=1)
            known = f" (options: {', '.join(options)}; recipe sections: {', '.join(sections)})"
            hint = f"; did you mean --{close[0]}{key[len(top):]}?" if close else known
            raise contract.UserError(f"--{key}: neither an option of vlmjobs {name} nor a recipe key{hint}")
        return fn(*args, **kwargs)

    return checked


if __name__ == "__main__":
    main()
