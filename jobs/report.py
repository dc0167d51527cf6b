"""The evaluate stage's readable output: report.md with the comparison table and plots, and the table for a terminal.

    write_report(report, out_dir, training_logs={"sft": <run>/sft/metrics.jsonl, "dpo": ...}) -> out_dir/report.md
    format_table(report) -> the comparison table as aligned plain text (printed at the end of ``make demo``)

``report`` is the content of the evaluate stage's report.json:
``{"variants": {name: {"metrics": {metric: float}, "samples": int}}, "primary_metric": "accuracy", ...}``.
matplotlib is imported inside the plotting functions, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

from jobs.recipe import VARIANTS  # in the pipeline's order: each variant builds on the previous

MISSING = "—"
DECIMALS = 3
# Every metric the evaluate stage writes is better when higher (accuracies, F1, margins); losses are the exception.
LOWER_IS_BETTER_SUFFIXES = ("loss", "perplexity")

# Training-curve panels per stage: (title, log keys drawn in it). The DPO panels are the ones the DPO blog post
# watches (rewards of chosen and rejected, their margin, the reward accuracy); the keys are TRL 1.16's
# DPOTrainer metric names. An ``eval_`` twin of a key, when logged, is drawn dashed in the same panel.
CURVE_PANELS = {
    "sft": (("loss", ("loss",)),),
    "dpo": (
        ("loss", ("loss",)),
        ("rewards", ("rewards/chosen", "rewards/rejected")),
        ("reward margin (chosen - rejected)", ("rewards/margins",)),
        ("reward accuracy (chosen > rejected)", ("rewards/accuracies",)),
    ),
}
DEFAULT_PANELS = (("loss", ("loss",)),)  # a stage without its own entry still gets its loss curve


# ---- the table -------------------------------------------------------------------------------------------------


def ordered_variants(report: dict) -> list[str]:
    """Variant names in pipeline order; names we don't know keep their report order, after the known ones."""
    names = list(report.get("variants", {}))
    known = [name for name in VARIANTS if name in names]
    return known + [name for name in names if name not in VARIANTS]


def metric_names(report: dict) -> list[str]:
    """Every metric any variant has, the primary one first, the rest in order of first appearance."""
    names: list[str] = []
    for variant in ordered_variants(report):
        for name in report["variants"][variant].get("metrics", {}):
            if name not in names:
                names.append(name)
    primary = report.get("primary_metric")
    if primary in names:
        names.remove(primary)
        names.insert(0, primary)
    return names


