"""SFT: supervised fine-tuning with TRL's SFTTrainer on the prepared prompt/completion rows.

LoRA, QLoRA (4-bit nf4 base, double quantisation) or full fine-tuning, as ``sft.method`` says.
Checkpoints go to the run folder; started again after an interruption, the stage resumes from
the newest complete checkpoint. On SIGTERM (SIGINT) it writes a checkpoint and exits 143 (130).

    local:      python -m jobs.sft --recipe recipes/tiny-demo.yaml [--sft.args.learning_rate=1e-4]
                vlmjobs run recipes/tiny-demo.yaml --stages sft
    in cluster: python -m jobs.sft            (accelerate launch ... -m jobs.sft with several GPUs)

Output: <run>/sft/model/ (adapter or weights, processor, lineage.json), metrics.jsonl with the training loss and an
eval loss (the eval split's first rows: training.eval_loss_rows), tensorboard/ (event files: tensorboard --logdir
<run>), _SUCCESS.json.
"""

from __future__ import annotations

from jobs import contract, entry
from jobs import recipe as recipes


def main(recipe: str = "", force: bool = False, **overrides):
    cfg = recipes.load(recipe, overrides)
    recipes.check_passthrough(cfg)
    stage = contract.begin("sft", cfg.run_dir, cfg.stage_config("sft"), needs=cfg.needs("sft"), force=force, resumable=True)
    if stage.skipped:
        return

    from datasets import load_from_disk
    from trl import SFTConfig, SFTTrainer

    from jobs import auto_batch, modeling, packing, training, turns, upstream, video
    from jobs.families import get_family

    family = get_family(cfg.model.family)
    processor = modeling.load_processor(cfg.model)
    precision = modeling.training_precision(cfg.model, cfg.sft)  # fp32 master weights for full fine-tuning
    shards = training.shard_count(cfg, "sft")
    quantize = modeling.quantization(cfg.sft, sharded=shards > 1, dtype=precision.weights)
    model = modeling.load_model(cfg.model, quantize=quantize, dtype=precision.weights)
    data = load_from_disk(stage.input("prepare") / "sft")
    train, held_out = (family.close_answers(data[split], processor, scratch=stage.scratch) for split in ("train", "eval"))

    watched = held_out.select(range(training.eval_loss_rows(cfg.sft, len(held_out))))  # the eval loss's rows

    args = training.trl_config(SFTConfig, cfg.sft, output_dir=stage.work / "checkpoints", seed=cfg.seed, dtype=precision.compute,
                               shards=shards, defaults=training.SFT_DEFAULTS)
    peft_config = None if cfg.sft.method == "full" else modeling.lora_config(cfg.sft, family)
    with training.sharding(args, model):
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=train, eval_dataset=watched, peft_config=peft_config,
            processing_class=family.rendering_processor(processor),  # renders BOS in; the saved processor stays the card's
            callbacks=training.callbacks("sft", stage.work),
        )
    trainer.data_collator = family.collator(trainer.data_collator, processor)
    if video.COLUMNS[0] in train.column_names:  # TRL's vision collator reads no videos; the wrapper hands them over
        trainer.data_collator = video.WithVideos(trainer.data_collator)
    # Every assistant turn of a multi-turn row is trained on, not only its completion; before the wraps below, which
    # read the batches it makes (prepare dropped multi-turn rows where the family cannot: multi_turn_unsupported)
    if not family.multi_turn_unsupported:
        trainer.data_collator = turns.EveryAnswer(trainer.data_collator, trainer.processing_class)
    padding_free = packing.enabled(cfg.sft.padding_free, family, upstream.attention_implementation(model.config))
    grouped = packing.with_lengths(trainer, "sft", by_image_size=family.pads_images_to_batch)  # group_by_length
    attention = packing.unpad(trainer, model) if padding_free else None  # the text's attention, by row under sdpa
    # per_device_train_batch_size: auto; before start prints the batch
    batch = auto_batch.fit(stage, trainer, cfg.sft, model=cfg.model, precision=precision)
    checkpoint = training.start("sft", trainer, work=stage.work, train_rows=len(train),
                                extra={"method": cfg.sft.method, "sharded over": shards,
                                       "eval loss on": f"{len(watched)} of {len(held_out)} eval rows",
                                       "padding-free": attention or False, "batched by length": grouped})
    with auto_batch.out_of_memory_in_training("sft", batch):
        result = trainer.train(resume_from_checkpoint=checkpoint)
    training.stop_if_interrupted(trainer, "sft")

    lineage = {"base": "sft/model"} if peft_config is None else {"adapter": "sft/model"}
    training.save(trainer, processor, stage.work / "model", **lineage)
    stage.finish(
        rows={"train": len(train), "eval": len(held_out), "eval loss": len(watched)}, metrics=result.metrics,
        resumed_from=checkpoint, steps=result.global_step, method=cfg.sft.method, padding_free=padding_free,
        grouped_by_length=grouped,
        quantized=bool(getattr(model, "is_loaded_in_4bit", False)), sharding=training.what_was_sharded(trainer),
    )


if __name__ == "__main__":
    entry.entrypoint(main, imports=("datasets", "trl:SFTTrainer", "jobs.modeling", "jobs.training", "jobs.packing"))
