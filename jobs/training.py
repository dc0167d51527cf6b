"""What the training stages (sft, dpo, grpo) share: their TRL config, logging, and stopping cleanly.

Imported inside the stages' ``main`` (it pulls in transformers).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from jobs import auto_batch, upstream
from jobs.contract import UserError, is_main_process
from jobs.progress import timing
from jobs.recipe import Train

# Stage defaults under the recipe's ``args``; printed at start so nothing is filled in silently.
STAGE_DEFAULTS = {
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 100,
    "save_total_limit": 2,
    # Curves a user can watch while a stage runs: event files in <run>/<stage>/tensorboard (``start`` points them
    # there). A recipe's report_to replaces it (trackio, wandb, mlflow, or a list; "none" turns tracking off).
    "report_to": "tensorboard",
    "max_length": None,  # truncating a VLM sample can cut through its image tokens
    "activation_checkpointing_kwargs": {"use_reentrant": False},  # transformers 5 name of gradient_checkpointing_kwargs
    # Every column reaches the collator: TRL's vision collators read only theirs, and the columns the stage adds for a
    # sampler or a collator wrapper (group_by_length's lengths, cached reference log-probs) stay (WithoutColumns)
    "remove_unused_columns": False,
}
# SFT's own: its eval loss on the eval split, as often as it checkpoints (``trl_config`` matches eval_steps to
# save_steps unless the recipe sets it) and at the last step (transformers 5 adds that evaluation itself).
SFT_DEFAULTS = {"eval_strategy": "steps"}
# That default eval loss is a curve to watch, not the evaluation (the evaluate stage scores the test split), so it
# runs on the eval split's first rows: a few percent of a run's work however large the split (SmolVLM's recipe: 8
# evaluations of 192 charts were 13% of its training's FLOPs; of 64, 4%). A recipe that sets eval_strategy itself
# asked for its evaluation, and gets all of the split.
WATCHED_EVAL_ROWS = 64
METRICS_FILE = "metrics.jsonl"
# Sharded over several processes (resources.sharding), through transformers' own fsdp arguments: torch's fully_shard
# (FSDP2) around each of the family's decoder and vision layers (the model's _no_split_modules). Checkpoints are
# sharded (each process writes its part with torch.distributed.checkpoint, resumed on the same number of
# processes); the final model is gathered whole by ``save``. Under recipe args.fsdp_config.
FSDP_DEFAULTS = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "SHARDED_STATE_DICT"}
TENSORBOARD_FOLDER = "tensorboard"
# transformers 5 renamed these and reads the old names only where the new ones are unset, with a FutureWarning; TRL
# 1.16's configs still default the old one (True), so every stage's log carried that warning
RENAMED = (("gradient_checkpointing", "activation_checkpointing"),
           ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"))


def eval_loss_rows(train: Train, eval_rows: int) -> int:
    """How many of the eval split's ``eval_rows`` rows, its first, SFT's eval loss is computed on: all of them where
    the recipe sets ``eval_strategy``, else WATCHED_EVAL_ROWS at most (the stage's default evaluation)."""
    return eval_rows if "eval_strategy" in train.args else min(eval_rows, WATCHED_EVAL_ROWS)


def trl_config(config_class, train: Train, *, output_dir: Path, seed: int, dtype, shards: int = 1,
               defaults: dict | None = None):
    """The stage's TRL config: stage defaults < the stage's own ``defaults`` < recipe args; bf16 / fp16 autocast in
    ``dtype`` (the compute dtype of ``modeling.training_precision``) unless the recipe sets them; FSDP when sharded
    over ``shards`` processes (``memory.shard_count``)."""
    import torch

    import dataclasses

    # A stage default the config does not have is not the stage's to give (GRPOConfig has no max_length)
    accepted = {f.name for f in dataclasses.fields(config_class)}
    args = {**{k: v for k, v in STAGE_DEFAULTS.items() if k in accepted}, **(defaults or {}), "seed": seed,
            **under_current_names(auto_batch.without_auto(train.args))}
    if "gradient_checkpointing" in accepted and "activation_checkpointing" not in args:  # TRL's default, new name
        args["activation_checkpointing"] = next(f.default for f in dataclasses.fields(config_class)
                                                if f.name == "gradient_checkpointing")
    if args.get("eval_strategy") == "steps":
        args.setdefault("eval_steps", args["save_steps"])  # an eval loss beside every checkpoint
    # per_device_train_batch_size or activation_checkpointing auto: where the stage's probe starts (auto_batch.fit)
    args.update(auto_batch.first_args(train, int(os.environ.get("WORLD_SIZE", "1"))))
    if shards > 1:
        args["fsdp"] = True
        args["fsdp_config"] = {**FSDP_DEFAULTS, **train.args.get("fsdp_config", {})}
    if "bf16" not in train.args and "fp16" not in train.args:
        args["bf16"] = dtype == torch.bfloat16
        args["fp16"] = dtype == torch.float16
    # Progress bars redraw with carriage returns, which pod logs keep as one endless line.
    args.setdefault("disable_tqdm", not sys.stdout.isatty())
    if not torch.cuda.is_available():
        args.setdefault("dataloader_pin_memory", False)  # pinning needs an accelerator; it only warns without one
    if not torch.accelerator.is_available():
        # Said by name, or transformers refuses bf16 (CPU autocast) and runs the processes of a CPU launch each alone
        args.setdefault("use_cpu", True)
    try:
        config = config_class(output_dir=str(output_dir), **args)
    except (TypeError, ValueError) as e:
        raise UserError(f"{config_class.__name__} rejects the recipe's args: {e}") from None
    _check_trackers(config.report_to, where=f"{config_class.__name__.removesuffix('Config').lower()}.args.report_to")
    return config


def under_current_names(args: dict) -> dict:
    """The recipe's args with transformers' old names for recomputation given as the new ones (``RENAMED``), where
    the recipe does not give both: a recipe's gradient_checkpointing_kwargs was dropped for the stage's default
    activation_checkpointing_kwargs, which transformers reads first."""
    renamed = dict(args)
    for old, new in RENAMED:
        if old in renamed and new not in renamed:
            renamed[new] = renamed.pop(old)
    return renamed


def _check_trackers(report_to: list[str], where: str) -> None:
    """A tracker the recipe asks for that this environment lacks is the user's to fix, said in one line (transformers
    would raise it as a traceback when the trainer is built)."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    available = get_available_reporting_integrations()
    for name in report_to:
        if name not in INTEGRATION_TO_CALLBACK:
            raise UserError(f"{where}: {name!r} is not a tracker transformers knows ({', '.join(INTEGRATION_TO_CALLBACK)})")
        if name not in available and name != "flyte":  # flyte has no availability check in transformers
            raise UserError(f"{where}: {name} is not installed in this environment (pip install {name}, "
                            f"or remove report_to for the default, TensorBoard event files in the stage's folder)")


def shard_count(cfg, stage: str) -> int:
    """The processes this stage shards over: all of those launched when ``resources.sharding`` chooses to shard
    (``memory.shard_count``), else 1; a stage run as one process (``python -m jobs.sft``) never shards."""
    from jobs import memory

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    return processes if processes > 1 and memory.shard_count(cfg, stage) > 1 else 1


@contextlib.contextmanager
def sharding(args, model):
    """Around building the trainer of a sharded run (``args.fsdp``): fully_shard around each of the model's layers
    that must not be split (``upstream.no_split_modules``: accelerate takes them whole and refuses one that is absent,
    and LLaVA lists CLIP's text embeddings, which it has not), FSDP on CPU processes too
    (``upstream.fsdp_on_cpu_processes``), and lm_head's gradient averaged over the processes once TRL's fused head
    is in place (``upstream.averaging_lm_head_gradient``)."""
    if not args.fsdp:
        yield
        return
    args.fsdp_plugin_args.setdefault("transformer_cls_names_to_wrap", ",".join(upstream.no_split_modules(model)))
    with upstream.fsdp_on_cpu_processes():
        yield
    upstream.averaging_lm_head_gradient(model)


def start(stage: str, trainer, *, work: Path, train_rows: int, extra: dict | None = None) -> str | None:
    """Print the numbers derived from the config (nanoGPT's "tokens per iteration") and the memory
    arithmetic; returns the newest complete checkpoint to resume from, if any."""
    from transformers import PrinterCallback

    from jobs.contract import newest_complete_checkpoint
    from jobs.memory import estimate
    from jobs.modeling import count_parameters

    trainer.remove_callback(PrinterCallback)  # MetricsLog prints the same, as one line per step
    tensorboard = _log_tensorboard_to(trainer, work / TENSORBOARD_FOLDER)
    args, extra = trainer.args, extra or {}
    trainable, total = count_parameters(trainer.model)
    effective_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    steps = args.max_steps if args.max_steps > 0 else math.ceil(train_rows / effective_batch) * math.ceil(args.num_train_epochs)
    numbers = {"parameters": total, "trainable parameters": trainable, "train rows": train_rows,
               "processes": args.world_size, "effective batch": effective_batch, "optimizer steps": steps, **extra}
    checkpoint = newest_complete_checkpoint(work / "checkpoints")
    if is_main_process():
        print(f"{stage}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in numbers.items()))
        shards = extra.get("sharded over", 1)
        print(f"{stage}: memory before activations, per process: "
              f"{estimate(trainer.model, trainable=trainable, reference_copy=extra.get('reference copy', False), shards=shards)}")
        if tensorboard:
            print(f"{stage}: curves in {tensorboard} (watch them: tensorboard --logdir {work.parent})")
        if checkpoint:
            print(f"{stage}: resuming from {checkpoint}")
    return checkpoint


def _log_tensorboard_to(trainer, folder: Path) -> str | None:
    """Event files into the stage's folder, which moves into <run>/<stage> when the stage is done (the default,
    <output_dir>/runs/<date>_<host>, would be among the checkpoints). TENSORBOARD_LOGGING_DIR, where set, wins,
    as transformers documents it. Only the main process writes (TensorBoardCallback checks is_world_process_zero).
    Returns where they go, None without TensorBoard in report_to."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = callback.logging_dir or str(folder)
            return callback.logging_dir
    return None


def callbacks(stage: str, work: Path) -> list:
    return [MetricsLog(stage, work / METRICS_FILE), SaveOnSigterm(), CompleteOptimizerState()]


class CompleteOptimizerState(TrainerCallback):
    """Before a sharded checkpoint is written: a fresh (zero) optimizer state for every trainable parameter that has
    none yet, so that the checkpoint resumes.

    AdamW makes a parameter's state at its first gradient, and some never get one: LLaVA's CLIP post_layernorm, as
    LLaVA reads the features of an earlier layer. A sharded resume loads the optimizer through
    torch.distributed.checkpoint, whose get_optimizer_state_dict first gives every parameter a state
    (``_init_optim_state``) and then requires each in the checkpoint ("Missing key in checkpoint state_dict:
    optimizer.state.model.vision_tower.post_layernorm.weight.step"). A zero state is the one AdamW would make at that
    parameter's first step (step 0, zero moments), and a parameter without a gradient is skipped by every step, so
    training is unchanged."""

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if not (args.fsdp and control.should_save and optimizer is not None):
            return
        import torch

        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        params = [p for group in optimizer.param_groups for p in group["params"]]
        made = next((optimizer.state[p] for p in params if optimizer.state.get(p)), None)
        for param in [p for p in params if p.requires_grad and not optimizer.state.get(p)] if made else ():
            # a scalar (the step count) as a zero scalar, a moment as zeros of this parameter's own shape
            optimizer.state[param] = {
                key: (torch.zeros_like(value) if value.dim() == 0 else torch.zeros_like(param)) if torch.is_tensor(value) else value
                for key, value in made.items()
            }


class MetricsLog(TrainerCallback):
    """Every logged step as one JSON line in the run folder, and one plain line on stdout with the elapsed
    time, the rate and the ETA of this attempt (a resumed one counts from its checkpoint)."""

    def __init__(self, stage: str, path: Path):
        self.stage, self.path = stage, path
        self.started, self.first_step = time.time(), 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.time(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in logs.items() if k in SHOWN_METRICS)
        clock = timing(time.time() - self.started, state.global_step - self.first_step, state.max_steps - state.global_step, "steps")
        print(f"{self.stage}: step {state.global_step}/{state.max_steps} {shown} ({clock})", flush=True)


SHOWN_METRICS = ("loss", "eval_loss", "learning_rate", "rewards/margins", "rewards/accuracies", "mean_token_accuracy",
                 "reward", "train_loss", "train_runtime")


class SaveOnSigterm(TrainerCallback):
    """On SIGTERM (preemption, node drain, kubectl delete) or SIGINT (Ctrl-C) write a checkpoint and stop,
    within the grace period; the stage then exits 128 + the signal's number.

    Over several processes the signal reaches them at different moments (a node drained, one pod evicted, the agent
    forwarding it in turn), and saving is collective (FSDP's sharded state, DDP's barriers): a process that saved at
    its own step would wait in the save for peers still training, until SIGKILL. So at every step's end the processes
    agree (``agreed_signal``): all of them save at the first step any of them was asked to stop."""

    def __init__(self):
        self.requested: int | None = None  # the signal that asked to stop
        self.previous: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler or signal.SIG_DFL)

    def _request(self, signum, frame):
        self.requested = self.requested or signum

    def on_step_end(self, args, state, control, **kwargs):
        self.requested = agreed_signal(self.requested, args.device)
        if self.requested:
            control.should_save = True
            control.should_training_stop = True


def agreed_signal(requested: int | None, device) -> int | None:
    """The signal any process was asked to stop by (the largest number where they differ), the same on every process:
    a max all-reduce of one number, at each step's end (microseconds beside a step). Alone, ``requested`` itself."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return requested
    flag = torch.tensor([requested or 0], dtype=torch.int64, device=device)  # NCCL reduces only on the GPU
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def stop_if_interrupted(trainer, stage: str) -> None:
    """After ``train()`` returns: exit with 128 + N if it stopped for signal N, so the stage is not marked done."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, SaveOnSigterm) and callback.requested:
            name = signal.Signals(callback.requested).name
            print(f"{stage}: stopped on {name} at step {trainer.state.global_step}; checkpoint saved, running the same "
                  "command again resumes from it", file=sys.stderr, flush=True)
            trainer.end()  # every process saved at the same step; left, the group aborts the exit (leave_process_group)
            sys.exit(128 + callback.requested)


def reshard(model) -> None:
    """Every FSDP unit of ``model`` back to its shards. FSDP2 leaves the root unit gathered after a forward (training
    gathers it again at once), and until resharded its modules hold the gathered copies, not the parameters FSDP keeps."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def what_was_sharded(trainer) -> dict | None:
    """For the stage's record, under FSDP: the parameters sharded over the processes, and those left whole on every
    one (accelerate leaves out what fully_shard cannot split, such as 4-bit weights packed in bytes); None unsharded."""
    if not trainer.is_fsdp_enabled:
        return None
    from torch.distributed.tensor import DTensor

    reshard(trainer.model)
    parameters = dict(trainer.model.named_parameters())
    whole = [name for name, parameter in parameters.items() if not isinstance(parameter, DTensor)]
    return {"processes": trainer.args.world_size, "parameters": len(parameters), "whole on every process": whole}


def save(trainer, processor, out: Path, **lineage) -> None:
    """The trained adapter or weights, the processor and their lineage (``modeling.write_lineage``) in ``out``:
    every process saves its part, the main one writes the rest once they all have."""
    from jobs.modeling import write_lineage

    if trainer.is_fsdp_enabled:  # checkpoints stay sharded; the final model is gathered whole, as save_pretrained writes it
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(out))
    trainer.accelerator.wait_for_everyone()
    if is_main_process():
        processor.save_pretrained(out)
        write_lineage(out, **lineage)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return str(value)
