"""The command a stage runs, the same for the local runner and the Kubernetes Job."""

from __future__ import annotations

import json

from jobs.contract import UserError
from jobs.recipe import RECIPE_ENV, TRAINING_STAGES, Recipe
from jobs.stage_resources import StageResources, resolve

NODE_RANK_ENV = "NODE_RANK"  # set in each pod of a multi-node Job from its completion index
RENDEZVOUS_PORT = 29500  # torch.distributed's customary port, on the pod of index 0


def stage_argv(
    recipe: Recipe, stage: str, *, python: str = "python", main_address: str | None = None, res: StageResources | None = None
) -> list[str]:
    """argv of the stage's Fire entry; the recipe itself travels in the environment (``stage_env``).

    One GPU on one node runs the module directly, and so do the stages that do not train: they
    run one process that spreads the model over the pod's GPUs. A training stage on more GPUs, or more nodes, goes through
    ``accelerate launch`` with one process per GPU, by way of ``launcher.distributed``, which is
    accelerate's launcher keeping the stage's exit code (accelerate itself turns exit 2 into 1).
    More nodes need ``main_address``, the rendezvous host, and take the node rank from
    ``$(NODE_RANK)``, which Kubernetes expands from the container's environment. ``res``: the stage's
    resources where the caller resolved them (rendering), else resolved here.
    """
    res = res or resolve(recipe, stage)
    module = f"jobs.{stage}"
    if (res.gpus <= 1 and res.nodes <= 1) or stage not in TRAINING_STAGES:
        return [python, "-m", module]
    if res.nodes > 1 and not main_address:
        raise UserError(
            f"{stage}: resources.nodes={res.nodes} runs only on a cluster (vlmjobs submit --stage={stage}); "
            "the local runner runs one node"
        )
    argv = [
        python, "-m", "launcher.distributed",
        "--multi_gpu",
        "--num_processes", str(max(res.gpus, 1) * res.nodes),
        "--num_machines", str(res.nodes),
        "--mixed_precision", "no",  # the stage's bf16/fp16 arguments decide; this only silences accelerate's warning
        "--dynamo_backend", "no",
    ]  # fmt: skip
    if res.nodes > 1:
        argv += [
            "--machine_rank", f"$({NODE_RANK_ENV})",
            "--main_process_ip", str(main_address),
            "--main_process_port", str(RENDEZVOUS_PORT),
        ]  # fmt: skip
    return argv + ["-m", module]


def stage_env(recipe: Recipe) -> dict[str, str]:
    """The resolved recipe as JSON: every default and override applied, so the stage sees exactly this run."""
    return {RECIPE_ENV: json.dumps(recipe.to_dict(), sort_keys=True)}
