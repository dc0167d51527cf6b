"""Whole manifests, compared with tests/golden/. After an intended change: `make goldens`
(VLMJOBS_UPDATE_GOLDENS=1) rewrites them; review the diff like code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobs import recipe as recipes
from launcher import render
from tests.launcher.conftest import IMAGE, MULTI, SINGLE, make

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
# The shipped open-r1 GRPO recipe with vLLM as a server pod beside its 8 trainer GPUs instead of colocated in them
OPEN_R1_GRPO = GOLDEN.parents[1] / "recipes" / "qwen25vl-3b-open-r1-grpo.yaml"
VLLM_SERVER = {"grpo.args.use_vllm": True, "grpo.args.vllm_mode": "server", "grpo.vllm_server.image": "ghcr.io/vlmjobs/vllm-trl:0.31.0-trl1.16.0"}
UPDATE = os.environ.get("VLMJOBS_UPDATE_GOLDENS") == "1"

CASES = {
    **{
        f"single-{stage}": (lambda stage=stage: render.render_stage(make(SINGLE), stage, IMAGE))
        for stage in make(SINGLE).stages
    },
    "multi-node-dpo": lambda: render.render_stage(make(MULTI), "dpo", IMAGE),
    "grpo-vllm-server": lambda: render.render_stage(recipes.load(OPEN_R1_GRPO, VLLM_SERVER), "grpo", IMAGE),
    "target-1.29-sft": lambda: render.render_stage(make(SINGLE, **{"kubernetes.target_version": "1.29"}), "sft", IMAGE),
    "driver": lambda: [render.render_driver_job(make(SINGLE), IMAGE)],
    "cronjob": lambda: [render.render_cronjob(make(SINGLE), IMAGE)],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_manifests_match_their_golden(name):
    text = render.dump(CASES[name]())
    path = GOLDEN / f"{name}.yaml"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} missing: run make goldens"
    assert text == path.read_text(), f"{path.name} differs from the renderer's output: review, then make goldens"