def metric_value(report: dict, variant: str, metric: str) -> float | None:
    """The variant's value for the metric, or None where it has none (or a non-number)."""
    value = report["variants"][variant].get("metrics", {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def format_value(value: float | None) -> str:
    return MISSING if value is None else f"{value:.{DECIMALS}f}"


def lower_is_better(metric: str) -> bool:
    return metric.endswith(LOWER_IS_BETTER_SUFFIXES)


def best_variants(report: dict, metric: str) -> set[str]:
    """The variants holding the best value of the metric, compared as shown (to 3 decimals), so equal-looking
    numbers are marked together. Empty where fewer than two variants have a finite value, or all show the same:
    nothing stands out."""
    shown = {}
    for variant in ordered_variants(report):
        value = metric_value(report, variant, metric)
        if value is not None and math.isfinite(value):
            shown[variant] = round(value, DECIMALS)
    if len(shown) < 2 or len(set(shown.values())) == 1:
        return set()
    best = (min if lower_is_better(metric) else max)(shown.values())
    return {variant for variant, value in shown.items() if value == best}


def table_cells(report: dict) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """The header and, per variant, (shown text, is best) for each cell; the first column is the variant name."""
    metrics = metric_names(report)
    best = {metric: best_variants(report, metric) for metric in metrics}
    rows = []
    for variant in ordered_variants(report):
        cells = [(variant, False)]
        cells += [(format_value(metric_value(report, variant, m)), variant in best[m]) for m in metrics]
        rows.append(cells)
    return ["variant", *metrics], rows


def _align(rows: list[list[str]]) -> list[list[str]]:
    """Pad every column to its widest cell: the first (names) to the left, the numbers to the right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        [cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths))]
        for row in rows
    ]


def markdown_table(report: dict) -> str:
    """The comparison table in Markdown, the best value per metric in bold, columns padded for the raw text too."""
    header, rows = table_cells(report)
    texts = [header] + [[f"**{text}**" if is_best else text for text, is_best in row] for row in rows]
    aligned = _align(texts)
    rule = ["-" * len(aligned[0][0])] + ["-" * (len(cell) - 1) + ":" for cell in aligned[0][1:]]
    lines = [aligned[0], rule, *aligned[1:]]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def format_table(report: dict) -> str:
    """The comparison table as aligned plain text for a terminal; ``*`` marks the best value per metric."""
    header, rows = table_cells(report)
    # Non-best numbers get a trailing space where the best get "*", so the decimal points stay in one column.
    texts = [header] + [[row[0][0]] + [text + ("*" if is_best else " ") for text, is_best in row[1:]] for row in rows]
    lines = ["  ".join(cells).rstrip() for cells in _align(texts)]
    if any(is_best for row in rows for _, is_best in row):
        lines.append("* best per metric")
    return "\n".join(lines)


# ---- training logs ---------------------------------------------------------------------------------------------


def read_metrics_log(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not JSON is skipped with a warning on stderr, because a
    preempted job can leave its last line half-written and the report should still show the rest."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(f"report: skipping line {number} of {path}: not JSON", file=sys.stderr)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def log_series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one logged key in step order. Where a step was logged twice (a run resumed from a
    checkpoint re-logs the steps after it) the later line wins, since it belongs to the run that finished."""
    by_step: dict[float, float] = {}
    for record in records:
        value, step = record.get(key), record.get("step")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(step, (int, float)):
            by_step[step] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_training_curves(stage: str, records: list[dict], path: Path) -> bool:
    """One PNG with a panel per watched quantity the log holds; returns False (and writes nothing) if it holds none."""
    panels = []
    for title, keys in CURVE_PANELS.get(stage, DEFAULT_PANELS):
        lines = []
        for key in keys:
            for logged, style in ((key, "-"), (f"eval_{key}", "--")):
                steps, values = log_series(records, logged)
                if steps:
                    lines.append((logged, style, steps, values))
        if lines:
            panels.append((title, lines))
    if not panels:
        return False

    # Figure draws with the Agg canvas on savefig without pyplot, so no global backend or figure state is touched.
    from matplotlib.figure import Figure

    columns = min(2, len(panels))  # two across keeps the four DPO panels readable at a Markdown viewer's width
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.0 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, lines) in zip(axes, panels):
        for label, style, steps, values in lines:
            ax.plot(steps, values, style, marker="." if len(steps) < 20 else None, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(f"{stage} training")
    fig.savefig(path, dpi=100)
    return True


def plot_metric_bars(report: dict, metric: str, path: Path) -> bool:
    """A bar per variant that has a finite value of the metric, the best highlighted; False (nothing written)
    where no variant has one."""
    values = {}
    for variant in ordered_variants(report):
        value = metric_value(report, variant, metric)
        if value is not None and math.isfinite(value):
            values[variant] = value
    if not values:
        return False
    best = best_variants(report, metric)

    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.3 * len(values) + 2, 3.2), layout="constrained")
    ax = fig.subplots()
    colors = ["tab:orange" if variant in best else "tab:blue" for variant in values]
    bars = ax.bar(list(values), list(values.values()), color=colors)
    ax.bar_label(bars, fmt=f"%.{DECIMALS}f", fontsize=8)
    ax.set_title(metric + (" (lower is better)" if lower_is_better(metric) else ""), fontsize=10)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.margins(y=0.15)  # room for the value labels above the tallest bar
    fig.savefig(path, dpi=100)
    return True


# ---- benchmarks and published numbers ---------------------------------------------------------------------------

BENCHMARK_SCORING = {  # how each benchmark format is scored: jobs.metrics follows the official script named
    "amber": "AMBER's discriminative task, scored as junyangwang0410/AMBER `inference.py`: a response counts only when it "
             "is exactly `Yes` or `No`; precision, recall and F1 take `No` as the positive class; values are the "
             "script's percentages (rounded to 0.1, F1 from the rounded precision and recall) / 100",
    "pope": "POPE, scored as RUCAIBox/POPE `evaluate.py`: an answer is `no` when its first sentence has the word "
            "`No`, `no` or `not`, else `yes`; precision, recall and F1 take `yes` as the positive class; `yes_ratio` "
            "is the share of `yes` answers",
}
YES_NO_NOTE = ("`yes_no_accuracy`, `no_*` and `yes_*` are agreement of the generated answers with the held-out rows' own "
               "yes/no answers, `no` the positive class in `no_*`, `yes` in `yes_*`: the data's test split, not a benchmark.")
# Published AMBER discriminative results in percent, as the DPO blog post ("Preference Optimization for Vision
# Language Models with TRL") reports them: its Idefics2-8B before and after DPO, and the other models it lists.
PUBLISHED_AMBER = {
    "huggingfacem4/idefics2-8b": {
        "source": "the TRL blog post \"Preference Optimization for Vision Language Models with TRL\"",
        "variants": {"base": ("Idefics2", 85.8, 89.1), "dpo": ("Idefics2+DPO", 85.9, 89.4)},
        "others": (("GPT-4o", 88.8, 91.6), ("GPT-4v", 83.4, 87.4), ("MiniGemini", 82.6, 87.6), ("LLaVA-NeXT", 81.4, 85.4),
                   ("QWEN-VL", 81.9, 86.4), ("LURE", 73.5, 77.7), ("OPERA", 75.2, 78.3), ("Less-is-more", 72.4, 75.8)),
    },
}


