"""make bench: the sft stage against the plain script of the source documents, on the same data.

The plain script is what the TRL cookbook and the DPO blog do in a notebook: load_dataset, a
format function with the thumbnail step, SFTTrainer, train. vlmjobs runs prepare then sft as the
local runner does. Both train the tiny LLaVA on the synthetic ChartQA-shaped data with the same
arguments, each in a fresh process; reported are wall time, the trainer's own train_runtime and
steps/s, and peak resident memory. On a CUDA machine the same runs use the GPU.

    make bench                    # or: python tests/bench/sft_vs_plain.py [--steps=60] [--out=DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PLAIN = r'''
import json, sys, time
from datasets import load_dataset
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig, SFTTrainer

model_dir, data_dir, out, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = AutoModelForImageTextToText.from_pretrained(model_dir)
processor = AutoProcessor.from_pretrained(model_dir)
max_size = processor.image_processor.size["shortest_edge"]

def format_data(sample):
    image = sample["image"]
    image.thumbnail((max_size * 4, max_size))  # the blog's thumbnail step, for CLIP's shortest edge
    return {"images": [image],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["query"]}]}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": sample["label"][0] + processor.tokenizer.eos_token}]}]}

train = load_dataset(data_dir, split="train")
train = train.map(format_data, remove_columns=train.column_names)
args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=16, learning_rate=1e-3, warmup_steps=0.1,
                 gradient_checkpointing=False, logging_steps=steps, save_strategy="no", report_to="none",
                 max_length=None, bf16=False, disable_tqdm=True)
result = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=processor).train()
print("METRICS " + json.dumps(result.metrics))
'''


def measured(argv: list[str], env: dict) -> dict:
    """Run argv in a fresh process; wall seconds and its peak RSS (via a wrapper that waits for it alone)."""
    wrapper = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
               "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
    started = time.time()
    done = subprocess.run([sys.executable, "-c", wrapper, *argv], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"bench: {' '.join(argv[:4])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    peak = int(done.stdout.rsplit("PEAK_KB", 1)[1].split()[0])
    return {"wall_s": time.time() - started, "peak_rss_mb": peak / 1024, "stdout": done.stdout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    work = options.out or Path(tempfile.mkdtemp(prefix="vlmjobs-bench-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    sys.path.insert(0, str(ROOT))
    from jobs import synthetic, tiny

    model_dir = tiny.build("llava", work / "tiny-llava") if not (work / "tiny-llava").is_dir() else work / "tiny-llava"
    data_dir = synthetic.write("chartqa", work / "chartqa", rows=400) if not (work / "chartqa").is_dir() else work / "chartqa"

    plain = measured([sys.executable, "-c", PLAIN, str(model_dir), str(data_dir), str(work / "plain"), str(options.steps)], env)
    plain_metrics = json.loads(plain["stdout"].split("METRICS ", 1)[1].splitlines()[0])

    recipe = {
        "name": "bench", "stages": ["prepare", "sft"], "run": {"root": str(work / "runs")},
        "model": {"name_or_path": str(model_dir), "family": "llava"},
        "data": {"sft": {"path": str(data_dir), "format": "chartqa", "eval_split": "val", "test_split": "test"}},
        "sft": {"method": "full", "args": {"max_steps": options.steps, "per_device_train_batch_size": 16, "learning_rate": 1e-3,
                                           "warmup_steps": 0.1, "gradient_checkpointing": False, "logging_steps": options.steps,
                                           "save_steps": options.steps}},
    }
    path = work / "bench.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    prepare = measured([sys.executable, "-m", "jobs.prepare", f"--recipe={path}", "--force"], env)
    sft = measured([sys.executable, "-m", "jobs.sft", f"--recipe={path}", "--force"], env)
    stage_metrics = json.loads((work / "runs" / "bench" / "sft" / "_SUCCESS.json").read_text())["metrics"]

    rows = [
        ("plain script (load, format, train)", plain["wall_s"], plain_metrics["train_runtime"], plain_metrics["train_steps_per_second"], plain["peak_rss_mb"]),
        ("vlmjobs prepare", prepare["wall_s"], None, None, prepare["peak_rss_mb"]),
        ("vlmjobs sft", sft["wall_s"], stage_metrics["train_runtime"], stage_metrics["train_steps_per_second"], sft["peak_rss_mb"]),
    ]
    device = "cuda" if "cuda" in subprocess.run([sys.executable, "-c", "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"],
                                                 capture_output=True, text=True).stdout else "cpu"
    lines = [f"SFT of the tiny LLaVA, {options.steps} steps of 16 rows, on {device} ({os.cpu_count()} cores)", "",
             "| run | wall s | train_runtime s | steps/s | peak RSS MB |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, wall, runtime, speed, peak in rows:
        lines.append(f"| {name} | {wall:.1f} | {'' if runtime is None else f'{runtime:.1f}'} | {'' if speed is None else f'{speed:.2f}'} | {peak:.0f} |")
    print("\n".join(lines))
    (work / "bench.md").write_text("\n".join(lines) + "\n")
    print(f"\n(runs and this table in {work})")


if __name__ == "__main__":
    main()
