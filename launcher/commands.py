"""The command a stage runs, the same for the local runner and the Kubernetes Job."""

from __future__ import annotations

import json

from jobs.recipe import RECIPE_ENV, Recipe


def stage_argv(recipe: Recipe, stage: str, *, python: str = "python") -> list[str]:
    """argv of the stage's Fire entry; the recipe itself travels in the environment (``stage_env``)."""
    return [python, "-m", f"jobs.{stage}"]


def stage_env(recipe: Recipe) -> dict[str, str]:
    """The resolved recipe as JSON: every default and override applied, so the stage sees exactly this run."""
    return {RECIPE_ENV: json.dumps(recipe.to_dict(), sort_keys=True)}
