"""report.md, its plots and the terminal table, written from a fake report.json and small metrics.jsonl files."""

import json
import re
from pathlib import Path

import pytest

from jobs.report import (
    format_table,
    log_series,
    markdown_table,
    ordered_variants,
    read_metrics_log,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

REPORT = {
    "task": "chartqa",
    "primary_metric": "relaxed_accuracy",
    "variants": {  # deliberately out of pipeline order
        "sft": {"metrics": {"relaxed_accuracy": 0.61, "exact_match": 0.5, "preference_accuracy": 0.7}, "samples": 200},
        "base": {"metrics": {"relaxed_accuracy": 0.42, "exact_match": 0.3}, "samples": 200},
        "prompted": {"metrics": {"relaxed_accuracy": 0.4504, "exact_match": 0.5}, "samples": 190},
        "dpo": {"metrics": {"relaxed_accuracy": 0.6, "preference_accuracy": 0.85}, "samples": 200},
    },
}


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
    return write_report(REPORT, out, training_logs=logs)


def embedded_images(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_writes_report_md_and_returns_its_path(written):
    assert written.name == "report.md" and written.is_file()
    assert written.read_text().startswith("# Evaluation report\n")


def test_every_embedded_plot_is_a_real_png_next_to_the_report(written):
    images = embedded_images(written.read_text())
    assert set(images) == {
        "metric_relaxed_accuracy.png", "metric_exact_match.png", "metric_preference_accuracy.png",
        "training_sft.png", "training_dpo.png",
    }
    for name in images:
        data = (written.parent / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert len(data) > 5_000, f"{name} is only {len(data)} bytes"


def test_plots_listed_in_pipeline_order(written):
    text = written.read_text()
    assert text.index("training_sft.png") < text.index("training_dpo.png")
    assert text.index("metric_relaxed_accuracy.png") < text.index("metric_exact_match.png")


def test_report_lists_sample_counts_and_context(written):
    text = written.read_text()
    assert "- `prompted`: 190 samples" in text
    assert "- `base`: 200 samples" in text
    assert "- task: chartqa" in text
    assert "Primary metric: `relaxed_accuracy`" in text


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
    assert list(rows)[2:] == ["base", "prompted", "sft", "dpo"]
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
    assert lines[-1] == "* best per metric"
    # Aligned: under the last letter of each header sits the mark ("*" or a space), the value's last digit just before.
    header = lines[0]
    for line in lines[1:5]:
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
    assert "## Training curves" not in text and "## Metrics across variants" not in text
    assert "- `base`: 0 samples" in text
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
