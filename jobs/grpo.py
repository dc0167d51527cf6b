"""GRPO: online reinforcement learning with verifiable rewards, TRL's GRPOTrainer on the prepared prompts and gold answers.

For each prompt (and its images) the policy samples ``num_generations`` completions; each is rewarded by the recipe's
``grpo.rewards`` (jobs.rewards: evaluate's own scoring rules, or a user's function), and the policy is pushed towards
the completions that score above their group's mean. Starts from the SFT stage's output when the run has one
(``grpo.init: sft``), as DPO does. Completions are generated with transformers' ``generate`` unless the recipe asks
for vLLM (``grpo.args.use_vllm``, ``vllm_mode: colocate`` or ``server``: GPU clusters only, in an image with vLLM).
In server mode the launcher runs the server beside the trainer (``grpo.vllm_server``) and hands its URL in
$VLMJOBS_VLLM_SERVER_URL; TRL's trainer pushes its weights to the server before the first generation and every step.

    local:      python -m jobs.grpo --recipe recipes/tiny-grpo.yaml [--grpo.args.learning_rate=1e-5]
                vlmjobs run recipes/tiny-grpo.yaml --stages grpo
    in cluster: python -m jobs.grpo            (accelerate launch ... -m jobs.grpo with several GPUs)

Output: <run>/grpo/model/ (adapter or weights, processor, lineage.json), metrics.jsonl with each reward's mean, the
completions' lengths and the loss at every logging step, tensorboard/, and _SUCCESS.json.
"""

from __future__ import annotations

import importlib.util
import os

from jobs import contract, entry
from jobs import recipe as recipes


def main(recipe: str = "", force: bool = False, **overrides):
    cfg = recipes.load(recipe, overrides)
    recipes.check_passthrough(cfg)
    # TRL imports vLLM in the trainer in both modes (in server mode for the weight-transfer group): without it
    # GRPOTrainer fails after the model has loaded, with an ImportError that names pip, not the recipe
    if cfg.grpo.args.get("use_vllm") and importlib.util.find_spec("vllm") is None:
        raise contract.UserError("grpo.args.use_vllm: vLLM is not installed where the stage runs (the project's image "
                                 "has none); run in an image with vLLM (kubernetes.image), or set use_vllm false")
    from_sft = cfg.grpo.init == "sft" and "sft" in cfg.stages
    stage = contract.begin("grpo", cfg.run_dir, cfg.stage_config("grpo"), needs=cfg.needs("grpo"), force=force, resumable=True)
    if stage.skipped:
        return

    from datasets import load_from_disk
    from trl import GRPOConfig, GRPOTrainer

    from jobs import modeling, rewards, training
    from jobs.dpo import starting_point
    from jobs.families import get_family
    from jobs.formats import FORMATS

    family = get_family(cfg.model.family)
    processor = modeling.load_processor(cfg.model)
    precision = modeling.training_precision(cfg.model, cfg.grpo)  # fp32 master weights for full fine-tuning
    # The config before the model, as in DPO: it sets up the processes that loading SFT's merged model waits on
    shards = training.shard_count(cfg, "grpo")
    args = training.trl_config(GRPOConfig, cfg.grpo, output_dir=stage.work / "checkpoints", seed=cfg.seed,
                               dtype=precision.compute, shards=shards,
                               defaults={"reward_weights": [reward.weight for reward in cfg.grpo.rewards],
                                         **vllm_server_address(cfg)})
    model, lineage, start = starting_point(cfg, stage.run_dir, from_sft, dtype=precision.weights, sharded=shards > 1,
                                           stage="grpo")
    # A completion ends where the template closes a turn, as evaluate's answers end (TRL stops at the eos ids of the
    # model's generation config and the tokenizer's)
    model.generation_config.eos_token_id = family.stop_token_ids(processor, model.generation_config)
    # Prompts, their images and gold answers; the reference completion is SFT's, not GRPO's (it samples its own)
    train = load_from_disk(stage.input("prepare") / "sft")["train"]
    train = train.select_columns([c for c in ("prompt", "images", "answers") if c in train.column_names])

    source = cfg.data.sft
    reward_funcs = [rewards.build(reward.name, relaxed=FORMATS[source.format].relaxed_accuracy,
                                  answer_after=source.answer_after) for reward in cfg.grpo.rewards]
    new_adapter = cfg.grpo.method != "full" and lineage["adapter"] is None
    with training.sharding(args, model):
        trainer = GRPOTrainer(
            model=model, reward_funcs=reward_funcs, args=args, train_dataset=train,
            processing_class=family.rendering_processor(processor),  # renders BOS in, as SFT trained the prompts
            peft_config=modeling.lora_config(cfg.grpo, family) if new_adapter else None,
            callbacks=training.callbacks("grpo", stage.work),
        )
    checkpoint = training.start(
        "grpo", trainer, work=stage.work, train_rows=len(train),
        extra={"method": cfg.grpo.method, "starting from": start,
               "rewards": " + ".join(f"{r.weight:g} x {r.name}" for r in cfg.grpo.rewards),
               "completions per prompt": args.num_generations, "generation batch": args.generation_batch_size,
               "max completion tokens": args.max_completion_length, "beta": args.beta,
               "generation": f"vLLM ({args.vllm_mode})" if args.use_vllm else "transformers generate",
               "sharded over": shards, "reference copy": trainer.ref_model is not None},
    )
    result = trainer.train(resume_from_checkpoint=checkpoint)
    training.stop_if_interrupted(trainer, "grpo")

    trained = {"base": "grpo/model"} if cfg.grpo.method == "full" else {**lineage, "adapter": "grpo/model"}
    training.save(trainer, processor, stage.work / "model", **trained)
    stage.finish(
        rows={"train": len(train)}, metrics=result.metrics, resumed_from=checkpoint, steps=result.global_step,
        method=cfg.grpo.method, starting_from=start, rewards=[r.name for r in cfg.grpo.rewards],
        quantized=bool(getattr(model, "is_loaded_in_4bit", False)), sharding=training.what_was_sharded(trainer),
    )


def vllm_server_address(cfg: recipes.Recipe) -> dict:
    """GRPOConfig.vllm_server_base_url: the server pod the launcher rendered beside this one, in server mode."""
    url = os.environ.get(recipes.VLLM_SERVER_URL_ENV)
    return {"vllm_server_base_url": url} if url and cfg.grpo.vllm_server_mode else {}


if __name__ == "__main__":
    entry.entrypoint(main, imports=("datasets", "trl:GRPOTrainer", "jobs.modeling", "jobs.training", "jobs.rewards"))
