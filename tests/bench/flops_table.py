"""make bench: FLOPs per training sample, counted, for the seed recipes' real checkpoints (issue 24).

For each checkpoint (jobs.checkpoints: idefics2-8b, llava-1.5-7b, SmolVLM DPO; qwen2-vl-7b, SmolVLM SFT) the model is
built from its published config with hollow weights (jobs.flops: every operation on a weight gives its output's
shape, no numbers, so a 7B model takes seconds and no memory), and torch's FlopCounterMode counts what the code runs
on the same rows:

- TRL's defaults: TRL's DPOTrainer / SFTTrainer with the recipe's args (which are the seed script's), the
  reference's forward at every step (the adapter switched off), padded batches, TRL's own eval schedule;
- vlmjobs as the recipe runs: the stage's trainer (shared-prefix DPO, the reference's log-probs computed once over
  the train and eval rows and read from the batches after; SFT's collators, padding-free where the attention allows
  it), with the stage's defaults (SFT evaluates every save_steps), recomputing activations as the recipe says, or,
  where it says auto, as the stage's probe would settle it on the recipe's GPU (``settles``: counted activations
  beside the weights);
- the ideal: the work the recipe asks for and nothing else: each pair's prompt once and both answers, one reference
  forward per pair (none in a second epoch or rerun), one row per batch (no padding), no recomputation, and the
  evaluations the recipe's own schedule asks for (none where it names none), one row a batch.

The rows are RLAIF-V-like pairs with sentence answers and ChartQA-like charts, images at sizes like the data sets'
(jobs.checkpoints: RLAIF_V_SIZES, CHARTQA_SIZES), so each checkpoint's processor gives its real image-token counts;
the text is rendered by the tiny model's tokenizer (jobs.checkpoints says why). A phase's FLOPs per row are counted on
--rows rows and scaled to an epoch of the recipe's data (Checkpoint.rows, its effective batch and eval schedule), per
training sample. TRL's fused LM head is counted as CUDA runs it, over the labelled positions only
(``scoring_labelled_positions_only``; --every-position counts it as a CPU runs it). DPO's rows are taken from a pool
of --pool rows (2,048) as the stage orders an epoch's (``as_the_stage_orders``): the training rows as the recipe's
sampler draws them, and the reference pass, which sorts a whole split and batches 8 pairs at a time, on
--reference-rows (64) neighbours in its order. The last column divides by the ideal plus one forward per row where
vlmjobs recomputes activations: the part of the gap that is the GPU's memory, not the code.

    python tests/bench/flops_table.py [--rows 4] [--reference-rows 64] [--pool 2048] [--only "SmolVLM DPO"]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from jobs.auto_batch import AUTO  # noqa: E402  (jobs.auto_batch imports no third-party library at import)

UNCOUNTED: dict[str, str] = {}  # families whose hollow run is not yet hollow throughout, and why


def dpo_rows(n: int, thumbnail: int | None):
    """RLAIF-V-like pairs with sentence answers, images at RLAIF-V's sizes in turn, built 256 rows at a time (a pool
    of thousands of decoded images would hold gigabytes)."""
    from datasets import Dataset, concatenate_datasets
    from PIL import Image

    from jobs import synthetic
    from jobs.checkpoints import RLAIF_V_SIZES

    chunks, rows = [], []
    for i, row in enumerate(synthetic.rlaif_v_rows(n, seed=7, sentences=True, chart_share=0)):
        image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        image = image.resize(RLAIF_V_SIZES[i % len(RLAIF_V_SIZES)])
        if thumbnail:
            image.thumbnail((thumbnail, thumbnail))
        rows.append({
            "images": [image],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": row["chosen"]}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": row["rejected"]}]}],
        })
        if len(rows) == 256 or i == n - 1:
            chunks.append(Dataset.from_list(rows))
            rows = []
    return concatenate_datasets(chunks)


def sft_rows(n: int, system_prompt: str | None):
    """ChartQA-like rows, charts at ChartQA's sizes in turn, built 256 rows at a time (as ``dpo_rows``)."""
    from datasets import Dataset, concatenate_datasets
    from PIL import Image

    from jobs import formats, synthetic
    from jobs.checkpoints import CHARTQA_SIZES

    chunks, rows = [], []
    for i, row in enumerate(synthetic.chartqa_rows(n, seed=7)):
        image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        image = image.resize(CHARTQA_SIZES[i % len(CHARTQA_SIZES)])
        rows.append({**formats.chartqa(row, system_prompt), "images": [image]})
        if len(rows) == 256 or i == n - 1:
            chunks.append(Dataset.from_list(rows))
            rows = []
    return concatenate_datasets(chunks)


