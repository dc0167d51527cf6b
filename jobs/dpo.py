"""DPO: direct preference optimisation with TRL's DPOTrainer on the prepared prompt/chosen/rejected rows.

Starts from the SFT stage's output when the run has one (``dpo.init: sft``), its adapter merged
into the weights first or trained further (``dpo.sft_adapter``), else from the base model. With
LoRA the reference model is the same weights with the adapter switched off, never a second copy;
continuing SFT's adapter, TRL keeps a frozen copy of that adapter (not of the model) as reference.
The reference's log-probs of the rows the run draws are computed once before training and reused
(``dpo.reference_logprobs: cache``, jobs.reference_logprobs): full fine-tuning then needs no frozen copy
of the model either. Each pair's image and prompt are encoded once, both answers continuing from them (``dpo.shared_prefix``, jobs.shared_prefix).

    local:      python -m jobs.dpo --recipe recipes/tiny-demo.yaml [--dpo.args.beta=0.1]
                vlmjobs run recipes/tiny-demo.yaml --stages dpo
    in cluster: python -m jobs.dpo            (accelerate launch ... -m jobs.dpo with several GPUs)

Output: <run>/dpo/model/ (adapter or weights, processor, lineage.json), metrics.jsonl with rewards,
margins, accuracies and log-probs at every logging step, tensorboard/ (the same as event files), and _SUCCESS.json.
"""

from __future__ import annotations

from jobs import contract, entry
from jobs import recipe as recipes


def main(recipe: str = "", force: bool = False, **overrides):
    cfg = recipes.load(recipe, overrides)
    recipes.check_passthrough(cfg)
    from_sft = cfg.dpo.init == "sft" and "sft" in cfg.stages
    stage = contract.begin("dpo", cfg.run_dir, cfg.stage_config("dpo"), needs=cfg.needs("dpo"), force=force, resumable=True)
    if stage.skipped:
        return

    import contextlib
    import copy
    import functools

    from datasets import load_from_disk
    from trl import DPOConfig, DPOTrainer

    from jobs import auto_batch, modeling, packing, reference_logprobs, shared_prefix, training
    from jobs.families import get_family

    family = get_family(cfg.model.family)
    processor = modeling.load_processor(cfg.model)
    precision = modeling.training_precision(cfg.model, cfg.dpo)  # fp32 master weights for full fine-tuning
    # The config before the model: it sets up the processes (accelerate's PartialState) that rebuilding SFT's merged
    # model in 4 bits waits on, one process writing it for all (modeling.load_trained).
    shards = training.shard_count(cfg, "dpo")
    args = training.trl_config(DPOConfig, cfg.dpo, output_dir=stage.work / "checkpoints", seed=cfg.seed, dtype=precision.compute,
                               shards=shards)
    model, lineage, start = starting_point(cfg, stage.run_dir, from_sft, dtype=precision.weights, sharded=shards > 1)
    data = load_from_disk(stage.input("prepare") / "dpo")
    train, held_out = (family.close_answers(data[split], processor, scratch=stage.scratch) for split in ("train", "eval"))

    # A new adapter on top, unless SFT's adapter is being trained further (it is already on the model).
    new_adapter = cfg.dpo.method != "full" and lineage["adapter"] is None
    cached = reference_logprobs.cached(cfg.dpo, args)  # says why not where the recipe asks for it and cannot have it
    reference_copy = cfg.dpo.method == "full" and not cached
    packed = shared_prefix.wanted(cfg.dpo.shared_prefix, model)
    build = functools.partial(
        shared_prefix.SharedPrefixDPOTrainer if packed else DPOTrainer,
        model=model,
        # Full fine-tuning recomputing the reference needs a frozen copy; TRL would reload it from the base
        # model's id, which is not the merged SFT weights this run starts from.
        ref_model=copy.deepcopy(model).eval() if reference_copy else None,
        args=args, train_dataset=train, eval_dataset=held_out, processing_class=family.rendering_processor(processor),
        peft_config=modeling.lora_config(cfg.dpo, family) if new_adapter else None,
        callbacks=training.callbacks("dpo", stage.work),
    )
    with training.sharding(args, model):
        trainer = reference_logprobs.building_without_reference_model(build) if cached else build()
    trainer.data_collator = family.collator(trainer.data_collator, processor)
    # train_sampling_strategy: group_by_length; before the reference pass, which batches its rows the same way
    grouped = packing.with_lengths(trainer, "dpo", by_image_size=family.pads_images_to_batch)
    with reference_logprobs.as_if_cached(trainer) if cached else contextlib.nullcontext():
        # per_device_train_batch_size: auto; before start prints the batch
        batch = auto_batch.fit(stage, trainer, cfg.dpo, model=cfg.model, precision=precision)
    # Before training: for full fine-tuning the policy is still the reference
    cache = reference_logprobs.use_cached(trainer, reference_logprobs.store_for(stage.run_dir)) if cached else None
    checkpoint = training.start(
        "dpo", trainer, work=stage.work, train_rows=len(train),
        extra={"method": cfg.dpo.method, "starting from": start, "beta": args.beta, "loss": args.loss_type,
               "reference copy": reference_copy, "reference log-probs": "cached" if cached else "recomputed",
               "sharded over": shards, "batched by length": grouped,
               "prompt encoded": "once per pair (shared prefix)" if packed else "twice per pair (dpo.shared_prefix off)"},
    )
    with auto_batch.out_of_memory_in_training("dpo", batch):
        result = trainer.train(resume_from_checkpoint=checkpoint)
    training.stop_if_interrupted(trainer, "dpo")

    trained = {"base": "dpo/model"} if cfg.dpo.method == "full" else {**lineage, "adapter": "dpo/model"}
    training.save(trainer, processor, stage.work / "model", **trained)
    stage.finish(
        rows={"train": len(train), "eval": len(held_out)}, metrics=result.metrics, resumed_from=checkpoint,
        steps=result.global_step,
        method=cfg.dpo.method, starting_from=start, quantized=bool(getattr(model, "is_loaded_in_4bit", False)),
        reference=reference_kind(trainer), reference_logprobs=cache or "recomputed at every step", shared_prefix=packed,
        grouped_by_length=grouped,
        sharding=training.what_was_sharded(trainer),
    )


