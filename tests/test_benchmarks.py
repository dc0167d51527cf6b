"""AMBER and POPE as evaluate data sources (issue 11): their released file formats, read and scored through the
evaluate stage as their official scripts score them, with the numbers worked by hand; and the report naming them
AMBER and POPE only where they are those benchmarks."""

from __future__ import annotations

import json

import pytest

from jobs import contract, synthetic
from jobs import recipe as recipes
from tests.conftest import recipe_file, run_stages_answering

# Synthetic questions come in pairs per image, "yes" then "no" (jobs.synthetic), so the truths are y, n, y, n, ...
AMBER_ANSWERS = ["Yes", "No", "No", "No", "Yes.", "Yes", "No", "No"]  # see test_metrics: 50.0, 60.0, 75.0, 66.7
POPE_ANSWERS = ["Yes, there is.", "No.", "There is not a red bar.", "no", "I think so", "Yes"]  # 4/6, 2/3, 2/3, 2/3, 1/2


def amber_entry(folder, **extra) -> dict:
    return {"format": "amber", "path": str(folder / "data" / "query" / "query_discriminative.json"),
            "annotations": str(folder / "data" / "annotations.json"), "images": str(folder / "image"), **extra}


def pope_entry(folder, subset="adversarial", **extra) -> dict:
    return {"name": f"pope_{subset}", "format": "pope", "path": str(folder / "output" / "coco" / f"coco_pope_{subset}.json"),
            "images": str(folder / "val2014"), **extra}


@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory, tiny_model, synthetic_data):
    """prepare and evaluate of the base model, every generated answer scripted per benchmark question."""
    folder = tmp_path_factory.mktemp("benchmarks")
    amber = synthetic.write("amber", folder / "amber", rows=len(AMBER_ANSWERS))
    pope = synthetic.write("pope", folder / "pope", rows=len(POPE_ANSWERS))
    sources = {kind: synthetic_data(kind) for kind in ("chartqa", "rlaif-v")}
    path = recipe_file(folder, tiny_model("llava"), sources, name="bench", stages=["prepare", "evaluate"],
                       evaluate={"variants": ["base"], "max_samples": 2, "max_new_tokens": 2,
                                 "benchmarks": [amber_entry(amber), pope_entry(pope)]})
    scripted = {("amber", 5 + i): a for i, a in enumerate(AMBER_ANSWERS)}  # 4 images: generative ids 1-4 come first
    scripted |= {("pope_adversarial", 1 + i): a for i, a in enumerate(POPE_ANSWERS)}

    return run_stages_answering(path, lambda row: scripted[(row["benchmark"], row["id"])] if "benchmark" in row else "x")


def test_evaluate_scores_amber_and_pope_as_their_official_scripts(benchmark_run):
    report = json.loads((benchmark_run.run_dir / "evaluate" / "report.json").read_text())
    metrics, counts = report["variants"]["base"]["metrics"], report["variants"]["base"]["counts"]
    assert {k: v for k, v in metrics.items() if k.startswith("amber_")} == {
        "amber_accuracy": 0.5, "amber_precision": 0.6, "amber_recall": 0.75, "amber_f1": 0.667}
    assert {k: v for k, v in metrics.items() if k.startswith("pope_")} == pytest.approx({
        "pope_adversarial_accuracy": 4 / 6, "pope_adversarial_precision": 2 / 3, "pope_adversarial_recall": 2 / 3,
        "pope_adversarial_f1": 2 / 3, "pope_adversarial_yes_ratio": 0.5})
    assert counts["amber_f1"] == 8 and counts["pope_adversarial_f1"] == 6
    assert report["benchmarks"]["amber"]["questions"] == 8
    predictions = [json.loads(line) for line in (benchmark_run.run_dir / "evaluate" / "predictions.jsonl").read_text().splitlines()]
    amber = [p for p in predictions if p["split"] == "benchmark/amber"]
    assert [p["correct"] for p in amber] == [True, True, False, True, False, False, False, True]
    assert [p["gold"] for p in amber] == ["yes", "no"] * 4
    record = contract.read_json(benchmark_run.run_dir / "evaluate" / contract.SUCCESS_FILE)
    assert record["rows"]["amber"] == 8 and record["rows"]["pope_adversarial"] == 6


def test_the_report_says_how_each_benchmark_is_scored_and_what_the_yes_no_columns_are_not(benchmark_run):
    text = (benchmark_run.run_dir / "evaluate" / "report.md").read_text()
    section = text.split("## Benchmarks\n\n")[1].split("\n## ")[0]
    assert section.splitlines()[0].startswith("- `amber_*`: 8 questions of `") and "junyangwang0410/AMBER `inference.py`" in section
    assert "- `pope_adversarial_*`: 6 questions of `" in section and "RUCAIBox/POPE `evaluate.py`" in section
    assert "## AMBER beside the published numbers" not in text  # not Idefics2-8B