def args_for(cfg, stage: str, work: Path, *, batch: int, steps: int, seed_defaults: bool, ideal: bool = False,
             dtype=None):
    """The stage's TRL config from the recipe (jobs.training.trl_config, as the stage makes it), with what counting
    needs: ``steps`` optimizer steps of ``batch`` rows (no accumulation), no checkpoints, trackers or workers. The
    seed script recomputes activations where the recipe leaves it to the stage (activation_checkpointing: auto, which
    vlmjobs settles on the recipe's GPU: ``settles``); autocast in ``dtype``, or as the stage on the recipe's GPU
    (``on_its_gpu``)."""
    import dataclasses

    from trl import DPOConfig, SFTConfig

    from jobs import auto_batch, training

    train = getattr(cfg, stage)
    args = {**train.args, "max_steps": steps, "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1, "save_strategy": "no", "eval_strategy": "no", "report_to": "none",
            "dataloader_num_workers": 0, "logging_steps": 1, "disable_tqdm": True}
    if ideal:  # one row a batch everywhere, the reference pass and evaluation included
        args["gradient_checkpointing"] = args["activation_checkpointing"] = False
        args["per_device_eval_batch_size"] = 1
        if stage == "dpo":
            args["precompute_ref_batch_size"] = 1
    args.pop("gradient_checkpointing" if "activation_checkpointing" in args else "activation_checkpointing", None)
    if seed_defaults and auto_batch.checkpointing_is_auto(args):
        args["activation_checkpointing"] = True  # the source documents' gradient_checkpointing=True (TRL's default)
    if seed_defaults:
        args.pop("train_sampling_strategy", None)  # the source documents' scripts shuffle
    train = dataclasses.replace(train, args=args, effective_batch_size=None)
    defaults = None if seed_defaults or stage == "dpo" else training.SFT_DEFAULTS
    config_class = DPOConfig if stage == "dpo" else SFTConfig
    dtype = dtype or on_its_gpu(cfg, stage).compute
    return training.trl_config(config_class, train, output_dir=work, seed=0, dtype=dtype, defaults=defaults)


def on_its_gpu(cfg, stage: str):
    """The dtypes the stage trains the recipe in on its GPU (jobs.modeling.training_precision, a Precision): bf16, which
    every seed recipe's GPU (L4, A100, H100) computes in. A step's FLOPs do not depend on them; what it keeps for its
    backward does, by half."""
    from jobs import modeling

    return modeling.training_precision(cfg.model, getattr(cfg, stage), bf16_gpu=True)


def hollow_as_loaded(family, config, mode, cfg, stage: str):
    """The checkpoint's hollow model as the stage loads it on the recipe's GPU (``on_its_gpu``; a QLoRA base as one
    quantised to 4 bits: jobs.flops.hollow_model)."""
    from jobs import flops

    return flops.hollow_model(family.model_class, config, mode, on_its_gpu(cfg, stage),
                              four_bit=getattr(cfg, stage).method == "qlora")


def schedule(cfg, stage: str, checkpoint, *, seed_defaults: bool) -> dict:
    """An epoch of the recipe's data: optimizer steps, evaluations (as the recipe's args and the stage's defaults,
    or TRL's, set eval_strategy and eval_steps) and the eval rows each takes."""
    from jobs import auto_batch, training

    train = getattr(cfg, stage)
    args = {**training.STAGE_DEFAULTS, **({} if seed_defaults or stage == "dpo" else training.SFT_DEFAULTS), **train.args}
    if auto_batch.is_auto(args):  # the stage settles the micro-batch (predicted by ``settles``), the script had its own
        effective = train.effective_batch_size
        if seed_defaults and checkpoint.source_batch is None:
            raise SystemExit(f"{checkpoint.name}: its recipe's micro-batch is auto; give the source script's as "
                             "Checkpoint.source_batch (jobs/checkpoints.py)")
        batch = checkpoint.source_batch[0] if seed_defaults else auto_batch.AUTO
    else:
        effective = args.get("per_device_train_batch_size", 8) * args.get("gradient_accumulation_steps", 1)
        batch = args.get("per_device_train_batch_size", 8)
    steps = math.ceil(checkpoint.rows["train"] / effective)
    evals, eval_rows = 0, checkpoint.rows["eval"]
    if args.get("eval_strategy") == "steps":
        # every eval_steps, and at the last step where it is not one of those (transformers' DefaultFlowCallback)
        evals = math.ceil(steps / args.get("eval_steps", args["save_steps"]))
        if stage == "sft" and not seed_defaults:  # the stage's default eval loss: the split's first rows
            eval_rows = training.eval_loss_rows(train, eval_rows)
    return {"steps": steps, "evals": evals, "eval_rows": eval_rows, "batch": batch, "effective": effective}


def dpo_trainer(way: str, cfg, family, model, processor, rows, eval_rows, args):
    """TRL's DPOTrainer (way "trl") or the dpo stage's (jobs/dpo.py: shared prefix, LoRA from the recipe, rows given
    their lengths where the recipe groups them) on the rows."""
    from trl import DPOTrainer

    from jobs import modeling, packing, shared_prefix

    trainer_class = DPOTrainer if way == "trl" else shared_prefix.SharedPrefixDPOTrainer
    # TRL's DPOTrainer turns the rows' messages into text itself: the same rows for all
    trainer = trainer_class(
        model=model, ref_model=None, args=args, train_dataset=family.close_answers(rows, processor),
        eval_dataset=None if eval_rows is None else family.close_answers(eval_rows, processor),
        processing_class=family.rendering_processor(processor), peft_config=modeling.lora_config(cfg.dpo, family),
    )
    trainer.data_collator = family.collator(trainer.data_collator, processor)
    if way != "trl":
        packing.with_lengths(trainer, "dpo", by_image_size=family.pads_images_to_batch)
    return trainer