def _benchmarks_section(report: dict) -> list[str]:
    """What each benchmark column is, and what the yes/no columns are not."""
    benchmarks = report.get("benchmarks") or {}
    has_yes_no = any(name.startswith(("no_", "yes_")) for name in metric_names(report))
    if not benchmarks and not has_yes_no:
        return []
    lines = ["## Benchmarks", ""]
    for key, bench in benchmarks.items():
        lines.append(f"- `{key}_*`: {bench.get('questions', MISSING)} questions of `{bench.get('path')}`. "
                     f"{BENCHMARK_SCORING.get(bench.get('format'), '')}.")
    if has_yes_no:
        lines.append(f"- {YES_NO_NOTE}")
    return lines + [""]


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{value * 100:.1f}"


def _published_section(report: dict) -> list[str]:
    """Our AMBER numbers beside the published ones, for the model they were published for; nothing otherwise."""
    published = PUBLISHED_AMBER.get(str(report.get("model", "")).lower())
    amber = [key for key, bench in (report.get("benchmarks") or {}).items() if bench.get("format") == "amber"]
    if not published or not amber:
        return []
    key = amber[0]
    lines = ["## AMBER beside the published numbers", "",
             f"Discriminative task, in percent: ours on `{key}` and those published in {published['source']}.", "",
             "| model | variant | accuracy (published) | accuracy (ours) | F1 (published) | F1 (ours) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for variant, (label, accuracy, f1) in published["variants"].items():
        if variant in report["variants"]:
            ours = [_percent(metric_value(report, variant, f"{key}_{m}")) for m in ("accuracy", "f1")]
            lines.append(f"| {label} | `{variant}` | {accuracy:.1f} | {ours[0]} | {f1:.1f} | {ours[1]} |")
    for label, accuracy, f1 in published["others"]:
        lines.append(f"| {label} | | {accuracy:.1f} | | {f1:.1f} | |")
    return lines + [""]


# ---- report.md -------------------------------------------------------------------------------------------------


def _summary_section(report: dict) -> list[str]:
    """What was evaluated, the comparison table, and the sample count of each variant."""
    # Other plain top-level fields (task, model, ...) say what was evaluated; nested ones are report.json's business.
    context = [
        (key, value) for key, value in report.items()
        if key not in ("variants", "primary_metric") and isinstance(value, (str, int, float))
    ]
    lines = [f"- {key}: {value}" for key, value in context] + ([""] if context else [])
    primary = report.get("primary_metric")
    lines += [
        (f"Primary metric: `{primary}`. " if primary else "")
        + f"Best value per metric in **bold**; {MISSING} where a variant has no value.",
        "",
        markdown_table(report),
        "",
    ]
    for variant in ordered_variants(report):
        samples = report["variants"][variant].get("samples")
        lines.append(f"- `{variant}`: {samples if samples is not None else MISSING} samples")
    return lines + [""]


def _metric_bars_section(report: dict, out_dir: Path) -> list[str]:
    lines = []
    for metric in metric_names(report):
        name = f"metric_{_slug(metric)}.png"
        if plot_metric_bars(report, metric, out_dir / name):
            lines += [f"![{metric} across variants]({name})", ""]
    return ["## Metrics across variants", "", *lines] if lines else []


def _training_curves_section(training_logs: dict[str, Path], out_dir: Path) -> list[str]:
    lines = []
    for stage in training_logs:  # in the order given: the run's
        path = Path(training_logs[stage])
        if not path.is_file():
            continue
        name = f"training_{_slug(stage)}.png"
        if plot_training_curves(stage, read_metrics_log(path), out_dir / name):
            lines += [f"### {stage}", "", f"![{stage} training curves]({name})", ""]
    return ["## Training curves", "", *lines] if lines else []


def write_report(report: dict, out_dir: Path, *, training_logs: dict[str, Path]) -> Path:
    """Write ``out_dir/report.md`` and its PNGs (linked by relative path); return the report.md path.

    A stage whose metrics.jsonl is missing, or logs nothing plottable, is left out; so is a metric no variant has.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Evaluation report",
        "",
        *_summary_section(report),
        *_benchmarks_section(report),
        *_published_section(report),
        *_metric_bars_section(report, out_dir),
        *_training_curves_section(training_logs, out_dir),
    ]
    report_path = out_dir / "report.md"
    report_path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")  # "—" must not depend on the locale
    return report_path
