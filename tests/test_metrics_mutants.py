"""Scoring rules on cases where a slightly wrong rule gives a different number (issue 26: mutants make mutate found
surviving tests/test_metrics.py). Each expected value is worked by hand from the published rule named at its test."""

from __future__ import annotations

import pytest

from jobs.metrics import amber_discriminative, pope_answer, pope_scores, preference_metrics, relaxed_correctness


@pytest.mark.parametrize("prediction, target, correct", [
    # pix2struct: float(text.rstrip('%')) / 100. 0.05 against 0.0525 is 0.0025 / 0.0525 = 4.76% off: correct;
    # against 0.0475, 0.0025 / 0.0475 = 5.26%: wrong. (Dividing by anything but 100 moves both across 5%.)
    pytest.param("5%", "0.0525", True, id="percent-4.76%-off"),
    pytest.param("5%", "0.0475", False, id="percent-5.26%-off"),
    # only "%" is stripped: "5X%" is no number, so the string "0.05" does not match it
    pytest.param("0.05", "5X%", False, id="only-percent-signs-are-stripped"),
])
def test_relaxed_correctness_of_percentages(prediction, target, correct):
    assert relaxed_correctness(prediction, target) is correct


def amber_case(no_truths: tuple[int, int], yes_truths: tuple[int, int]) -> tuple[list[str], list[str]]:
    """Responses and truths: (answered "No", answered "Yes") for the questions whose truth is no, then yes."""
    (no_no, no_yes), (yes_no, yes_yes) = no_truths, yes_truths
    truths = ["no"] * (no_no + no_yes) + ["yes"] * (yes_no + yes_yes)
    return ["No"] * no_no + ["Yes"] * no_yes + ["No"] * yes_no + ["Yes"] * yes_yes, truths


@pytest.mark.parametrize("no_truths, yes_truths, printed", [
    # 8 truly no (5 answered No), 3 yes (2 answered No). Right: 5 + 1 of 11 = 54.545 -> 54.5.
    # P = 5/7 = 71.43 -> 71.4; R = 5/8 = 62.5; F1 = 2 * .714 * .625 / (.714 + .625 + .0001) = .66649 -> 66.6
    # (without the +0.0001, .8925 / 1.339 = .66654 -> 66.7; from unrounded P and R, 2/3 -> 66.7).
    pytest.param((5, 3), (2, 1), (54.5, 71.4, 62.5, 66.6), id="f1-66.6-not-66.7"),
    # 9 truly no (2 answered No), 4 yes (3 answered No). Right: 2 + 1 of 13 = 23.08 -> 23.1.
    # P = 2/5 = 40.0; R = 2/9 = 22.22 -> 22.2; F1 = 2 * .4 * .222 / (.622 + .0001) = .28548 -> 28.5 (plainly 28.6).
    pytest.param((2, 7), (3, 1), (23.1, 40.0, 22.2, 28.5), id="f1-28.5-not-28.6"),
    # every question answered right, all of them yes: accuracy 100, and no "No" answer to divide by (0, as stated)
    pytest.param((0, 0), (0, 3), (100.0, 0.0, 0.0, 0.0), id="all-yes-right"),
])
def test_amber_prints_percentages_rounded_to_a_tenth_and_f1_from_them(no_truths, yes_truths, printed):
    """junyangwang0410/AMBER inference.py: each score printed as round(x * 100, 1); F1 from the printed P and R
    with + 0.0001 in the denominator. Returned as fractions of those printed numbers."""
    responses, truths = amber_case(no_truths, yes_truths)
    scores = amber_discriminative(responses, truths)
    assert scores == pytest.approx(dict(zip(("accuracy", "precision", "recall", "f1"), [p / 100 for p in printed])),
                                   abs=1e-12)


def test_unequal_lengths_are_refused_naming_both_counts():
    with pytest.raises(ValueError, match=r"^amber_discriminative: 2 responses but 1 truths; pass one per question$"):
        amber_discriminative(["Yes", "No"], ["yes"])
    with pytest.raises(ValueError, match=r"^pope_scores: 1 answers but 2 labels; pass one per question$"):
        pope_scores(["Yes"], ["yes", "no"])
    with pytest.raises(ValueError, match=r"^preference_metrics: 1 chosen but 2 rejected log-probabilities; pass one of "
                                         r"each per pair$"):
        preference_metrics([-1.0], [-1.0, -2.0])


@pytest.mark.parametrize("answer, read", [
    # RUCAIBox/POPE evaluate.py: `if text.find('.') != -1: text = text.split('.')[0]`, then `text.split(' ')`
    ("A. There is no dog.", "yes"),  # the first sentence is "A", however early the period
    ("Yes\nno", "yes"),  # split at spaces only: "Yes\nno" is one word, neither "No", "no" nor "not"
    ("Yes no", "no"),
])
def test_pope_reads_the_first_sentence_split_at_spaces(answer, read):
    assert pope_answer(answer) == read


def test_pope_with_no_yes_answer_scores_zero_rather_than_dividing_by_zero():
    # answers read: no, no; labels yes, yes -> TP 0, FP 0, TN 0, FN 2: P = 0 (nothing predicted yes), R = 0, F1 0
    assert pope_scores(["No.", "There is not."], ["yes", "yes"]) == {
        "accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