def grouped(cfg, stage: str) -> bool:
    return getattr(cfg, stage).args.get("train_sampling_strategy") == "group_by_length"


def as_the_stage_orders(name, checkpoint, cfg, pool, *, rows: int, reference_rows: int, work: Path):
    """(training rows, reference rows, probed rows) taken from ``pool`` as the dpo stage orders a split, so that a count
    on a few rows sees the neighbours an epoch's batches hold, not rows of a few drawn at random:

    - training: where the recipe groups rows by length, the ``rows`` rows that the stage's seeded LengthGroupedSampler
      (over the recipe's micro-batch times accumulation, sorting megabatches of up to 50 such optimizer steps by the
      stage's lengths: jobs.packing.with_lengths) draws in a first epoch, in its order, from its second optimizer
      step on (it swaps the pool's longest row into the first batch, once an epoch); else the pool's first rows, in
      no order (``drawn_by_length``);
    - reference: ``reference_rows`` consecutive rows from the middle of the order the reference pass batches a split in
      (jobs.reference_logprobs.batching_order: shortest text first, or the stage's lengths where it groups);
    - probed: the rows the stage's micro-batch probe takes (``probed``).

    A pool of 2,048 rows holds each of RLAIF_V_SIZES 256 times; for idefics2-8b's 64-row steps the sampler's
    megabatches are of 8 steps, 512 rows: a data set whose images come in a few sizes (where they come in many, more
    batches mix sizes; the count says how many do here)."""
    from jobs import reference_logprobs

    trainer = stage_trainer(checkpoint, cfg, "dpo", pool, work)
    order = reference_logprobs.batching_order(trainer.args, trainer.train_dataset)
    middle = (len(order) - reference_rows) // 2
    scored = pool.select(order[middle:middle + reference_rows])
    counted = (drawn_by_length(name, cfg, "dpo", trainer, pool, rows) if grouped(cfg, "dpo")
               else pool.select(range(rows)))
    return counted, scored, probed(name, cfg, "dpo", checkpoint, trainer, pool)


def probed(name, cfg, stage: str, checkpoint, trainer, pool):
    """The rows of ``pool`` that the stage's micro-batch probe takes from its split (jobs.auto_batch.longest_rows: those
    its collator makes the most tokens of), as many as the largest micro-batch it tries; ``trainer`` is the stage's
    on ``pool``. Where activation checkpointing is auto, whether a step fits is decided on these, not on the rows
    counted."""
    from jobs import auto_batch

    sched = schedule(cfg, stage, checkpoint, seed_defaults=False)
    largest = sched["effective"] if sched["batch"] == AUTO else sched["batch"]
    longest, tokens = auto_batch.longest_rows(trainer, min(largest, len(pool)))
    print(f"  {name}: the probe's rows: the pool's {len(longest)} longest, {tokens} tokens", flush=True)
    return pool.select(longest)


