"""The recipe schema: precedence, every problem reported at once naming its key, and the shipped recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jobs import recipe as recipes
from jobs.contract import UserError
from jobs.stage_resources import resolve

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = {
    "name": "r", "stages": ["prepare", "sft"],
    "model": {"name_or_path": "org/model", "family": "llava"},
    "data": {"sft": {"path": "d", "format": "chartqa"}},
}


def build(data: dict | None = None, **overrides):
    return recipes.from_dict({**MINIMAL, **(data or {})}, overrides)


def test_defaults_fill_everything_the_yaml_leaves_out():
    recipe = build({"stages": ["prepare", "sft"]})
    assert recipe.sft.method == "lora"
    assert recipe.run_id == "r"
    assert recipe.prepare.max_drop_fraction == 0.01
    assert resolve(recipe, "prepare").gpus == 0
    assert resolve(recipe, "sft").gpus == 1
    multi = build({"resources": {"nodes": 4, "gpus": 8}})
    assert resolve(multi, "sft").nodes == 4 and resolve(multi, "evaluate").nodes == 1
    assert resolve(multi, "evaluate").gpus == 8, "without model.parameters evaluate keeps the recipe's GPUs per node"


def test_cli_overrides_beat_yaml_and_reach_nested_sections():
    recipe = build({"sft": {"args": {"learning_rate": 1e-3}}}, **{"sft.args.learning_rate": 2e-4, "run.id": "exp-2"})
    assert recipe.sft.args["learning_rate"] == 2e-4
    assert recipe.run_id == "exp-2"


def test_every_problem_is_reported_at_once_with_its_key():
    with pytest.raises(UserError) as error:
        build({"sft": {"methd": "lora", "args": {}}, "seed": "one", "prepare": {"max_drop_fraction": "1%"}})
    message = str(error.value)
    assert "sft.methd: unknown key; did you mean 'method'?" in message
    assert "seed: expected an integer, got str 'one'" in message
    assert "prepare.max_drop_fraction: expected a number, got str '1%'" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "data, expected",
    [
        pytest.param({"model": {"name_or_path": "x", "family": "lava"}}, "model.family: 'lava' is not supported (supported: llava", id="family"),
        pytest.param({"model": {"family": "llava"}}, "model.name_or_path: required", id="required"),
        pytest.param({"stages": ["sft", "prepare"]}, "stages: list each stage once, in the order", id="order"),
        pytest.param({"stages": ["prepare", "train"]}, "stages: 'train' is not a stage", id="unknown-stage"),
        pytest.param({"run": {"id": "My_Run"}}, "run.id: 'My_Run' must be a DNS-1123 label", id="dns"),
        pytest.param({"data": {"sft": {"path": "d", "format": "rlaif-v"}}}, "data.sft.format: 'rlaif-v' holds dpo rows", id="format-kind"),
        pytest.param({"stages": ["prepare", "dpo"]}, "data.dpo: the dpo stage needs a data source", id="missing-source"),
        pytest.param({"sft": {"method": "qlora8"}}, "sft.method: 'qlora8' is not one of lora, qlora, full", id="method"),
        pytest.param({"merge_push": {"push": True}}, "merge_push.repo_id: required when merge_push.push is true", id="repo"),
        pytest.param({"sft": {"resources": {"gpu": 2}}}, "sft.resources.gpu: unknown key; did you mean 'gpus'?", id="resources"),
        pytest.param({"evaluate": {"resources": {"nodes": 2}}}, "evaluate.resources.nodes: only the training stages (sft, dpo, grpo) span nodes", id="nodes"),
        pytest.param({"stages": "prepare"}, None, id="single-stage-string-is-a-list"),
    ],
)
def test_semantic_errors_name_the_key_and_the_fix(data, expected):
    if expected is None:
        assert build(data).stages == ("prepare",)
        return
    with pytest.raises(UserError, match=None) as error:
        build(data)
    assert expected in str(error.value)


def test_yaml_spellings_of_booleans_and_null_work_on_the_command_line():
    recipe = build(**{"sft.args.gradient_checkpointing": "false", "merge_push.private": "True", "model.revision": "null"})
    assert recipe.sft.args["gradient_checkpointing"] is False and recipe.merge_push.private is True
    assert recipe.model.revision is None


def test_a_number_given_for_a_text_field_is_taken_back_as_text_or_refused():
    assert build(**{"model.revision": 20240101}).model.revision == "20240101"
    # Fire reads --model.revision=2e9672320848 as a float (inf): its digits are lost, so refuse (python-fire#507)
    with pytest.raises(UserError, match=r"model.revision: expected text, got float inf \(quote it\)"):
        build(**{"model.revision": float("inf")})


def test_passthrough_keys_and_types_are_checked_against_trl_peft_and_transformers():
    recipe = build(
        {"stages": ["prepare", "sft"], "sft": {
            "args": {"learning_rat": 1e-4, "num_train_epochs": "three", "output_dir": "/tmp/x"},
            "lora": {"r": 8, "lora_alhpa": 16},
            "quantization": {"bnb_4bit_quant_type": "nf4", "load_in_3bit": True},
        }}
    )
    with pytest.raises(UserError) as error:
        recipes.check_passthrough(recipe)
    message = str(error.value)
    assert "sft.args.learning_rat: unknown key (SFTConfig has no field 'learning_rat'); did you mean 'learning_rate'?" in message
    assert "sft.args.num_train_epochs: str 'three' does not fit SFTConfig.num_train_epochs (float)" in message
    assert "sft.args.output_dir: set by the stage" in message
    assert "sft.lora.lora_alhpa: unknown key (LoraConfig has no field 'lora_alhpa'); did you mean 'lora_alpha'?" in message
    assert "sft.quantization.load_in_3bit: unknown key" in message


def test_resolved_recipe_round_trips_through_the_environment(monkeypatch):
    recipe = build({"stages": ["prepare", "sft"]}, **{"sft.args.max_steps": 3})
    monkeypatch.setenv(recipes.RECIPE_ENV, json.dumps(recipe.to_dict()))
    assert recipes.load(None) == recipe
    assert recipes.load(None).fingerprint() == recipe.fingerprint()


def test_missing_or_broken_recipe_files_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"recipe .*nope.yaml: no such file"):
        recipes.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(UserError, match=r"recipe .*bad.yaml line 3: not valid YAML"):
        recipes.load(bad)


def test_stage_config_leaves_out_resources_so_moving_to_more_gpus_keeps_the_output():
    a = build({"stages": ["prepare", "sft"]})
    b = build({"stages": ["prepare", "sft"], "sft": {"resources": {"gpus": 8}}})
    assert a.stage_config("sft") == b.stage_config("sft")
    assert a.fingerprint() != b.fingerprint()


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("**/*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_validates(path):
    recipe = recipes.load(path)
    recipes.check_passthrough(recipe)
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), "a recipe opens with a comment saying what it runs"
    assert yaml.safe_load(path.read_text())["name"] == recipe.name


def test_passthrough_checks_from_the_cache_are_as_strict_as_from_the_classes(tmp_path, monkeypatch):
    """Issue 13 (4): the classes' fields are cached per installed versions, so checks need not import TRL."""
    monkeypatch.setenv("VLMJOBS_CACHE", str(tmp_path))
    recipe = build({"sft": {"args": {"learnig_rate": 1e-4, "bf16": "yes", "lr_scheduler_type": "cosine"},
                            "lora": {"r": "8", "target_modules": "all-linear"}}})
    with pytest.raises(UserError) as fresh:
        recipes.check_passthrough(recipe)
    (cached,) = tmp_path.glob("passthrough-*.json")
    assert json.loads(cached.read_text())["schemas"] == recipes.describe_passthrough_classes()

    monkeypatch.setattr(recipes, "describe_passthrough_classes", lambda: pytest.fail("the cache was not used"))
    with pytest.raises(UserError) as again:
        recipes.check_passthrough(recipe)
    assert str(again.value) == str(fresh.value)
    assert "sft.args.learnig_rate: unknown key (SFTConfig has no field 'learnig_rate'); did you mean 'learning_rate'?" in str(again.value)
    assert "sft.args.bf16: str 'yes' does not fit SFTConfig.bf16" in str(again.value)
    assert "sft.lora.r: str '8' does not fit LoraConfig.r (int)" in str(again.value)
    assert "lr_scheduler_type" not in str(again.value) and "target_modules" not in str(again.value)


