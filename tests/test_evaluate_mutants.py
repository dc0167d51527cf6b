"""evaluate's model-free parts, exactly: what prompt each variant sees, what the yes/no columns count, which metrics a
benchmark adds (issue 26: make mutate found no fast test calling them). evaluate_variant itself needs a model and is
scored by the evaluate tests make mutate names in pyproject.toml."""

from __future__ import annotations

import pytest

from jobs import evaluate
from jobs import recipe as recipes
from tests.test_chain import quick_recipe

SYSTEM = {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]}
USER = {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "How many bars?"}]}


@pytest.mark.parametrize("variant, trained_with_system, expected", [
    ("base", True, [USER]),  # as published: the data's system message is the tuning's, not the base model's
    ("base", False, [USER]),
    ("prompted", True, [SYSTEM, USER]),  # the data's own system message where it has one
    ("prompted", False, [{"role": "system", "content": [{"type": "text", "text": "Say only the number."}]}, USER]),
    ("sft", True, [SYSTEM, USER]),  # trained variants see the prompts they were trained on
    ("dpo", False, [USER]),
])
def test_each_variant_sees_its_own_prompt(variant, trained_with_system, expected):
    cfg = quick_recipe(evaluate={"system_prompt": "Say only the number."})
    row = {"prompt": [SYSTEM, USER] if trained_with_system else [USER], "answers": ["3"]}
    assert evaluate.with_prompt(row, variant, cfg) == {"prompt": expected, "answers": ["3"]}


def test_the_question_shown_is_the_last_user_turns_text():
    answer = {"role": "assistant", "content": [{"type": "text", "text": "3"}]}
    last = {"role": "user", "content": [{"type": "text", "text": "And red"}, {"type": "image", "text": None},
                                        {"type": "text", "text": ""}, {"type": "text", "text": "ones?"}]}
    row = {"prompt": [SYSTEM, USER, answer, USER, answer, last]}
    assert evaluate._question(row) == "And red ones?"  # empty texts and images add nothing


def test_the_yes_no_columns_count_no_then_yes_as_the_positive_class():
    # predicted: yes, no, no, None, yes; gold: yes, no, yes, no, no
    # no positive: predicted no #2 #3, truly no #2 #4 #5 -> P 1/2, R 1/3, F1 2 * (1/6) / (5/6) = 2/5
    # yes positive: predicted yes #1 #5, truly yes #1 #3 -> P 1/2, R 1/2, F1 1/2; right #1 #2 -> accuracy 2/5
    scores = evaluate._yes_no_scores(["yes", "no", "no", None, "yes"], ["yes", "no", "yes", "no", "no"])
    assert scores == pytest.approx({"yes_no_accuracy": 0.4, "no_f1": 0.4, "no_precision": 0.5, "no_recall": 1 / 3,
                                    "yes_f1": 0.5, "yes_precision": 0.5, "yes_recall": 0.5})


def test_a_benchmark_adds_its_official_metrics_under_its_name_with_their_definitions():
    pope = recipes.Benchmark(format="pope", name="pope_random", path="p.json", images="i")
    amber = recipes.Benchmark(format="amber", path="q.json", images="i", annotations="a.json")
    assert evaluate.benchmark_metrics([amber, pope]) == (
        "amber_accuracy", "amber_precision", "amber_recall", "amber_f1",
        "pope_random_accuracy", "pope_random_precision", "pope_random_recall", "pope_random_f1", "pope_random_yes_ratio")
    definitions = evaluate.metric_definitions([pope])
    assert definitions["pope_random_yes_ratio"] == ("POPE (RUCAIBox/POPE evaluate.py): answers read yes, over all questions "
                                                    "(0.5 is balanced)")
    assert definitions["no_f1"] == "F1 of answering no, no being the positive class" and "amber_f1" not in definitions
    assert set(evaluate.metric_definitions([])) == {name for names in evaluate.METRICS.values() for name in names}


def test_max_samples_takes_the_first_rows():
    from datasets import Dataset

    rows = Dataset.from_dict({"n": list(range(5))})
    assert evaluate._sample(rows, 3)["n"] == [0, 1, 2] and evaluate._sample(rows, 9)["n"] == list(range(5))
    assert evaluate._sample(rows, None) is rows