def drawn_by_length(name, cfg, stage: str, trainer, pool, rows: int, micro: int | None = None):
    """The ``rows`` rows of ``pool`` that the stage's seeded LengthGroupedSampler draws in a first epoch, from its
    second optimizer step on, over the lengths ``trainer`` (the stage's, built on ``pool``) gave the rows (see
    ``as_the_stage_orders``). Prints the share of the pool's batch tokens that is padding, grouped and shuffled, and
    where rows are ordered by image size, how many of its micro-batches still mix sizes. ``micro``: the micro-batch
    the stage settles, where the recipe's is auto."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from jobs import packing, upstream

    train, args = getattr(cfg, stage), trainer.args
    if train.args.get("per_device_train_batch_size", 8) == AUTO:  # the sampler groups whole optimizer steps
        if micro is None:
            raise SystemExit(f"{name}: rows grouped by length under per_device_train_batch_size auto are drawn in "
                             "the micro-batches the stage settles: give it")
        per_step = train.effective_batch_size
    else:
        micro = train.args.get("per_device_train_batch_size", 8)
        per_step = micro * train.args.get("gradient_accumulation_steps", 1)
    # the stage's sampler for a first epoch (jobs.upstream.seeded_length_grouping: seeded by the run's seed, here 0)
    sampler = upstream.SeededLengthGrouping(
        LengthGroupedSampler(per_step, lengths=trainer.train_dataset[args.length_column_name]), args.seed)
    drawn, columns = list(sampler), trainer.train_dataset.column_names
    by_image_size = packing.TOKENS in columns  # the length column holds a place by image size, the tokens their own
    tokens = trainer.train_dataset[packing.TOKENS if by_image_size else args.length_column_name]
    sizes = packing.image_sizes(trainer.train_dataset)

    def batches(order: list[int]) -> list[list[int]]:
        return [order[at:at + micro] for at in range(0, len(order), micro)]

    def padding(order: list[int]) -> str:
        padded = sum(max(tokens[i] for i in batch) * len(batch) - sum(tokens[i] for i in batch)
                     for batch in batches(order))
        return f"{padded / (padded + sum(tokens)):.1%}"

    shuffled = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0)).tolist()
    mixed = sum(len({sizes[i] for i in batch}) > 1 for batch in batches(drawn))
    said = f"{mixed} of the pool's {len(batches(drawn))} batches of {micro} mix image sizes; " if by_image_size else ""
    counted = drawn[per_step:per_step + rows]
    print(f"  {name}: drawn by length grouping: {said}padding {padding(drawn)} of the batches' tokens (shuffled: "
          f"{padding(shuffled)}); counted: rows of images {[sizes[i][0] for i in counted]}, "
          f"{[tokens[i] for i in counted]} tokens", flush=True)
    return pool.select(counted)


def sft_drawn(name, checkpoint, cfg, pool, *, rows: int, work: Path):
    """(the SFT rows counted, the rows the probe takes, what the stage settles on them: ``settled_on``): the rows
    counted as ``as_the_stage_orders`` takes DPO's training rows, in the micro-batches settled, where the recipe
    groups by length; else ``pool``'s first rows."""
    trainer = stage_trainer(checkpoint, cfg, "sft", pool, work / "order")
    probe_rows = probed(name, cfg, "sft", checkpoint, trainer, pool)
    settled = settled_on(probe_rows, name, checkpoint, cfg, "sft", "vlmjobs", work)
    if not grouped(cfg, "sft"):
        return pool.select(range(rows)), probe_rows, settled
    return drawn_by_length(name, cfg, "sft", trainer, pool, rows, settled["batch"]), probe_rows, settled


def stage_trainer(checkpoint, cfg, stage: str, rows, work: Path):
    """The stage's trainer on ``rows`` (hollow): the lengths and order it gives them."""
    from jobs import checkpoints, flops
    from jobs.families import get_family

    family = get_family(checkpoint.family)
    processor = checkpoints.processor(checkpoint)
    config = checkpoints.config(checkpoint, processor.tokenizer)
    build = dpo_trainer if stage == "dpo" else sft_trainer
    with flops.hollow() as mode:
        model = hollow_as_loaded(family, config, mode, cfg, stage)
        args = args_for(cfg, stage, work, batch=1, steps=1, seed_defaults=False)
        return build("vlmjobs", cfg, family, model, processor, rows, None, args)


def sft_trainer(way: str, cfg, family, model, processor, rows, eval_rows, args):
    """TRL's SFTTrainer with its own collator (way "trl"), or with the sft stage's collators in its order (jobs/sft.py),
    padding-free as the recipe and attention say (way "padding-free": sft.padding_free true)."""
    from trl import SFTTrainer

    from jobs import modeling, packing, turns

    if isinstance(eval_rows, dict):  # several evaluation sets, each by its name (Trainer.evaluate(name))
        eval_rows = {name: family.close_answers(split, processor) for name, split in eval_rows.items()}
    elif eval_rows is not None:
        eval_rows = family.close_answers(eval_rows, processor)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=family.close_answers(rows, processor), eval_dataset=eval_rows,
        peft_config=modeling.lora_config(cfg.sft, family), processing_class=family.rendering_processor(processor),
    )
    if way != "trl":
        trainer.data_collator = family.collator(trainer.data_collator, processor)
        if not family.multi_turn_unsupported:
            trainer.data_collator = turns.EveryAnswer(trainer.data_collator, trainer.processing_class)
        packing.with_lengths(trainer, "sft", by_image_size=family.pads_images_to_batch)
        attention = upstream_attention(model)
        if packing.enabled(True if way == "padding-free" else cfg.sft.padding_free, family, attention):
            packing.unpad(trainer, model)
    return trainer


def upstream_attention(model) -> str:
    from jobs import upstream

    return upstream.attention_implementation(model.config) or "sdpa"


def memory_before_activations(cfg, stage: str, config, folder: Path) -> float:
    """`vlmjobs memory`'s estimate for the recipe's stage (GB: weights, gradients, optimizer states) with the model
    ``config`` in place of the recipe's hub id, which for_stage reads from the folder it is written to (no hub)."""
    import dataclasses

    from jobs import memory

    config.save_pretrained(folder)
    local = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=str(folder), revision=None))
    return memory.for_stage(local, stage)[0].total