def test_validate_with_a_warm_cache_imports_neither_torch_nor_trl(tmp_path):
    """Issue 13 (4): a second `vlmjobs validate` answers in well under torch's import time."""
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    script = (
        "import sys\nfrom launcher import cli\n"
        "cli.validate(sys.argv[1])\n"
        "print('imported:', sorted(m for m in ('torch', 'trl', 'transformers', 'peft') if m in sys.modules))\n"
    )
    env = subprocess_env(VLMJOBS_CACHE=str(tmp_path))
    path = str(ROOT / "recipes" / "idefics2-8b-rlaif-v-dpo.yaml")
    first = subprocess.run([sys.executable, "-c", script, path], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([sys.executable, "-c", script, path], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[-1] == "imported: []"


def test_a_missing_recipe_file_suggests_the_shipped_one(monkeypatch):
    monkeypatch.chdir(ROOT)
    for given in ("tiny-demo", "tiny-dmeo.yaml", "recipes/tiny-dem.yaml"):
        with pytest.raises(UserError, match=rf"^recipe {given}: no such file; did you mean recipes/tiny-demo.yaml\?$"):
            recipes.load(given)


def test_errors_of_the_args_name_the_recipe_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "sft": {"args": {"learnig_rate": 1e-4}}}))
    with pytest.raises(UserError, match=rf"^recipe {path}: sft.args.learnig_rate: unknown key"):
        recipes.check_passthrough(recipes.load(path))


