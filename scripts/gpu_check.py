"""make gpu-check: the seed recipes on one H100/H200 at their real sizes, random weights in bf16, in one call (issue 24).

For each case, a few dozen optimizer steps of the trainer the recipe runs (vlmjobs' stage trainer, built as
tests/bench/flops_table.py builds it) or TRL's defaults, on rows with the checkpoint's real image geometry, and for each:
tokens/s, model FLOPs utilisation (the FLOPs torch's FlopCounterMode counts for one step, times the steps, over the
time, against the chip's dense bf16 peak), and peak memory (torch.cuda.max_memory_allocated) beside `vlmjobs memory`'s
prediction for the stage (weights, reference, gradients and optimizer: activations come on top of it).

    cases: idefics2-8b DPO (vlmjobs: shared prefix, cached reference; TRL: reference at every step),
           qwen2-vl-7b SFT QLoRA 4-bit (vlmjobs, TRL), SmolVLM SFT padding-free with the best attention available
           (flash_attention_2 where flash-attn is installed, else sdpa, which padding-free SFT runs on each row alone:
           the image has no compiler for flex_attention's kernels), and merging SmolVLM's adapter on CUDA.

The GPU machines may carry their own torch and no network: ``--wheels DIR`` installs, with pip and no index, the
project's other locked wheels the check imports (WHEELS: pure Python, plus bitsandbytes and docopt's sdist) from DIR
before anything else is imported. ``--tiny`` runs the same code on the CPU with the tiny models of the same families, two
steps each, no 4-bit (bitsandbytes' 4-bit training wants CUDA): ``make test`` runs it (tests/test_gpu_check.py), so
that a GPU minute is never spent finding a typo.

    python scripts/gpu_check.py --wheels /path/to/wheels [--steps 30] [--only "qwen2-vl-7b SFT"]
    python scripts/gpu_check.py --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# What --wheels installs: requirements.lock's versions, 58.4 MiB together (bitsandbytes' manylinux wheel 41.1 MiB,
# transformers 12.7 MiB; pip download, 2026-12-06). The GPU
# machine's own torch, numpy, pyarrow, tokenizers, safetensors, pillow and PyYAML are used as they are.
WHEELS = (
    "transformers==5.23.0", "trl==1.16.0", "peft==0.21.2", "accelerate==1.15.0", "datasets==5.2.0",
    "huggingface_hub==2.4.0", "fsspec==2026.9.0", "filelock==4.2.11", "dill==0.4.1", "multiprocess==0.70.19",
    "tqdm==4.70.1", "fire==0.7.1", "termcolor==3.3.0", "num2words==0.5.14", "docopt==0.6.2", "bitsandbytes==0.50.2",
)
# Dense bf16 peak FLOP/s by the name torch.cuda gives the device (NVIDIA's datasheets, SXM, without sparsity)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}
CASES = {  # name: (checkpoint in jobs.checkpoints, stage, way, recipe changes)
    "idefics2-8b DPO, vlmjobs": ("IDEFICS2_8B", "dpo", "vlmjobs", {}),
    "idefics2-8b DPO, TRL defaults": ("IDEFICS2_8B", "dpo", "trl", {}),
    "qwen2-vl-7b SFT QLoRA, vlmjobs": ("QWEN2_VL_7B", "sft", "vlmjobs", {}),
    "qwen2-vl-7b SFT QLoRA, TRL defaults": ("QWEN2_VL_7B", "sft", "trl", {}),
    "SmolVLM SFT padding-free": ("SMOLVLM_SFT", "sft", "padding-free", {"method": "lora"}),
    # its longest pairs fit a 24 GB GPU with one layer in 8 recomputed, by the FLOPs table's count; here the probe says
    "SmolVLM DPO QLoRA, vlmjobs": ("SMOLVLM", "dpo", "vlmjobs", {}),
}


def install(wheels: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), *WHEELS],
                   check=True)


def best_attention() -> str:
    import importlib.util

    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"  # sdpa: by row, padding-free


def peak_flops(device: str) -> float | None:
    import torch

    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def model_for(checkpoint, family, *, tiny: bool, quantize: dict | None, attention: str, dtype, work: Path):
    """(model, processor): random weights of the checkpoint's size in ``dtype`` on the GPU, or the tiny model of its
    family. 4-bit goes through a saved copy, since bitsandbytes quantizes as from_pretrained loads."""
    import torch
    import transformers

    from jobs import checkpoints, modeling
    from jobs import tiny as tiny_models
    from jobs.recipe import Model

    if tiny:
        folder = work / f"tiny-{checkpoint.family}"
        if not folder.is_dir():
            tiny_models.build(checkpoint.family, folder)
        spec = Model(name_or_path=str(folder), family=checkpoint.family)
        return modeling.load_model(spec, dtype=dtype), modeling.load_processor(spec)
    processor = checkpoints.processor(checkpoint)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = getattr(transformers, family.model_class)(checkpoints.config(checkpoint, processor.tokenizer))
    finally:
        torch.set_default_dtype(default)
    model.set_attn_implementation(attention)
    if quantize is None:
        return model, processor
    folder = work / f"random-{checkpoint.family}"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    spec = Model(name_or_path=str(folder), family=checkpoint.family, attn_implementation=attention)
    return modeling.load_model(spec, quantize=quantize, dtype=dtype), processor


def run_case(name: str, options, work: Path) -> dict:
    import torch

    from jobs import auto_batch, checkpoints, flops, modeling, reference_logprobs
    from jobs import recipe as recipes
    from jobs.families import get_family
    from tests.bench import flops_table

    checkpoint_name, stage, way, changes = CASES[name]
    checkpoint = getattr(checkpoints, checkpoint_name)
    changes = {f"{stage}.{key}": value for key, value in changes.items()}
    cfg = recipes.load(ROOT / checkpoint.recipe, changes)
    family = get_family(checkpoint.family)
    cuda = not options.tiny
    dtype = torch.bfloat16 if cuda else torch.float32
    attention = best_attention() if way == "padding-free" and cuda else "sdpa"
    quantize = modeling.quantization(getattr(cfg, stage), dtype=dtype) if cuda else None
    model, processor = model_for(checkpoint, family, tiny=options.tiny, quantize=quantize, attention=attention,
                                 dtype=dtype, work=work)
    if cuda:  # from the loaded weights on: the bf16 copy that 4-bit loading was made from is gone
        torch.cuda.reset_peak_memory_stats()
    schedule = flops_table.schedule(cfg, stage, checkpoint, seed_defaults=way == "trl")
    # per_device_train_batch_size auto: the stage's search starts from the whole per-process batch (one GPU), and
    # its longest rows are among these; the micro-batch it settles cycles over them
    auto = schedule["batch"] == flops_table.AUTO
    batch = schedule["effective"] if auto else schedule["batch"]
    count = batch if auto else batch * options.steps
    rows = (flops_table.dpo_rows(count, None) if stage == "dpo"
            else flops_table.sft_rows(count, cfg.data.sft.system_prompt))
    case_work = work / name.replace(" ", "-").replace(",", "")
    args = flops_table.args_for(cfg, stage, case_work, batch=batch, steps=options.steps, seed_defaults=way == "trl",
                                dtype=dtype)
    build = flops_table.dpo_trainer if stage == "dpo" else flops_table.sft_trainer
    trainer = build(way, cfg, family, model, processor, rows, None, args)
    started = time.time()
    if stage == "dpo" and way != "trl":  # the stage's reference pass, once, then read from the batches
        chosen, rejected = reference_logprobs.compute(trainer, trainer.train_dataset, "train")
        trainer.train_dataset = (trainer.train_dataset.add_column(reference_logprobs.COLUMNS[0], chosen.tolist())
                                 .add_column(reference_logprobs.COLUMNS[1], rejected.tolist()))
        reference_logprobs.read_from_batches(trainer)
    reference_s = time.time() - started
    with on_the_recipes_gpu(cfg, stage, held=cuda and way != "trl"):
        if way != "trl":
            settle(trainer, cfg, stage, case_work)
        result = trainer.train()
        seconds = result.metrics["train_runtime"]
        tokens = next(entry["num_tokens"] for entry in reversed(trainer.state.log_history) if "num_tokens" in entry)
        peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
        # FLOPs: one more step of the same trainer, counted apart (the counter slows the step it watches)
        trainer.args.max_steps = 1
        step_flops = flops.count(trainer.train)
    chip = peak_flops("cuda" if cuda else "cpu")
    # of the real checkpoint, even --tiny
    estimate = flops_table.memory_before_activations(cfg, stage, checkpoints.config(checkpoint, processor.tokenizer),
                                                     work / f"config-{checkpoint.family}")
    out = {"case": name, "steps": options.steps, "tokens/s": tokens / seconds, "reference s": reference_s,
           "TFLOP/step": step_flops / 1e12, "MFU": step_flops * options.steps / seconds / chip if chip else None,
           "peak GB": peak, "predicted GB": estimate, "attention": text_attention(model),
           "micro-batch": trainer.args.per_device_train_batch_size,
           "recomputed": checkpointed(auto_batch.recomputed_every(trainer.args))}
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return out


@contextlib.contextmanager
def on_the_recipes_gpu(cfg, stage: str, *, held: bool):
    """Torch held, where ``held``, to the memory of the recipe's GPU (an L4's 24 GB on an H100 or H200: its
    per-process memory fraction), so that the stage's auto settings settle, and its training peaks, as there; lifted
    after."""
    import torch

    if not held:
        yield
        return
    whole = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.resources_for(stage).gpu_memory_gib * 2**30 / whole))
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def text_attention(model) -> str:
    """The attention the model's text runs (padding-free SFT under sdpa: each row alone, jobs.packing.attend_by_row)."""
    from jobs import upstream

    return upstream.attention_implementation(getattr(model.config, "text_config", None) or model.config)


