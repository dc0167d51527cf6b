"""report.md, its plots and the terminal table, written from a fake report.json and small metrics.jsonl files."""

import json
import re
from pathlib import Path

import pytest

from jobs.report import (
    comparison_grid,
    curve_panels,
    format_table,
    log_series,
    markdown_table,
    metric_count,
    ordered_variants,
    prediction_examples,
    read_metrics_log,
    run_rows,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

COUNTS = {"relaxed_accuracy": 80, "exact_match": 80, "preference_accuracy": 40}
REPORT = {
    "task": "chartqa",
    "model": "org/tiny",
    "family": "llava",
    "primary_metric": "relaxed_accuracy",
    "variants": {  # deliberately out of pipeline order
        "sft": {"metrics": {"relaxed_accuracy": 0.61, "exact_match": 0.5, "preference_accuracy": 0.7}, "counts": COUNTS, "samples": 120},
        "base": {"metrics": {"relaxed_accuracy": 0.42, "exact_match": 0.3}, "counts": COUNTS, "samples": 120},
        "prompted": {"metrics": {"relaxed_accuracy": 0.4504, "exact_match": 0.5}, "counts": COUNTS, "samples": 120},
        "dpo": {"metrics": {"relaxed_accuracy": 0.6, "preference_accuracy": 0.85}, "counts": COUNTS, "samples": 120},
    },
    "definitions": {"relaxed_accuracy": "numbers within 5%", "exact_match": "the same text",
                    "preference_accuracy": "chosen more likely than rejected", "not_reported": "left out"},
}
# The _SUCCESS.json records of a run's stages, as jobs.contract writes them (the fields the summary reads).
STAGES = {
    "prepare": {"rows": {"sft": {"train": 320, "eval": 40, "test": 80}, "dpo": {"train": 288, "eval": 36, "test": 40}},
                "duration_s": 21.4},
    "sft": {"method": "full", "steps": 200, "rows": {"train": 320, "eval": 40}, "duration_s": 95.2,
            "metrics": {"train_loss": 0.5321, "epoch": 10.0, "train_runtime": 80.1}},
    "dpo": {"method": "lora", "starting_from": "sft adapter merged", "steps": 144, "rows": {"train": 288, "eval": 36},
            "duration_s": 3725, "metrics": {"train_loss": 0.2, "epoch": 8.0}},
}


def predictions() -> list[dict]:
    """predictions.jsonl as evaluate writes it: each variant's rows in the test split's order, split after split."""
    rows = []
    for variant in ("base", "prompted", "sft", "dpo"):
        for i in range(5):
            right = variant in ("sft", "dpo")
            rows.append({"variant": variant, "split": "sft/test", "question": f"What colour is bar {i}?",
                         "answer": "red" if right else "dat=D\ufffd yellowVi|*", "gold": ["red", "Red"], "correct": right})
        for i in range(4):
            rows.append({"variant": variant, "split": "dpo/test", "question": f"Is there a cat {i}?", "answer": "No",
                         "gold": "No, there is no cat.", "correct": variant == "dpo", "chosen_logp": -3.0, "rejected_logp": -4.0})
    return rows


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def sft_log(path: Path) -> Path:
    records = [{"step": s, "epoch": s / 40, "loss": 2.0 / s, "learning_rate": 2e-4} for s in (10, 20, 30, 40)]
    records.append({"step": 20, "epoch": 0.5, "eval_loss": 0.2})
    records.append({"step": 40, "epoch": 1.0, "train_runtime": 3.0, "train_loss": 0.1})  # Trainer's closing summary
    return write_jsonl(path, records)


def dpo_log(path: Path) -> Path:
    # TRL 1.16 DPOTrainer keys.
    records = [
        {"step": s, "epoch": s / 30, "loss": 0.69 - s / 1000, "rewards/chosen": s / 100, "rewards/rejected": -s / 100,
         "rewards/margins": s / 50, "rewards/accuracies": 0.5 + s / 100, "logps/chosen": -40.0, "logps/rejected": -45.0}
        for s in (10, 20, 30)
    ]
    return write_jsonl(path, records)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One full report, written once: matplotlib's first figure costs about a second."""
    root = tmp_path_factory.mktemp("report")
    logs = {"sft": sft_log(root / "sft.jsonl"), "dpo": dpo_log(root / "dpo.jsonl")}
    out = root / "out"
    return write_report(REPORT, out, training_logs=logs, stages=STAGES, predictions=predictions())


def embedded_images(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_writes_report_md_and_returns_its_path(written):
    assert written.name == "report.md" and written.is_file()
    assert written.read_text().startswith("# Evaluation report\n")


def test_every_embedded_plot_is_a_real_png_next_to_the_report(written):
    """Issue 13 (10): one comparison figure for every metric and variant, not a bar chart per metric."""
    images = embedded_images(written.read_text())
    assert images == ["comparison.png", "training_sft.png", "training_dpo.png"]
    for name in images:
        data = (written.parent / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert len(data) > 5_000, f"{name} is only {len(data)} bytes"
    assert sorted(path.name for path in written.parent.glob("*.png")) == sorted(images), "no other figure"


def test_the_report_tells_the_story_in_order(written):
    text = written.read_text()
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections == ["## The run", "## Results", "## Example answers", "## Training curves"]
    assert text.index("training_sft.png") < text.index("training_dpo.png")
    assert "- task: chartqa" in text and "Primary metric: `relaxed_accuracy`" in text


def test_comparison_grid_holds_every_metric_of_every_variant():
    metrics, variants, values, shades = comparison_grid(REPORT)
    assert metrics == ["relaxed_accuracy", "exact_match", "preference_accuracy"]
    assert variants == ["base", "prompted", "sft", "dpo"]
    assert values == [[0.42, 0.4504, 0.61, 0.6], [0.3, 0.5, 0.5, None], [None, None, 0.7, 0.85]]
    assert shades == values, "fractions are shaded by their value: near-equal scores look near-equal"


def test_comparison_shades_other_metrics_within_their_row_best_darkest():
    report = {"variants": {
        "base": {"metrics": {"mean_margin": -3.0, "eval_loss": 2.0, "f1": float("nan")}},
        "sft": {"metrics": {"mean_margin": 1.0, "eval_loss": 1.0, "f1": 0.5}},
        "dpo": {"metrics": {"mean_margin": 0.0, "eval_loss": 1.5}},
    }}
    metrics, _, values, shades = comparison_grid(report)
    rows = dict(zip(metrics, shades))
    assert rows["mean_margin"] == [0.0, 1.0, 0.75]
    assert rows["eval_loss"] == [0.0, 1.0, 0.5], "lower is better: the smallest loss is darkest"
    assert rows["f1"] == [None, 0.5, None] and dict(zip(metrics, values))["f1"] == [None, 0.5, None]


def test_report_gives_each_metric_its_sample_count_and_definition(written):
    """Issue 13 (10): accuracy over 80 answer rows, preference accuracy over 40 pairs, not '120 samples' for all."""
    text = written.read_text()
    assert table_rows(markdown_table(REPORT))["*samples*"] == ["*80*", "*80*", "*40*"]
    assert "- `relaxed_accuracy` (80 samples): numbers within 5%" in text
    assert "- `preference_accuracy` (40 samples): chosen more likely than rejected" in text
    assert "not_reported" not in text, "only the metrics the report has"
    assert "120" not in text


def test_metric_count_is_one_number_a_range_or_a_dash():
    report = {"variants": {"base": {"counts": {"a": 80, "b": 38}}, "sft": {"counts": {"a": 80, "b": 40}}, "dpo": {}}}
    assert [metric_count(report, m) for m in ("a", "b", "c")] == ["80", "38-40", "—"]


def test_the_run_summary_reads_each_stage_s_record():
    assert run_rows(STAGES) == [
        ["prepare", "—", "—", "—", "sft 320 / 40 / 80, dpo 288 / 36 / 40", "—", "21s"],
        ["sft", "full", "200", "10", "320", "0.5321", "1m 35s"],
        ["dpo", "lora, from sft adapter merged", "144", "8", "288", "0.2", "1h 02m"],
    ]
    assert run_rows({"sft": {"method": "qlora"}}) == [["sft", "qlora", "—", "—", "—", "—", "—"]], "an old record lacks fields"


def test_the_report_opens_with_the_run(written):
    text = written.read_text()
    run = text.split("## The run\n\n")[1].split("\n## ")[0]
    assert run.startswith("- model: `org/tiny` (family `llava`)\n")
    assert "| sft | full | 200 | 10 | 320 | 0.5321 | 1m 35s |" in run
    assert "| dpo | lora, from sft adapter merged | 144 | 8 | 288 | 0.2 | 1h 02m |" in run


def test_prediction_examples_line_up_every_variant_s_answer_to_the_same_question():
    examples = prediction_examples(predictions(), per_split=2)
    assert list(examples) == ["sft/test", "dpo/test"]
    first = examples["sft/test"][0]
    assert first["question"] == "What colour is bar 0?" and first["gold"] == ["red", "Red"]
    assert first["answers"] == {"base": ("dat=D\ufffd yellowVi|*", False), "prompted": ("dat=D\ufffd yellowVi|*", False),
                                "sft": ("red", True), "dpo": ("red", True)}
    assert [q["question"] for q in examples["dpo/test"]] == ["Is there a cat 0?", "Is there a cat 1?"]


def test_the_report_shows_example_answers_side_by_side(written):
    """Issue 13 (10): the base model's garbage beside SFT's right answer."""
    section = written.read_text().split("## Example answers\n\n")[1].split("\n## ")[0]
    lines = section.splitlines()
    table = lines[lines.index("### sft/test") + 2:]
    assert table[0] == "| question | reference | `base` | `prompted` | `sft` | `dpo` |"
    # a pipe or a star in a model's answer is escaped, so the table keeps its columns
    assert table[2] == "| What colour is bar 0? | red / Red | dat=D\ufffd yellowVi\\|\\* ✗ | dat=D\ufffd yellowVi\\|\\* ✗ | red ✓ | red ✓ |"
    assert "What colour is bar 3?" not in section, "the first 3 questions of each split"
    assert "| Is there a cat 0? | No, there is no cat. | No ✗ | No ✗ | No ✗ | No ✓ |" in section


def test_the_sft_loss_panel_draws_the_eval_loss_dashed_beside_the_training_loss(tmp_path):
    """Issue 13 (9): SFT's eval loss, logged on the eval split, is plotted with its training loss."""
    panels = curve_panels("sft", read_metrics_log(sft_log(tmp_path / "sft.jsonl")))
    assert [(title, [(key, style) for key, style, *_ in lines]) for title, lines in panels] == [
        ("loss", [("loss", "-"), ("eval_loss", "--")])]
    assert panels[0][1][1][2:] == ([20], [0.2])


def table_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_markdown_table_numbers_best_in_bold_and_missing_as_dash():
    rows = table_rows(markdown_table(REPORT))
    # Columns: the primary metric first, then in order of first appearance.
    assert rows["variant"] == ["relaxed_accuracy", "exact_match", "preference_accuracy"]
    # Rows in pipeline order; 0.4504 shown as 0.450; exact_match ties at 0.500 so both are bold.
    assert list(rows)[2:] == ["base", "prompted", "sft", "dpo", "*samples*"]
    assert rows["base"] == ["0.420", "0.300", "—"]
    assert rows["prompted"] == ["0.450", "**0.500**", "—"]
    assert rows["sft"] == ["**0.610**", "**0.500**", "0.700"]
    assert rows["dpo"] == ["0.600", "—", "**0.850**"]


def test_the_written_report_holds_the_table(written):
    assert markdown_table(REPORT) in written.read_text()


def test_format_table_aligned_with_best_marked():
    lines = format_table(REPORT).splitlines()
    assert lines[0].split() == ["variant", "relaxed_accuracy", "exact_match", "preference_accuracy"]
    assert lines[1].split() == ["base", "0.420", "0.300", "—"]
    assert lines[3].split() == ["sft", "0.610*", "0.500*", "0.700"]
    assert lines[4].split() == ["dpo", "0.600", "—", "0.850*"]
    assert lines[5].split() == ["samples", "80", "80", "40"]
    assert lines[-1] == "* best per metric"
    # Aligned: under the last letter of each header sits the mark ("*" or a space), the value's last digit just before.
    header = lines[0]
    for line in lines[1:6]:
        for column in ("relaxed_accuracy", "exact_match"):
            end = header.index(column) + len(column)
            assert line[end - 2] in "0123456789—" and line[end - 1] in "* ", (column, line)


def test_lower_is_better_metrics_bold_the_smallest():
    report = {"variants": {"base": {"metrics": {"eval_loss": 1.2}}, "sft": {"metrics": {"eval_loss": 0.8}}}}
    rows = table_rows(markdown_table(report))
    assert rows["base"] == ["1.200"] and rows["sft"] == ["**0.800**"]


def test_nothing_bold_without_a_comparison():
    report = {"variants": {"sft": {"metrics": {"accuracy": 0.5, "f1": float("nan")}, "samples": 3}}}
    assert table_rows(markdown_table(report))["sft"] == ["0.500", "nan"]
    assert "*" not in format_table(report)


def test_unknown_variants_follow_the_known_ones_in_report_order():
    report = {"variants": {"zeta": {}, "dpo": {}, "alpha": {}, "base": {}}}
    assert ordered_variants(report) == ["base", "dpo", "zeta", "alpha"]


def test_missing_dpo_log_leaves_its_plot_out(tmp_path):
    logs = {"sft": sft_log(tmp_path / "sft.jsonl"), "dpo": tmp_path / "does-not-exist.jsonl"}
    path = write_report(REPORT, tmp_path / "out", training_logs=logs)
    images = embedded_images(path.read_text())
    assert "training_sft.png" in images and "training_dpo.png" not in images
    assert not (tmp_path / "out" / "training_dpo.png").exists()


def test_no_logs_and_no_metrics_still_write_a_report(tmp_path):
    report = {"variants": {"base": {"metrics": {}, "samples": 0}}}
    path = write_report(report, tmp_path / "out", training_logs={})
    text = path.read_text()
    assert "## Training curves" not in text and "comparison.png" not in text
    assert "## The run" not in text and "## Example answers" not in text and "### The metrics" not in text
    assert "| base      |" in text
    assert list((tmp_path / "out").glob("*.png")) == []


def test_log_without_watched_keys_gives_no_plot(tmp_path):
    log = write_jsonl(tmp_path / "dpo.jsonl", [{"step": 10, "epoch": 1.0, "train_runtime": 3.0}])
    path = write_report({"variants": {}}, tmp_path / "out", training_logs={"dpo": log})
    assert "training_dpo.png" not in path.read_text()


def test_read_metrics_log_skips_a_half_written_last_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "loss": 1.0}\n\n{"step": 20, "loss": 0.5}\n{"step": 30, "lo')
    assert read_metrics_log(path) == [{"step": 10, "loss": 1.0}, {"step": 20, "loss": 0.5}]
    assert "skipping line 4" in capsys.readouterr().err


def test_log_series_in_step_order_later_line_wins_and_other_lines_ignored():
    records = [
        {"step": 10, "loss": 1.0},
        {"step": 20, "loss": 0.9},
        {"step": 20, "eval_loss": 0.95},  # an eval line at the same step is another key
        {"step": 10, "loss": 0.99},  # resumed from the checkpoint at step 0: re-logged
        {"step": 30, "train_loss": 0.5},  # the closing summary has no "loss"
    ]
    assert log_series(records, "loss") == ([10, 20], [0.99, 0.9])
    assert log_series(records, "eval_loss") == ([20], [0.95])
    assert log_series(records, "rewards/margins") == ([], [])
