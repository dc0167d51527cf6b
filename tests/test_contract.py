"""The stage contract on its own: inputs, skip, refuse, resume, and the commit marker written last."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jobs import contract
from jobs.contract import SUCCESS_FILE, UserError
from tests.conftest import subprocess_env


def finished(run_dir, name, config=None, **record):
    stage = contract.begin(name, run_dir, config or {"x": 1})
    (stage.work / "out.txt").write_text(name)
    return stage.finish(**record)


def test_a_stage_refuses_to_start_without_its_inputs_success_marker(tmp_path):
    (tmp_path / "prepare").mkdir()  # a folder without _SUCCESS.json is not a finished stage
    with pytest.raises(UserError, match=r"sft needs the prepare stage's output: .*prepare/_SUCCESS.json not found; run prepare first"):
        contract.begin("sft", tmp_path, {}, needs=("prepare",))


def test_finish_renames_the_work_folder_then_writes_the_marker_with_the_record(tmp_path):
    finished(tmp_path, "prepare")
    out = finished(tmp_path, "sft", {"lr": 1}, rows={"train": 3})
    record = contract.read_json(out / SUCCESS_FILE)
    assert (out / "out.txt").read_text() == "sft"
    assert not (tmp_path / ".sft.partial").exists()
    assert record["rows"] == {"train": 3} and record["config"]["lr"] == 1
    assert record["inputs"] == {}  # no needs were declared
    assert {"python", "vlmjobs"} <= set(record["versions"]) and record["duration_s"] >= 0
    assert not (out / contract.CONFIG_FILE).exists()


def test_inputs_fingerprints_enter_the_downstream_fingerprint(tmp_path):
    finished(tmp_path, "prepare", {"data": "a"})
    first = contract.begin("sft", tmp_path, {}, needs=("prepare",)).fingerprint
    contract.begin("prepare", tmp_path, {"data": "b"}, force=True).finish()
    assert contract.begin("sft", tmp_path, {}, needs=("prepare",)).fingerprint != first


def test_a_stage_done_for_the_same_config_is_skipped_unless_forced(tmp_path, capsys):
    finished(tmp_path, "prepare")
    again = contract.begin("prepare", tmp_path, {"x": 1})
    assert again.skipped and "already done for this config" in capsys.readouterr().out
    forced = contract.begin("prepare", tmp_path, {"x": 1}, force=True)
    assert not forced.skipped
    (forced.work / "out.txt").write_text("redone")
    assert (forced.finish() / "out.txt").read_text() == "redone"


def test_output_of_another_config_is_never_replaced_silently(tmp_path):
    finished(tmp_path, "prepare", {"x": 1, "data": {"path": "a", "rows": 3}})
    with pytest.raises(UserError, match=r"prepare: .* holds output of another config \(changed: data.path, x; fingerprint .*\): "
                                        r"use another run.id, or --force to replace it"):
        contract.begin("prepare", tmp_path, {"x": 2, "data": {"path": "b", "rows": 3}})
    assert (tmp_path / "prepare" / SUCCESS_FILE).is_file()


def test_an_unfinished_attempt_of_the_same_config_is_resumed_and_one_of_another_discarded(tmp_path):
    stage = contract.begin("sft", tmp_path, {"x": 1}, resumable=True)
    (stage.work / "checkpoint").write_text("step 10")
    again = contract.begin("sft", tmp_path, {"x": 1}, resumable=True)
    assert (again.work / "checkpoint").read_text() == "step 10"
    other = contract.begin("sft", tmp_path, {"x": 2}, resumable=True)
    assert not (other.work / "checkpoint").exists()


def test_a_stage_that_does_not_checkpoint_starts_over(tmp_path):
    stage = contract.begin("prepare", tmp_path, {"x": 1})
    (stage.work / "half-written.arrow").write_text("...")
    again = contract.begin("prepare", tmp_path, {"x": 1})
    assert not (again.work / "half-written.arrow").exists()


def test_a_crash_between_rename_and_marker_is_resumed_not_mistaken_for_done(tmp_path):
    stage = contract.begin("sft", tmp_path, {"x": 1}, resumable=True)
    (stage.work / "model").write_text("weights")
    stage.work.rename(stage.out)  # as if the process died right after the rename
    again = contract.begin("sft", tmp_path, {"x": 1}, resumable=True)
    assert not again.skipped and (again.work / "model").read_text() == "weights"


def test_newest_complete_checkpoint_ignores_one_still_being_written(tmp_path):
    for step, complete in ((10, True), (20, True), (30, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert contract.newest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")
    assert contract.newest_complete_checkpoint(tmp_path / "missing") is None


def test_entrypoint_turns_user_errors_into_one_line_and_exit_code_2(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(
        "from jobs.contract import UserError\n"
        "from jobs.entry import entrypoint\n"
        "def main(fail: str = 'user'):\n"
        "    if fail == 'user': raise UserError('data.sft: no rows')\n"
        "    raise RuntimeError('disk on fire')\n"
        "entrypoint(main)\n"
    )
    user = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=subprocess_env())
    assert user.returncode == contract.EXIT_USER_ERROR
    assert user.stderr == "error: data.sft: no rows\n"
    crash = subprocess.run([sys.executable, str(script), "--fail=crash"], capture_output=True, text=True, env=subprocess_env())
    assert crash.returncode == contract.EXIT_FAILURE and "Traceback" in crash.stderr


def test_out_of_gpu_memory_outside_the_batch_search_is_one_line_with_advice_and_exit_code_2(tmp_path):
    """Issue 26 (8): a forward that runs out of memory after per_device_train_batch_size: auto has chosen (or without
    it) fails the same way on every retry; exit 1 would have the Job retry it on GPUs for nothing. torch's own
    OutOfMemoryError, with CUDA's message, raised where CUDA raises it: inside a module's forward."""
    script = tmp_path / "stage.py"
    script.write_text(
        "import torch\n"
        "from jobs.entry import entrypoint\n"
        "def out_of_memory(module, args):\n"
        "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of '\n"
        "                                 '79.19 GiB of which 1.06 GiB is free.\\nSee documentation for Memory Management')\n"
        "def main():\n"
        "    embedding = torch.nn.Embedding(10, 4)\n"
        "    embedding.register_forward_pre_hook(out_of_memory)\n"
        "    embedding(torch.zeros(64, 8, dtype=torch.long))\n"
        "entrypoint(main)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == contract.EXIT_USER_ERROR, done.stderr
    assert done.stderr == (
        "error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB "
        "of which 1.06 GiB is free.): halve per_device_train_batch_size and double gradient_accumulation_steps, or turn on "
        "activation_checkpointing\n"
    )


def test_a_finished_stage_exits_at_once_with_its_exit_handlers_run_and_its_output_flushed(tmp_path):
    """entrypoint skips the interpreter's teardown after a stage finishes, not what exiting owes: atexit handlers
    (a tracker's last upload, logging's flush) run, and buffered output reaches the pipe."""
    script = tmp_path / "stage.py"
    script.write_text(
        "import atexit, logging, sys\n"
        "from jobs.entry import entrypoint\n"
        "def main(out: str = ''):\n"
        "    atexit.register(lambda: open(out, 'w').write('flushed'))\n"
        "    logging.basicConfig(stream=sys.stderr)\n"
        "    logging.getLogger('stage').warning('a last log line')\n"
        "    sys.stdout.write('no newline, still buffered')\n"
        "entrypoint(main)\n"
    )
    done = subprocess.run([sys.executable, str(script), f"--out={tmp_path / 'atexit'}"], capture_output=True, text=True,
                          env=subprocess_env(PYTHONUNBUFFERED=""))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "atexit").read_text() == "flushed"
    assert done.stdout == "no newline, still buffered" and "a last log line" in done.stderr
    # under a profiler, which writes its results after the module has run, the stage ends as Python would
    profiled = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(tmp_path / "prof"), str(script),
                               f"--out={tmp_path / 'atexit'}"], capture_output=True, text=True, env=subprocess_env())
    assert profiled.returncode == 0 and (tmp_path / "prof").stat().st_size > 0, profiled.stderr
