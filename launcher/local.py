"""The local runner: the embedded default when there is no cluster. It runs each stage's command,
the very argv and environment its Kubernetes Job would get, one after another on this machine.

Each stage is a fresh process, and its imports (torch, transformers, TRL) take seconds before it does anything.
So while a stage runs, the runner starts the next one (when it runs as one process and is not already done):
it imports its libraries meanwhile and waits on a pipe for its turn (jobs.contract.START_FD_ENV). If the stage
before fails, the pipe is closed and the waiting one ends without having run.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

from jobs.contract import START_FD_ENV, SUCCESS_FILE, UserError, exit_status, hold_run, is_done, missing_input, release_run
from jobs.history import refuse_regressed, regression_of
from jobs.recipe import Recipe
from launcher.commands import stage_argv, stage_env


class StageFailed(Exception):
    """A stage exited non-zero; ``exit_code`` is the stage's own, so that the runner passes a user error (2) on
    as one, distinguishable from a failure upstream."""

    def __init__(self, stage: str, returncode: int, argv: list[str]):
        super().__init__(f"stage {stage} failed with exit code {returncode}: {shlex.join(argv)}")
        self.stage, self.returncode, self.argv = stage, returncode, argv
        self.exit_code = exit_status(returncode)


def run(recipe: Recipe, stages: tuple[str, ...] = (), *, force: bool = False) -> None:
    """Run ``stages`` (default: the recipe's) in order; raises StageFailed at the first failure.

    A stage whose output is done for this config is skipped here, from its ``_SUCCESS.json``, without
    starting its process; a stage whose input is neither done nor made earlier in this run is refused
    before anything runs."""
    stages = recipe.chosen_stages(stages)
    env = {**os.environ, **stage_env(recipe), "PYTHONUNBUFFERED": "1"}
    # Every stage's command first, so that one this machine cannot run (nodes > 1) fails before any runs.
    force_args = ["--force"] if force else []
    argvs = {stage: stage_argv(recipe, stage, python=sys.executable) + force_args for stage in stages}
    for i, stage in enumerate(stages):
        for need in recipe.needs(stage):
            if need not in stages[:i] and not (recipe.run_dir / need / SUCCESS_FILE).is_file():
                raise UserError(f"{missing_input(stage, recipe.run_dir, need)} (vlmjobs run RECIPE --stages={need},{stage})")
    started = time.time()
    hold_run(recipe.run_dir)  # in use until the chain ends: pruning leaves it alone between its stages

    def done(stage: str) -> bool:
        return not force and is_done(stage, recipe.run_dir, recipe.stage_config(stage), recipe.needs(stage))

    ahead: StageProcess | None = None  # the next stage, started while this one runs
    try:
        for i, stage in enumerate(stages):
            argv = argvs[stage]
            if done(stage):
                if ahead and ahead.name == stage:  # done after all: the stage before it remade the same input
                    ahead.cancel()
                    ahead = None
                print(f"==> {stage}: already done for this config ({recipe.run_dir / stage}); skipping (--force redoes it)", flush=True)
                if stage == "evaluate":  # a regressed night stays one: the chain stops as when evaluate decided
                    refuse_regressed(regression_of(recipe.run_dir))
                continue
            print(f"==> {stage} [{recipe.run_dir}]: {shlex.join(argv)}", flush=True)
            current = ahead if ahead and ahead.name == stage else StageProcess.start(stage, argv, env)
            following = stages[i + 1] if i + 1 < len(stages) else None
            if following and _one_process(argvs[following]) and not done(following):
                ahead = StageProcess.start(following, argvs[following], env, waiting=True)
            else:
                ahead = None
            returncode = current.run()
            if returncode != 0:
                raise StageFailed(stage, returncode, argv)
    finally:
        if ahead:
            ahead.cancel()
        release_run(recipe.run_dir)
    print(f"==> done in {time.time() - started:.0f}s: {', '.join(stages)} in {recipe.run_dir}", flush=True)
    report = recipe.run_dir / "evaluate" / "report.json"
    if "evaluate" in stages and report.is_file():
        from jobs.report import format_table

        print(f"\n{format_table(json.loads(report.read_text()))}\n(details: {report.with_name('report.md')})", flush=True)



def _one_process(argv: list[str]) -> bool:
    """The stage runs as the module itself (``python -m jobs.<stage>``), not through accelerate's launcher, whose
    processes would not inherit the pipe."""
    return argv[1] == "-m" and argv[2].startswith("jobs.")


class StageProcess:
    """A stage's process. Started ``waiting``, it imports and then waits on a pipe for its turn (``run``), or
    for the pipe's end (``cancel``). It runs in its own process group, so that Ctrl-C in a terminal reaches it once,
    from here: SIGINT and SIGTERM to this process are passed on, and the stage checkpoints and exits 130 / 143."""

    def __init__(self, name: str, process: subprocess.Popen, go: int | None):
        self.name, self.process, self.go = name, process, go

    @classmethod
    def start(cls, name: str, argv: list[str], env: dict, *, waiting: bool = False) -> StageProcess:
        if not waiting:
            return cls(name, subprocess.Popen(argv, env=env, process_group=0), None)
        read, write = os.pipe()
        try:
            process = subprocess.Popen(argv, env={**env, START_FD_ENV: str(read)}, process_group=0, pass_fds=(read,))
        finally:
            os.close(read)
        return cls(name, process, write)

    def run(self) -> int:
        """Its turn: run it to its end."""
        def forward(signum, frame):
            self.process.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._release(b"1")
            return self.process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def cancel(self) -> None:
        """Not its turn after all: the pipe closed, it ends without having run once its imports are done (killed if
        it has not ended within a minute)."""
        self._release(b"")
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _release(self, go: bytes) -> None:
        if self.go is None:
            return
        try:
            if go:
                os.write(self.go, go)
        except BrokenPipeError:  # it ended while importing: its exit code tells
            pass
        finally:
            os.close(self.go)
            self.go = None
