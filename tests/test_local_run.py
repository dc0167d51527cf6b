"""The local runner, as a user runs it: `vlmjobs run RECIPE`, stages as their own processes."""

from __future__ import annotations

import subprocess
import sys

from jobs import contract
from tests.conftest import subprocess_env


def vlmjobs(*args: str):
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], env=subprocess_env(), capture_output=True, text=True, timeout=600)


def test_prepare_then_sft_from_a_recipe_and_a_second_run_skips_both(write_recipe):
    path = write_recipe()
    first = vlmjobs("run", str(path))
    assert first.returncode == 0, first.stdout + first.stderr
    run = path.parent / "runs" / "t"
    assert (run / "prepare" / contract.SUCCESS_FILE).is_file() and (run / "sft" / contract.SUCCESS_FILE).is_file()
    assert "==> prepare" in first.stdout and "==> sft" in first.stdout

    again = vlmjobs("run", str(path), "--stages=sft")
    assert again.returncode == 0
    assert "sft: already done for this config" in again.stdout and "==> prepare" not in again.stdout


def test_a_stage_s_user_error_stops_the_chain_with_its_exit_code(write_recipe, tmp_path):
    path = write_recipe(data={"sft": {"path": str(tmp_path / "missing"), "format": "chartqa"}})
    done = vlmjobs("run", str(path))
    assert done.returncode == contract.EXIT_USER_ERROR
    assert f"error: data source {tmp_path / 'missing'}: not found" in done.stderr
    assert "error: stage prepare failed with exit code 2" in done.stderr
    assert "==> sft" not in done.stdout


def test_a_bad_recipe_is_one_line_and_exit_code_2_before_anything_runs(write_recipe):
    path = write_recipe(sft={"method": "lora", "args": {"learnig_rate": 1e-4}})
    done = vlmjobs("run", str(path), "--stages=prepare")
    assert done.returncode == contract.EXIT_USER_ERROR
    assert done.stderr.strip().splitlines() == [
        f"error: recipe {path}: sft.args.learnig_rate: unknown key (SFTConfig has no field 'learnig_rate'); did you mean 'learning_rate'?"
    ]
    assert not (path.parent / "runs").exists()


def test_overrides_on_the_command_line_reach_the_stages(write_recipe):
    path = write_recipe()
    done = vlmjobs("run", str(path), "--stages=prepare", "--run.id=other", "--prepare.max_rows=10")
    assert done.returncode == 0, done.stderr
    record = contract.read_json(path.parent / "runs" / "other" / "prepare" / contract.SUCCESS_FILE)
    assert record["config"]["prepare"]["max_rows"] == 10 and record["rows"]["sft"] == {"train": 10, "eval": 10, "test": 10}


def test_unknown_stages_tiny_families_and_data_kinds_are_one_line_each(write_recipe, tmp_path):
    path = write_recipe()
    for args, message in [
        (("run", str(path), "--stages=dpo"), "error: --stages: dpo not in the recipe's stages (prepare, sft)"),
        (("tiny-model", "--family=gpt2", f"--out={tmp_path / 'm'}"), "error: --family: no tiny model for 'gpt2' (have: llava,"),
        (("synth-data", "--kind=coco", f"--out={tmp_path / 'd'}"), "error: --kind: 'coco' is not one of chartqa,"),
    ]:
        done = vlmjobs(*args)
        assert done.returncode == contract.EXIT_USER_ERROR, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith(message), done.stderr
    assert not (path.parent / "runs").exists() and not (tmp_path / "m").exists() and not (tmp_path / "d").exists()