def settles(trainer, cfg, stage: str, config, batch, work: Path) -> dict:
    """What the recipe's ``auto`` settings settle on its GPU (jobs.auto_batch.fit), predicted from counts, in the
    probe's order (jobs.auto_batch.tries): without recomputation, then with one layer in 8, 4, 2 and every layer
    recomputed (auto_batch.RECOMPUTE_EVERY), the micro-batch ``batch`` (every one from the whole per-process batch
    down, where ``batch`` is auto): the first whose training step of the longest of ``trainer``'s rows
    keeps activations (counted by jobs.flops.saved_for_backward) that fit beside the weights, gradients and optimizer
    states (jobs.memory.for_stage, from the checkpoint's config) in ``resources.gpu_memory_gib``; where none does,
    every layer recomputed at micro-batch 1, over. A micro-batch of more rows than ``trainer`` holds is taken as their
    activations, scaled by its size. The hollow step runs in the dtypes the stage runs on the GPU (``on_its_gpu``: bf16
    weights and autocast, a QLoRA adapter cast to bf16 by TRL, with CUDA autocast's float32 norms:
    jobs.flops.cuda_autocast_norms). A recipe that says true or false is taken at its word. ``as_settled`` sets what is
    predicted on a trainer."""
    from jobs import auto_batch, flops, memory

    train = getattr(cfg, stage)
    auto_micro = batch == auto_batch.AUTO
    if not auto_batch.checkpointing_is_auto(train.args):
        if auto_micro:
            raise SystemExit(f"{stage}: per_device_train_batch_size auto is predicted only with "
                             "activation_checkpointing: auto")
        return {"recompute": auto_batch.recomputed_every(trainer.args), "batch": batch}
    weights = memory_before_activations(cfg, stage, config, work / "config")
    room = memory.gpu_gb(cfg.resources_for(stage).gpu_memory_gib)
    counted = len(trainer.train_dataset)
    longest, _ = auto_batch.longest_rows(trainer, counted)
    per_process = train.effective_batch_size if auto_micro else batch  # one process: the recipes' one GPU
    measured = {}

    def activations(every: int, micro: int) -> float:
        rows = min(micro, counted)
        if (every, rows) not in measured:
            auto_batch.recompute_activations(trainer, every)
            probed_rows = trainer.train_dataset.select(longest[:rows])
            measured[every, rows] = flops.training_step_activations(trainer, probed_rows)
        return measured[every, rows] * micro / rows / memory.GB

    tried = []
    for every, micro in auto_batch.tries([0, *auto_batch.RECOMPUTE_EVERY], per_process, per_process, auto_micro):
        if weights + activations(every, micro) <= room:
            break
        tried.append((every, micro))
    return {"recompute": every, "weights": weights, "activations": activations(every, micro), "room": room,
            "batch": micro, "tried": tried, "counted": counted}


def settled_on(probe_rows, name, checkpoint, cfg, stage: str, way: str, work: Path) -> dict:
    """``settles`` on the rows the stage's probe takes, by a hollow trainer of the way's own (the rows counted are
    another trainer's)."""
    from jobs import checkpoints, flops, reference_logprobs
    from jobs.families import get_family

    family = get_family(checkpoint.family)
    processor = checkpoints.processor(checkpoint)
    config = checkpoints.config(checkpoint, processor.tokenizer)
    with flops.hollow() as mode:
        model = hollow_as_loaded(family, config, mode, cfg, stage)
        recipe_batch, args = first_args(name, cfg, stage, checkpoint, way, probe_rows, work / f"{way}-probe")
        if stage == "sft":
            trainer = sft_trainer(way, cfg, family, model, processor, probe_rows, None, args)
            return settles(trainer, cfg, stage, config, recipe_batch, work / way)
        trainer = dpo_trainer(way, cfg, family, model, processor, probe_rows, None, args)
        with reference_logprobs.as_if_cached(trainer):  # a training step that reads the cached reference's columns
            return settles(trainer, cfg, stage, config, recipe_batch, work / way)


def as_settled(name: str, trainer, settled: dict) -> None:
    """Set on ``trainer`` what ``settles`` predicts, as jobs.auto_batch.fit sets it: recomputation (of one layer in
    ``settled["recompute"]``, 0: none), and the micro-batch, one step a batch over the counted rows."""
    from jobs import auto_batch

    auto_batch.recompute_activations(trainer, settled["recompute"])
    micro = min(settled["batch"], len(trainer.train_dataset))  # more than the counted rows: all of them, one batch
    auto_batch.set_batch(trainer, auto_batch.Batch(micro, 1))
    trainer.args.max_steps = steps_of(name, trainer.train_dataset, micro)


def first_args(name, cfg, stage: str, checkpoint, way: str, rows, work: Path):
    """(the recipe's micro-batch, auto where it leaves it to the stage, for ``settles``; the way's TRL config, over
    ``rows`` one step a batch). An auto micro-batch starts as all the counted rows, until ``as_settled``."""
    recipe_batch = 1 if way == "ideal" else schedule(cfg, stage, checkpoint, seed_defaults=way == "trl")["batch"]
    batch = len(rows) if recipe_batch == AUTO else recipe_batch
    return recipe_batch, args_for(cfg, stage, work / way, batch=batch, steps=steps_of(name, rows, batch),
                                  seed_defaults=way == "trl", ideal=way == "ideal")