def checkpointed(every: int) -> str:
    """Which layers activation checkpointing recomputes, for the table (jobs.auto_batch.recomputed_every)."""
    return {0: "off", 1: "every layer"}.get(every, f"one layer in {every}")


def settle(trainer, cfg, stage: str, work: Path) -> None:
    """The recipe's ``auto`` settings (the micro-batch, activation checkpointing) settled as the stage settles them:
    by jobs.auto_batch.fit itself, probing on the GPU (held to the recipe's GPU's memory: ``on_the_recipes_gpu``). An
    optimizer step is then one micro-batch: the check measures throughput, to which accumulation adds nothing."""
    from types import SimpleNamespace

    from jobs import auto_batch, modeling

    train = getattr(cfg, stage)
    placed = SimpleNamespace(name=stage, work=work, out=work)  # where fit keeps what it found (a run's stage folder)
    auto_batch.fit(placed, trainer, train, model=cfg.model, precision=modeling.training_precision(cfg.model, train))
    trainer.args.gradient_accumulation_steps = 1


def merge_on_cuda(work: Path, options) -> dict:
    """SmolVLM with a LoRA adapter on every linear layer, merged into its weights on the device (peft's
    merge_and_unload, merge_push's path after LoRA)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from jobs import checkpoints
    from jobs.families import get_family

    family = get_family("idefics3")
    model, _ = model_for(checkpoints.SMOLVLM, family, tiny=options.tiny, quantize=None, attention="sdpa",
                         dtype=torch.float32 if options.tiny else torch.bfloat16, work=work)
    model = get_peft_model(model, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    started = time.time()
    merged = model.merge_and_unload()
    if not options.tiny:
        torch.cuda.synchronize()
    return {"case": "SmolVLM merge", "seconds": time.time() - started, "device": str(next(merged.parameters()).device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, default=None, help="a folder holding WHEELS, installed first")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps a case (30; --tiny: 2)")
    parser.add_argument("--tiny", action="store_true", help="the tiny models on the CPU: the check of the check")
    parser.add_argument("--only", default=None, help="one case: " + "; ".join(CASES))
    options = parser.parse_args()
    if options.wheels:
        install(options.wheels)
    options.steps = options.steps or (2 if options.tiny else 30)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if not options.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device; --tiny runs the check's code on the CPU")
    work = Path(tempfile.mkdtemp(prefix="vlmjobs-gpu-check-"))
    results = []
    for name in CASES:
        if options.only and name != options.only:
            continue
        if options.tiny and "QLoRA" in name:
            print(f"{name}: as LoRA on the CPU (4-bit training wants CUDA)")
        results.append(run_case(name, options, work))
        print(results[-1], flush=True)
    if not options.only:
        results.append(merge_on_cuda(work, options))
    print("\n| case | steps | micro-batch | activation checkpointing | tokens/s | TFLOP/step | MFU | peak GB | "
          "`vlmjobs memory` GB (before activations) |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        if "tokens/s" not in r:
            print(f"| {r['case']} | | | | | | | | (merged on {r['device']} in {r['seconds']:.1f} s) |")
            continue
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        print(f"| {r['case']} ({r['attention']}) | {r['steps']} | {r['micro-batch']} | "
              f"{r['recomputed']} | "
              f"{r['tokens/s']:.0f} | {r['TFLOP/step']:.3g} | "
              f"{fmt(r['MFU'], '.1%')} | {fmt(r['peak GB'], '.1f')} | {fmt(r['predicted GB'], '.1f')} |")


if __name__ == "__main__":
    main()
