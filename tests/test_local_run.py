"""The local runner, as a user runs it: `vlmjobs run RECIPE`, stages as their own processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
    # sft, started while prepare ran, ended on the closed pipe without having begun
    run = path.parent / "runs" / "t"
    assert not (run / ".sft.partial").exists() and not (run / "sft").exists() and "Traceback" not in done.stderr


def test_the_next_stage_imports_while_the_one_before_runs_and_begins_after_it(write_recipe):
    """The local runner starts sft while prepare runs: its imports (torch, TRL) overlap prepare's work, and it
    begins only once prepare has finished."""
    path = write_recipe()
    done = vlmjobs("run", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    run = path.parent / "runs" / "t"
    prepare, sft = (contract.read_json(run / stage / contract.SUCCESS_FILE) for stage in ("prepare", "sft"))
    assert "imported_ahead_of_its_turn_s" not in prepare, "the first stage has nothing to overlap"
    assert sft["imported_ahead_of_its_turn_s"] > 0
    assert sft["started_at"] >= prepare["finished_at"]


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
        (("run", str(path), "--forse"), "error: --forse: neither an option of vlmjobs run nor a recipe key; did you mean --force?"),
        (("validate", str(path), "--modle.family=x"), "error: --modle.family: neither an option of vlmjobs validate nor a recipe key; did you mean --model.family?"),
    ]:
        done = vlmjobs(*args)
        assert done.returncode == contract.EXIT_USER_ERROR, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith(message), done.stderr
    assert not (path.parent / "runs").exists() and not (tmp_path / "m").exists() and not (tmp_path / "d").exists()


def test_a_stage_without_its_input_is_refused_before_any_process_starts(write_recipe):
    """Issue 13 (4): `vlmjobs run --stages=sft` on an empty run says "run prepare first", from the launcher."""
    path = write_recipe()
    done = vlmjobs("run", str(path), "--stages=sft")
    assert done.returncode == contract.EXIT_USER_ERROR
    assert done.stderr.strip().splitlines() == [
        f"error: sft needs the prepare stage's output: {path.parent / 'runs' / 't' / 'prepare' / contract.SUCCESS_FILE} "
        "not found; run prepare first (vlmjobs run RECIPE --stages=prepare,sft)"
    ]
    assert "==>" not in done.stdout and not (path.parent / "runs").exists()


def test_the_skip_is_decided_from_the_marker_and_a_changed_input_is_not_skipped(write_recipe, monkeypatch):
    """Issue 13 (4): a stage done for this config and these inputs starts no process."""
    from jobs import recipe as recipes
    from launcher import local

    path = write_recipe()
    recipe = recipes.load(path)
    started = []

    class Started:
        name = "unused"

        def run(self):
            return 0

    monkeypatch.setattr(local.StageProcess, "start", lambda name, argv, env, waiting=False: started.append(argv[-1]) or Started())
    run = recipe.run_dir
    sft_config = {"stage": "sft", **recipe.stage_config("sft"), "inputs": {"prepare": "p1"}}
    for stage, fingerprint in (("prepare", "p1"), ("sft", contract._fingerprint(sft_config))):
        (run / stage).mkdir(parents=True)
        contract.write_json_atomic(run / stage / contract.SUCCESS_FILE, {"fingerprint": fingerprint})
    local.run(recipe)
    assert started == ["jobs.prepare"], "prepare's marker is of another config; sft's matches prepare's p1"


def interrupt(argv, ready, tmp_path):
    """Start `vlmjobs run`, poll until ``ready(stdout so far)``, send SIGINT to it; returns (returncode, stdout, stderr)."""
    import signal
    import time

    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "launcher.cli", *argv], env=subprocess_env(), stdout=stdout, stderr=stderr)
        deadline = time.time() + 300
        while not ready(out.read_text()):
            assert process.poll() is None, "finished before the moment came: " + out.read_text() + err.read_text()
            assert time.time() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=300)
    return process.returncode, out.read_text(), err.read_text()


def test_sigint_at_three_moments_is_one_line_and_130_and_the_rerun_resumes(write_recipe):
    """Issue 13 (3): Ctrl-C while importing, in prepare, in training: one line, exit 130, the attempt resumable."""
    path = write_recipe(sft={"method": "full", "args": {"max_steps": 12, "save_steps": 1000, "per_device_train_batch_size": 2, "logging_steps": 1}})
    run = path.parent / "runs" / "t"

    def one_line(code, err):
        assert code == 130, err
        assert "Traceback" not in err and "terminate called" not in err, err
        assert len([line for line in err.splitlines() if "stopped on SIGINT" in line]) == 1, err

    # while importing: the stage has begun (its work folder is there) and is importing datasets and torch
    code, out, err = interrupt(["run", str(path)], lambda out: (run / ".prepare.partial" / contract.CONFIG_FILE).is_file(), path.parent)
    one_line(code, err)
    assert "prepare: images shrunk" not in out, "stopped before the stage's first line"
    assert err.strip().splitlines()[-1] == (
        "stopped on SIGINT; the unfinished work stays in the run folder, and running the same command again resumes it")
    # in prepare: converting rows
    code, out, err = interrupt(["run", str(path)], lambda out: " converted, " in out, path.parent)
    one_line(code, err)
    assert "prepare: starting over; discarding an unfinished attempt" in out and not (run / "prepare").exists()
    # in training: a few steps logged, with elapsed time, rate and ETA (issue 13, item 8)
    code, out, err = interrupt(["run", str(path)], lambda out: "sft: step 3/12 " in out, path.parent)
    one_line(code, err)
    assert "elapsed, " in out and ", ETA " in out
    checkpoint = contract.newest_complete_checkpoint(run / ".sft.partial" / "checkpoints")
    assert checkpoint and not (run / "sft").exists()

    resumed = vlmjobs("run", str(path))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "==> prepare: already done for this config" in resumed.stdout
    assert f"sft: resuming from {checkpoint}" in resumed.stdout


def test_a_stop_signal_that_library_code_turns_into_its_own_error_is_still_one_line_and_128_plus_n(tmp_path):
    """multiprocess (imported by datasets) catches everything around an import and falls back to another, which fails:
    a Ctrl-C landing there reached the stage as ModuleNotFoundError, a traceback and exit 1 (seen in the full suite's
    test above: 'No module named version'). The error's context holds the Interrupted: it is the stop it came from."""
    import signal

    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent("""
        import os, signal, time
        from jobs import entry

        def main():
            try:  # as multiprocess/__init__.py does around `from .__info__ import ...`
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except BaseException:
                from version_of_a_package_that_is_not_there import __version__  # noqa: F401

        entry.entrypoint(main)
    """))
    done = subprocess.run([sys.executable, str(script)], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert done.stderr.strip().splitlines() == [contract.stopped(signal.SIGINT)], done.stderr
