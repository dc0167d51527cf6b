"""The evaluate stage's scoring rules, on cases worked by hand from their published definitions."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.metrics import (
    amber_discriminative,
    binary_metrics,
    exact_match,
    pope_answer,
    pope_scores,
    preference_metrics,
    relaxed_accuracy,
    relaxed_correctness,
    yes_no,
)


@pytest.mark.parametrize(
    "prediction, target, correct",
    [
        # Numbers: correct when |p - t| / |t| <= 0.05.
        pytest.param("105", "100", True, id="5-of-100-is-exactly-5%-inclusive"),
        pytest.param("95", "100", True, id="below-by-5-of-100-inclusive"),
        pytest.param("105.1", "100", False, id="5.1-of-100-is-5.1%"),
        pytest.param("94.9", "100", False, id="below-by-5.1-of-100"),
        pytest.param("19", "20", True, id="1-of-20-is-5%"),
        pytest.param("10.5", "10", True, id="0.5-of-10-is-5%"),
        pytest.param("10.6", "10", False, id="0.6-of-10-is-6%"),
        pytest.param("-10.4", "-10", True, id="negative-0.4-of-10-is-4%"),
        pytest.param("10", "-10", False, id="opposite-sign-is-200%"),
        pytest.param("100", "105", True, id="denominator-is-target-5-of-105-is-4.8%"),
        pytest.param("105", "100.0", True, id="float-and-int-spellings"),
        pytest.param("1e2", "100", True, id="scientific-notation-parses"),
        # Percentages: a trailing % divides by 100, so "5%" and "0.05" are the same number.
        pytest.param("5%", "0.05", True, id="percent-prediction-0.05-vs-0.05"),
        pytest.param("0.05", "5%", True, id="percent-target"),
        pytest.param("5.2%", "5%", True, id="0.052-vs-0.05-is-4%"),
        pytest.param("5.3%", "5%", False, id="0.053-vs-0.05-is-6%"),
        pytest.param("5", "5%", False, id="5-vs-0.05-without-percent-sign"),
        pytest.param("5 %", "5%", True, id="space-before-percent-float-tolerates-it"),
        # Target 0: no relative change exists, so the reference falls back to a string match.
        pytest.param("0", "0", True, id="target-zero-same-string"),
        pytest.param("0.0", "0", False, id="target-zero-different-string"),
        pytest.param("0.01", "0", False, id="target-zero-tiny-number-is-string-mismatch"),
        # Strings: case-insensitive exact match, nothing stripped (as in pix2struct).
        pytest.param("Yes", "yes", True, id="case-ignored"),
        pytest.param("United States", "united states", True, id="words-case-ignored"),
        pytest.param("Yes.", "yes", False, id="punctuation-not-ignored"),
        pytest.param(" Yes", "yes", False, id="whitespace-not-stripped-for-strings"),
        pytest.param(" 105 ", "100", True, id="whitespace-around-numbers-float-ignores-it"),
        pytest.param("1,000", "1000", False, id="commas-not-removed-as-in-reference"),
        pytest.param("1,000", "1,000", True, id="commas-compare-as-strings"),
        pytest.param("100", "hundred", False, id="number-against-word"),
        pytest.param("five", "5", False, id="word-against-number"),
    ],
)
def test_relaxed_correctness(prediction, target, correct):
    assert relaxed_correctness(prediction, target) is correct


@pytest.mark.parametrize(
    "prediction, targets, correct",
    [
        pytest.param("12", ["12", "twelve"], True, id="first-label-matches"),
        pytest.param("Twelve", ["12", "twelve"], True, id="best-label-counts"),
        pytest.param("13", ["12", "twelve"], False, id="none-match-13-vs-12-is-8.3%"),
        pytest.param("12", "12", True, id="bare-string-is-one-label-not-characters"),
        pytest.param("1", "12", False, id="bare-string-not-split-into-characters"),
        pytest.param("yes\n", ["Yes"], True, id="prediction-stripped-as-in-qwen-vl"),
        pytest.param("12", [], False, id="no-labels"),
    ],
)
def test_relaxed_accuracy(prediction, targets, correct):
    assert relaxed_accuracy(prediction, targets) is correct


@pytest.mark.parametrize(
    "prediction, targets, correct",
    [
        pytest.param("Paris", ["paris"], True, id="case"),
        pytest.param("  Paris.\n", ["paris"], True, id="surrounding-whitespace-and-trailing-period"),
        pytest.param("paris!?", ["Paris."], True, id="trailing-punctuation-both-sides"),
        pytest.param("Paris, France", ["paris"], False, id="extra-words"),
        pytest.param("(a)", ["(a)"], True, id="leading-punctuation-kept-both-sides"),
        pytest.param("50%", ["50"], False, id="percent-is-not-noise"),
        pytest.param("rome", ["paris", "Rome"], True, id="any-label"),
        pytest.param("rome", "Rome", True, id="bare-string-label"),
        pytest.param("rome", [], False, id="no-labels"),
        pytest.param("105", ["100"], False, id="no-numeric-tolerance"),
    ],
)
def test_exact_match(prediction, targets, correct):
    assert exact_match(prediction, targets) is correct


@pytest.mark.parametrize(
    "answer, expected",
    [
        pytest.param("Yes", "yes", id="yes"),
        pytest.param("Yes.", "yes", id="yes-period"),
        pytest.param(" NO! ", "no", id="shouted-no-with-spaces"),
        pytest.param("no", "no", id="lowercase-no"),
        pytest.param("Yes, there is a dog.", "yes", id="yes-with-explanation"),
        pytest.param("No, there is no dog.", "no", id="no-with-explanation"),
        pytest.param("There is no dog in the image.", "no", id="no-inside-sentence"),
        pytest.param("Yes. There is no cat next to it.", "yes", id="only-first-sentence-counts"),
        pytest.param("No\nYes", "no", id="newline-ends-a-sentence"),
        pytest.param("...Yes", "yes", id="leading-punctuation-skipped"),
        pytest.param("yes and no", None, id="both"),
        pytest.param("yes/no", None, id="both-slash"),
        pytest.param("Yes, with no leash.", None, id="both-in-first-sentence"),
        pytest.param("maybe", None, id="neither"),
        pytest.param("Not sure", None, id="not-is-not-no"),
        pytest.param("There isn't a dog.", None, id="contraction-is-not-no"),
        pytest.param("", None, id="empty"),
        pytest.param("  \n", None, id="whitespace-only"),
        pytest.param("Yesterday nobody came", None, id="words-containing-yes-and-no"),
        pytest.param("yes yes", "yes", id="repeated-yes"),
    ],
)
def test_yes_no(answer, expected):
    assert yes_no(answer) == expected


# Eight samples, predictions P against labels L:
#   #  1    2    3    4   5     6    7    8
#   P  yes  yes  no   yes no    None no   None
#   L  yes  yes  yes  no  no    yes  no   no
PREDICTIONS = ["yes", "yes", "no", "yes", "no", None, "no", None]
LABELS = ["yes", "yes", "yes", "no", "no", "yes", "no", "no"]


def test_binary_metrics_yes_positive_like_pope():
    # TP = #1,#2 = 2; predicted yes = #1,#2,#4 = 3; labelled yes = #1,#2,#3,#6 = 4 (#6, a None, is a false negative).
    # correct = #1,#2,#5,#7 = 4 of 8. P = 2/3, R = 2/4, F1 = 2*(2/3)*(1/2) / (2/3 + 1/2) = (2/3) / (7/6) = 4/7.
    result = binary_metrics(PREDICTIONS, LABELS, positive="yes")
    assert result == pytest.approx({"accuracy": 4 / 8, "precision": 2 / 3, "recall": 2 / 4, "f1": 4 / 7})


def test_binary_metrics_no_positive_like_amber():
    # TP = #5,#7 = 2; predicted no = #3,#5,#7 = 3 (the Nones #6,#8 are not predicted positives);
    # labelled no = #4,#5,#7,#8 = 4 (#8, a None, is a false negative). Accuracy does not depend on the class: 4/8.
    # P = 2/3, R = 2/4, F1 = 4/7 as above.
    result = binary_metrics(PREDICTIONS, LABELS, positive="no")
    assert result == pytest.approx({"accuracy": 4 / 8, "precision": 2 / 3, "recall": 2 / 4, "f1": 4 / 7})


def test_binary_metrics_asymmetric_classes():
    # P = [yes, yes, yes, no], L = [yes, no, no, no].
    # yes positive: TP 1, predicted 3, labelled 1 -> P 1/3, R 1, F1 = 2*(1/3)*1/(4/3) = 1/2.
    # no positive:  TP 1 (#4), predicted 1, labelled 3 -> P 1, R 1/3, F1 = 1/2. Accuracy 2/4 for both.
    predictions, labels = ["yes", "yes", "yes", "no"], ["yes", "no", "no", "no"]
    assert binary_metrics(predictions, labels) == pytest.approx(
        {"accuracy": 0.5, "precision": 1 / 3, "recall": 1.0, "f1": 0.5}
    )
    assert binary_metrics(predictions, labels, positive="no") == pytest.approx(
        {"accuracy": 0.5, "precision": 1.0, "recall": 1 / 3, "f1": 0.5}
    )


def test_binary_metrics_all_none_is_all_wrong_without_dividing_by_zero():
    # No predicted positives: precision 0 by convention; recall 0/2; F1 0.
    result = binary_metrics([None, None, None], ["yes", "no", "yes"])
    assert result == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_binary_metrics_perfect():
    assert binary_metrics(["yes", "no"], ["yes", "no"]) == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_binary_metrics_empty():
    assert binary_metrics([], []) == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_binary_metrics_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        binary_metrics(["yes", "no"], ["yes"])


def test_binary_metrics_from_free_text_answers():
    # The evaluate stage's path: free text -> yes_no -> binary_metrics. "maybe" becomes None and is wrong.
    answers = ["Yes, a dog.", "No.", "maybe"]
    result = binary_metrics([yes_no(a) for a in answers], ["yes", "no", "no"], positive="no")
    # no-positive: TP 1 (#2), predicted no 1, labelled no 2 -> P 1, R 1/2, F1 2/3; accuracy 2/3.
    assert result == pytest.approx({"accuracy": 2 / 3, "precision": 1.0, "recall": 0.5, "f1": 2 / 3})


def test_preference_metrics():
    # margins: -1-(-3)=2, -5-(-2)=-3, -4-(-4)=0 (a tie, wrong), -0.5-(-1.5)=1 -> 2 of 4 preferred.
    # mean margin (2 - 3 + 0 + 1) / 4 = 0.
    result = preference_metrics([-1.0, -5.0, -4.0, -0.5], [-3.0, -2.0, -4.0, -1.5])
    assert result == pytest.approx({"preference_accuracy": 0.5, "mean_margin": 0.0})


def test_preference_metrics_nan_and_infinite_pairs():
    # (-1, -3): preferred, margin 2. (nan, -1): not preferred (NaN compares False), margin NaN left out.
    # (-2, -inf): preferred, margin inf left out. (-1, -5): preferred, margin 4. -> 3 of 4; mean of [2, 4] = 3.
    result = preference_metrics([-1.0, float("nan"), -2.0, -1.0], [-3.0, -1.0, float("-inf"), -5.0])
    assert result["preference_accuracy"] == pytest.approx(3 / 4)
    assert result["mean_margin"] == pytest.approx(3.0)


def test_preference_metrics_empty():
    result = preference_metrics([], [])
    assert result == {"preference_accuracy": 0.0, "mean_margin": 0.0}
    assert not any(math.isnan(v) for v in result.values())


def test_preference_metrics_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="2 chosen but 1 rejected"):
        preference_metrics([-1.0, -2.0], [-1.0])


def test_importable_without_torch():
    # In a fresh interpreter: this one may already hold torch from other tests.
    code = "import sys, jobs.metrics; assert 'torch' not in sys.modules, 'jobs.metrics imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ---- AMBER and POPE as their official scripts score them (issue 11) ------------------------------------------------
# AMBER: junyangwang0410/AMBER inference.py. POPE: RUCAIBox/POPE evaluate.py. Each case is worked by hand below.


def test_amber_counts_only_exact_yes_and_no_with_no_positive():
    truths = ["yes", "no", "yes", "no", "yes", "no", "yes", "no"]
    responses = ["Yes", "No", "No", "No", "Yes.", "Yes", "No", "No"]
    # right: 1 (Yes/yes), 2, 4, 8 (No/no); "Yes." on 5 is not "Yes" -> accuracy 4/8 = 50.0
    # answered "No": 2, 3, 4, 7, 8, of which truly no 2, 4, 8 -> precision 3/5 = 60.0
    # truly no: 2, 4, 6, 8, of which answered "No" 2, 4, 8 -> recall 3/4 = 75.0
    # F1 = 2 * .6 * .75 / (.6 + .75 + .0001) = 66.662 -> 66.7
    assert amber_discriminative(responses, truths) == {"accuracy": 0.5, "precision": 0.6, "recall": 0.75, "f1": 0.667}


def test_amber_f1_is_taken_from_the_rounded_precision_and_recall_with_its_epsilon():
    truths = ["no"] * 3 + ["yes"] * 3
    responses = ["No", "No", "Yes", "No", "Yes", "Yes"]
    # answered No: 1, 2, 4 (truly no 1, 2) -> P = 66.7; truly no 1-3, answered No 1, 2 -> R = 66.7
    # F1 = 2 * .667 * .667 / (1.334 + .0001) * 100 = 66.695 -> 66.7 (unrounded P and R give 66.67 too)
    assert amber_discriminative(responses, truths)["f1"] == 0.667
    # all "Yes": no "No" answer, where the script divides by zero; we report 0
    assert amber_discriminative(["Yes", "Yes"], ["yes", "no"]) == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0}


# AMBER's inference.py (junyangwang0410/AMBER, discriminative task) prints, with Precision and Recall already rounded:
#     F1 = round(2 * (Precision/100) * (Recall/100) / ((Precision/100) + (Recall/100) + 0.0001) * 100, 1)
# Each case below is chosen so that plain F1 (unrounded precision and recall, no 0.0001) prints another number.
@pytest.mark.parametrize("name, no_on_no, no_on_yes, truly_no, truly_yes, precision, recall, f1, plain_f1", [
    # P = 3/5 = 60.0 and R = 3/8 = 37.5 round to themselves: only the 0.0001 matters.
    # official: 2 * .6 * .375 / (.6 + .375 + .0001) = .45 / .9751 = .46149 -> 46.1; plain: .45 / .975 = .46154 -> 46.2
    ("the epsilon alone", 3, 2, 8, 5, 0.6, 0.375, 0.461, 0.462),
    # P = 2/4 = 50.0, R = 2/3 = 66.67 -> 66.7: the rounded recall lifts it.
    # official: 2 * .5 * .667 / (.5 + .667 + .0001) = .667 / 1.1671 = .57150 -> 57.2; plain: 2 (1/2)(2/3) / (7/6) = 4/7 = .57143 -> 57.1
    ("the rounded recall alone", 2, 2, 3, 3, 0.5, 0.667, 0.572, 0.571),
    # P = 1/3 -> 33.3, R = 1/9 -> 11.1, both rounded down, and the epsilon.
    # official: 2 * .333 * .111 / (.333 + .111 + .0001) = .073926 / .4441 = .16646 -> 16.6; plain: 2 (1/27) / (4/9) = 1/6 -> 16.7
    ("rounding and epsilon together", 1, 2, 9, 3, 0.333, 0.111, 0.166, 0.167),
])
def test_amber_f1_follows_the_official_rounding_where_plain_f1_prints_another_number(
        name, no_on_no, no_on_yes, truly_no, truly_yes, precision, recall, f1, plain_f1):
    """Issue 26 (4): "No" on ``no_on_no`` of the ``truly_no`` questions and on ``no_on_yes`` of the ``truly_yes`` ones,
    "Yes" on the rest."""
    truths = ["no"] * truly_no + ["yes"] * truly_yes
    responses = (["No"] * no_on_no + ["Yes"] * (truly_no - no_on_no)
                 + ["No"] * no_on_yes + ["Yes"] * (truly_yes - no_on_yes))
    right = no_on_no + truly_yes - no_on_yes
    scores = amber_discriminative(responses, truths)
    # approx only for the float of x / 100 (57.2 / 100 = 0.5720000000000001); a tenth of a percent is 1e-3
    assert scores == pytest.approx({"accuracy": round(right / len(truths), 3), "precision": precision, "recall": recall,
                                    "f1": f1}, abs=1e-9)
    assert f1 != plain_f1 == round(2 * (no_on_no / (no_on_no + no_on_yes)) * (no_on_no / truly_no)
                                   / (no_on_no / (no_on_no + no_on_yes) + no_on_no / truly_no), 3)


@pytest.mark.parametrize("answer, read", [
    ("Yes, there is a red bar.", "yes"),  # first sentence "Yes, there is a red bar" -> no "no" word
    ("No.", "no"),
    ("There is not a red bar.", "no"),  # "not" counts as no
    ("no", "no"),
    ("NO", "yes"),  # case-sensitive: only "No" and "no"
    ("No, there is none", "no"),  # the comma is removed before splitting: "No"
    ("Yes. No.", "yes"),  # only the first sentence
    ("I think so", "yes"),  # neither: yes
    ("", "yes"),
])
def test_pope_reads_answers_as_its_evaluate_py(answer, read):
    assert pope_answer(answer) == read


def test_pope_scores_with_yes_positive_and_the_yes_ratio():
    labels = ["yes", "no", "yes", "no", "yes", "no"]
    answers = ["Yes, there is.", "No.", "There is not a red bar.", "no", "I think so", "Yes"]
    # read: yes, no, no, no, yes, yes -> TP 1, 5; FP 6; TN 2, 4; FN 3
    scores = pope_scores(answers, labels)
    assert scores == pytest.approx({"accuracy": 4 / 6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 3 / 6})


# Where a completion's answer stands (issue 25; evaluate's accuracy and GRPO's rewards read it alike). "</think>": R1's
# "<think>reasoning</think> answer" as TRL's grpo_vlm.py system prompt asks for it; "<answer>": open-r1-multimodal's
# accuracy reward, re.search(r"<answer>(.*?)</answer>") stripped.
@pytest.mark.parametrize("completion, after, read", [
    ("  12 \n", None, "  12 \n"),  # the whole completion, as evaluate always read it (relaxed_accuracy strips it)
    ("<think>two bars</think>\n2", "</think>", "2"),
    ("<think>a</think> b </think> 3.", "</think>", "3."),  # after the last one
    ("<think>no end", "</think>", ""),  # no answer given in the asked format
    ("2", "</think>", ""),
    ("<think>x</think><answer> B </answer> trailing", "<answer>", "B"),
    ("<answer>A</answer><answer>C</answer>", "<answer>", "C"),  # the last, the final say (open-r1-multimodal takes the first)
    ("<answer>C", "<answer>", "C"),  # cut off before its closing tag: what was said
    ("C", "<answer>", ""),
])
def test_read_answer_takes_the_text_where_the_recipe_says_the_answer_stands(completion, after, read):
    from jobs.metrics import read_answer

    assert read_answer(completion, after) == read


def test_answer_correct_is_relaxed_or_exact_on_the_answer_read():
    from jobs.metrics import answer_correct

    assert answer_correct("<think>x</think> 10.4", ["10"], relaxed=True, answer_after="</think>")  # within 5%
    assert not answer_correct("<think>x</think> 10.6", ["10"], relaxed=True, answer_after="</think>")
    assert not answer_correct("<think>x</think> 10.4", ["10"], relaxed=False, answer_after="</think>")
    assert answer_correct("<think>x</think> Blue.", ["blue"], relaxed=False, answer_after="</think>")  # exact match's rule
    assert not answer_correct("<think>x</think> Blue.", ["blue"], relaxed=True, answer_after="</think>")  # ChartQA's does not strip "."
    assert not answer_correct("10", ["10"], relaxed=True, answer_after="</think>")  # no reasoning block, no answer
    assert answer_correct(" 10\n", ["10"], relaxed=True)
