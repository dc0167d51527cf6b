"""Preemption without loss over several processes (issue 21): SIGTERM reaches one rank only (a node drained, one pod
evicted first, torch's agent forwarding in turn), and every rank saves at the same step. Two CPU processes (gloo)
under FSDP, whose checkpoint is collective, launched as the local runner and the Job launch them (tests/test_fsdp.py).

And every rank, stopped or finished, leaves torch.distributed's group before it exits: left to the interpreter's
teardown, gloo's threads abort about one exit in three (exit 134), which is how CI once saw this test fail. The abort
is a race; whether the group was still there when the process exited is not, so that is what the tests read, from
an exit handler each process runs last (``exit_records``)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from jobs import contract
from jobs import recipe as recipes
from tests.conftest import recipe_file, run_stages, subprocess_env, with_sitecustomize

EXIT_RECORDER = """
import atexit, os, sys

def record():  # registered first, so run last: after everything the process itself does on its way out
    if "RANK" in os.environ:
        dist = sys.modules.get("torch.distributed")
        joined = bool(dist and dist.is_available() and dist.is_initialized())
        with open(os.path.join(os.environ["VLMJOBS_TEST_EXIT_RECORDS"], "rank-" + os.environ["RANK"]), "w") as f:
            f.write("in the group" if joined else "left")

atexit.register(record)
"""


def exit_records(tmp_path):
    """(environment, read): processes started with the environment write, as they exit, whether they were still in
    torch.distributed's group; read() gives {rank file: that}. A sitecustomize module, which Python imports at start."""
    records = tmp_path / "exit-records"
    records.mkdir()
    env = with_sitecustomize(subprocess_env(VLMJOBS_TEST_EXIT_RECORDS=str(records)), tmp_path / "exit-recorder",
                             EXIT_RECORDER)
    return env, lambda: {p.name: p.read_text() for p in sorted(records.iterdir())}


@pytest.mark.parametrize("ending, exit_code", [("return", 0), ("raise contract.UserError('bad recipe')", 2)])
def test_a_multi_process_stage_leaves_the_group_before_it_exits(tmp_path, ending, exit_code):
    """Finished, or with a user's error: the abort would turn exit 2 (not worth a retry) into 134 (worth one)."""
    script = tmp_path / "stage.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from jobs import contract, entry\n"
        "def main():\n"
        "    dist.init_process_group('gloo')\n"
        "    dist.all_reduce(torch.ones(1))\n"
        f"    {ending}\n"
        "entry.entrypoint(main)\n")
    env, read = exit_records(tmp_path)
    done = subprocess.run([sys.executable, "-m", "launcher.distributed", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
                          env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=120)
    assert done.returncode == exit_code, done.stderr[-3000:]
    assert read() == {"rank-0": "left", "rank-1": "left"}


STEPS = 400  # far more than are trained before the signal: the tiny model trains tens of steps a second
GRACE_S = 60  # what the stage has, here, from the signal to its exit (Kubernetes' terminationGracePeriodSeconds)


def rank_process(marker: str, rank: int) -> psutil.Process | None:
    """The training process of ``rank`` among those started with ``marker`` in their environment."""
    for process in psutil.process_iter(["pid"]):
        try:
            env = process.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if env.get("VLMJOBS_TEST_MARKER") == marker and env.get("RANK") == str(rank):
            return process
    return None


def test_sigterm_to_one_rank_makes_every_rank_save_at_the_same_step(tmp_path, tiny_model, synthetic_data):
    sources = {kind: synthetic_data(kind) for kind in ("chartqa", "rlaif-v")}
    args = {"max_steps": STEPS, "per_device_train_batch_size": 1, "logging_steps": 1, "save_steps": 10_000,
            "report_to": "none"}
    path = recipe_file(tmp_path, tiny_model("llava"), sources, prepare={"max_rows": 40},
                       sft={"method": "full", "args": args}, resources={"gpus": 2, "sharding": "fsdp"})
    run_stages(path, "prepare")
    partial = recipes.load(path).run_dir / ".sft.partial"
    marker = uuid.uuid4().hex
    env, exits = exit_records(tmp_path)
    process = subprocess.Popen([sys.executable, "-m", "launcher.cli", "run", str(path), "--stages", "sft"],
                               env={**env, "CUDA_VISIBLE_DEVICES": "", "VLMJOBS_TEST_MARKER": marker},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        metrics = partial / "metrics.jsonl"
        while not (metrics.is_file() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= 3):
            assert process.poll() is None, process.stdout.read()
            assert time.time() < deadline, "training did not start"
            time.sleep(0.05)
        rank_1 = rank_process(marker, 1)
        assert rank_1 is not None and rank_process(marker, 0) is not None
        rank_1.send_signal(signal.SIGTERM)  # rank 1 alone: the agent and rank 0 are not signalled
        signalled = time.time()
        try:
            output, _ = process.communicate(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the ranks did not exit within {GRACE_S} s of the signal (a rank waiting in the "
                                 "collective save for a peer still training)") from None
        took = time.time() - signalled
    finally:
        for child in psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []:
            child.kill()
        process.kill()
    checkpoints = sorted(p.name for p in (partial / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1, (checkpoints, output[-3000:])
    checkpoint = partial / "checkpoints" / checkpoints[0]
    step = int(checkpoints[0].rsplit("-", 1)[1])
    assert 3 <= step < STEPS, output[-3000:]
    # Each rank's own part of the one checkpoint, from the same step: its RNG state and its shard of the weights
    assert sorted(p.name for p in checkpoint.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"], \
        output[-3000:]
    assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("__*_0.distcp")) == ["__0_0.distcp",
                                                                                                 "__1_0.distcp"]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert contract.newest_complete_checkpoint(partial / "checkpoints") == str(checkpoint)
    assert "stopped on SIGTERM at step" in output, output[-3000:]
    assert exits() == {"rank-0": "left", "rank-1": "left"}, output[-3000:]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    print(f"both ranks saved checkpoint-{step} and exited {took:.1f} s after the signal")