def steps_of(name: str, rows, batch: int) -> int:
    """Training steps over ``rows``; fewer rows than a batch would train none and count 0 FLOPs for the phase."""
    if len(rows) % batch:
        raise SystemExit(f"--rows {len(rows)}: {name} trains {batch} rows a batch; give a multiple of {batch}")
    return len(rows) // batch


def count_dpo(name, checkpoint, cfg, rows, eval_rows, work: Path, reference_rows, probe_rows) -> dict:
    """Each way's FLOPs per row by phase: training and evaluation counted on ``rows`` and ``eval_rows``, the reference
    pass on ``reference_rows``, what the stage settles on ``probe_rows`` (``as_the_stage_orders``)."""
    from jobs import checkpoints, flops, packing, reference_logprobs
    from jobs.families import get_family

    family = get_family(checkpoint.family)
    processor = checkpoints.processor(checkpoint)
    config = checkpoints.config(checkpoint, processor.tokenizer)
    reference_rows = family.close_answers(reference_rows, processor)
    out = {}
    for way in ("trl", "vlmjobs", "ideal"):
        seed = way == "trl"
        with flops.hollow() as mode:
            model = hollow_as_loaded(family, config, mode, cfg, "dpo")
            _, args = first_args(name, cfg, "dpo", checkpoint, way, rows, work)
            trainer = dpo_trainer(way, cfg, family, model, processor, rows, eval_rows, args)
            phases = {}
            if way == "vlmjobs":
                out["memory"] = settled_on(probe_rows, name, checkpoint, cfg, "dpo", way, work)
                as_settled(name, trainer, out["memory"])
            if not seed:  # the reference's log-probs computed once, then read from the batches
                scored = reference_rows
                if grouped(cfg, "dpo"):  # batched in the order of the lengths the stage gives the rows
                    scored = packing.lengths_added(scored, trainer.data_collator, args.length_column_name,
                                                   by_image_size=family.pads_images_to_batch)
                phases["reference"] = flops.count_reference(trainer, scored)
                reference_logprobs.read_from_batches(trainer)
                if grouped(cfg, "dpo"):
                    trainer.args.train_sampling_strategy = "sequential"  # the rows, batched as the sampler drew them
                for split in ("train_dataset", "eval_dataset"):
                    data = getattr(trainer, split)
                    zeros = [0.0] * len(data)
                    setattr(trainer, split, data.add_column(reference_logprobs.COLUMNS[0], zeros)
                            .add_column(reference_logprobs.COLUMNS[1], zeros))
            phases["train"] = flops.count_training(trainer, len(rows))
            if way == "vlmjobs":
                phases["recomputation"] = recomputation(trainer, phases["train"], len(rows))
            phases["eval"] = flops.count_evaluation(trainer)  # the ideal's: one pair a batch
            out[way] = phases
        print(f"  {name}: {way} counted", flush=True)
    return out


def count_sft(name, checkpoint, cfg, rows, eval_rows, work: Path, probe_rows, settled: dict) -> dict:
    """Each way's FLOPs per row by phase, on ``rows`` and ``eval_rows``: vlmjobs' with what the stage settles
    (``settled``, from ``sft_drawn``), padding-free's with what it would settle on ``probe_rows``."""
    from jobs import checkpoints, flops
    from jobs.families import get_family

    family = get_family(checkpoint.family)
    processor = checkpoints.processor(checkpoint)
    config = checkpoints.config(checkpoint, processor.tokenizer)
    out = {}
    for way in ("trl", "vlmjobs", "padding-free", "ideal"):
        seed = way == "trl"
        with flops.hollow() as mode:
            model = hollow_as_loaded(family, config, mode, cfg, "sft")
            _, args = first_args(name, cfg, "sft", checkpoint, way, rows, work)
            trainer = sft_trainer(way, cfg, family, model, processor, rows, eval_rows, args)
            if grouped(cfg, "sft") and not seed:
                trainer.args.train_sampling_strategy = "sequential"  # the rows, batched as the sampler drew them
            if way == "vlmjobs":
                as_settled(name, trainer, settled)
            elif way == "padding-free":
                as_settled(name, trainer, settled_on(probe_rows, name, checkpoint, cfg, "sft", way, work))
            out[way] = {"train": flops.count_training(trainer, len(rows))}
            if way in ("vlmjobs", "padding-free"):
                out[way]["recomputation"] = recomputation(trainer, out[way]["train"], len(rows))
            out[way]["eval"] = flops.count_evaluation(trainer)  # the ideal's: one row a batch
        print(f"  {name}: {way} counted", flush=True)
    out["memory"] = settled
    return out


def recomputation(trainer, train: float, rows: int) -> float:
    """FLOPs per row that ``trainer``'s activation checkpointing recomputes: its training (``train``, counted) less
    the same training counted again without it; 0 where it recomputes nothing. Left off after."""
    from jobs import auto_batch, flops

    if not trainer.args.activation_checkpointing:
        return 0.0
    auto_batch.recompute_activations(trainer, 0)
    return train - flops.count_training(trainer, rows)


