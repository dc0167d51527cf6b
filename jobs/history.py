"""A recipe's nights: what each run shipped and how it scored, whether it regressed, and pruning old run folders.

    <run.root>/.history/<recipe name>.jsonl     one JSON object a line, appended by evaluate when it has finished

A line (a night) holds the run id, the date, the recipe's fingerprint (every section that shapes the model: all but
run, kubernetes and resources), the image, the variant the run ships (merge_push's source) with each of its metrics
and the samples behind each, the primary metric's value and standard error, and the verdict against the last good
night. On a cluster ``run.root`` is the shared volume's mount, so the history lives beside the run folders.

Regression, the rule: a night is regressed when its primary metric is below the last good (not regressed) night's by
more than the standard error of the difference, ``sqrt(se_last^2 + se_night^2)``: both are scores on finite test sets,
as merge_push compares the tuned model with base. A fraction's standard error is ``sqrt(p(1 - p) / n)``; a mean of
per-sample values' (mean_margin) is their spread over sqrt(n) (``jobs.metrics``). evaluate's metrics are all better
when higher. The first night, and a night whose primary metric no earlier good night has, is not judged.

Append-safe: a line is one ``write`` on a file opened ``O_APPEND`` and then synced, so two writers never interleave
within a line; a writer killed mid-line leaves a torn last line, which reading skips (saying so), and the next append
starts on a line of its own. A night evaluated again (``--force``) appends again: the latest line of a run id counts,
at the place of its first.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from jobs import contract

HISTORY_DIR = ".history"
# The sections of a recipe that do not change what is trained or how it is scored: left out of the night's
# fingerprint, so that two nights of the same recipe (another run id, another cluster) show the same one.
NOT_FINGERPRINTED = ("run", "kubernetes", "resources")


def history_path(root: str | Path, recipe_name: str) -> Path:
    return Path(root) / HISTORY_DIR / f"{recipe_name}.jsonl"


def recipe_fingerprint(cfg) -> str:
    sections = [name for name in cfg.to_dict() if name not in NOT_FINGERPRINTED]
    return cfg.fingerprint(*sections)


# ---- reading and writing -----------------------------------------------------------------------------------------


def append(path: Path, night: dict) -> None:
    """Add one night as one line (see the module docstring for why it is safe against crashes and other writers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(night, sort_keys=False, default=str) + "\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn line before: start afresh
            line = "\n" + line
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path, *, quiet: bool = False) -> list[dict]:
    """The nights in the order they were first added, each as its latest line says. A line that is no JSON object
    (a writer stopped mid-line) is skipped, and counted on stderr unless ``quiet``."""
    path = Path(path)
    if not path.is_file():
        return []
    nights: dict[str, dict] = {}
    torn = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            night = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if not isinstance(night, dict) or "run_id" not in night:
            torn += 1
            continue
        nights[night["run_id"]] = night  # an existing key keeps its place
    if torn and not quiet:
        print(f"history: skipped {torn} unreadable line{'s' * (torn > 1)} in {path} (a writer stopped mid-line)", file=sys.stderr)
    return list(nights.values())


# ---- a night and its verdict -------------------------------------------------------------------------------------


def night_of(cfg, report: dict, standard_error: float | None) -> dict:
    """The line the run adds: its shipped variant's scores from evaluate's report, with what identifies the run."""
    variant = cfg.shipped_stage
    scored = report["variants"].get(variant, {})
    metric = cfg.evaluate.primary_metric
    return {
        "run_id": cfg.run_id,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": cfg.name,
        "fingerprint": recipe_fingerprint(cfg),
        "image": cfg.kubernetes.image or "local",
        "variant": variant,
        "primary_metric": metric,
        "value": scored.get("metrics", {}).get(metric),
        "samples": scored.get("counts", {}).get(metric),
        "standard_error": standard_error,
        "metrics": scored.get("metrics", {}),
        "counts": scored.get("counts", {}),
    }


def last_good(nights: list[dict], metric: str | None = None) -> dict | None:
    """The newest night scored and not regressed (on ``metric``, when given)."""
    good = [n for n in nights if not n.get("regressed") and n.get("value") is not None
            and (metric is None or n.get("primary_metric") == metric)]
    return good[-1] if good else None


def judge(nights: list[dict], night: dict) -> dict:
    """The verdict on ``night`` against the last good night before it in ``nights`` (the module docstring's rule)."""
    metric, value = night["primary_metric"], night["value"]
    if value is None:
        return {"regressed": False, "against": None,
                "summary": f"not judged: the run has no {metric} of its {night['variant']} variant"}
    baseline = last_good([n for n in nights if n["run_id"] != night["run_id"]], metric)
    if baseline is None:
        return {"regressed": False, "against": None, "summary": f"the first night with {metric}: nothing to compare with"}
    errors = [e or 0.0 for e in (baseline.get("standard_error"), night.get("standard_error"))]
    error = math.sqrt(sum(e * e for e in errors))
    drop = baseline["value"] - value
    regressed = drop > error
    summary = (f"{night['variant']} scores {value:.3f} {metric} over {night.get('samples')} samples, the last good night "
               f"{baseline['run_id']} {baseline['value']:.3f}: {'down' if drop > 0 else 'up'} {abs(drop):.3f}, "
               f"{'more' if regressed else 'not more'} than the standard error of the difference {error:.3f}")
    # "difference_error", not "standard_error": the history's line holds the verdict beside the night's own error
    return {"regressed": regressed, "against": baseline["run_id"], "baseline": baseline["value"], "drop": drop,
            "difference_error": error, "summary": ("regressed: " if regressed else "") + summary}


