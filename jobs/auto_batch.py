"""``per_device_train_batch_size: auto``: the blog's batch-halving loop, done by the stage before it trains; and
``activation_checkpointing: auto``: recomputation only where the batch does not fit without it.

The recipe states the effective batch, the samples per optimizer step over all processes, and leaves the
micro-batch to the stage::

    sft:
      effective_batch_size: 64            # samples per optimizer step, all processes together
      args:
        per_device_train_batch_size: auto  # the stage finds the largest micro-batch that fits

Before training, every process runs the trainer's own ``training_step`` (forward and backward, DPO's reference
included) on the longest rows of the training data at the largest micro-batch, with as much memory held aside as
AdamW's two states take (and DDP's gradient buckets with several processes), since those come with the first
optimizer step. Longest means the most tokens as the trainer's own collator makes them (``packing.token_counts``),
image tokens included: they grow with the image's area in Qwen2-VL and with its tiles in Idefics3, so a row's text
says little; a DPO pair counts its chosen and rejected sequences together. On ``torch.OutOfMemoryError`` the
micro-batch halves and gradient accumulation doubles, so the effective batch and the optimizer steps stay the same,
until it fits or even 1 does not. The processes agree after every try (any one out of memory: all try smaller), so
they train with one size. The probe leaves no trace: the weights, the random state and the logged metrics are as
before, and gradients are dropped.

The size found is kept in the run folder (``<run>/.<stage>.partial/auto_batch.json``, then ``<run>/<stage>/``)
under what it depends on: the model, the stage and method (sft or dpo; lora, qlora or full), ``max_length``, the
precision, activation checkpointing, the effective batch, the process count and the device. A resumed stage (or one
redone with ``--force``) of the same starts its search there instead of at the top; a changed recipe probes again.
An out-of-memory in training after all (a longer evaluation batch, fragmentation) ends in one line that gives the
smaller size to write in the recipe.

``activation_checkpointing: auto`` (issue 24) asks the same probe whether the batch fits *without* recomputing
activations in the backward, which costs one more forward of every row (a third more compute in full fine-tuning, a
half more under LoRA), and turns checkpointing on only where it does not::

    dpo:
      args:
        per_device_train_batch_size: 2
        activation_checkpointing: auto    # or gradient_checkpointing: auto, its name before transformers 5

Between none and all there are steps (``RECOMPUTE_EVERY``): transformers checkpoints every n-th layer
(``activation_checkpointing_kwargs: {every_n_layers: n}``), which keeps about 1/n fewer activations for 1/n of a
forward. A batch just over the GPU's memory (SmolVLM's longest DPO pairs on 24 GB, by make bench's count) then sheds
what it must for a part of what recomputing every layer costs. With a micro-batch given, the probe tries it without
checkpointing, then with every 8th, 4th and 2nd layer checkpointed, then every layer; with ``auto`` for both, every
micro-batch from the top down at each step in turn. The choice is recorded beside the size, and ``train()``
checkpoints as the config then says.

On a CPU nothing is probed (``can_run_out_of_memory``): a probe there could only find that the first try fits, so
the stage takes it, the whole per-process batch without recomputation, and spends no step on it.

Why a probe and not transformers' ``auto_find_batch_size``: that retries the whole training loop with a smaller
per-device batch but the same accumulation (the effective batch shrinks, and so does the learning signal per
step), and under several processes an out-of-memory on one rank leaves the others waiting in DDP's all-reduce;
the probe runs with no collective inside the forward and backward, and agrees only after them.
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from jobs import packing, upstream
from jobs.contract import UserError, is_main_process, read_json, write_json_atomic

AUTO = "auto"
RECORD_FILE = "auto_batch.json"
# activation_checkpointing: auto's steps after none: every n-th layer checkpointed (transformers' every_n_layers over a
# model's decoder and encoder layers, in their order), 1 for all of them
RECOMPUTE_EVERY = (8, 4, 2, 1)
# transformers 5's name and the one before it, which TrainingArguments still reads
CHECKPOINTING_KEYS = ("activation_checkpointing", "gradient_checkpointing")


@dataclass(frozen=True)
class Batch:
    micro: int  # per process
    accumulation: int

    def __str__(self) -> str:
        return f"{self.micro} x accumulation {self.accumulation}"


def is_auto(args: dict) -> bool:
    return args.get("per_device_train_batch_size") == AUTO


def checkpointing_is_auto(args: dict) -> bool:
    """``activation_checkpointing: auto`` (or ``gradient_checkpointing: auto``): the probe trains without recomputing
    activations wherever the batch fits without it (see ``fit``)."""
    return any(args.get(key) == AUTO for key in CHECKPOINTING_KEYS)


def without_auto(args: dict) -> dict:
    """The recipe's args as TRL is handed them: each ``auto`` is the stage's to resolve (``first_args``, ``fit``)."""
    return {k: v for k, v in args.items() if not (v == AUTO and k in ("per_device_train_batch_size", *CHECKPOINTING_KEYS))}


def recipe_errors(stage: str, effective: int | None, args: dict, processes: int) -> list[str]:
    """The recipe's side of it, checked when the recipe loads (no GPU asked for yet)."""
    if checkpointing_is_auto(args) and stage == "grpo":
        key = next(k for k in CHECKPOINTING_KEYS if args.get(k) == AUTO)
        return [f"grpo.args.{key}: auto is for sft and dpo, whose stages probe a training step before training; "
                "give true or false"]
    if not is_auto(args):
        return [f"{stage}.effective_batch_size: only read with {stage}.args.per_device_train_batch_size: auto; "
                "set that, or remove effective_batch_size"] if effective is not None else []
    errors = []
    if effective is None or effective < 1:
        errors.append(f"{stage}.effective_batch_size: required with per_device_train_batch_size: auto, a positive "
                      "integer (samples per optimizer step, all processes together), e.g. 64")
    elif effective % processes:
        errors.append(f"{stage}.effective_batch_size: {effective} does not split evenly over the stage's {processes} "
                      f"processes; use a multiple of {processes}")
    if "gradient_accumulation_steps" in args:
        errors.append(f"{stage}.args.gradient_accumulation_steps: set by the stage with per_device_train_batch_size: "
                      "auto (effective_batch_size / processes / micro-batch); remove it")
    return errors


