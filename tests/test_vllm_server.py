"""GRPO's vLLM server (vllm_mode server): what validate refuses, the server's memory arithmetic, and the trainer's side
(the server's address, vLLM missing from the image). The pod itself: tests/launcher/test_render.py; against the real
JobSet controller: tests/launcher/test_vllm_server_on_cluster.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import memory
from jobs import recipe as recipes
from jobs.contract import UserError
from tests.conftest import ROOT

SERVER_IMAGE = "ghcr.io/vlmjobs/vllm-trl:0.31.0-trl1.16.0"
SERVER_MODE = {"use_vllm": True, "vllm_mode": "server"}


def build(grpo: dict, model: str = "llava-hf/llava-1.5-7b-hf", **sections):
    data = {"name": "t", "model": {"name_or_path": model, "family": "llava"},
            "data": {"sft": {"path": "d", "format": "chartqa"}}, "stages": ["prepare", "sft", "grpo"], "grpo": grpo,
            **sections}  # fmt: skip
    return recipes.from_dict(data)


def refusal(grpo: dict, **kwargs) -> str:
    with pytest.raises(UserError) as error:
        build(grpo, **kwargs)
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize(
    "grpo, model, expected",
    [
        pytest.param({"args": SERVER_MODE}, "llava-hf/llava-1.5-7b-hf",
                     "grpo.args.vllm_mode: server needs a vLLM server: set grpo.vllm_server.image", id="no-server"),
        pytest.param({"args": SERVER_MODE, "vllm_server": {"gpus": 1}}, "llava-hf/llava-1.5-7b-hf",
                     "grpo.vllm_server.image: required: an image with vLLM and trl==1.16.0", id="no-image"),
        pytest.param({"args": {"use_vllm": True}, "vllm_server": {"image": SERVER_IMAGE}}, "llava-hf/llava-1.5-7b-hf",
                     "grpo.vllm_server: a server pod serves grpo.args.use_vllm: true with vllm_mode: server only",
                     id="colocate"),  # TRL's default mode
        pytest.param({"vllm_server": {"image": SERVER_IMAGE}}, "llava-hf/llava-1.5-7b-hf",
                     "grpo.vllm_server: a server pod serves", id="no-vllm"),
        pytest.param({"args": {**SERVER_MODE, "vllm_server_base_url": "http://v:8000"}, "vllm_server": {"image": SERVER_IMAGE}},
                     "llava-hf/llava-1.5-7b-hf", "grpo.args.vllm_server_base_url: set by the launcher", id="two-servers"),
        pytest.param({"args": SERVER_MODE, "vllm_server": {"image": SERVER_IMAGE}}, "/runs/models/llava",
                     "grpo.vllm_server: the server pod loads model.name_or_path from the hub, and '/runs/models/llava' "
                     "is a path", id="model-on-the-volume"),
        pytest.param({"args": SERVER_MODE, "vllm_server": {"image": SERVER_IMAGE, "gpu_memory_utilization": 1.5}},
                     "llava-hf/llava-1.5-7b-hf", "grpo.vllm_server.gpu_memory_utilization: 1.5 is not a share", id="share"),
        pytest.param({"args": SERVER_MODE, "vllm_server": {"image": SERVER_IMAGE, "gpus": 0}},
                     "llava-hf/llava-1.5-7b-hf", "grpo.vllm_server.gpus: 0; vLLM needs 1 or more", id="no-gpus"),
    ],
)
def test_a_vllm_server_that_cannot_work_is_refused_in_one_line(grpo, model, expected):
    assert expected in refusal(grpo, model=model)


def test_server_mode_is_accepted_with_the_launchers_server_or_the_users_own_and_from_sfts_output():
    # grpo starts from SFT's adapter (init sft): the server still loads the base model's hub id, and the trainer's
    # first weight push, before any generation, overwrites it
    launched = build({"args": SERVER_MODE, "vllm_server": {"image": SERVER_IMAGE}})
    assert launched.grpo.server_pod and launched.needs("grpo") == ("prepare", "sft")
    own = build({"args": {**SERVER_MODE, "vllm_server_base_url": "http://vllm.team:8000"}})
    assert own.grpo.vllm_server_mode and not own.grpo.server_pod


def test_trl_pushes_the_weights_before_the_servers_first_generation():
    """Why the server may load the base model: GRPOTrainer syncs when global_step differs from _last_loaded_step,
    which starts at -1 (global_step is 0 at the first generation)."""
    import importlib.util

    source = Path(importlib.util.find_spec("trl.trainer.grpo_trainer").origin).read_text()  # read, not imported: 10 s
    assert "self._last_loaded_step = -1" in source
    assert "if self.state.global_step != self._last_loaded_step:" in source


def test_the_servers_gpus_hold_the_weights_in_half_of_vllms_share():
    # 80 GiB = 85.9 GB; at 0.9 vLLM takes 77.3 GB of each GPU, half of it for the weights: 38.7 GB
    assert memory.vllm_server_gpus(3.75e9, 2, 80, 0.9) == 1  # 7.5 GB
    assert memory.vllm_server_gpus(38e9, 2, 80, 0.9) == 2  # 76 GB: 38 a GPU on two
    assert memory.vllm_server_gpus(72e9, 2, 80, 0.9) == 4  # 144 GB: 72 on two does not fit, 36 on four
    assert memory.vllm_server_gpus(72e9, 2, 80, 0.5) == 8  # 42.9 GB for vLLM, 21.5 for weights: 18 a GPU on eight
    estimate = memory.vllm_server(72e9, 2, 80, 0.9, 4)
    assert (round(estimate.weights, 1), round(estimate.reserved, 1), round(estimate.cache, 1)) == (36.0, 77.3, 41.3)


def test_vlmjobs_memory_prints_the_servers_need_and_fails_when_its_gpus_are_too_few(capsys):
    from launcher.cli import _vllm_server_memory

    recipe = build({"args": SERVER_MODE, "vllm_server": {"image": SERVER_IMAGE, "gpus": 2}},
                   resources={"gpus": 8, "gpu_memory_gib": 80})
    def counts(parameters: int, batch_cache_gb: float, prompt_tokens: int | None) -> dict:  # as memory.for_stage's
        return {**memory.grpo_generation(recipe, prompt_tokens), "parameters": parameters,
                "batch_cache_gb": batch_cache_gb}

    assert _vllm_server_memory(recipe, counts(7_060_000_000, 100.0, None)) == []
    printed = capsys.readouterr().out  # 7.06B x 2 bytes over 2 GPUs; 0.9 x 85.9 GB = 77.3 GB, less 7.06 GB
    assert "grpo's vLLM server (grpo.vllm_server): 2 GPUs of its own, grpo.vllm_server.gpus" in printed
    assert "weights 7.06 GB per GPU over 2 GPUs (tensor parallel) + KV cache 70.2 GB = 77.3 GB" in printed
    assert ("the generation batch's key-value cache (64 completions, prompts of 1,024 tokens): 50 GB per GPU; 70.2 GB "
            "left: all at once") in printed
    assert _vllm_server_memory(recipe, counts(72_000_000_000, 100.0, 2048)) == [
        "grpo's vLLM server needs 4 GPUs for its weights and KV cache, not 2"]
    printed = capsys.readouterr().out
    assert "grpo.vllm_server.gpus: 4" in printed
    assert "(64 completions, prompts of 2,048 tokens): 50 GB per GPU; 5.31 GB left: about 6 of them at a time" in printed


def test_vlmjobs_memory_checks_the_server_beside_the_training_and_exits_2_when_it_does_not_fit(tmp_path, monkeypatch, capsys):
    import yaml

    from launcher import cli

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "r", "model": {"name_or_path": "Qwen/Qwen2-VL-72B-Instruct", "family": "qwen2_vl"},
        "data": {"sft": {"path": "d", "format": "chartqa"}}, "stages": ["prepare", "grpo"],
        "grpo": {"args": SERVER_MODE, "vllm_server": {"image": SERVER_IMAGE, "gpus": 1}},
        "resources": {"gpus": 8, "gpu_memory_gib": 80, "sharding": "fsdp"}}))  # fmt: skip
    # the training arithmetic as the config would give it (no download): 72B parameters, LoRA, sharded over 8 GPUs
    training = memory.Estimate(model=144.0, reference=0.0, gradients=0.4, optimizer=0.8)
    monkeypatch.setattr(memory, "for_stage", lambda recipe, stage, prompt_tokens=None: (training, {
        "parameters": 72_000_000_000, "trainable": 100_000_000, "dtype": "bfloat16", "precision": "bfloat16 base",
        **memory.grpo_generation(recipe, prompt_tokens), "batch_cache_gb": 240.0}))
    with pytest.raises(UserError, match=r"^memory: grpo's vLLM server needs 4 GPUs for its weights and KV cache, not 1; "):
        cli.memory(str(path))
    out = capsys.readouterr().out
    assert "grpo's vLLM server (grpo.vllm_server): 1 GPU of its own" in out
    assert "fits in one GPU of 80 GiB" in out  # the training's own line: 145.2 GB over 8 GPUs
    cli.memory(str(path), **{"grpo.vllm_server.gpus": None, "model.parameters": 72_000_000_000})  # sized so: 4, which fit
    out = capsys.readouterr().out
    assert "weights 36 GB per GPU over 4 GPUs (tensor parallel)" in out
    # TRL's default batch, 8 rows a process x 8 processes; 240 GB of cache split over 4 GPUs, 41.3 GB left on each
    left = 80 * 2**30 / 1e9 * 0.9 - 36
    assert (f"the generation batch's key-value cache (64 completions, prompts of 1,024 tokens): 60 GB per GPU; "
            f"{left:.3g} GB left: about {int(64 * left / 60)} of them at a time (vLLM queues the rest)") in out


def test_the_trainer_takes_the_server_pods_url_in_server_mode_only(monkeypatch):
    from jobs.grpo import vllm_server_address

    url = "http://t-grpo-vllm-0-0.t-grpo:8000"
    monkeypatch.setenv(recipes.VLLM_SERVER_URL_ENV, url)
    assert vllm_server_address(build({"args": SERVER_MODE, "vllm_server": {"image": SERVER_IMAGE}})) == {
        "vllm_server_base_url": url}
    assert vllm_server_address(build({"args": {"use_vllm": True}})) == {}
    monkeypatch.delenv(recipes.VLLM_SERVER_URL_ENV)
    assert vllm_server_address(build({"args": SERVER_MODE, "vllm_server": {"image": SERVER_IMAGE}})) == {}


def test_vllm_missing_where_the_stage_runs_is_a_recipe_error_before_anything_loads(monkeypatch):
    import importlib.util

    from jobs import grpo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(UserError, match=r"^grpo\.args\.use_vllm: vLLM is not installed where the stage runs"):
        grpo.main("recipes/tiny-grpo.yaml", **{"grpo.args.use_vllm": True, "run.root": "/nonexistent/never-written"})


def test_the_tiny_twin_of_a_server_mode_recipe_generates_with_transformers_and_drops_the_server(tmp_path):
    """A shipped recipe in server mode keeps its twin (tests/test_twins.py): no vLLM on a CPU, so no server either."""
    import fnmatch

    import yaml

    from jobs import twins

    original = yaml.safe_load((ROOT / "recipes" / "qwen25vl-3b-open-r1-grpo.yaml").read_text())
    original["grpo"]["args"].update(use_vllm=True, vllm_mode="server")
    original["grpo"]["vllm_server"] = {"image": SERVER_IMAGE}
    recipes.from_dict(original)  # valid as shipped
    twin = twins.twin(original, lambda family: tmp_path / "model", lambda kind: tmp_path / "data", tmp_path / "runs")
    recipe = recipes.from_dict(twin)
    assert not recipe.grpo.args["use_vllm"] and recipe.grpo.vllm_server is None
    changed = twins.changed_keys(original, twin)
    assert "*.vllm_server.image" in changed
    assert all(any(fnmatch.fnmatchcase(key, documented) for documented in twins.CHANGED) for key in changed)