def regression_of(run_dir: Path) -> dict | None:
    """The verdict evaluate recorded for a finished run (its _SUCCESS.json), or None."""
    marker = Path(run_dir) / "evaluate" / contract.SUCCESS_FILE
    if not marker.is_file():
        return None
    return contract.read_json(marker).get("regression")


def refuse_regressed(verdict: dict | None) -> None:
    """End a regressed run with its own exit code (contract.EXIT_REGRESSED): evaluate, when it decides and whenever it
    finds the run done, and the local runner skipping a done evaluate, so that the chain stops before merge_push."""
    if verdict and verdict.get("regressed"):
        raise contract.Regressed(f"evaluate: {verdict['summary']}; the chain stops here, and merge_push refuses to push "
                                 "this run (merge_push.force=true pushes it anyway)")


# ---- what a user reads -------------------------------------------------------------------------------------------


def table(nights: list[dict], root: str | Path) -> str:
    """The nights as aligned text: one row each, oldest first; ``regressed`` names the night it fell below."""
    header = ["run", "date", "variant", "metric", "value", "± se", "n", "verdict", "fingerprint", "image", "folder"]
    rows = [header]
    for n in nights:
        value, error = n.get("value"), n.get("standard_error")
        verdict = (f"REGRESSED (vs {n['against']})" if n.get("regressed") else
                   "ok" if n.get("against") else "first" if value is not None else "no value")
        rows.append([
            n["run_id"], str(n.get("date", ""))[:16].replace("T", " "), str(n.get("variant")), str(n.get("primary_metric")),
            "—" if value is None else f"{value:.3f}", "—" if error is None else f"{error:.3f}", str(n.get("samples") or "—"),
            verdict, str(n.get("fingerprint", "")), str(n.get("image", "")),
            "kept" if (Path(root) / n["run_id"]).is_dir() else "pruned",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def plot(nights: list[dict], path: Path, title: str) -> bool:
    """The primary metric night by night with its standard error, regressed nights in red, as a PNG (matplotlib, as
    report.md's figures). False (nothing written) when no night has a value."""
    drawn = [(i, n) for i, n in enumerate(nights) if n.get("value") is not None]
    if not drawn:
        return False
    from matplotlib.figure import Figure  # the Agg canvas on savefig, no pyplot state

    fig = Figure(figsize=(max(4.5, 1.0 + 0.7 * len(nights)), 3.6), layout="constrained")
    ax = fig.subplots()
    xs = [i for i, _ in drawn]
    ys = [n["value"] for _, n in drawn]
    ax.plot(xs, ys, color="0.6", linewidth=1, zorder=1)
    for i, n in drawn:
        colour = "tab:red" if n.get("regressed") else "tab:blue"
        ax.errorbar([i], [n["value"]], yerr=[n.get("standard_error") or 0.0], fmt="o", color=colour, capsize=3, zorder=2)
    ax.set_xticks(range(len(nights)), [n["run_id"] for n in nights], rotation=30, ha="right", fontsize=8)
    metrics = sorted({str(n.get("primary_metric")) for _, n in drawn})
    ax.set_ylabel(", ".join(metrics))
    ax.grid(alpha=0.3)
    ax.set_title(f"{title}: {', '.join(metrics)} by night (± standard error; red: regressed)", fontsize=9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return True


# ---- pruning -----------------------------------------------------------------------------------------------------


def prune(root: str | Path, recipe_name: str, keep: int, *, spare: tuple[str, ...] = (), in_use=None) -> tuple[list[str], dict[str, str]]:
    """Remove the folders of the recipe's runs (those in its history) beyond the newest ``keep``; never the last
    good run's, a run in use (``contract.run_in_use``, or ``in_use(run_id)`` where the caller knows more, such as
    the run's Jobs), nor those in ``spare``. Returns (the run ids removed, the runs kept with why). A run that never
    reached evaluate is not in the history and is left alone."""
    if keep < 1:
        raise contract.UserError(f"--keep: {keep} keeps no run; at least 1")
    root = Path(root)
    nights = read(history_path(root, recipe_name))
    present = [n["run_id"] for n in nights if (root / n["run_id"]).is_dir()]
    good = last_good(nights)
    kept: dict[str, str] = {}
    for run_id in present[-keep:]:
        kept[run_id] = f"one of the newest {keep}"
    if good and good["run_id"] in present:
        kept.setdefault(good["run_id"], "the last good run")
    for run_id in present:
        if run_id in kept:
            continue
        if run_id in spare:
            kept[run_id] = "this run"
        elif contract.run_in_use(root / run_id) or (in_use is not None and in_use(run_id)):
            kept[run_id] = "in use"
    removed = []
    for run_id in present:
        if run_id in kept:
            continue
        # Renamed first, so that a prune stopped midway leaves a hidden folder, not a run folder with holes.
        doomed = root / f".{run_id}.pruning"
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(root / run_id, doomed)
        shutil.rmtree(doomed)
        removed.append(run_id)
    return removed, kept
