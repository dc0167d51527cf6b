"""make bench: the dpo stage against the DPO blog's own plain script, on the same tiny model, data and arguments.

The plain script is the blog's ("Preference Optimization for VLMs with TRL", dpo_idefics2-8b.py): load_dataset, its
format function (chat template applied to strings, the thumbnail step at half the processor's size), DPOTrainer with
LoRA all-linear and the adapter switched off as reference; changed only where this machine forces it (the tiny model's
folder; no bf16 or 32 workers on a CPU; the model class transformers 5 names). vlmjobs runs as a user does,
``vlmjobs run`` of prepare + dpo, with its shared-prefix forward (the default) and without (dpo.shared_prefix: false),
so that what the shared prefix alone gives shows, each as a first run (the store of reference log-probs emptied
before it: it computes them), once more as a rerun that reads what the run before stored, and as a first run with
pairs batched by image size, then length (train_sampling_strategy: group_by_length, as the shipped Idefics2
recipes). Runs alternate, each in
a fresh process; the medians of --repeats runs are printed: samples/s of the training loop (the trainer's
train_samples_per_second) and of the whole process (samples / wall time: start-up, load, data, train, save), the
ratio to the blog's, peak resident memory, the mean train loss and the preference accuracy (rewards/accuracies) over
the last quarter of the steps. For vlmjobs also the seconds before the launcher starts the first stage and before
each stage prints anything (start-up: imports, loading).

The data is RLAIF-V-shaped with answers that are sentences of varying length (jobs.synthetic, sentences=True).

Two geometries (--geometry):
- tiny: jobs.tiny's model (600-token vocabulary, 64 image tokens an image for Idefics2), 32-96 px images;
- real: idefics2-8b's published config (the blog's checkpoint) made narrow and shallow only as far as a 2-core CPU
  needs (jobs.checkpoints.narrowed: 2 layers 256 wide, a vision tower of 2 layers and 2 heads), keeping its
  32,003-token vocabulary, its heads' width and its image geometry (64 image tokens an image; the vision tower sees
  every 14 px patch of images at RLAIF-V's sizes, 375-640 px, halved by the blog's thumbnail), 12 steps of 8 pairs
  (96 of the 360 training rows: a run shorter than an epoch). What stays unlike the checkpoint is said in the table:
  the vocabulary projection's share of a token's work (82% against 2%), and the tiny tokenizer's pieces per word.

    make bench                    # or: python tests/bench/dpo_vs_plain.py [--geometry=real] [--steps=40] [--repeats=3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The blog's script, as close as this machine and transformers 5 allow.
PLAIN = r'''
import json, sys
from datasets import features, load_dataset
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import DPOConfig, DPOTrainer
from peft import LoraConfig

model_dir, data_dir, out, steps, batch, lr, beta = sys.argv[1:4] + [int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7])]
model = AutoModelForImageTextToText.from_pretrained(model_dir)
processor = AutoProcessor.from_pretrained(model_dir, do_image_splitting=False)
dataset = load_dataset(data_dir, split="train")

def format(example):
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example["question"]}]}]
    chosen = [{"role": "assistant", "content": [{"type": "text", "text": example["chosen"]}]}]
    rejected = [{"role": "assistant", "content": [{"type": "text", "text": example["rejected"]}]}]
    prompt = processor.apply_chat_template(prompt, tokenize=False)
    chosen = processor.apply_chat_template(chosen, tokenize=False)
    rejected = processor.apply_chat_template(rejected, tokenize=False)
    max_size = processor.image_processor.size["longest_edge"] // 2
    example["image"].thumbnail((max_size, max_size))
    return {"images": [example["image"]], "prompt": prompt, "chosen": chosen, "rejected": rejected}

dataset = dataset.map(format, remove_columns=dataset.column_names)
f = dataset.features
f["images"] = features.Sequence(features.Image(decode=True))
dataset = dataset.cast(f)
training_args = DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr, beta=beta,
                          gradient_checkpointing=True, logging_steps=1, save_strategy="no", report_to="none",
                          max_length=None, bf16=False, use_cpu=True, dataloader_pin_memory=False, disable_tqdm=True)
trainer = DPOTrainer(model, ref_model=None, args=training_args, train_dataset=dataset, processing_class=processor,
                     peft_config=LoraConfig(target_modules="all-linear"))
result = trainer.train()
trainer.save_model(out)
print("METRICS " + json.dumps({"metrics": result.metrics, "log": trainer.state.log_history}))
'''


CHECKPOINTING = {"auto": "auto", "true": True, "false": False}


def measured(argv: list[str], env: dict) -> dict:
    """Run argv in a fresh process: wall seconds, peak RSS of the largest process in it, and when each output line
    came (seconds from the start)."""
    wrapper = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
               "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
    started = time.time()
    process = subprocess.Popen([sys.executable, "-c", wrapper, *argv], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines = [(time.time() - started, line) for line in process.stdout]
    if process.wait():
        tail = "".join(line for _, line in lines[-40:])
        raise SystemExit(f"bench: {' '.join(argv[:4])} failed:\n{tail}")
    peak = int(lines[-1][1].split()[1])
    return {"wall_s": time.time() - started, "peak_rss_mb": peak / 1024, "lines": lines}


def last_quarter(log: list[dict], key: str) -> float:
    values = [entry[key] for entry in log if key in entry]
    return statistics.mean(values[-max(1, len(values) // 4):])


def plain_run(work: Path, model_dir: Path, data_dir: Path, options, env: dict) -> dict:
    run = measured([sys.executable, "-c", PLAIN, str(model_dir), str(data_dir), str(work / "plain"), str(options.steps),
                    str(options.batch), str(options.lr), str(options.beta)], env)
    out = json.loads(next(line for _, line in run["lines"] if line.startswith("METRICS ")).split(" ", 1)[1])
    return {**run, "train_sps": out["metrics"]["train_samples_per_second"],
            "loss": last_quarter(out["log"], "loss"), "accuracy": last_quarter(out["log"], "rewards/accuracies")}


def vlmjobs_run(work: Path, model_dir: Path, data_dir: Path, options, env: dict, *, shared_prefix: bool,
                rerun: bool = False, grouped: bool = False) -> dict:
    """A first run (the reference log-probs' store emptied before it) or, ``rerun``, one that reads what the run
    before it stored, as a later run of the same data and model does (a nightly rerun, a beta sweep). ``grouped``:
    pairs batched by image size, then length, as the shipped Idefics2 recipes batch them."""
    name = "rerun" if rerun else "grouped" if grouped else "shared" if shared_prefix else "unshared"
    if not rerun:
        shutil.rmtree(work / "runs" / ".cache", ignore_errors=True)
    recipe = {
        "name": name, "stages": ["prepare", "dpo"], "run": {"root": str(work / "runs")},
        "model": {"name_or_path": str(model_dir), "family": options.family},
        "data": {"dpo": {"path": str(data_dir), "format": "rlaif-v"}},
        "prepare": {"image_scale": 0.5},  # the blog's thumbnail at half the processor's size
        "dpo": {"init": "base", "method": "lora", "shared_prefix": shared_prefix,
                "args": {"max_steps": options.steps, "per_device_train_batch_size": options.batch,
                         "learning_rate": options.lr, "beta": options.beta,
                         # auto as the shipped recipes say: recomputed only where the batch does not fit without
                         "activation_checkpointing": CHECKPOINTING[options.activation_checkpointing],
                         "logging_steps": 1, "save_strategy": "no",
                         **({"train_sampling_strategy": "group_by_length"} if grouped else {})}},
    }
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    run = measured([str(Path(sys.executable).with_name("vlmjobs")), "run", str(path), "--force"], env)
    record = json.loads((work / "runs" / name / "dpo" / "_SUCCESS.json").read_text())
    log = [json.loads(line) for line in (work / "runs" / name / "dpo" / "metrics.jsonl").read_text().splitlines()]
    # start-up: the launcher until it starts prepare; each stage from its start until its own first line
    times = [(t, line) for t, line in run["lines"]]
    starts = [i for i, (_, line) in enumerate(times) if line.startswith("==> ")]
    startup = {"launcher": times[starts[0]][0]}
    for i in starts[:-1]:
        stage = times[i][1].split()[1].rstrip(":")
        startup[stage] = times[i + 1][0] - times[i][0]
    return {**run, "train_sps": record["metrics"]["train_samples_per_second"], "startup": startup,
            "loss": last_quarter(log, "loss"), "accuracy": last_quarter(log, "rewards/accuracies")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="idefics2", help="the model's family (the blog trains Idefics2)")
    parser.add_argument("--geometry", default="tiny", choices=["tiny", "real"],
                        help="jobs.tiny's model, or the real checkpoint's config narrowed (jobs.checkpoints.narrowed)")
    parser.add_argument("--steps", type=int, default=None, help="40 tiny, 12 real")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--image-tokens", type=int, default=64,
                        help="the tiny Idefics2's tokens per image: idefics2-8b's 64, so that prompts weigh what the blog's do")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--activation-checkpointing", default="auto", choices=["auto", "true", "false"],
                        help="vlmjobs' setting (the blog's script recomputes: gradient_checkpointing=True)")
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    options.steps = options.steps or (12 if options.geometry == "real" else 40)
    work = options.out or Path(tempfile.mkdtemp(prefix="vlmjobs-dpo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    # datasets' own cache in the bench's folder: its key for a local folder need not change with the rows in it, so
    # the default cache handed the script an earlier bench's 40 rows instead of these 400 (vlmjobs' prepare keeps its own)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": tempfile.mkdtemp(prefix="datasets-cache-", dir=work),
           "TOKENIZERS_PARALLELISM": "false"}

    sys.path.insert(0, str(ROOT))
    from jobs import checkpoints, synthetic, tiny

    rows = synthetic.rlaif_v_rows(options.rows, sentences=True, chart_share=0)
    if options.geometry == "real":
        if options.family != "idefics2":
            raise SystemExit("--geometry real: the blog's script trains idefics2-8b (--family idefics2)")
        checkpoint = checkpoints.IDEFICS2_8B
        model_dir, data_dir = work / f"narrowed-{options.family}", work / "rlaif-v-sentences-real-sizes"
        if not model_dir.is_dir():
            checkpoints.save_narrowed(checkpoint, model_dir)
        rows = checkpoints.at_sizes(rows, checkpoints.RLAIF_V_SIZES)
        model = f"{checkpoint.name} narrowed ({geometry_note(model_dir, rows)})"
    else:
        image_tokens = options.image_tokens if options.family == "idefics2" else None
        model_dir, data_dir = work / f"tiny-{options.family}-{image_tokens}", work / "rlaif-v-sentences"
        if not model_dir.is_dir():
            tiny.build(options.family, model_dir, image_tokens=image_tokens)
        model = f"the tiny {options.family}" + (f" ({image_tokens} tokens per image)" if image_tokens else "")
    if not data_dir.is_dir():
        synthetic.write_splits("rlaif-v", data_dir, {"train": rows})

    runs = {"plain": [], "shared": [], "unshared": [], "rerun": [], "grouped": []}
    for repeat in range(options.repeats):  # alternating, so that a slow minute on a shared machine hits all of them
        runs["plain"].append(plain_run(work, model_dir, data_dir, options, env))
        runs["unshared"].append(vlmjobs_run(work, model_dir, data_dir, options, env, shared_prefix=False))
        runs["shared"].append(vlmjobs_run(work, model_dir, data_dir, options, env, shared_prefix=True))
        runs["rerun"].append(vlmjobs_run(work, model_dir, data_dir, options, env, shared_prefix=True, rerun=True))
        runs["grouped"].append(vlmjobs_run(work, model_dir, data_dir, options, env, shared_prefix=True, grouped=True))
        print(f"repeat {repeat + 1}/{options.repeats}: " + ", ".join(
            f"{name} {r[-1]['train_sps']:.2f} train samples/s, {r[-1]['wall_s']:.0f} s" for name, r in runs.items()), flush=True)

    samples = options.steps * options.batch
    median = {name: {key: statistics.median(r[key] for r in rs) for key in ("train_sps", "wall_s", "peak_rss_mb", "loss", "accuracy")}
              for name, rs in runs.items()}
    base = median["plain"]
    titles = {"plain": "blog script (one process)", "shared": "vlmjobs run: prepare + dpo, shared prefix",
              "unshared": "vlmjobs run: prepare + dpo, dpo.shared_prefix false",
              "rerun": "vlmjobs rerun (reference log-probs stored by the run before), shared prefix",
              "grouped": "vlmjobs run: prepare + dpo, shared prefix, grouped by image size and length (the shipped "
                         "recipe's train_sampling_strategy)"}
    lines = [f"DPO of {model}, LoRA all-linear, {options.steps} steps of {options.batch} pairs, lr {options.lr}, "
             f"beta {options.beta}, medians of {options.repeats} alternating runs, on {device()} ({os.cpu_count()} cores)", "",
             "| run | train samples/s | × blog | whole-process samples/s | × blog | wall s | peak RSS MB | loss | pref. accuracy |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in median.items():
        lines.append(f"| {titles[name]} | {m['train_sps']:.2f} | {m['train_sps'] / base['train_sps']:.2f} | "
                     f"{samples / m['wall_s']:.2f} | {base['wall_s'] / m['wall_s']:.2f} | {m['wall_s']:.1f} | "
                     f"{m['peak_rss_mb']:.0f} | {m['loss']:.3f} | {m['accuracy']:.2f} |")
    startup = {key: statistics.median(r["startup"][key] for r in runs["shared"]) for key in runs["shared"][0]["startup"]}
    lines += ["", "vlmjobs start-up (median s): " + ", ".join(
        f"{'launcher until the first stage starts' if k == 'launcher' else k + ' until its first output'} {v:.1f}"
        for k, v in startup.items())]
    print("\n".join(lines))
    (work / "bench-dpo.md").write_text("\n".join(lines) + "\n")
    print(f"\n(runs and this table in {work})")


def geometry_note(model_dir: Path, rows: list[dict]) -> str:
    """What a narrowed model keeps and what it does not, for the table's title."""
    from transformers import AutoConfig, AutoTokenizer

    from jobs.checkpoints import head_share

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    answers = [row[key] for row in rows for key in ("chosen", "rejected")]
    pieces = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    words = sum(len(a.split()) for a in answers)
    text = config.get_text_config()
    return (f"{text.num_hidden_layers} layers {text.hidden_size} wide, vocabulary {text.vocab_size:,}; the vocabulary "
            f"projection {head_share(config):.0%} of a token's work; answers {words / len(answers):.0f} words, "
            f"{pieces / words:.1f} tokens a word")


def device() -> str:
    probe = "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
