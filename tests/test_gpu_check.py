"""make gpu-check in miniature (issue 24): the GPU check's own code on the CPU with a tiny model, so that a GPU minute
is never spent finding a typo; and the wheels it installs are the lock's."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_check_runs_a_case_on_the_cpu_in_miniature(monkeypatch, capsys):
    """The shared-prefix DPO case end to end (model, rows at real image sizes, the stage's trainer, the reference pass
    read from the batches, a timed step, a counted step, `vlmjobs memory` of the real idefics2-8b): one row of the table."""
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--tiny", "--steps", "1", "--only", "idefics2-8b DPO, vlmjobs"])
    gpu_check().main()
    # the recipe's activation_checkpointing: auto, settled as the stage settles it: the tiny batch fits without
    row = re.search(r"^\| idefics2-8b DPO, vlmjobs \(sdpa\) \| 1 \| 2 \| off \| (\d+) \| ([\d.e+-]+) \|  \|  \| "
                    r"([\d.]+) \|$",
                    capsys.readouterr().out, re.MULTILINE)
    assert row, "no table row for the case"
    tokens_per_s, tflop_per_step, predicted_gb = (float(v) for v in row.groups())
    assert tokens_per_s > 0 and tflop_per_step > 0
    # the blog's LoRA on bf16 idefics2-8b with no reference copy (jobs/memory.py's docstring: 16.8 GB for the blog's 8B)
    assert 16 < predicted_gb < 18


def test_the_gpu_check_settles_an_auto_micro_batch_as_the_stage_does(monkeypatch, capsys):
    """The Qwen2-VL recipe leaves its micro-batch to the stage (per_device_train_batch_size: auto): the check settles it
    with the stage's own search (jobs.auto_batch.fit), which on a CPU takes the whole per-process batch, the recipe's
    effective batch of 32, unprobed; its padding-free rows attend each alone."""
    case = "qwen2-vl-7b SFT QLoRA, vlmjobs"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--tiny", "--steps", "1", "--only", case])
    gpu_check().main()
    out = capsys.readouterr().out
    assert "micro-batch 32 without activation checkpointing (effective batch 32 over 1 process), not probed" in out
    row = re.search(rf"^\| {case} \(sdpa_by_row\) \| 1 \| 32 \| off \| (\d+) \| ([\d.e+-]+) \|  \|  \| ([\d.]+) \|$",
                    out, re.MULTILINE)
    assert row, "no table row for the case"
    assert 5 < float(row.group(3)) < 7  # QLoRA on the real Qwen2-VL-7B: 4-bit weights, bf16 embeddings and head


def test_the_gpu_check_runs_smolvlm_dpo_as_the_stage_does(monkeypatch, capsys):
    """SmolVLM DPO, whose recipe leaves activation checkpointing to the probe (one layer in 8 recomputed on a 24 GB
    GPU, by the FLOPs table's count): the check settles it with the stage's own search, unprobed on a CPU (none), and
    runs the shared-prefix step after the cached reference pass."""
    case = "SmolVLM DPO QLoRA, vlmjobs"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--tiny", "--steps", "1", "--only", case])
    gpu_check().main()
    out = capsys.readouterr().out
    assert "activation_checkpointing auto: micro-batch 1 without activation checkpointing" in out
    row = re.search(rf"^\| {case} \(sdpa\) \| 1 \| 1 \| off \| (\d+) \| ([\d.e+-]+) \|  \|  \| ([\d.]+) \|$",
                    out, re.MULTILINE)
    assert row, "no table row for the case"
    assert 1 < float(row.group(3)) < 2.5  # QLoRA on the real SmolVLM: 4-bit weights, bf16 embeddings and head


def test_the_wheels_it_installs_are_the_locks_versions():
    locked = dict(line.split(" ")[0].split("==") for line in (ROOT / "requirements.lock").read_text().splitlines()
                  if "==" in line and not line.startswith(("#", " ")))
    for wheel in gpu_check().WHEELS:
        name, version = wheel.split("==")
        assert locked.get(name) == version, f"{wheel}: requirements.lock has {name}=={locked.get(name)}"
