"""The stage command shared by the local runner and the Jobs, and the exit code through accelerate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.contract import UserError
from launcher import distributed, local
from launcher.commands import stage_argv
from tests.launcher.conftest import SINGLE, make

ROOT = Path(__file__).resolve().parents[2]


def test_one_gpu_runs_the_stage_module_directly():
    assert stage_argv(make(SINGLE), "sft", python="py") == ["py", "-m", "jobs.sft"]


def test_prepare_runs_directly_whatever_the_recipes_gpus():
    assert stage_argv(make(SINGLE, **{"resources.gpus": 8}), "prepare") == ["python", "-m", "jobs.prepare"]


def test_several_gpus_on_this_machine_go_through_accelerate():
    argv = stage_argv(make(SINGLE, **{"resources.gpus": 4}), "sft", python="py")
    assert argv[:3] == ["py", "-m", "launcher.distributed"] and argv[-2:] == ["-m", "jobs.sft"]
    assert argv[argv.index("--num_processes") + 1] == "4" and "--machine_rank" not in argv


def test_several_nodes_need_a_cluster():
    with pytest.raises(
        UserError,
        match=r"^sft: resources\.nodes=2 runs only on a cluster \(vlmjobs submit --stage=sft\); the local runner runs one node$",
    ):
        stage_argv(make(SINGLE, **{"resources.gpus": 8, "resources.nodes": 2}), "sft")


def test_the_local_runner_refuses_a_multi_node_stage_before_running_any(capfd):
    recipe = make(SINGLE, **{"sft.resources": {"gpus": 8, "nodes": 2}})
    with pytest.raises(UserError, match=r"resources\.nodes=2 runs only on a cluster"):
        local.run(recipe, ("prepare", "sft"))
    assert "==> prepare" not in capfd.readouterr().out


@pytest.mark.parametrize(
    "name, codes, expected",
    [
        ("a user error anywhere wins", [1, 2], 2),
        ("the first failure otherwise", [137, 1], 137),
        ("a signal as 128+N", [-15], 143),
        ("no code at all", [0], 1),
    ],
)
def test_launcher_exit_code_from_the_ranks(name, codes, expected):
    assert distributed.exit_code(codes) == expected


def test_a_rank_exiting_2_makes_the_launcher_exit_2(tmp_path):
    """accelerate launch alone would exit 1 here (it re-raises torch's ChildFailedError)."""
    (tmp_path / "exits_two.py").write_text("import sys\nsys.exit(2)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]), "CUDA_VISIBLE_DEVICES": ""}
    argv = [sys.executable, "-m", "launcher.distributed", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "exits_two"]  # fmt: skip
    result = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: exits_two failed on rank(s) [0, 1]; exit code 2" in result.stderr


def test_sigterm_reaches_the_ranks_which_checkpoint_and_the_launcher_exits_143(tmp_path):
    """What the kubelet does at preemption: SIGTERM to the container's first process."""
    (tmp_path / "checkpoints.py").write_text(
        "import os, signal, sys, time\n"
        "def stop(signum, frame):\n"
        "    time.sleep(0.5)\n"
        "    print(f\"rank {os.environ['RANK']} checkpointed\", flush=True)\n"
        "    sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]),
        "CUDA_VISIBLE_DEVICES": "",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "30",
    }
    argv = [sys.executable, "-m", "launcher.distributed", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "checkpoints"]  # fmt: skip
    process = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        seen = ""
        while seen.count("ready") < 2:  # both ranks have their handler; they share one pipe
            line = process.stdout.readline()
            assert line, f"launcher ended before both ranks were ready: {seen!r}"
            seen += line
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143
    assert "rank 0 checkpointed" in out and "rank 1 checkpointed" in out, out  # the ranks share one pipe
