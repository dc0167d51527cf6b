"""The local runner: the embedded default when there is no cluster. It runs each stage's command,
the very argv and environment its Kubernetes Job would get, one after another on this machine.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

from jobs.contract import exit_status
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
    """Run ``stages`` (default: the recipe's) in order; raises StageFailed at the first failure."""
    stages = recipe.chosen_stages(stages)
    env = {**os.environ, **stage_env(recipe), "PYTHONUNBUFFERED": "1"}
    # Every stage's command first, so that one this machine cannot run (nodes > 1) fails before any runs.
    force_args = ["--force"] if force else []
    argvs = {stage: stage_argv(recipe, stage, python=sys.executable) + force_args for stage in stages}
    started = time.time()
    for stage in stages:
        argv = argvs[stage]
        print(f"==> {stage} [{recipe.run_dir}]: {shlex.join(argv)}", flush=True)
        returncode = subprocess.call(argv, env=env)
        if returncode != 0:
            raise StageFailed(stage, returncode, argv)
    print(f"==> done in {time.time() - started:.0f}s: {', '.join(stages)} in {recipe.run_dir}", flush=True)
    report = recipe.run_dir / "evaluate" / "report.json"
    if "evaluate" in stages and report.is_file():
        from jobs.report import format_table

        print(f"\n{format_table(json.loads(report.read_text()))}\n(details: {report.with_name('report.md')})", flush=True)

