"""make bench: the sft stage against the source document's own plain SFT script, on the same data (issue 12).

The plain script is the TRL cookbook's Qwen2-VL ChartQA SFT ("Fine-tuning a VLM (Qwen2-VL-7B) with TRL"): its system
message and messages format, LoRA r 8 / alpha 16 / dropout 0.05 on q_proj and v_proj, its SFTConfig (gradient
checkpointing, adamw_torch_fused, max_grad_norm 0.3, warmup 0.03), SFTTrainer, train, save_model. Changed only where
this machine forces it: LoRA instead of QLoRA and float32 instead of bf16 on a CPU (bitsandbytes' 4-bit CPU fallback
would time bitsandbytes); Dataset.map instead of a list (TRL 1.16 refuses a list), the image as the images column
alone (map stores no image inside the messages); no hub push or trackio (no network), no evaluation during training, and the bench's steps,
batch and learning rate in place of its 3 epochs, batch 4 x 8 and 2e-4. vlmjobs runs the same training as a user does:
`vlmjobs run` of prepare then sft, with the same system message, LoRA, batch, steps and learning rate.

Both train the tiny Qwen2-VL (jobs.tiny) on synthetic ChartQA data whose images differ in size (jobs.synthetic), so
that Qwen2-VL's processor gives rows different numbers of image tokens. The arms alternate (in a rotating order),
each in fresh processes, --repeats times; the medians are reported:
- training loop samples/s: the trainer's train_samples_per_second (steps x batch / train_runtime);
- whole process samples/s: steps x batch / wall time of everything the user waits for (the script; the launcher and
  its prepare and sft processes);
- peak memory: the largest resident set of the processes; final loss: the last logged training loss. The plain script
  trains on every token of its messages (system prompt and image placeholders included), vlmjobs on the answer only,
  so their losses measure different things; the padded vlmjobs arm is the one to compare vlmjobs' loss with.
It is a benchmark, not a test: nothing here asserts a speed. On a CUDA machine the same runs use the GPU.

Two geometries (--geometry):
- tiny: jobs.tiny's Qwen2-VL (600-token vocabulary) with a pixel budget of --max-image-tokens, images --image-sides;
- real: Qwen2-VL-7B-Instruct's published config made narrow and shallow only as far as a 2-core CPU needs
  (jobs.checkpoints.narrowed: 2 layers 256 wide, a vision tower of 2 layers and 2 heads), keeping its 152,064-token
  vocabulary, its heads' width and its image processor (patch 14, merge 2, 4 to 1,280 image tokens an image), on
  charts at ChartQA's sizes (jobs.checkpoints.CHARTQA_SIZES: 165 to 1,230 image tokens), or all of one size
  (--one-size: 800 x 557, 580 tokens). What stays unlike the checkpoint is said in the table's title: the vocabulary
  projection's share of a token's work (94% against 8%). The text is the tiny tokenizer's (jobs.checkpoints).

    make bench                    # or: python tests/bench/sft_vs_plain.py [--geometry=real] [--steps=10] [--repeats=3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The cookbook's system message (its English original)
SYSTEM_MESSAGE = """You are a Vision Language Model specialized in interpreting visual data from chart images.
Your task is to analyze the provided chart image and respond to queries with concise answers, usually a single word, number, or short phrase.
The charts include a variety of types (e.g., line charts, bar charts) and contain colors, labels, and text.
Focus on delivering accurate, succinct answers based on the visual information. Avoid additional explanation unless absolutely necessary."""

LORA = {"lora_alpha": 16, "lora_dropout": 0.05, "r": 8, "bias": "none", "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}

PLAIN = r'''
import json, sys
import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor
from trl import SFTConfig, SFTTrainer

model_dir, data_dir, out, steps, batch, lr, system_message, lora = sys.argv[1:9]
steps, batch, lr, lora = int(steps), int(batch), float(lr), json.loads(lora)

def format_data(sample):
    return {"images": [sample["image"]],
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": system_message}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["query"]}]},
                {"role": "assistant", "content": [{"type": "text", "text": sample["label"][0]}]},
            ]}

train_dataset = load_dataset(data_dir, split="train")
train_dataset = train_dataset.map(format_data, remove_columns=train_dataset.column_names)
model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32)
processor = Qwen2VLProcessor.from_pretrained(model_dir)
peft_config = LoraConfig(**lora)
training_args = SFTConfig(
    output_dir=out, max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
    gradient_checkpointing_kwargs={"use_reentrant": False}, max_length=None, optim="adamw_torch_fused",
    learning_rate=lr, logging_steps=max(1, steps // 5), save_strategy="steps", save_steps=steps, bf16=False,
    max_grad_norm=0.3, warmup_steps=0.03, report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
)
trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_dataset, peft_config=peft_config,
                     processing_class=processor)
result = trainer.train()
trainer.save_model(training_args.output_dir)
losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
print("METRICS " + json.dumps({**result.metrics, "final_loss": losses[-1]}))
'''


CHECKPOINTING = {"auto": "auto", "true": True, "false": False}


def measured(argv: list[str], env: dict) -> dict:
    """Run argv in a fresh process; wall seconds and the peak RSS of its largest process (a wrapper waits for it)."""
    wrapper = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
               "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
    started = time.time()
    done = subprocess.run([sys.executable, "-c", wrapper, *argv], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"bench: {' '.join(argv[:4])} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    peak = int(done.stdout.rsplit("PEAK_KB", 1)[1].split()[0])
    return {"wall_s": time.time() - started, "peak_mb": peak / 1024, "stdout": done.stdout}


def plain_run(work: Path, model_dir: Path, data_dir: Path, options, env: dict, i: int) -> dict:
    out = work / f"plain-{i}"
    run = measured([sys.executable, "-c", PLAIN, str(model_dir), str(data_dir), str(out), str(options.steps), str(options.batch),
                    str(options.lr), SYSTEM_MESSAGE, json.dumps(LORA)], env)
    metrics = json.loads(run["stdout"].split("METRICS ", 1)[1].splitlines()[0])
    return {**run, "train_sps": metrics["train_samples_per_second"], "final_loss": metrics["final_loss"]}


def vlmjobs_run(work: Path, model_dir: Path, data_dir: Path, options, env: dict, i: int, padding_free: bool,
                grouped: bool = False) -> dict:
    name = f"bench-{'packed' if padding_free else 'grouped' if grouped else 'padded'}-{i}"
    grouping = {"train_sampling_strategy": "group_by_length"} if grouped else {}
    lora = {k: v for k, v in LORA.items() if k != "task_type"}  # the stage sets the task type
    recipe = {
        "name": name, "stages": ["prepare", "sft"], "run": {"root": str(work / "runs")},
        "model": {"name_or_path": str(model_dir), "family": "qwen2_vl"},
        "data": {"sft": {"path": str(data_dir), "format": "chartqa", "eval_split": "val", "test_split": "test",
                         "system_prompt": SYSTEM_MESSAGE}},
        "sft": {"method": "lora", "lora": lora, "padding_free": padding_free,
                "args": {"max_steps": options.steps, "per_device_train_batch_size": options.batch, "gradient_accumulation_steps": 1,
                         "optim": "adamw_torch_fused", "learning_rate": options.lr, "max_grad_norm": 0.3, "warmup_steps": 0.03,
                         "logging_steps": max(1, options.steps // 5), "save_steps": options.steps,
                         # the shipped recipes' auto (recomputed only where the batch does not fit without); the
                         # script's SFTConfig recomputes (TRL's default)
                         "activation_checkpointing": CHECKPOINTING[options.activation_checkpointing],
                         # the script evaluates nothing; the stage's eval loss (its default) would be timed in its loop
                         "eval_strategy": "no", **grouping}},
    }
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    run = measured([str(Path(sys.executable).with_name("vlmjobs")), "run", str(path)], env)
    sft = work / "runs" / name / "sft"
    metrics = json.loads((sft / "_SUCCESS.json").read_text())["metrics"]
    losses = [r["loss"] for r in map(json.loads, (sft / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return {**run, "train_sps": metrics["train_samples_per_second"], "final_loss": losses[-1]}


def with_image_budget(model_dir: Path, tokens: int) -> Path:
    """The tiny Qwen2-VL's processor with a pixel budget of ``tokens`` image tokens. The tiny model's own (16 tokens, a
    32 x 32 image) leaves rows made mostly of text; a real Qwen2-VL gives a ChartQA chart hundreds of image tokens, and
    how many differs from chart to chart, which is the shape padding-free batches are for."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    image_processor = processor.image_processor
    pixels = tokens * (image_processor.patch_size * image_processor.merge_size) ** 2
    image_processor.size.longest_edge = pixels
    if hasattr(image_processor, "max_pixels"):
        image_processor.max_pixels = pixels
    processor.save_pretrained(model_dir)
    return model_dir