def attention_of(cfg) -> str:
    return cfg.model.attn_implementation or "sdpa"  # transformers' default where the recipe names none


def per_sample(counted: dict, sched: dict, checkpoint, *, epoch: int, way: str) -> dict:
    """FLOPs per training sample of epoch ``epoch`` (1, or 2 for any later epoch or rerun), by phase."""
    train_rows, eval_rows = checkpoint.rows["train"], checkpoint.rows["eval"]  # the reference scores all eval rows
    phases = {"train": counted["train"]}
    reference = counted.get("reference", 0.0)
    if way == "vlmjobs":  # computed once for the train and eval rows, read from the store afterwards
        phases["reference"] = reference * (train_rows + eval_rows) / train_rows if epoch == 1 else 0.0
    elif way == "ideal":
        phases["reference"] = reference if epoch == 1 else 0.0
    else:
        phases["reference"] = 0.0  # inside TRL's training step
    phases["eval"] = counted["eval"] * sched["evals"] * sched["eval_rows"] / train_rows
    phases["total"] = sum(phases.values())
    return phases


def ideal_reference(name, checkpoint, cfg, rows, work: Path) -> float:
    """One reference forward per pair, packed, one pair per batch: the reference pass of vlmjobs at batch 1."""
    from jobs import checkpoints, flops, modeling, shared_prefix
    from jobs.families import get_family

    family = get_family(checkpoint.family)
    processor = checkpoints.processor(checkpoint)
    config = checkpoints.config(checkpoint, processor.tokenizer)
    with flops.hollow() as mode:
        model = hollow_as_loaded(family, config, mode, cfg, "dpo")
        args = args_for(cfg, "dpo", work / "ideal-ref", batch=1, steps=1, seed_defaults=False, ideal=True)
        trainer = shared_prefix.SharedPrefixDPOTrainer(
            model=model, ref_model=None, args=args, train_dataset=family.close_answers(rows, processor),
            processing_class=family.rendering_processor(processor), peft_config=modeling.lora_config(cfg.dpo, family))
        trainer.data_collator = family.collator(trainer.data_collator, processor)
        return flops.count_reference(trainer, trainer.train_dataset)


def memory_note(name: str, settled: dict) -> str:
    from jobs import auto_batch

    def recomputing(every: int) -> str:
        return auto_batch.recomputing(every).strip()

    if "activations" not in settled:
        return f"{name}: {recomputing(settled['recompute'])}, as the recipe says"
    scaled = sorted({micro for _, micro in settled["tried"] if micro > settled["counted"]}, reverse=True)
    scaled = f" ({', '.join(map(str, scaled))} scaled from the {settled['counted']} probed rows)" if scaled else ""
    steps = dict.fromkeys(every for every, _ in settled["tried"])  # in the order tried
    tried = "; ".join(f"{recomputing(every)}, micro-batch "
                      f"{', '.join(str(micro) for e, micro in settled['tried'] if e == every)}" for every in steps)
    tried = f"over the GPU's memory: {tried}{scaled}; " if tried else ""
    fits = settled["weights"] + settled["activations"] <= settled["room"]
    return (f"{name}: activation_checkpointing auto: {tried}micro-batch {settled['batch']} "
            f"{recomputing(settled['recompute'])} of the probe's {settled['counted']} rows keeps "
            f"{settled['activations']:.1f} GB of activations (bf16, as on the GPU) beside {settled['weights']:.1f} "
            f"GB of weights, gradients and optimizer states, {'within' if fits else 'over'} the GPU's "
            f"{settled['room']:.1f} GB")