def test_validate_reports_every_problem_a_gpu_would_meet_later_in_one_line(tmp_path, capsys):
    """Issue 13 (7): missing local paths, malformed hub ids and an unknown primary metric (which failed at
    merge_push, after all training) are found by `vlmjobs validate`, with the pass-through fields, all at once."""
    from launcher import cli

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        **MINIMAL, "stages": ["prepare", "sft", "evaluate"],
        "model": {"name_or_path": str(tmp_path / "no-model"), "family": "llava"},
        "data": {"sft": {"path": "org//data", "format": "chartqa"}},
        "sft": {"args": {"learnig_rate": 1e-4}},
        "evaluate": {"primary_metric": "preference_accuracy"},
    }))
    with pytest.raises(UserError) as error:
        cli.validate(str(path))
    assert str(error.value) == (
        f"recipe {path}: 4 problems: "
        "sft.args.learnig_rate: unknown key (SFTConfig has no field 'learnig_rate'); did you mean 'learning_rate'?; "
        f"model.name_or_path: {tmp_path / 'no-model'}: no such folder on this machine (a hub id is org/name); "
        "data.sft.path: org//data: no such file or folder on this machine (a hub id is org/name); "
        "evaluate.primary_metric: 'preference_accuracy' is reported only with data.dpo; this recipe's evaluate reports accuracy, exact_match, "
        "yes_no_accuracy, no_f1, no_precision, no_recall, yes_f1, yes_precision, yes_recall"
    )
    assert capsys.readouterr().out == ""


def test_validate_ends_with_its_verdict_and_leaves_the_clusters_paths_alone(tmp_path, capsys):
    from launcher import cli

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        **MINIMAL, "model": {"name_or_path": "/runs/models/base", "family": "llava"},
        "data": {"sft": {"path": str(tmp_path), "format": "chartqa"}},
        "evaluate": {"primary_metric": "exact_match"},
    }))
    cli.validate(str(path))
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["model"]["name_or_path"] == "/runs/models/base", "the output stays YAML"
    assert out.splitlines()[-1].startswith(f"# recipe {path} is valid: stages prepare, sft; checked ")
    with pytest.raises(UserError, match=r"evaluate.primary_metric: evaluate reports no 'acuracy' for this recipe's data; did you mean 'accuracy'\?$"):
        cli.validate(str(path), **{"evaluate.primary_metric": "acuracy", "stages": ["prepare", "sft", "evaluate"]})
