"""The local runner: the embedded default when there is no cluster. It runs each stage's command,
the very argv and environment its Kubernetes Job would get, one after another on this machine.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

from jobs.contract import SUCCESS_FILE, UserError, exit_status, is_done, missing_input
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
    for stage in stages:
        argv = argvs[stage]
        if not force and is_done(stage, recipe.run_dir, recipe.stage_config(stage), recipe.needs(stage)):
            print(f"==> {stage}: already done for this config ({recipe.run_dir / stage}); skipping (--force redoes it)", flush=True)
            continue
        print(f"==> {stage} [{recipe.run_dir}]: {shlex.join(argv)}", flush=True)
        returncode = _call(argv, env)
        if returncode != 0:
            raise StageFailed(stage, returncode, argv)
    print(f"==> done in {time.time() - started:.0f}s: {', '.join(stages)} in {recipe.run_dir}", flush=True)
    report = recipe.run_dir / "evaluate" / "report.json"
    if "evaluate" in stages and report.is_file():
        from jobs.report import format_table

        print(f"\n{format_table(json.loads(report.read_text()))}\n(details: {report.with_name('report.md')})", flush=True)



def _call(argv: list[str], env: dict) -> int:
    """Run a stage to its end. It runs in its own process group, so that Ctrl-C in a terminal reaches it once,
    from here: SIGINT and SIGTERM to this process are passed on, and the stage checkpoints and exits 130 / 143."""
    process = subprocess.Popen(argv, env=env, process_group=0)

    def forward(signum, frame):
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
