"""``vlmjobs``: the command line. Each command is also a Make target (see the Makefile).

    vlmjobs run RECIPE [--stages=sft,dpo] [--force] [--sft.args.learning_rate=1e-4 ...]   local chain
    vlmjobs validate RECIPE [overrides]       check a recipe, print the resolved one
    vlmjobs tiny-model --family=llava --out=DIR
    vlmjobs synth-data --kind=chartqa --out=DIR [--rows=400]
"""

from __future__ import annotations

import sys

from jobs import contract
from jobs import recipe as recipes


def _stages(stages) -> tuple[str, ...]:
    if isinstance(stages, str):
        return tuple(s.strip() for s in stages.split(",") if s.strip())
    return tuple(stages or ())


def run(recipe: str, stages="", force: bool = False, **overrides):
    """Run the recipe's stages (or --stages) on this machine, one after another."""
    from launcher import local

    resolved = recipes.load(str(recipe), overrides)
    recipes.check_passthrough(resolved)
    try:
        local.run(resolved, _stages(stages), force=force)
    except local.StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(local.exit_code(e))


def validate(recipe: str, **overrides):
    """Check a recipe (schema, families, formats, TRL/peft fields) and print it resolved."""
    import yaml

    resolved = recipes.load(str(recipe), overrides)
    recipes.check_passthrough(resolved)
    print(yaml.safe_dump(resolved.to_dict(), sort_keys=False), end="")


def tiny_model(family: str, out: str, seed: int = 0):
    """Build a tiny random model of a family's real classes, offline, into OUT."""
    from jobs import tiny

    if family not in tiny.BUILDERS:
        raise contract.UserError(f"--family: no tiny model for {family!r} (have: {', '.join(tiny.BUILDERS)})")
    print(f"tiny {family} model in {tiny.build(family, str(out), seed=int(seed))}")


def synth_data(kind: str, out: str, rows: int = 400, seed: int = 0):
    """Write a synthetic data set in a real data set's schema (chartqa, rlaif-v, messages) into OUT."""
    from jobs import synthetic

    if kind not in synthetic.ROWS:
        raise contract.UserError(f"--kind: {kind!r} is not one of {', '.join(synthetic.ROWS)}")
    print(f"synthetic {kind} data in {synthetic.write(kind, str(out), rows=int(rows), seed=int(seed))}")


COMMANDS = {"run": run, "validate": validate, "tiny-model": tiny_model, "synth-data": synth_data}


def main():
    contract.entrypoint(COMMANDS)


if __name__ == "__main__":
    main()
