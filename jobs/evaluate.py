"""Evaluate: every model variant the run has, on the held-out test splits, with the same decoding.

    base      the base model, prompts without a system message
    prompted  the base model with a system prompt: the cookbook's "prompting instead of fine-tuning"
    sft, dpo  the trained stages' models, prompts as they were trained on

On answer rows (data.sft): accuracy (ChartQA's relaxed accuracy for chartqa sources, else exact match), exact match, and
yes/no metrics where the gold answers are yes/no. On preference rows (data.dpo): preference accuracy
and mean margin (is the chosen answer more likely than the rejected one?), and the yes/no
hallucination metrics of the generated answers as AMBER ("no" positive) and POPE ("yes" positive) report them.

    local:      python -m jobs.evaluate --recipe recipes/tiny-demo.yaml
    in cluster: python -m jobs.evaluate

Output: <run>/evaluate/report.json, predictions.jsonl, report.md with the comparison table and plots.
"""

from __future__ import annotations

import json

from jobs import contract
from jobs import recipe as recipes

TRAINED_VARIANTS = recipes.TRAINING_STAGES  # a variant per training stage: the model it trained


def main(recipe: str = "", force: bool = False, **overrides):
    cfg = recipes.load(recipe, overrides)
    variants = [v for v in cfg.evaluate.variants if v not in TRAINED_VARIANTS or v in cfg.stages]
    for skipped in sorted(set(cfg.evaluate.variants) - set(variants)):
        print(f"evaluate: no {skipped} variant: the run has no {skipped} stage")
    stage = contract.begin(
        "evaluate", cfg.run_dir, cfg.stage_config("evaluate"),
        needs=("prepare",) + tuple(v for v in TRAINED_VARIANTS if v in variants), force=force,
    )
    if stage.skipped:
        return

    from datasets import load_from_disk

    from jobs import modeling
    from jobs.families import get_family
    from jobs.report import format_table, write_report

    family = get_family(cfg.model.family)
    processor = family.rendering_processor(modeling.load_processor(cfg.model))  # prompts as trained, BOS included
    prepared = stage.input("prepare")
    tests = {kind: _sample(load_from_disk(prepared / kind / "test"), cfg.evaluate.max_samples)
             for kind in ("sft", "dpo") if (prepared / kind).is_dir()}
    if "dpo" in tests:  # log-likelihoods score the answers as they were trained on: closed as the family closes them
        closed = family.close_answers(tests["dpo"], processor)
        tests["dpo"] = [{**row, "closed_chosen": c["chosen"], "closed_rejected": c["rejected"]} for row, c in zip(tests["dpo"], closed)]
    tests = {kind: list(rows) for kind, rows in tests.items()}
    # A run that trained against a 4-bit base is evaluated on one, its base variant included.
    quantize = next((modeling.quantization(getattr(cfg, s)) for s in TRAINED_VARIANTS
                     if s in cfg.stages and getattr(cfg, s).method == "qlora"), None)

    report = {"variants": {}, "primary_metric": cfg.evaluate.primary_metric}
    predictions = []
    model = None
    for variant in variants:
        if variant in TRAINED_VARIANTS:
            model = modeling.load_trained(cfg, stage.run_dir, variant, quantize=quantize, device_map="auto")
        elif model is None or variant == "base":
            model = modeling.load_model(cfg.model, quantize=quantize, device_map="auto")
        metrics, rows = evaluate_variant(variant, model, processor, tests, cfg)
        report["variants"][variant] = {"metrics": metrics, "samples": sum(len(t) for t in tests.values())}
        predictions += rows
        if variant in TRAINED_VARIANTS:
            model = None  # the next variant loads its own; free this one first

    (stage.work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(stage.work / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in predictions)
    logs = {s: stage.input(s) / "metrics.jsonl" for s in TRAINED_VARIANTS if s in cfg.stages}
    write_report(report, stage.work, training_logs=logs)
    print(format_table(report))
    stage.finish(report=report["variants"], rows={kind: len(rows) for kind, rows in tests.items()})


def evaluate_variant(variant: str, model, processor, tests: dict[str, list[dict]], cfg) -> tuple[dict, list[dict]]:
    """Metrics and per-sample predictions of one variant."""
    from jobs import metrics as m
    from jobs.families import get_family
    from jobs.inference import completion_logprobs, generate_answers

    scores, predictions = {}, []

    def progress(done, total):
        if done == total or done % (cfg.evaluate.batch_size * 10) == 0:
            print(f"evaluate: {variant}: {done}/{total} answers", flush=True)

    # an answer ends where the template closes a turn, even where the checkpoint's eos ids leave that token out
    stop = get_family(cfg.model.family).stop_token_ids(processor, model.generation_config)

    def answer(rows):
        return generate_answers(model, processor, rows, max_new_tokens=cfg.evaluate.max_new_tokens,
                                batch_size=cfg.evaluate.batch_size, progress=progress, stop_token_ids=stop)

    if "sft" in tests:
        rows = [with_prompt(row, variant, cfg) for row in tests["sft"]]
        answers = answer(rows)
        exact = [m.exact_match(a, row["answers"]) for a, row in zip(answers, rows)]
        # ChartQA's published metric is relaxed accuracy; elsewhere accuracy is exact match
        relaxed = cfg.data.sft.format == "chartqa"
        correct = [m.relaxed_accuracy(a, row["answers"]) for a, row in zip(answers, rows)] if relaxed else exact
        scores["accuracy"] = sum(correct) / len(correct)
        scores["exact_match"] = sum(exact) / len(exact)
        gold = [m.yes_no(row["answers"][0]) for row in rows]
        if all(g is not None for g in gold):
            scores |= _yes_no_scores([m.yes_no(a) for a in answers], gold)
        predictions += [
            {"variant": variant, "split": "sft/test", "question": _question(row), "answer": a, "gold": row["answers"], "correct": c}
            for a, row, c in zip(answers, rows, correct)
        ]
    if "dpo" in tests:
        rows = [with_prompt(row, variant, cfg) for row in tests["dpo"]]
        chosen = completion_logprobs(model, processor, rows, "closed_chosen", batch_size=cfg.evaluate.batch_size)
        rejected = completion_logprobs(model, processor, rows, "closed_rejected", batch_size=cfg.evaluate.batch_size)
        scores |= m.preference_metrics(chosen, rejected)
        answers = answer(rows)
        gold = [m.yes_no(_text(row["chosen"])) for row in rows]
        judged = [(m.yes_no(a), g) for a, g in zip(answers, gold) if g is not None]
        if judged:
            scores |= _yes_no_scores(*map(list, zip(*judged)))
        predictions += [
            {"variant": variant, "split": "dpo/test", "question": _question(row), "answer": a, "gold": _text(row["chosen"]),
             "correct": g is not None and m.yes_no(a) == g, "chosen_logp": c, "rejected_logp": r}
            for a, row, g, c, r in zip(answers, rows, gold, chosen, rejected)
        ]
    return scores, predictions


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
    from jobs.metrics import binary_metrics

    amber = binary_metrics(predicted, gold, positive="no")  # AMBER's discriminative task: "no" is positive
    pope = binary_metrics(predicted, gold, positive="yes")  # POPE: "yes" is positive
    return {"yes_no_accuracy": amber["accuracy"], "amber_f1": amber["f1"], "amber_precision": amber["precision"],
            "amber_recall": amber["recall"], "pope_f1": pope["f1"], "pope_precision": pope["precision"], "pope_recall": pope["recall"]}


def _text(messages: list[dict]) -> str:
    return " ".join(part["text"] for message in messages for part in message["content"] if part["type"] == "text" and part["text"])


def _question(row: dict) -> str:
    return _text([message for message in row["prompt"] if message["role"] == "user"][-1:])


def _sample(dataset, limit: int | None):
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


if __name__ == "__main__":
    contract.entrypoint(main)
