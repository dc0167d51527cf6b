"""The evaluate stage's readable output: report.md, and the table for a terminal.

    write_report(report, out_dir, training_logs={"sft": <run>/sft/metrics.jsonl, "dpo": ...},
                 stages={"sft": <its _SUCCESS.json record>, ...}, predictions=<predictions.jsonl rows>) -> out_dir/report.md
    format_table(report) -> the comparison table as aligned plain text (printed at the end of ``make demo``)

report.md tells the run's story top to bottom: what ran (model, each stage's method, steps, rows, time), the
comparison of every variant on every metric (a table and one figure), the samples behind each metric and what it
means, a few test questions with every variant's answer side by side, then benchmarks and training curves.

``report`` is the content of the evaluate stage's report.json:
``{"variants": {name: {"metrics": {metric: float}, "counts": {metric: int}, "samples": int}},
"primary_metric": "accuracy", "definitions": {metric: str}, "regression": {"regressed": bool, "summary": str, ...},
"model": ..., "family": ..., ...}``.
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
    # TRL 1.16's GRPOTrainer names: the weighted reward's mean over the generation batch, its spread within a prompt's
    # group (no spread, no signal), and how long the completions grew
    "grpo": (
        ("loss", ("loss",)),
        ("reward", ("reward",)),
        ("reward spread within a group", ("reward_std",)),
        ("completion length (tokens)", ("completions/mean_length",)),
    ),
}
DEFAULT_PANELS = (("loss", ("loss",)),)  # a stage without its own entry still gets its loss curve
COMPARISON_FIGURE = "comparison.png"
EXAMPLES_PER_SPLIT = 3  # the first questions of each test split, not chosen by outcome
EXAMPLE_TEXT_CHARS = 80  # a longer question or answer is cut there, marked with "…"


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


def metric_count(report: dict, metric: str) -> str:
    """The number of test samples behind the metric (report.json's ``counts``): one number where every variant was
    scored on as many, a range where they differ, the dash where the report does not say."""
    counts = sorted({
        count for variant in ordered_variants(report)
        if isinstance(count := report["variants"][variant].get("counts", {}).get(metric), int)
    })
    if not counts:
        return MISSING
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def count_row(report: dict) -> list[str]:
    """The table's last row: the samples behind each metric's values."""
    return ["samples", *(metric_count(report, metric) for metric in metric_names(report))]


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
    texts.append([f"*{cell}*" for cell in count_row(report)])
    aligned = _align(texts)
    rule = ["-" * len(aligned[0][0])] + ["-" * (len(cell) - 1) + ":" for cell in aligned[0][1:]]
    lines = [aligned[0], rule, *aligned[1:]]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def format_table(report: dict) -> str:
    """The comparison table as aligned plain text for a terminal; ``*`` marks the best value per metric."""
    header, rows = table_cells(report)
    # Non-best numbers get a trailing space where the best get "*", so the decimal points stay in one column.
    texts = [header] + [[row[0][0]] + [text + ("*" if is_best else " ") for text, is_best in row[1:]] for row in rows]
    counts = count_row(report)
    texts.append([counts[0]] + [count + " " for count in counts[1:]])
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


def curve_panels(stage: str, records: list[dict]) -> list[tuple[str, list[tuple]]]:
    """(title, [(logged key, line style, steps, values)]) of each panel the log has data for: a watched key drawn
    solid, its ``eval_`` twin (SFT's eval loss on the eval split) dashed beside it."""
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
    return panels


def plot_training_curves(stage: str, records: list[dict], path: Path) -> bool:
    """One PNG with a panel per watched quantity the log holds; returns False (and writes nothing) if it holds none."""
    panels = curve_panels(stage, records)
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


# ---- the comparison figure -------------------------------------------------------------------------------------


def comparison_grid(report: dict) -> tuple[list[str], list[str], list[list[float | None]], list[list[float | None]]]:
    """(metrics, variants, values, shades) of the comparison figure: a row per metric, a column per variant, None
    where a variant has no finite value. A fraction (every value of the row in [0, 1], higher better) is shaded by
    its value, so near-equal scores look near-equal; any other metric (a margin in nats, a loss) by its place between
    the row's worst (0) and best (1), all 1 where the row's values are equal."""
    metrics, variants = metric_names(report), ordered_variants(report)
    values, shades = [], []
    for metric in metrics:
        row = [metric_value(report, variant, metric) for variant in variants]
        row = [v if v is not None and math.isfinite(v) else None for v in row]
        present = [v for v in row if v is not None]
        low, high = (min(present), max(present)) if present else (0.0, 0.0)
        if not lower_is_better(metric) and 0 <= low and high <= 1:
            shade = list(row)
        else:
            shade = [None if v is None else 1.0 if high == low else (v - low) / (high - low) for v in row]
            if lower_is_better(metric):
                shade = [None if x is None else 1.0 - x for x in shade]
        values.append(row)
        shades.append(shade)
    return metrics, variants, values, shades


def plot_comparison(report: dict, path: Path) -> bool:
    """Every metric (rows) of every variant (columns) in one figure: each cell shows the value, shaded as
    ``comparison_grid`` says, the best in bold; a row's label carries its sample count. False (nothing written) where
    no variant has a value."""
    metrics, variants, values, shades = comparison_grid(report)
    if not any(v is not None for row in values for v in row):
        return False

    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.2 + 1.2 * len(variants), 0.9 + 0.38 * len(metrics)), layout="constrained")
    ax = fig.subplots()
    grid = [[float("nan") if x is None else x for x in row] for row in shades]
    ax.imshow(grid, cmap="Greens", vmin=-0.15, vmax=1.15, aspect="auto")  # margins keep the ends readable
    best = {metric: best_variants(report, metric) for metric in metrics}
    for i, metric in enumerate(metrics):
        for j, variant in enumerate(variants):
            value = values[i][j]
            ax.text(j, i, format_value(value), ha="center", va="center", fontsize=9,
                    fontweight="bold" if variant in best[metric] else "normal",
                    color="white" if shades[i][j] is not None and shades[i][j] > 0.6 else "black")
    ax.set_xticks(range(len(variants)), variants)
    ax.xaxis.tick_top()
    labels = [f"{metric}{' (lower is better)' if lower_is_better(metric) else ''}  n={metric_count(report, metric)}"
              for metric in metrics]
    ax.set_yticks(range(len(metrics)), labels, fontsize=9)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xticks([j + 0.5 for j in range(len(variants) - 1)], minor=True)
    ax.set_yticks([i + 0.5 for i in range(len(metrics) - 1)], minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    fig.suptitle("every metric of every variant: darker is better (fractions by value, others within their row)",
                 fontsize=9)
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


# ---- the run and the examples ----------------------------------------------------------------------------------


def _duration(seconds) -> str:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        return MISSING
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _number(value, spec: str) -> str:
    return MISSING if isinstance(value, bool) or not isinstance(value, (int, float)) else format(value, spec)


def run_rows(stages: dict[str, dict]) -> list[list[str]]:
    """A row per stage (stage, method, optimizer steps, epochs, train rows, final train loss, wall time), read from
    the stages' _SUCCESS.json records in the order given; prepare's rows are per data kind, train/eval/test."""
    rows = []
    for name, record in stages.items():
        metrics, rows_of = record.get("metrics") or {}, record.get("rows") or {}
        if name == "prepare":
            made = ", ".join(f"{kind} {' / '.join(str(n) for n in split.values())}" for kind, split in rows_of.items()
                             if isinstance(split, dict))
            rows.append([name, *[MISSING] * 3, made or MISSING, MISSING, _duration(record.get("duration_s"))])
            continue
        start = record.get("starting_from")
        method = str(record.get("method", MISSING)) + (f", from {start}" if start else "")
        rows.append([name, method, _number(record.get("steps"), "d"), _number(metrics.get("epoch"), ".3g"),
                     _number(rows_of.get("train"), "d"), _number(metrics.get("train_loss"), ".4g"),
                     _duration(record.get("duration_s"))])
    return rows


def _run_section(report: dict, stages: dict[str, dict]) -> list[str]:
    """What ran: the model, its family, and each stage's method, length and wall time."""
    family = f" (family `{report['family']}`)" if report.get("family") else ""
    lines = ["## The run", ""] + ([f"- model: `{report['model']}`{family}"] if report.get("model") else [])
    # Other plain top-level fields (task, ...) say what was evaluated too; nested ones are report.json's business.
    lines += [f"- {key}: {value}" for key, value in report.items()
              if key not in ("variants", "primary_metric", "model", "family") and isinstance(value, (str, int, float))]
    rows = run_rows(stages)
    if rows:
        header = ["stage", "method", "steps", "epochs", "train rows", "train loss", "wall time"]
        lines += ["", "| " + " | ".join(header) + " |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += ["", "prepare's rows are train / eval / test of each data kind; times are each stage's own "
                  "(`_SUCCESS.json`)."]
    return lines + [""] if len(lines) > 2 else []


def _cell(text, limit: int = EXAMPLE_TEXT_CHARS) -> str:
    """Text safe inside a Markdown table cell, on one line, cut at ``limit`` characters."""
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return re.sub(r"([\\`*_|<>\[\]#])", r"\\\1", text) if text else "(empty)"


def prediction_examples(predictions: list[dict], per_split: int = EXAMPLES_PER_SPLIT) -> dict[str, list[dict]]:
    """The first ``per_split`` test questions of each split, each with every variant's answer:
    ``{split: [{"question", "gold", "answers": {variant: (answer, correct)}}]}``. evaluate writes each variant's
    predictions in the order of the rows, so the i-th prediction of a split is the same question for every variant."""
    examples: dict[str, list[dict]] = {}
    seen: dict[tuple[str, str], int] = {}
    for row in predictions:
        split, variant = row.get("split", "?"), row.get("variant", "?")
        index = seen[split, variant] = seen.get((split, variant), -1) + 1
        if index >= per_split:
            continue
        questions = examples.setdefault(split, [])
        if index == len(questions):
            questions.append({"question": row.get("question", ""), "gold": row.get("gold", ""), "answers": {}})
        questions[index]["answers"][variant] = (row.get("answer", ""), row.get("correct"))
    return examples


def _gold(gold) -> str:
    return " / ".join(map(str, gold)) if isinstance(gold, list) else str(gold)


def _examples_section(report: dict, predictions: list[dict]) -> list[str]:
    """A table per test split: the question, the reference answer and every variant's answer, marked right or wrong."""
    examples = prediction_examples(predictions)
    if not examples:
        return []
    known = ordered_variants(report)
    lines = ["## Example answers", "",
             f"The first {EXAMPLES_PER_SPLIT} questions of each test split, every variant's answer beside the reference "
             "(✓ right, ✗ wrong as the split's metric counts it); all of them are in `predictions.jsonl`.", ""]
    for split, questions in examples.items():
        variants = [v for v in known if any(v in q["answers"] for q in questions)]
        variants += [v for q in questions for v in q["answers"] if v not in variants]
        lines += [f"### {split}", "", "| question | reference | " + " | ".join(f"`{v}`" for v in variants) + " |",
                  "| --- | --- |" + " --- |" * len(variants)]
        for q in questions:
            answers = []
            for variant in variants:
                answer, correct = q["answers"].get(variant, (None, None))
                mark = {True: " ✓", False: " ✗"}.get(correct, "")
                answers.append(MISSING if answer is None else _cell(answer) + mark)
            lines.append(f"| {_cell(q['question'])} | {_cell(_gold(q['gold']))} | " + " | ".join(answers) + " |")
        lines.append("")
    return lines


# ---- report.md -------------------------------------------------------------------------------------------------


def _results_section(report: dict, out_dir: Path) -> list[str]:
    """The comparison table, the same as one figure, and what each metric is, over how many samples."""
    primary = report.get("primary_metric")
    lines = [
        "## Results",
        "",
        (f"Primary metric: `{primary}`. " if primary else "")
        + f"Best value per metric in **bold**; {MISSING} where a variant has no value; the last row is the number of "
        "test samples each metric was computed on.",
        "",
        markdown_table(report),
        "",
    ]
    if plot_comparison(report, out_dir / COMPARISON_FIGURE):
        lines += [f"![every metric of every variant]({COMPARISON_FIGURE})", ""]
    verdict = report.get("regression")
    if verdict:  # jobs.history: the shipped variant against the last good night of the recipe
        mark = "**Regressed.** " if verdict.get("regressed") else ""
        lines += ["### Against the last good night", "", f"{mark}{verdict['summary']}.", ""]
    definitions = report.get("definitions") or {}
    described = [metric for metric in metric_names(report) if metric in definitions]
    if described:
        lines += ["### The metrics", "", "Fractions of the samples counted, unless said otherwise.", ""]
        lines += [f"- `{metric}` ({metric_count(report, metric)} samples): {definitions[metric]}" for metric in described]
        lines.append("")
    return lines


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


def write_report(
    report: dict, out_dir: Path, *, training_logs: dict[str, Path], stages: dict[str, dict] | None = None,
    predictions: list[dict] | None = None,
) -> Path:
    """Write ``out_dir/report.md`` and its PNGs (linked by relative path); return the report.md path.

    ``stages``: the run's _SUCCESS.json records by stage, for the run summary; ``predictions``: the rows of
    predictions.jsonl, for the example answers. A section without its data is left out: a stage whose metrics.jsonl
    is missing or logs nothing plottable, the figure where no variant has a value, the examples without predictions.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Evaluation report",
        "",
        *_run_section(report, stages or {}),
        *_results_section(report, out_dir),
        *_examples_section(report, predictions or []),
        *_benchmarks_section(report),
        *_published_section(report),
        *_training_curves_section(training_logs, out_dir),
    ]
    report_path = out_dir / "report.md"
    report_path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")  # "—" must not depend on the locale
    return report_path