def test_amber_and_pope_are_named_only_where_they_are_the_benchmarks(tmp_path):
    from jobs.report import write_report

    report = {"model": "m", "primary_metric": "accuracy", "variants": {
        "base": {"metrics": {"accuracy": 0.5, "yes_no_accuracy": 0.5, "no_f1": 0.4, "yes_f1": 0.6}, "samples": 4}}}
    text = write_report(report, tmp_path, training_logs={}).read_text()
    assert "AMBER" not in text.upper() and "POPE" not in text.upper()
    assert "the data's test split, not a benchmark" in text


def test_the_blogs_idefics2_numbers_stand_beside_ours_for_idefics2_8b(tmp_path):
    from jobs.report import write_report

    metrics = {"base": {"amber_accuracy": 0.861, "amber_f1": 0.893}, "dpo": {"amber_accuracy": 0.87, "amber_f1": 0.9}}
    report = {"model": "HuggingFaceM4/idefics2-8b", "primary_metric": "preference_accuracy",
              "benchmarks": {"amber": {"format": "amber", "path": "a.json", "questions": 14216}},
              "variants": {v: {"metrics": m, "samples": 14216} for v, m in metrics.items()}}
    text = write_report(report, tmp_path, training_logs={}).read_text()
    section = text.split("## AMBER beside the published numbers\n\n")[1].split("\n## ")[0].splitlines()
    assert section[4:8] == [
        "| Idefics2 | `base` | 85.8 | 86.1 | 89.1 | 89.3 |",
        "| Idefics2+DPO | `dpo` | 85.9 | 87.0 | 89.4 | 90.0 |",
        "| GPT-4o | | 88.8 | | 91.6 | |",
        "| GPT-4v | | 83.4 | | 87.4 | |",
    ]


def test_benchmark_files_that_are_missing_or_malformed_are_user_errors_naming_the_key(tmp_path):
    from jobs import benchmarks

    amber = synthetic.write("amber", tmp_path / "amber", rows=4)
    entry = recipes.Benchmark(**amber_entry(amber))
    assert [row["label"] for row in benchmarks.load(entry, "evaluate.benchmarks[0]")] == ["yes", "no", "yes", "no"]
    (amber / "image" / "AMBER_2.jpg").unlink()
    with pytest.raises(contract.UserError, match=r"^evaluate.benchmarks\[0\].images: .*/AMBER_2.jpg: no such image \(question 5\)$"):
        benchmarks.load(entry, "evaluate.benchmarks[0]")
    short = recipes.Benchmark(**amber_entry(amber, annotations=str(tmp_path / "short.json")))
    (tmp_path / "short.json").write_text(json.dumps([{"id": 1, "type": "generative", "truth": [], "hallu": []}]))
    with pytest.raises(contract.UserError, match=r"^evaluate.benchmarks\[0\].annotations: .*short.json has no annotation for id 3 at position 2$"):
        benchmarks.load(short, "evaluate.benchmarks[0]")
    (tmp_path / "q.json").write_text("{not json")
    with pytest.raises(contract.UserError, match=r"^evaluate.benchmarks\[1\].path: .*q.json is not JSON lines"):
        benchmarks.load(recipes.Benchmark(format="pope", path=str(tmp_path / "q.json"), images="x"), "evaluate.benchmarks[1]")


def test_the_recipe_checks_its_benchmarks():
    base = {"name": "r", "stages": ["prepare"], "model": {"name_or_path": "m", "family": "llava"},
            "data": {"sft": {"path": "d", "format": "chartqa"}}}
    entries = [{"format": "amber", "path": "q.json", "images": "i"}, {"format": "pope", "path": "p.json", "images": "i"},
               {"format": "pope", "path": "r.json", "images": "i"}, {"format": "mme", "path": "m", "images": "i", "name": "MME"}]
    with pytest.raises(contract.UserError) as error:
        recipes.from_dict({**base, "evaluate": {"benchmarks": entries}})
    assert str(error.value) == (
        "recipe: evaluate.benchmarks[0].annotations: required for amber (data/annotations.json of the AMBER "
        "repository); evaluate.benchmarks[2].name: 'pope' names another benchmark too; give each its own name (e.g. "
        "pope_random); evaluate.benchmarks[3].format: 'mme' is not one of amber, pope; evaluate.benchmarks[3].name: "
        "'MME' must be lower-case letters, digits and _, starting with a letter"
    )

