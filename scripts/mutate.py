"""make mutate: mutation testing (mutmut) of the code whose numbers users read or decide by, scored per module.

    python scripts/mutate.py            every function in SCOPE, from a fresh copy (25 to 35 minutes on 2 cores)
    python scripts/mutate.py 'jobs.metrics.x_amber*'    only these mutants (mutmut's names; `mutmut show NAME` diffs one)
    python scripts/mutate.py jobs.inference             one module's functions in SCOPE

mutmut copies jobs/ and launcher/ into mutants/, rewrites each function of the modules named in pyproject.toml
([tool.mutmut] only_mutate) into small variants (a "<" for a "<=", a 2 for a 1, a None for an argument), then, for
each variant, runs only the tests of [tool.mutmut]'s selection that called the function. A variant no test notices
(survived) is a change to what users see that the suite lets through. Not part of make test: it is slow.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The functions whose results users act on (issue 26). The rest of these modules (evaluate's and merge_push's main,
# which need a trained chain per mutant; contract's run-folder bookkeeping) is out of scope: minutes a mutant.
SCOPE = {
    "jobs.metrics": ["*"],  # every scoring rule
    "jobs.benchmarks": ["*"],  # AMBER's and POPE's files, read as their scripts read them
    "jobs.evaluate": ["x_evaluate_variant", "x__yes_no_scores", "x_with_prompt", "x__text", "x__question", "x__sample"],
    "jobs.inference": ["x_completion_logprobs", "x_prompt_inputs", "x__images", "x__batches"],
    "jobs.merge_push": ["x_gate", "x_compare_with_base"],  # the push gate
    "launcher.state": ["*"],  # what a Job's objects say happened, and whether to retry on GPUs
    "jobs.entry": ["x__run", "x_entrypoint"],  # a stage's exit codes
    "jobs.contract": ["x_exit_status", "x__raise_interrupted", "x_stopped", "xǁInterruptedǁ__init__"],  # and signals
}
MUTMUT = [sys.executable, "-c", "from mutmut.__main__ import cli; cli()"]


def patterns(modules: list[str] | None = None) -> list[str]:
    """mutmut's names for the mutants of SCOPE (of ``modules`` only, where given)."""
    return [f"{module}.{function}__mutmut_*" if function != "*" else f"{module}.*"
            for module, functions in SCOPE.items() if modules is None or module in modules for function in functions]


def results() -> dict[str, str]:
    """{mutant name: killed, survived, timeout, no tests, ...} of every mutant mutmut made."""
    listed = subprocess.run([*MUTMUT, "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True, check=True)
    return dict(line.strip().rsplit(": ", 1) for line in listed.stdout.splitlines() if ": " in line)


def table(statuses: dict[str, str], wanted: list[str]) -> str:
    """Per module: how many of its in-scope mutants each status has, and the score (killed over all)."""
    columns = ("killed", "survived", "timeout", "no tests")
    lines = [f"{'module':<18}" + "".join(f"{c:>10}" for c in columns) + f"{'others':>8}{'score':>8}"]
    for module in SCOPE:
        counts = Counter(status for name, status in statuses.items()
                         if name.startswith(module + ".x") and any(fnmatch.fnmatch(name, p) for p in wanted))
        total = sum(counts.values())
        others = total - sum(counts[c] for c in columns)
        score = f"{counts['killed'] / total:.0%}" if total else "-"
        lines.append(f"{module:<18}" + "".join(f"{counts[c]:>10}" for c in columns) + f"{others:>8}{score:>8}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    # a module of SCOPE stands for its functions in scope: `make mutate MUTANTS=jobs.inference`
    wanted = [p for arg in argv for p in (patterns([arg]) if arg in SCOPE else [arg])] or patterns()
    if not argv:  # a fresh copy: the score is today's code against today's tests, nothing cached
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    # One thread per mutant's process: torch's thread pools would otherwise spin on the cores the other mutants run on.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    (ROOT / "mutants").mkdir(exist_ok=True)
    log = ROOT / "mutants" / "run.log"  # mutmut's progress, one line a mutant
    with open(log, "w") as out:
        run = subprocess.run([*MUTMUT, "run", *wanted], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if run.returncode:
        tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-20:]
        print("\n".join(tail), f"make mutate: mutmut run failed (exit {run.returncode}); all of it in {log}", sep="\n",
              file=sys.stderr)
        return 1
    statuses = {name: status for name, status in results().items() if any(fnmatch.fnmatch(name, p) for p in wanted)}
    print(f"mutation testing of {len(statuses)} mutants in {time.time() - started:.0f} s\n")
    print(table(statuses, wanted))
    left = sorted(name for name, status in statuses.items() if status not in ("killed", "no tests"))
    if left:
        print(f"\nnot killed ({len(left)}; `mutmut show NAME` shows the change):")
        print("\n".join(f"  {statuses[name]:<9} {name}" for name in left))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
