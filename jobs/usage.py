"""``--help`` for every vlmjobs command and stage script, answered before Fire runs anything.

Fire would call the command to find its help (``vlmjobs k8s --help`` wrote k8s/), page it, exit 2,
and show neither the recipe's override syntax nor the stages. Here ``--help`` (or ``-h``) anywhere
on the line prints the command's usage from its docstrings and returns: no file, cluster or hub is
touched, nothing heavy is imported.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

HELP_FLAGS = ("--help", "-h")


def overrides_and_stages() -> str:
    from jobs.recipe import STAGES

    return (
        "Recipe overrides: any recipe key as --SECTION.KEY=VALUE after the recipe; they beat the YAML file:\n"
        "    --sft.args.learning_rate=1e-4  --run.id=exp-2  --prepare.max_rows=100  --model.revision=null\n"
        "  (YAML spellings: true, false, null; quote text that looks like a number: --model.revision=\"'2024'\")\n"
        f"Stages, in order: {', '.join(STAGES)} (a recipe's `stages` lists those it runs)\n"
        "Exit codes: 0 done; 2 the recipe, data or stage order needs fixing (a retry cannot help); "
        "1 worth a retry; 3 the run scored worse than the recipe's last good night (evaluate; not pushed); "
        "130 / 143 stopped by SIGINT / SIGTERM (run again to resume)\n"
    )


def wants_help(argv: list[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv)


def options(fn: Callable, skip: tuple[str, ...] = ()) -> str:
    """The command's own flags, from its signature, with their defaults."""
    lines = []
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind is p.VAR_KEYWORD or name in skip:
            continue
        if p.default is p.empty:
            lines.append(f"    --{name}={name.upper()}  (required)")
        elif isinstance(p.default, bool):
            lines.append(f"    --no{name}" if p.default else f"    --{name}")
        elif p.default in ("", None):
            lines.append(f"    --{name}={name.upper()}")
        else:
            lines.append(f"    --{name}={name.upper()}  (default {p.default})")
    return "Options:\n" + "\n".join(lines) + "\n\n" if lines else ""


def command_help(program: str, name: str, fn: Callable, usage_lines: list[str], example: str) -> str:
    doc = inspect.cleandoc(fn.__doc__ or "")
    usage = "\n".join(f"    {line.strip()}" for line in usage_lines) or f"    {program} {name} RECIPE [overrides]"
    takes_recipe = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    return (
        f"Usage:\n{usage}\n\n{doc}\n\n{options(fn, skip=('recipe',))}"
        f"{overrides_and_stages() if takes_recipe else ''}\nExample:\n    {example}\n"
    )


def stage_help(main: Callable) -> str:
    """A stage script's help: its module docstring (what it does, how to run it, what it writes)."""
    module = sys.modules.get(main.__module__)
    doc = inspect.cleandoc((module.__doc__ if module else None) or main.__doc__ or "")
    stage = module.__spec__.name.rsplit(".", 1)[-1] if module and module.__spec__ else "STAGE"
    return (
        f"{doc}\n\nThe recipe: --recipe=recipes/NAME.yaml, or the resolved recipe in $VLMJOBS_RECIPE (as in a Job).\n"
        "    --force   redo the stage even when its output is done for this config, or replace output of another config\n\n"
        f"{overrides_and_stages()}\nExample:\n    python -m jobs.{stage} --recipe=recipes/tiny-demo.yaml\n"
    )


def print_help(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