def reference_kind(trainer) -> str:
    """What DPO compared against, read off the trainer TRL built: the record says so for every run."""
    if trainer.ref_model is not None:
        return "frozen copy of the model"
    if "ref" in getattr(trainer.model, "peft_config", {}):
        return "frozen copy of the adapter"
    if not hasattr(trainer.model, "peft_config"):  # full fine-tuning on cached log-probs: no copy was made
        return "the model before its first step"
    return "the model with its adapter switched off"


def starting_point(cfg, run_dir, from_sft: bool, *, dtype=None, sharded: bool = False, stage: str = "dpo"):
    """(model, lineage of the weights under the stage's adapter, description) for the recipe's dpo.init (or grpo.init,
    ``stage``), loaded in ``dtype``."""
    from jobs import modeling

    train = getattr(cfg, stage)
    quantize = modeling.quantization(train, sharded=sharded, dtype=dtype)
    if not from_sft:
        model = modeling.load_model(cfg.model, quantize=quantize, dtype=dtype)
        return model, {"base": modeling.BASE, "merged": [], "adapter": None}, "base model"
    sft = modeling.read_lineage(run_dir, "sft")
    if sft["adapter"] is None:  # SFT trained every weight: DPO starts from them
        return (modeling.load_model(cfg.model, path=run_dir / sft["base"], quantize=quantize, dtype=dtype),
                {"base": sft["base"], "merged": [], "adapter": None}, "sft weights")
    if train.sft_adapter == "continue":
        if train.method == "full":
            raise contract.UserError(f"{stage}.sft_adapter: continue trains SFT's adapter further; it needs {stage}.method lora or qlora")
        model = modeling.load_trained(cfg, run_dir, "sft", quantize=quantize, trainable=True, dtype=dtype)
        return model, sft, "sft adapter, trained further"
    model = modeling.load_trained(cfg, run_dir, "sft", quantize=quantize, merge=True, dtype=dtype)
    if train.method == "full":  # peft loaded the adapter for inference, freezing every weight; merged, they all train
        model.requires_grad_(True)
    return model, {"base": sft["base"], "merged": sft["merged"] + [sft["adapter"]], "adapter": None}, "sft adapter merged"


if __name__ == "__main__":
    entry.entrypoint(main, imports=(
        "datasets", "trl:DPOTrainer", "jobs.modeling", "jobs.training", "jobs.shared_prefix", "jobs.reference_logprobs",
    ))
