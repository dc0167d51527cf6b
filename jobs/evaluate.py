"""Evaluate: every model variant the run has, on the held-out test splits and the recipe's benchmarks, with the same decoding.

    base      the base model as published, prompts without a system message
    prompted  the base model with a system prompt: the cookbook's "prompting instead of fine-tuning"
    sft, dpo  the trained stages' models as they trained them, prompts as they were trained on

On answer rows (data.sft): accuracy (ChartQA's relaxed accuracy for chartqa sources, else exact match), exact match, and
yes/no metrics where the gold answers are yes/no. On preference rows (data.dpo): preference accuracy and mean margin
(is the chosen answer more likely than the rejected one?), and yes/no metrics of the generated answers against the
chosen ones. The yes/no metrics are agreement with the data's own answers, not a benchmark: ``yes_no_accuracy``, and
precision, recall and F1 with "no" as the positive class (``no_f1``, as AMBER counts) and with "yes" (``yes_f1``, as
POPE counts). The benchmarks themselves (evaluate.benchmarks: AMBER, POPE in their released files, jobs.benchmarks)
are scored as their official scripts score them, under their names (``amber_f1``, ``pope_random_f1``).

    local:      python -m jobs.evaluate --recipe recipes/tiny-demo.yaml
    in cluster: python -m jobs.evaluate

Output: <run>/evaluate/report.json (each variant's metrics and the samples behind each, the metrics' definitions, the
verdict against the last good night), predictions.jsonl, report.md (jobs.report: the run, the comparison, example
answers side by side, training curves). The run's shipped variant is added to the recipe's history
(<run.root>/.history/<name>.jsonl, jobs.history); a night that regressed exits 3 (contract.EXIT_REGRESSED).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from jobs import contract, entry, history
from jobs import recipe as recipes

TRAINED_VARIANTS = recipes.TRAINING_STAGES  # a variant per training stage: the model it trained
def main(recipe: str = "", force: bool = False, **overrides):
    cfg = recipes.load(recipe, overrides)
    variants = [v for v in cfg.evaluate.variants if v not in TRAINED_VARIANTS or v in cfg.stages]
    for skipped in sorted(set(cfg.evaluate.variants) - set(variants)):
        print(f"evaluate: no {skipped} variant: the run has no {skipped} stage")
    stage = contract.begin(
        "evaluate", cfg.run_dir, cfg.stage_config("evaluate"),
        needs=cfg.needs("evaluate"), force=force,
    )
    if stage.skipped:
        history.refuse_regressed(history.regression_of(cfg.run_dir))  # every run of a finished night says what it found
        return

    from jobs import modeling
    from jobs.benchmarks import metric_definitions
    from jobs.report import format_table, write_report

    processor = scoring_processor(cfg)
    tests, benchmarks = test_sets(cfg, stage.input("prepare"), processor, scratch=stage.scratch)

    report = {"model": cfg.model.name_or_path, "family": cfg.model.family, "variants": {},
              "primary_metric": cfg.evaluate.primary_metric,
              "benchmarks": {key: {"format": bench.format, "path": bench.path, "questions": len(rows)}
                             for key, (bench, rows) in benchmarks.items()}}
    samples = sum(len(rows) for rows in tests.values()) + sum(len(rows) for _, rows in benchmarks.values())
    predictions = []
    model = None
    for variant in variants:
        # Each variant as it will be used (issue 11): base as published; a trained stage's model as it trained it, its
        # adapter on the 4-bit base after QLoRA, on full-precision weights after LoRA, earlier adapters merged into
        # the weights they were trained against; what merge_push ships is that model merged, checked against it.
        if variant in TRAINED_VARIANTS:
            # One model at a time, as its GPUs are sized (jobs.stage_resources): device_map="auto" places the next in
            # the memory the last leaves free, so the base goes first
            model = None
            free_memory()
            quantize = modeling.quantization(getattr(cfg, variant))
            model = modeling.load_trained(cfg, stage.run_dir, variant, quantize=quantize, device_map="auto")
        elif model is None or variant == "base":
            model = modeling.load_model(cfg.model, device_map="auto")
        metrics, counts, predicted = evaluate_variant(variant, model, processor, tests, cfg, benchmarks)
        report["variants"][variant] = {"metrics": metrics, "counts": counts, "samples": samples}
        predictions += predicted
        if variant in TRAINED_VARIANTS:
            model = None  # the next variant loads its own; free this one first

    reported = {metric for scored in report["variants"].values() for metric in scored["metrics"]}
    definitions = metric_definitions([bench for bench, _ in benchmarks.values()])
    report["definitions"] = {metric: text for metric, text in definitions.items() if metric in reported}
    # Tonight against the last good night of the recipe's history (jobs.history), before anything is written
    nights = history.history_path(cfg.run.root, cfg.name)
    error = primary_standard_error(report, predictions, cfg.shipped_stage, cfg.evaluate.primary_metric)
    night = history.night_of(cfg, report, error)
    report["regression"] = history.judge(history.read(nights), night)
    (stage.work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(stage.work / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in predictions)
    logs = {s: stage.input(s) / "metrics.jsonl" for s in TRAINED_VARIANTS if s in cfg.stages}
    write_report(report, stage.work, training_logs=logs, stages=stage.inputs, predictions=predictions)
    print(format_table(report))
    print(f"evaluate: against the history ({nights}): {report['regression']['summary']}")
    rows = {kind: len(rows) for kind, rows in tests.items()} | {key: len(rows) for key, (_, rows) in benchmarks.items()}
    stage.finish(report=report["variants"], rows=rows, regression=report["regression"])
    # Added once the evaluation is committed: the history holds only nights whose report exists
    history.append(nights, {**night, **report["regression"]})
    if cfg.run.keep:
        removed, _ = history.prune(cfg.run.root, cfg.name, cfg.run.keep, spare=(cfg.run_id,))
        for run_id in removed:
            print(f"evaluate: pruned the run folder {Path(cfg.run.root) / run_id} (run.keep {cfg.run.keep})")
    history.refuse_regressed(report["regression"])


def primary_standard_error(report: dict, predictions: list[dict], variant: str, metric: str) -> float | None:
    """The standard error of ``variant``'s ``metric``: a fraction's from its value and sample count, mean_margin's from
    the per-pair margins behind it (predictions' chosen_logp - rejected_logp, the finite ones, as it is averaged);
    None for a value that is neither (outside [0, 1])."""
    from jobs.metrics import NOT_PROPORTIONS, mean_standard_error, proportion_standard_error

    scored = report["variants"].get(variant, {})
    value, n = scored.get("metrics", {}).get(metric), scored.get("counts", {}).get(metric, 0)
    if value is None:
        return None
    if metric in NOT_PROPORTIONS:
        margins = [row["chosen_logp"] - row["rejected_logp"] for row in predictions
                   if row["variant"] == variant and row["split"] == "dpo/test"]
        return mean_standard_error([m for m in margins if math.isfinite(m)])
    return proportion_standard_error(value, n) if 0 <= value <= 1 else None


def free_memory() -> None:
    """Collect what was let go, and hand the GPU's cached blocks back: device_map="auto" sees only free memory."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def scoring_processor(cfg):
    """The processor every variant is scored with (a test re-scoring the shipped model takes the same): prompts rendered
    as they were trained, BOS included (Family.rendering_processor)."""
    from jobs import modeling
    from jobs.families import get_family

    return get_family(cfg.model.family).rendering_processor(modeling.load_processor(cfg.model))


def test_sets(cfg, prepared, processor, *, scratch=None) -> tuple[dict[str, list[dict]], dict]:
    """(held-out rows by kind, {benchmark name: (its recipe entry, its rows)}): what every variant is scored on."""
    from datasets import load_from_disk

    from jobs import benchmarks as benchmarks_
    from jobs.families import get_family

    family = get_family(cfg.model.family)
    tests = {kind: _sample(load_from_disk(prepared / kind / "test"), cfg.evaluate.max_samples)
             for kind in ("sft", "dpo") if (prepared / kind).is_dir()}
    # Answers read as they were trained on: closed as the family closes them, log-likelihoods' answers and the earlier
    # answers of a multi-turn prompt alike
    closed = {kind: family.close_answers(rows, processor, scratch=scratch).select_columns(
        ["prompt", *(["chosen", "rejected"] if kind == "dpo" else [])]) for kind, rows in tests.items()}  # no images decoded
    if "dpo" in tests:
        tests["dpo"] = [{**row, "closed_chosen": c["chosen"], "closed_rejected": c["rejected"]} for row, c in zip(tests["dpo"], closed["dpo"])]
    tests = {kind: [{**row, "prompt": c["prompt"]} for row, c in zip(rows, closed[kind])] for kind, rows in tests.items()}

    def shrink(image):  # as prepare shrinks the training images
        return family.shrink(image, processor, cfg.prepare.image_scale)

    benchmarks = {bench.key: (bench, benchmarks_.load(bench, f"evaluate.benchmarks[{i}]", shrink))
                  for i, bench in enumerate(cfg.evaluate.benchmarks)}
    return tests, benchmarks


def evaluate_variant(
    variant: str, model, processor, tests: dict[str, list[dict]], cfg, benchmarks: dict | None = None
) -> tuple[dict, dict, list[dict]]:
    """Metrics, the number of samples behind each, and per-sample predictions of one variant."""
    from jobs import metrics as m
    from jobs.families import get_family
    from jobs.formats import FORMATS
    from jobs.inference import completion_logprobs, generate_answers
    from jobs.progress import Progress

    scores, counts, predictions = {}, {}, []

    def counted(metrics: dict, n: int) -> dict:
        counts.update(dict.fromkeys(metrics, n))
        return metrics

    # an answer ends where the template closes a turn, even where the checkpoint's eos ids leave that token out
    stop = get_family(cfg.model.family).stop_token_ids(processor, model.generation_config)

    def answer(rows):
        shown = Progress(f"evaluate: {variant}", len(rows), unit="answers")
        shown.begin()
        return generate_answers(model, processor, rows, max_new_tokens=cfg.evaluate.max_new_tokens, batch_size=cfg.evaluate.batch_size,
                                progress=lambda done, total: shown.update(done), stop_token_ids=stop)

    if "sft" in tests:
        rows = [with_prompt(row, variant, cfg) for row in tests["sft"]]
        answers = answer(rows)
        # The answer read where the data source says it stands (after "</think>", say), as GRPO's rewards read it
        after = cfg.data.sft.answer_after
        exact = [m.answer_correct(a, row["answers"], relaxed=False, answer_after=after) for a, row in zip(answers, rows)]
        # ChartQA's published metric is relaxed accuracy; elsewhere accuracy is exact match
        relaxed = FORMATS[cfg.data.sft.format].relaxed_accuracy
        correct = [m.answer_correct(a, row["answers"], relaxed=relaxed, answer_after=after) for a, row in zip(answers, rows)]
        scores |= counted({"accuracy": sum(correct) / len(correct), "exact_match": sum(exact) / len(exact)}, len(rows))
        gold = [m.yes_no(row["answers"][0]) for row in rows]
        if all(g is not None for g in gold):
            scores |= counted(_yes_no_scores([m.yes_no(m.read_answer(a, after)) for a in answers], gold), len(rows))
        predictions += [
            {"variant": variant, "split": "sft/test", "question": _question(row), "answer": a, "gold": row["answers"], "correct": c}
            for a, row, c in zip(answers, rows, correct)
        ]
    if "dpo" in tests:
        rows = [with_prompt(row, variant, cfg) for row in tests["dpo"]]
        chosen = completion_logprobs(model, processor, rows, "closed_chosen", batch_size=cfg.evaluate.batch_size)
        rejected = completion_logprobs(model, processor, rows, "closed_rejected", batch_size=cfg.evaluate.batch_size)
        scores |= counted(m.preference_metrics(chosen, rejected), len(rows))
        answers = answer(rows)
        gold = [m.yes_no(_text(row["chosen"])) for row in rows]
        judged = [(m.yes_no(a), g) for a, g in zip(answers, gold) if g is not None]
        if judged:
            scores |= counted(_yes_no_scores(*map(list, zip(*judged))), len(judged))
        predictions += [
            {"variant": variant, "split": "dpo/test", "question": _question(row), "answer": a, "gold": _text(row["chosen"]),
             "correct": g is not None and m.yes_no(a) == g, "chosen_logp": c, "rejected_logp": r}
            for a, row, g, c, r in zip(answers, rows, gold, chosen, rejected)
        ]
    from jobs.benchmarks import KINDS

    for key, (bench, rows) in (benchmarks or {}).items():
        kind = KINDS[bench.format]
        answers = answer([with_prompt(row, variant, cfg) for row in rows])
        official = kind.score(answers, [row["label"] for row in rows])
        scores |= counted({f"{key}_{name}": value for name, value in official.items()}, len(rows))
        predictions += [
            {"variant": variant, "split": f"benchmark/{key}", "id": row["id"], "question": _question(row), "answer": a,
             "gold": row["label"], "correct": kind.correct(a, row["label"])}
            for a, row in zip(answers, rows)
        ]
    return scores, counts, predictions


def with_prompt(row: dict, variant: str, cfg) -> dict:
    """The row's prompt as this variant sees it: no system message for base, one for prompted."""
    prompt = [message for message in row["prompt"] if message["role"] != "system"]
    if variant == "prompted":
        trained = next((msg for msg in row["prompt"] if msg["role"] == "system"), None)
        system = trained or {"role": "system", "content": [{"type": "text", "text": cfg.evaluate.system_prompt}]}
        prompt = [system] + prompt
    elif variant in TRAINED_VARIANTS:
        prompt = row["prompt"]
    return {**row, "prompt": prompt}


def _yes_no_scores(predicted: list, gold: list) -> dict:
    """Agreement with the data's yes/no answers; named for the positive class, since they are no benchmark."""
    from jobs.metrics import binary_metrics

    no = binary_metrics(predicted, gold, positive="no")  # "no" positive, as AMBER's discriminative task counts
    yes = binary_metrics(predicted, gold, positive="yes")  # "yes" positive, as POPE counts
    return {"yes_no_accuracy": no["accuracy"], "no_f1": no["f1"], "no_precision": no["precision"], "no_recall": no["recall"],
            "yes_f1": yes["f1"], "yes_precision": yes["precision"], "yes_recall": yes["recall"]}


def _text(messages: list[dict]) -> str:
    return " ".join(part["text"] for message in messages for part in message["content"] if part["type"] == "text" and part["text"])


def _question(row: dict) -> str:
    return _text([message for message in row["prompt"] if message["role"] == "user"][-1:])


def _sample(dataset, limit: int | None):
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


if __name__ == "__main__":
    entry.entrypoint(main, imports=(
        "datasets", "transformers:AutoProcessor", "jobs.modeling", "jobs.inference", "jobs.metrics", "jobs.report",
    ))