def first_args(train, processes: int) -> dict:
    """The TRL config's keys that ``fit`` settles, as the search starts: the whole per-process batch at once, and no
    recomputation of activations."""
    first = {"activation_checkpointing": False} if checkpointing_is_auto(train.args) else {}
    if is_auto(train.args):
        first.update(per_device_train_batch_size=train.effective_batch_size // processes, gradient_accumulation_steps=1)
    return first


def smaller(micro: int, per_process: int) -> int:
    """Half the micro-batch, rounded down to a divisor of the per-process batch, so that accumulation stays whole."""
    return next(m for m in range(micro // 2, 0, -1) if per_process % m == 0)


def tries(choices: list[int], top: int, per_process: int, auto_micro: bool):
    """The (recomputation, micro-batch) pairs the probe tries, in its order, until one fits: at each step of
    ``choices`` in turn (0: none; n: one layer in n), every micro-batch from ``top`` down as ``smaller`` halves it
    where the micro-batch is auto, else ``top`` alone. make bench's FLOPs table predicts the stage's choice in the
    same order."""
    for recompute in choices:
        micro = top
        while True:
            yield recompute, micro
            if not auto_micro or micro == 1:
                break
            micro = smaller(micro, per_process)


def fit(stage, trainer, train, *, model, precision) -> Batch | None:
    """Settle what the recipe left to the stage, and set it on the trainer (see the module docstring): the micro-batch
    for ``per_device_train_batch_size: auto``, and for ``activation_checkpointing: auto`` whether activations are
    recomputed. Returns the batch found; None when the recipe gives the micro-batch. ``model`` is the recipe's model
    section, ``precision`` the stage's (jobs.modeling.Precision): with the trainer's max_length, what the size found
    holds for."""
    auto_micro, auto_checkpointing = is_auto(train.args), checkpointing_is_auto(train.args)
    if not (auto_micro or auto_checkpointing):
        return None
    import torch

    accelerator, args = trainer.accelerator, trainer.args
    if getattr(trainer, "is_fsdp_enabled", False):
        key = "per_device_train_batch_size" if auto_micro else next(k for k in CHECKPOINTING_KEYS if train.args.get(k) == AUTO)
        raise UserError(f"{stage.name}.args.{key}: auto does not run with FSDP yet (its probe would need the whole "
                        "model on one GPU); give a value")
    processes = args.world_size
    per_process = (train.effective_batch_size // processes if auto_micro
                   else args.per_device_train_batch_size * args.gradient_accumulation_steps)
    key = {"effective_batch_size": per_process * processes, "processes": processes, "device": _device_name(),
           "model": model.name_or_path if model.revision is None else f"{model.name_or_path}@{model.revision}",
           "method": f"{stage.name} {train.method}", "max_length": args.max_length, "precision": str(precision),
           "per_device_train_batch_size": AUTO if auto_micro else args.per_device_train_batch_size,
           "activation_checkpointing": AUTO if auto_checkpointing else bool(args.activation_checkpointing),
           # the batch's layout: rows joined without padding, or DPO's pairs sharing their prompt (SharedPrefixDPOTrainer)
           "padding_free": isinstance(trainer.data_collator, packing.PaddingFree), "trainer": type(trainer).__name__}
    recorded = _recorded(stage, key)
    # Recomputing activations costs a forward per step (half the step again under LoRA, whose backward through the
    # frozen weights is about one forward), while a smaller micro-batch of rows of hundreds of tokens keeps a GPU's
    # matrix units as busy: so every micro-batch is tried without recomputation before any with it, and with a few
    # layers recomputed before more. choices: every n-th layer recomputed, 0 for none.
    choices = [0, *RECOMPUTE_EVERY] if auto_checkpointing else [recomputed_every(args)]
    if recorded and auto_checkpointing and recorded["recomputes_activations"]:
        # a record written before the steps recomputed every layer
        choices = choices[choices.index(recorded.get("recompute_every_n_layers", 1)):]
    top = recorded["micro_batch"] if recorded and auto_micro else (per_process if auto_micro else args.per_device_train_batch_size)
    # The smallest of the processes' starting points, should their run folders disagree (one per node)
    top = int(accelerator.gather(torch.tensor([top], device=accelerator.device)).min())
    say = print if is_main_process() else (lambda *a, **k: None)
    over = f"{processes} processes" if processes > 1 else "1 process"
    where = f"recorded in {recorded['path']}" if recorded else f"effective batch {per_process * processes} over {over}"
    settled = " and ".join(f"{k} auto" for k, auto in (("per_device_train_batch_size", auto_micro),
                                                       ("activation_checkpointing", auto_checkpointing)) if auto)
    how = recomputing(choices[0]) if auto_checkpointing else ""
    batch, ran_out = None, list(recorded["ran_out_of_memory_at"]) if recorded else []
    without_recomputation = list(recorded.get("ran_out_without_recomputation_at", [])) if recorded else []
    if not can_run_out_of_memory(accelerator.device):  # the first try is the answer: no step to spend on it
        recompute = choices[0]
        recompute_activations(trainer, recompute)
        batch = Batch(top, per_process // top)
        say(f"{stage.name}: {settled}: micro-batch {top}{how} ({where}), not probed: a {accelerator.device.type} "
            "raises no out-of-memory error to catch", flush=True)
    else:
        started = time.time()
        longest, tokens = longest_rows(trainer, per_process)
        say(f"{stage.name}: {settled}: starting at micro-batch {top}{how} ({where}); probing with the {top} longest "
            f"training rows ({tokens[:top][-1]} to {tokens[0]} tokens, of {len(trainer.train_dataset)} rows counted in "
            f"{time.time() - started:.1f}s)", flush=True)
    set_on_trainer = None  # the recomputation of the tries so far, the last of which ran out (None: no try yet)
    for recompute, micro in tries(choices, top, per_process, auto_micro) if batch is None else ():
        if set_on_trainer == recompute:
            how = recomputing(recompute) if auto_checkpointing else ""
            say(f"{stage.name}: micro-batch {ran_out[-1]}{how} ran out of memory; trying "
                f"{Batch(micro, per_process // micro)}", flush=True)
        else:
            if set_on_trainer is not None:
                say(f"{stage.name}: micro-batch {ran_out[-1]} ran out of memory{recomputing(set_on_trainer)}; "
                    f"trying micro-batch {top}{recomputing(recompute)}", flush=True)
            if set_on_trainer == 0:
                without_recomputation, ran_out = without_recomputation + ran_out, []
            recompute_activations(trainer, recompute)
            set_on_trainer = recompute
        fits = probe(trainer, trainer.train_dataset.select(longest[:micro]))
        # Every process learns whether any ran out; all then try the same smaller size.
        if bool(accelerator.gather(torch.tensor([int(fits)], device=accelerator.device)).min()):
            batch = Batch(micro, per_process // micro)
            break
        ran_out.append(micro)
    if batch is None:
        raise UserError(_nothing_fits(stage.name, ran_out[-1], bool(recompute), auto_micro))

    set_batch(trainer, batch)
    if "per_device_eval_batch_size" not in train.args:
        # An evaluation batch as large as the one that fits in training fits (no gradients, no optimizer states);
        # transformers' default (8) might not where training had to halve below it.
        args.per_device_eval_batch_size = min(args.per_device_eval_batch_size, batch.micro)
    record = stage.work / RECORD_FILE
    if is_main_process():
        write_json_atomic(record, {**key, "micro_batch": batch.micro, "gradient_accumulation_steps": batch.accumulation,
                                   "recomputes_activations": bool(recompute), "recompute_every_n_layers": recompute,
                                   "ran_out_of_memory_at": sorted(set(ran_out), reverse=True),
                                   **({"ran_out_without_recomputation_at": sorted(set(without_recomputation), reverse=True)}
                                      if without_recomputation else {})})
    how = recomputing(recompute) if auto_checkpointing else ""
    say(f"{stage.name}: micro-batch {batch} fits{how} (effective batch "
        f"{per_process * processes}); recorded in {record}", flush=True)
    return batch if auto_micro else None


def set_batch(trainer, batch: Batch) -> None:
    """Train with ``batch``: the args' micro-batch and accumulation, and the Trainer's own copy of the batch size,
    read by its dataloader and its state."""
    args = trainer.args
    before = args.train_batch_size
    args.per_device_train_batch_size, args.gradient_accumulation_steps = batch.micro, batch.accumulation
    upstream.set_train_batch_size(trainer, before)


def can_run_out_of_memory(device) -> bool:
    """Whether a batch too large for ``device`` raises ``torch.OutOfMemoryError``, which the probe catches: the
    accelerators' allocators do (CUDA, XPU, MPS); a CPU's raises a plain RuntimeError, or the kernel's out-of-memory
    killer ends the process, so a probe there can only ever find that the first try fits."""
    return device.type in ("cuda", "xpu", "mps")


def recomputing(every: int) -> str:
    if every > 1:
        return f" with activation checkpointing of one layer in {every}"
    return " with activation checkpointing" if every else " without activation checkpointing"


def _nothing_fits(stage: str, micro: int, recomputed: bool, auto_micro: bool) -> str:
    if auto_micro and not recomputed:
        return (f"{stage}: micro-batch 1 ran out of memory: the model does not fit even at per_device_train_batch_size "
                "1; turn on activation_checkpointing, train lora or qlora instead of full, or spread it over more GPUs "
                "(vlmjobs memory <recipe> shows the arithmetic)")
    if auto_micro:
        return (f"{stage}: micro-batch 1 ran out of memory even with activation checkpointing: train lora or qlora "
                "instead of full, or spread it over more GPUs (vlmjobs memory <recipe> shows the arithmetic)")
    return (f"{stage}: micro-batch {micro} ran out of memory even with activation checkpointing (activation_checkpointing "
            f"auto probed it on the longest training rows); give {stage}.args.per_device_train_batch_size a smaller "
            "number, or auto with an effective_batch_size")


def recomputed_every(args) -> int:
    """Every how many layers the config's activation checkpointing recomputes one (transformers' every_n_layers); 0:
    none."""
    if not args.activation_checkpointing:
        return 0
    return int((args.activation_checkpointing_kwargs or {}).get("every_n_layers", 1))


def recompute_activations(trainer, every: int) -> None:
    """Activation checkpointing of every ``every``-th layer (1: all; 0: off) for the probe and for training
    (``train()`` reads the args when it starts), as TRL's trainers set it up at their start when the config asks."""
    args, model = trainer.args, trainer.model
    on = every > 0
    args.activation_checkpointing = args.gradient_checkpointing = on
    kwargs = {k: v for k, v in (args.activation_checkpointing_kwargs or {}).items() if k != "every_n_layers"}
    args.activation_checkpointing_kwargs = {**kwargs, "every_n_layers": every} if every > 1 else (kwargs or None)
    args.gradient_checkpointing_kwargs = args.activation_checkpointing_kwargs  # the alias, read by older code
    if on:
        if hasattr(model, "peft_config"):  # TRL's SFT and DPO trainers do this for a PEFT model that recomputes
            model.enable_input_require_grads()
        _checkpoint_activations_as_training_will(trainer)
    elif getattr(model, "is_activation_checkpointing", False):
        model.activation_checkpointing_disable()


@contextmanager
def out_of_memory_in_training(stage_name: str, batch: Batch | None):
    """Training with the size ``fit`` found (``batch``; None: the recipe's own numbers, whose out-of-memory the stage
    contract explains): an out-of-memory says, in one line, what to write in the recipe instead of auto. A rerun with
    auto would start from the recorded size and run out again."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as e:
        if batch is None:
            raise
        found = (f"{stage_name}: out of GPU memory in training ({str(e).splitlines()[0]}) at micro-batch {batch}, the "
                 "size per_device_train_batch_size: auto found on the longest training rows")
        if batch.micro == 1:
            raise UserError(f"{found}; turn on activation_checkpointing, train lora or qlora instead of full, or spread it "
                            "over more GPUs (vlmjobs memory <recipe> shows the arithmetic)") from e
        half = smaller(batch.micro, batch.micro * batch.accumulation)
        raise UserError(
            f"{found}; give a smaller one in its place: {stage_name}.args.per_device_train_batch_size: {half} and "
            f"{stage_name}.args.gradient_accumulation_steps: {batch.micro * batch.accumulation // half}, without "
            f"{stage_name}.effective_batch_size (the same effective batch), or turn on activation_checkpointing"
        ) from e


def _recorded(stage, key: dict) -> dict | None:
    """The size found by an earlier attempt of this stage for the same key: the unfinished attempt's, else the
    finished output's (a run redone with --force)."""
    for folder in (stage.work, stage.out):
        path = Path(folder) / RECORD_FILE
        try:
            record = read_json(path)
        except (OSError, ValueError):
            continue
        if all(record.get(k) == v for k, v in key.items()):
            return {**record, "path": str(path)}
    return None


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def longest_rows(trainer, count: int) -> tuple[list[int], list[int]]:
    """The indices of the ``count`` training rows the trainer's collator makes the most tokens of, longest first (the
    batch that needs the most memory), and their token counts. Counted once for every row, unless the stage has
    already counted them for transformers' length grouping (packing.with_lengths, the same count, under its own column
    where the length column holds a place by image size)."""
    rows = trainer.train_dataset
    column = next((c for c in (packing.TOKENS, trainer.args.length_column_name) if c in rows.column_names), None)
    lengths = rows[column] if column else packing.token_counts(trainer.data_collator, rows)
    longest = sorted(range(len(lengths)), key=lambda i: -lengths[i])[:count]
    return longest, [lengths[i] for i in longest]


def probe(trainer, rows) -> bool:
    """One forward and backward of the trainer's own training step on ``rows`` (a Dataset); False on out-of-memory."""
    import torch

    model = trainer.model
    fits = True
    held, inputs = [], None
    try:
        inputs = trainer.data_collator([rows[i] for i in range(len(rows))])  # as its dataloader does: every column
        _checkpoint_activations_as_training_will(trainer)
        with upstream.probe_leaves_no_trace(trainer), upstream.forward_as_training_runs(trainer):
            held = _optimizer_sized_reserve(model, processes=trainer.args.world_size)
            trainer.training_step(model, inputs)
    except torch.OutOfMemoryError:
        fits = False
    finally:
        del held, inputs
        model.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return fits


def _optimizer_sized_reserve(model, *, processes: int) -> list:
    """Memory the first optimizer step will take and keep, held during the probe: AdamW's exp_avg and exp_avg_sq
    for every trainable weight (an optimizer with smaller states only gets more room), and with several processes
    DDP's gradient buckets, one more copy of the gradients."""
    import torch

    copies = 2 + (processes > 1)
    return [torch.empty_like(p) for p in model.parameters() if p.requires_grad for _ in range(copies)]


def _checkpoint_activations_as_training_will(trainer) -> None:
    """``train()`` turns on activation checkpointing only when it starts; the probe must measure what it will run."""
    args, model = trainer.args, trainer.model
    if args.activation_checkpointing and hasattr(model, "activation_checkpointing_enable"):
        kwargs = dict(args.activation_checkpointing_kwargs or {})
        every, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None, every_n_layers=every, offload=offload)
