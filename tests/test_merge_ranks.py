"""Several processes rebuilding a merged-then-4-bit model (issue 11, item 4): DPO with QLoRA on top of SFT's merged
adapter, one process per GPU. Before, every process merged and saved into the same ``.merged-scratch`` folder, loaded
it and deleted it, under the others' feet. Now the main process alone merges and writes it, the others wait, all load
the same weights, and it is gone afterwards. Two processes on CPU (gloo), launched as the cluster launches a stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, run_stages

REBUILD = """
import json, os, sys
import torch
from transformers import PreTrainedModel
from jobs import modeling
from jobs import recipe as recipes

saved = []
save = PreTrainedModel.save_pretrained
def spy(self, path, *args, **kwargs):
    saved.append(str(path))
    return save(self, path, *args, **kwargs)
PreTrainedModel.save_pretrained = spy

cfg = recipes.load(sys.argv[1])
from trl import DPOConfig
from jobs import training
training.trl_config(DPOConfig, cfg.dpo, output_dir=cfg.run_dir / "scratch-args", seed=0, dtype=torch.float32)  # as dpo.py, first
model = modeling.load_trained(cfg, cfg.run_dir, "sft", quantize=modeling.quantization(cfg.dpo), merge=True)
fingerprint = sum(float(p.detach().float().sum()) for p in model.parameters())
quantized = bool(getattr(model, "is_loaded_in_4bit", False))
json.dump({"saved": saved, "fingerprint": fingerprint, "quantized": quantized}, open(f"rank-{os.environ['RANK']}.json", "w"))
"""


def test_two_processes_merge_once_load_the_same_weights_and_leave_no_scratch(write_recipe, tmp_path):
    train = {"method": "lora", "lora": {"r": 4, "lora_alpha": 8}, "args": {"max_steps": 1, "per_device_train_batch_size": 2}}
    path = write_recipe(stages=["prepare", "sft", "dpo"], prepare={"max_rows": 8}, sft=train, dpo={**train, "method": "qlora"})
    recipe = run_stages(path, "prepare", "sft")
    (tmp_path / "rebuild.py").write_text(REBUILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]), "CUDA_VISIBLE_DEVICES": ""}
    argv = [sys.executable, "-m", "launcher.distributed", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rebuild", str(path)]  # fmt: skip
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    scratch = str(recipe.run_dir / ".merged-scratch")
    assert [r["saved"] for r in ranks] == [[scratch], []], "the main process alone writes the merged copy"
    assert ranks[0]["quantized"] and ranks[1]["quantized"]
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"], "both processes train the same merged weights"
    assert not (recipe.run_dir / ".merged-scratch").exists()