def geometry_note(model_dir: Path, sizes: list[tuple[int, int]]) -> str:
    """What a narrowed model keeps and what it does not, for the table's title; the image tokens counted by its
    processor on images of ``sizes``."""
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor

    from jobs.checkpoints import head_share

    config, processor = AutoConfig.from_pretrained(model_dir), AutoProcessor.from_pretrained(model_dir)
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    tokens = [int((processor(text="<|vision_start|><|image_pad|><|vision_end|>", images=[Image.new("RGB", size)],
                             return_tensors="pt")["input_ids"] == pad).sum()) for size in sizes]
    text = config.get_text_config()
    return (f"{text.num_hidden_layers} layers {text.hidden_size} wide, vocabulary {text.vocab_size:,}; the vocabulary "
            f"projection {head_share(config):.0%} of a token's work; {min(tokens)}-{max(tokens)} image tokens an image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", default="tiny", choices=["tiny", "real"],
                        help="jobs.tiny's model, or the real checkpoint's config narrowed (jobs.checkpoints.narrowed)")
    parser.add_argument("--one-size", action="store_true", help="real geometry: every chart 800 x 557")
    parser.add_argument("--steps", type=int, default=None, help="10 tiny, 6 real")
    parser.add_argument("--batch", type=int, default=None, help="8 tiny, 4 real (the cookbook's)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--activation-checkpointing", default="auto", choices=["auto", "true", "false"],
                        help="vlmjobs' setting (the cookbook's script recomputes: TRL's default)")
    parser.add_argument("--image-sides", default="16,160", help="smallest,largest image side in pixels")
    parser.add_argument("--max-image-tokens", type=int, default=256,
                        help="the tiny processor's pixel budget, in image tokens (the tiny model's own: 16)")
    parser.add_argument("--without", default="", help="arms left out, by words of their names: e.g. padded (both "
                        "padded arms) or group_by_length; the plain script, the baseline, always runs")
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    real = options.geometry == "real"
    options.steps = options.steps or (6 if real else 10)
    options.batch = options.batch or (4 if real else 8)
    work = options.out or Path(tempfile.mkdtemp(prefix="vlmjobs-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    # datasets' own cache in the bench's folder: its key for a local folder need not change with the rows in it, so
    # the default cache can hand the script an earlier bench's data (vlmjobs' prepare keeps its own for that reason)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": tempfile.mkdtemp(prefix="datasets-cache-", dir=work)}

    sys.path.insert(0, str(ROOT))
    from jobs import checkpoints, synthetic, tiny

    if real:
        model_dir = work / "narrowed-qwen2_vl"
        if not model_dir.is_dir():
            checkpoints.save_narrowed(checkpoints.QWEN2_VL_7B, model_dir)
        sizes = checkpoints.CHARTQA_SIZES[:1] if options.one_size else checkpoints.CHARTQA_SIZES
        data_dir = work / ("chartqa-one-size" if options.one_size else "chartqa-real-sizes")
        if not data_dir.is_dir():
            splits = {split: checkpoints.at_sizes(synthetic.chartqa_rows(rows, seed=seed), sizes)
                      for split, rows, seed in (("train", 400, 0), ("val", 40, 1), ("test", 40, 2))}
            synthetic.write_splits("chartqa", data_dir, splits)
        images = f"charts {'of one size, ' + 'x'.join(map(str, sizes[0])) if options.one_size else 'at ChartQA sizes'}"
        model = f"{checkpoints.QWEN2_VL_7B.name} narrowed ({geometry_note(model_dir, sizes)})"
    else:
        sides = tuple(int(s) for s in options.image_sides.split(","))
        model_dir = work / f"tiny-qwen2_vl-{options.max_image_tokens}"
        if not model_dir.is_dir():
            with_image_budget(tiny.build("qwen2_vl", model_dir), options.max_image_tokens)
        data_dir = work / f"chartqa-{sides[0]}-{sides[1]}"
        if not data_dir.is_dir():
            synthetic.write("chartqa", data_dir, rows=400, image_sides=sides)
        images, model = f"images {sides[0]}-{sides[1]} px a side", "the tiny Qwen2-VL"

    arms = {
        "plain script (cookbook)": lambda i: plain_run(work, model_dir, data_dir, options, env, i),
        "vlmjobs run (prepare + sft, padding-free)": lambda i: vlmjobs_run(work, model_dir, data_dir, options, env, i, True),
        "vlmjobs run (prepare + sft, padded)": lambda i: vlmjobs_run(work, model_dir, data_dir, options, env, i, False),
        "vlmjobs run (prepare + sft, padded, group_by_length)":
            lambda i: vlmjobs_run(work, model_dir, data_dir, options, env, i, False, grouped=True),
    }
    if options.one_size:  # rows of one image size are all about as long: nothing to group
        del arms["vlmjobs run (prepare + sft, padded, group_by_length)"]
    left_out = [word for word in options.without.split(",") if word]
    arms = {name: run for name, run in arms.items() if name.startswith("plain") or not any(w in name for w in left_out)}
    results: dict[str, list[dict]] = {name: [] for name in arms}
    names = list(arms)
    for i in range(options.repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:  # a rotating order: no arm always runs first
            results[name].append(arms[name](i))
            print(f"bench: {name}, run {i + 1}: {results[name][-1]['wall_s']:.1f} s, "
                  f"{results[name][-1]['train_sps']:.2f} training samples/s", flush=True)

    samples = options.steps * options.batch
    median = {name: {key: statistics.median(r[key] for r in runs) for key in ("train_sps", "wall_s", "peak_mb", "final_loss")}
              for name, runs in results.items()}
    for row in median.values():
        row["whole_sps"] = samples / row["wall_s"]
    base = median[names[0]]
    device = "cuda" if "cuda" in subprocess.run([sys.executable, "-c", "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"],
                                                 capture_output=True, text=True).stdout else "cpu"
    lines = [
        f"SFT of {model}, LoRA r 8 on q/v, {options.steps} steps of {options.batch} rows, lr {options.lr:g}, {images}; "
        f"median of {options.repeats} alternating runs; {datetime.date.today()}, {device}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "",
        "| run | training loop samples/s | x plain | whole process samples/s | x plain | wall s | peak RSS MB | final loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in median.items():
        lines.append(f"| {name} | {row['train_sps']:.2f} | {row['train_sps'] / base['train_sps']:.2f} | {row['whole_sps']:.2f} | "
                     f"{row['whole_sps'] / base['whole_sps']:.2f} | {row['wall_s']:.1f} | {row['peak_mb']:.0f} | {row['final_loss']:.3f} |")
    print("\n".join(lines))
    (work / "bench.md").write_text("\n".join(lines) + "\n")
    (work / "bench.json").write_text(json.dumps({"median": median, "runs": {n: [{k: v for k, v in r.items() if k != "stdout"} for r in runs]
                                                                             for n, runs in results.items()}}, indent=1))
    print(f"\n(runs, this table and every run's figures in {work})")


if __name__ == "__main__":
    main()