@contextlib.contextmanager
def scoring_labelled_positions_only():
    """TRL's fused LM head counted as it runs on CUDA with Triton: the vocabulary projection over the labelled
    positions only (the answers), where on a CPU it scores every position (TRL's choice for devices without Triton,
    made for Neuron's fixed shapes; ``trl.trainer.utils``' ``compact``). Only that choice is switched: the kernels keep
    their CPU path. A bench's coupling to one name of TRL 1.16, which fails loudly where the name is gone."""
    import trl.trainer.utils as trl_utils

    if not callable(getattr(trl_utils, "_use_triton", None)):
        raise SystemExit("flops_table: trl.trainer.utils._use_triton is gone (written for TRL 1.16); which positions "
                         "TRL's fused head scores on CUDA needs reading again")
    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4, help="rows counted per checkpoint (a multiple of the batches)")
    parser.add_argument("--reference-rows", type=int, default=64, help="rows the DPO reference pass is counted on")
    parser.add_argument("--pool", type=int, default=2048,
                        help="DPO rows the counted ones are taken from, as the stage orders them")
    parser.add_argument("--only", default=None, help="one of: " + ", ".join(__import__("jobs.checkpoints").checkpoints.SEEDS))
    parser.add_argument("--every-position", action="store_true",
                        help="count TRL's fused LM head as a CPU runs it, over every position (default: as CUDA does)")
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    from jobs import checkpoints
    from jobs import recipe as recipes

    transformers.logging.set_verbosity_error()
    work = options.out or Path(tempfile.mkdtemp(prefix="vlmjobs-flops-"))
    table = ["| recipe | epoch | TRL defaults TFLOP/sample | vlmjobs TFLOP/sample (train + reference + eval) | ideal "
             "TFLOP/sample | TRL ÷ ideal | vlmjobs ÷ ideal | vlmjobs ÷ (ideal + recomputation) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    started, notes = time.time(), []
    counting = contextlib.ExitStack()
    if not options.every_position:
        counting.enter_context(scoring_labelled_positions_only())
    for name, (checkpoint, stage) in checkpoints.SEEDS.items():
        if options.only and name != options.only:
            continue
        if not options.only and checkpoint.family in UNCOUNTED:
            notes.append(f"{name}: not counted ({UNCOUNTED[checkpoint.family]}); --only '{name}' runs it")
            continue
        cfg = recipes.load(ROOT / checkpoint.recipe)
        train = getattr(cfg, stage)
        if stage == "dpo":
            thumbnail = 490 if checkpoint.family == "idefics2" else None  # prepare.image_scale 0.5, the blog's thumbnail
            pool, folder = dpo_rows(options.pool, thumbnail), work / name.replace(" ", "-")
            rows, reference_rows, probe_rows = as_the_stage_orders(name, checkpoint, cfg, pool, rows=options.rows,
                                                       reference_rows=options.reference_rows, work=folder / "order")
            eval_rows = dpo_rows(max(2, options.rows // 4), thumbnail)
            counted = count_dpo(name, checkpoint, cfg, rows, eval_rows, folder, reference_rows, probe_rows)
            counted["ideal"]["reference"] = ideal_reference(name, checkpoint, cfg, reference_rows, folder)
        else:
            system = cfg.data.sft.system_prompt
            pool = sft_rows(options.pool if grouped(cfg, "sft") else options.rows, system)
            folder = work / name.replace(" ", "-")
            rows, probe_rows, settled = sft_drawn(name, checkpoint, cfg, pool, rows=options.rows, work=folder)
            eval_rows = sft_rows(max(4, options.rows // 2), system)
            counted = count_sft(name, checkpoint, cfg, rows, eval_rows, folder, probe_rows, settled)
        epochs = (1, 2) if stage == "dpo" else (1,)
        for epoch in epochs:
            result = {}
            for way in ("trl", "vlmjobs", "ideal"):
                # the ideal evaluates as the recipe asks (its own schedule over TRL's defaults, not the stage's default)
                sched = schedule(cfg, stage, checkpoint, seed_defaults=way != "vlmjobs")
                result[way] = per_sample(counted[way], sched, checkpoint, epoch=epoch, way=way)
            ideal = result["ideal"]["total"]
            v = result["vlmjobs"]
            recompute = counted["vlmjobs"]["recomputation"]  # what vlmjobs' checkpointing recomputes, counted
            if "padding-free" in counted:  # SFT with sft.padding_free: true under the same attention
                pf = per_sample(counted["padding-free"], schedule(cfg, stage, checkpoint, seed_defaults=False),
                                checkpoint, epoch=epoch, way="vlmjobs")
                notes.append(f"{name}: with sft.padding_free: true ({attention_of(cfg)}), vlmjobs "
                             f"{pf['total'] / 1e12:.2f} TFLOP/sample ({pf['train'] / 1e12:.2f} + 0 + {pf['eval'] / 1e12:.2f}), "
                             f"{pf['total'] / ideal:.2f} x ideal, "
                             f"{pf['total'] / (ideal + counted['padding-free']['recomputation']):.2f} x "
                             "(ideal + recomputation)")
            table.append(
                f"| {name} ({train.method}) | {'1' if epoch == 1 else '2+, rerun'} | {result['trl']['total'] / 1e12:.2f} | "
                f"{v['total'] / 1e12:.2f} ({v['train'] / 1e12:.2f} + {v['reference'] / 1e12:.2f} + {v['eval'] / 1e12:.2f}) | "
                f"{ideal / 1e12:.2f} | {result['trl']['total'] / ideal:.2f} | {v['total'] / ideal:.2f} | "
                f"{v['total'] / (ideal + recompute):.2f} |")
        notes.append(memory_note(name, counted["memory"]))
        print("\n".join(table[-len(epochs):]), flush=True)
    counting.close()
    head = "every position (as on a CPU)" if options.every_position else "the labelled positions (as on CUDA)"
    lines = [f"FLOPs per training sample, counted (torch FlopCounterMode, hollow weights), {options.rows} rows per "
             f"checkpoint, TRL's fused LM head over {head}, {time.time() - started:.0f} s", "", *table, "", *notes]
    print("\n".join(lines))
    (work / "flops.md").write_text("\n".join(lines) + "\n")
    print(f"\n(this table in {work / 'flops.md'})")


if __name__ == "__main__":
    main()
