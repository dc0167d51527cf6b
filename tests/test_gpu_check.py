"""make gpu-check in miniature (issue 24): the GPU check's own code on the CPU with a tiny model, so that a GPU minute
is never spent finding a typo; and the wheels it installs are the lock's."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("case, settled, attention, micro, predicted_gb", [
    # the recipe's micro-batch left to the stage: on a CPU the whole per-process batch, its effective 32, unprobed;
    # its padding-free rows attend each alone. QLoRA on the real Qwen2-VL-7B: 4-bit weights, bf16 embeddings and head
    ("qwen2-vl-7b SFT QLoRA, vlmjobs", "micro-batch 32 without activation checkpointing (effective batch 32 over 1 "
     "process), not probed", "sdpa_by_row", 32, (5, 7)),
    # its recomputation left to the probe (one layer in 8 on a 24 GB GPU, by the FLOPs table's count): none on a CPU,
    # unprobed; the shared-prefix step after the cached reference pass. QLoRA on the real SmolVLM
    ("SmolVLM DPO QLoRA, vlmjobs", "activation_checkpointing auto: micro-batch 1 without activation checkpointing",
     "sdpa", 1, (1, 2.5)),
], ids=["qwen2-vl-auto-micro-batch", "smolvlm-dpo-auto-recomputation"])
def test_the_gpu_check_settles_the_recipes_auto_settings_as_the_stage_does(case, settled, attention, micro,
                                                                          predicted_gb, monkeypatch, capsys):
    """The check settles a recipe's auto settings with the stage's own search (jobs.auto_batch.fit) and prints what it
    settled in its table, beside `vlmjobs memory`'s estimate for the real checkpoint."""
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--tiny", "--steps", "1", "--only", case])
    gpu_check().main()
    out = capsys.readouterr().out
    assert settled in out
    row = re.search(rf"^\| {case} \({attention}\) \| 1 \| {micro} \| off \| (\d+) \| ([\d.e+-]+) \|  \|  \| "
                    r"([\d.]+) \|$", out, re.MULTILINE)
    assert row, "no table row for the case"
    assert predicted_gb[0] < float(row.group(3)) < predicted_gb[1]


def test_a_case_is_held_to_the_recipes_gpus_memory_and_released_even_when_it_fails(monkeypatch):
    """On an H100 the check settles an L4 recipe's auto settings within the L4's 24 GiB (torch's per-process memory
    fraction) and lets the next case have the whole GPU again, whether or not this one ended well."""
    import torch

    from jobs import checkpoints
    from jobs import recipe as recipes

    fractions = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: type("H100", (), {"total_memory": 80 * 2**30}))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", fractions.append)
    cfg = recipes.load(ROOT / checkpoints.SMOLVLM.recipe)  # resources: an L4, gpu_memory_gib 24
    check = gpu_check()
    with pytest.raises(RuntimeError, match="out of memory"):
        with check.on_the_recipes_gpu(cfg, "dpo", held=True):
            assert fractions == [24 / 80]
            raise RuntimeError("CUDA out of memory")
    assert fractions == [24 / 80, 1.0]
    with check.on_the_recipes_gpu(cfg, "dpo", held=False):  # TRL's defaults, as their script ran: not held
        pass
    assert fractions == [24 / 80, 1.0]


def test_the_wheels_it_installs_are_the_locks_versions():
    locked = dict(line.split(" ")[0].split("==") for line in (ROOT / "requirements.lock").read_text().splitlines()
                  if "==" in line and not line.startswith(("#", " ")))
    for wheel in gpu_check().WHEELS:
        name, version = wheel.split("==")
        assert locked.get(name) == version, f"{wheel}: requirements.lock has {name}=={locked.get(name)}"
