"""Scoring rules of the evaluate stage: ChartQA relaxed accuracy, yes/no answers, DPO preferences, AMBER and POPE.

Pure Python, no torch, so the rules can be read, tested and reused without a model. Each rule follows a
published reference where one exists, so that our numbers compare with papers; where we chose differently
the docstring says so and why.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

# What evaluate reports, by the rows it scores: answer rows (data.sft), preference rows (data.dpo), and either kind
# where the gold answers are yes/no; each benchmark's as <its key>_<its official metric> (benchmarks.benchmark_metrics).
# evaluate.primary_metric must be one of them (vlmjobs validate checks, before any GPU). Each with the definition
# report.md gives.
METRICS = {
    "sft": {
        "accuracy": "answers judged right: ChartQA's relaxed accuracy for chartqa sources (a number within 5% of the "
                    "gold one, else the same text), exact match otherwise",
        "exact_match": "answers equal to a gold answer, ignoring case, surrounding spaces and trailing punctuation",
    },
    "dpo": {
        "preference_accuracy": "pairs in which the model gives the chosen answer a higher log-probability than the "
                               "rejected one",
        "mean_margin": "mean of log p(chosen) - log p(rejected) over the pairs, in nats: how clear the preference is "
                       "(not a fraction)",
    },
    "yes/no": {
        "yes_no_accuracy": "yes/no questions whose generated answer says the gold yes or no (saying neither counts "
                           "wrong)",
        "no_f1": "F1 of answering no, no being the positive class",
        "no_precision": "answers saying no where the gold answer is no, over the answers saying no",
        "no_recall": "gold no answers the model answered no, over the gold no answers",
        "yes_f1": "F1 of answering yes, yes being the positive class",
        "yes_precision": "answers saying yes where the gold answer is yes, over the answers saying yes",
        "yes_recall": "gold yes answers the model answered yes, over the gold yes answers",
    },
}


# ChartQA paper (arXiv 2203.10244, end of section 5.1): a numeric answer within 5% of the gold one counts.
CHARTQA_MAX_RELATIVE_CHANGE = 0.05


def _to_float(text: str) -> float | None:
    """The number in ``text`` as pix2struct's ``relaxed_correctness`` reads it, or None.

    Python's ``float`` itself: surrounding whitespace is tolerated, thousands separators ("1,000") are not, and
    "1e3", "1_000", "inf" and "nan" parse. All trailing "%" are removed (``rstrip``) and the number divided by 100,
    so "5%" equals "0.05".
    """
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str) -> bool:
    """ChartQA's relaxed correctness of one prediction against one gold answer.

    Reproduces google-research/pix2struct ``pix2struct/metrics.py::relaxed_correctness`` (copied unchanged
    into Qwen-VL's ``eval_mm/evaluate_vqa.py`` and lmms-eval's ``tasks/chartqa/utils.py``):
    when both parse as numbers and the target is not zero, ``abs(p - t) / abs(t) <= 0.05``;
    otherwise (a word, a target of 0, a prediction that is not a number) a case-insensitive exact match.
    Like the reference, nothing is stripped here: ``float`` ignores surrounding whitespace on its own,
    but " Yes" does not string-match "yes". ``relaxed_accuracy`` strips the prediction first, as Qwen-VL does.
    Commas are not removed either, so "1,000" against "1000" is a (failing) string match, as in the reference.
    """
    prediction_number = _to_float(prediction)
    target_number = _to_float(target)
    # `target_number` is falsy for 0 as well as None: the reference falls back to a string match for both.
    if prediction_number is not None and target_number:
        return abs(prediction_number - target_number) / abs(target_number) <= CHARTQA_MAX_RELATIVE_CHANGE
    return prediction.lower() == target.lower()


def _as_list(targets: str | Sequence[str]) -> list[str]:
    # A bare string would otherwise be iterated character by character; Qwen-VL wraps it the same way.
    return [targets] if isinstance(targets, str) else list(targets)


def relaxed_accuracy(prediction: str, targets: str | Sequence[str]) -> bool:
    """Whether ``prediction`` is relaxed-correct against its best gold answer (False when there are none).

    The best of several gold labels counts, as in pix2struct's ``aggregate_metrics`` (``max`` over targets).
    Surrounding whitespace of the prediction is stripped first, as in Qwen-VL's ``evaluate_relaxed_accuracy``
    (``elem['answer'].strip()``), because generated text often ends in a newline; targets are used as given.
    """
    prediction = prediction.strip()
    return any(relaxed_correctness(prediction, target) for target in _as_list(targets))


# "%" is kept: "50%" and "50" are different answers (mistral-evals' ChartQA normaliser keeps it for the same reason).
_TRAILING_NOISE = "".join(c for c in string.punctuation if c != "%") + string.whitespace


def _normalise_answer(text: str) -> str:
    return text.strip().rstrip(_TRAILING_NOISE).lower()


def exact_match(prediction: str, targets: str | Sequence[str]) -> bool:
    """Exact match against any gold answer, ignoring case, surrounding whitespace and trailing punctuation.

    "Paris." matches "paris"; "50%" does not match "50" (see ``_TRAILING_NOISE``). For non-chart tasks.
    """
    normalised = _normalise_answer(prediction)
    return any(normalised == _normalise_answer(target) for target in _as_list(targets))


_SENTENCE_END = re.compile(r"[.!?\n]")
_WORD = re.compile(r"\w+")


def _first_sentence_words(answer: str) -> list[str]:
    """Lower-cased words of the first sentence that has any ("...Yes" still reads as "yes")."""
    for sentence in _SENTENCE_END.split(answer.lower()):
        words = _WORD.findall(sentence)
        if words:
            return words
    return []


def yes_no(answer: str) -> str | None:
    """'yes' or 'no' where a free-text answer clearly says one of them, else None.

    The rule: take the first sentence (up to the first ".", "!", "?" or newline), lower-case it and split it into
    words (runs of letters and digits, so punctuation and whitespace never matter). If the word "yes" occurs and
    "no" does not, the answer is 'yes'; if "no" occurs and "yes" does not, 'no'; otherwise (neither, or both) None.

        "Yes." -> yes   " NO! " -> no   "Yes, there is a dog." -> yes   "No, there is no dog." -> no
        "yes and no" -> None   "maybe" -> None   "Not sure" -> None   "" -> None

    Sources and where we differ:
    - POPE (RUCAIBox/POPE ``evaluate.py``, copied into LLaVA's ``llava/eval/eval_pope.py``) also keeps only the
      first sentence (split at "."), but then says 'no' when the space-split words contain "No", "no" or "not",
      and 'yes' for everything else. We do not guess 'yes' for text that says neither ("maybe", "", a refusal),
      and we do not count "not", because "Not sure" and "I do not know" are not answers; such answers become
      None, which ``binary_metrics`` scores as wrong. POPE's split is also case- and punctuation-sensitive
      (" NO! " has no word equal to "No"); ours is not.
    - AMBER (junyangwang0410/AMBER ``inference.py``) leaves extraction to the user and compares the response
      with exactly "Yes" or "No"; anything else is wrong. For one-word answers our rule agrees with both.
    Known misses, by design: "There isn't a dog" and "There is not a dog" give None (no "yes"/"no" word), and
    "Yes, with no leash" gives None (both words in the first sentence).
    """
    words = set(_first_sentence_words(answer))
    says_yes, says_no = "yes" in words, "no" in words
    if says_yes == says_no:
        return None
    return "yes" if says_yes else "no"


def _fraction(numerator: int, denominator: int) -> float:
    # 0 rather than an error or NaN where nothing was counted, so report.json stays plain JSON.
    return numerator / denominator if denominator else 0.0


def binary_metrics(predictions: Sequence[str | None], labels: Sequence[str], positive: str = "yes") -> dict:
    """Accuracy, precision, recall and F1 (fractions) of yes/no predictions, ``positive`` being the positive class.

    POPE reports with "yes" as the positive class; AMBER's discriminative task with "no" (its precision is
    answered-"No"-and-truly-no over answered-"No", its recall over truly-no): pass ``positive='no'``.

    A None prediction (an answer that said neither yes nor no) is always wrong, as in AMBER's ``inference.py``,
    where a response other than exactly "Yes"/"No" is counted in every denominator and in no numerator:
    - accuracy: it counts in the denominator (all samples) and is never correct;
    - recall: for a positive label it is a false negative;
    - precision: it is not a predicted positive, so it changes neither true nor false positives.
    (lmms-eval's POPE precision/recall leave such answers out of recall too; LLaVA's POPE script never has any,
    since it maps everything without a "no" to 'yes'.)

    F1 is ``2PR / (P + R)`` unrounded. AMBER's script computes F1 from precision and recall already rounded to
    0.1% and adds 1e-4 to the denominator, so its printed F1 can differ from ours in the last digit.
    Every value is 0 where its denominator is empty (no samples, no predicted positives, no positive labels).
    """
    if len(predictions) != len(labels):
        raise ValueError(
            f"binary_metrics: {len(predictions)} predictions but {len(labels)} labels; pass one per sample"
        )
    correct = sum(p is not None and p == label for p, label in zip(predictions, labels))
    true_positives = sum(p == positive and label == positive for p, label in zip(predictions, labels))
    predicted_positives = sum(p == positive for p in predictions)
    actual_positives = sum(label == positive for label in labels)
    precision = _fraction(true_positives, predicted_positives)
    recall = _fraction(true_positives, actual_positives)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": _fraction(correct, len(labels)), "precision": precision, "recall": recall, "f1": f1}


def preference_metrics(chosen_logps: Sequence[float], rejected_logps: Sequence[float]) -> dict:
    """How often the model prefers the chosen answer, and by how much (log-probabilities of whole answers).

    ``preference_accuracy``: the fraction of pairs with chosen > rejected; a tie counts as wrong (TRL's
    ``rewards/accuracies`` uses the same strict ``>``), and so does a pair with a NaN, which compares False.
    ``mean_margin``: the mean of chosen - rejected over the pairs whose margin is finite, so one NaN or
    -inf log-probability (an empty or truncated answer) cannot turn the whole mean into NaN or infinity.
    Both are 0.0 for no pairs, like ``binary_metrics``, so report.json stays plain JSON.
    """
    if len(chosen_logps) != len(rejected_logps):
        raise ValueError(
            f"preference_metrics: {len(chosen_logps)} chosen but {len(rejected_logps)} rejected log-probabilities; "
            "pass one of each per pair"
        )
    pairs = [(float(c), float(r)) for c, r in zip(chosen_logps, rejected_logps)]
    preferred = sum(c > r for c, r in pairs)
    margins = [c - r for c, r in pairs if math.isfinite(c - r)]
    return {
        "preference_accuracy": _fraction(preferred, len(pairs)),
        "mean_margin": sum(margins) / len(margins) if margins else 0.0,
    }


# ---- published benchmarks, scored as their official scripts score them ------------------------------------------


def amber_discriminative(responses: Sequence[str], truths: Sequence[str]) -> dict:
    """AMBER's discriminative-task scores, as junyangwang0410/AMBER ``inference.py`` computes and prints them.

    The script compares each response with exactly "Yes" or "No" (anything else, "yes" or "Yes." included, is
    wrong) and takes "No" as the positive class, hallucination being the model saying "yes" to what is not there:
    - accuracy: responses equal to "Yes" where the truth is "yes", or "No" where it is not, over all questions;
    - precision: answered "No" and truly "no", over answered "No";
    - recall: answered "No" where the truth is not "yes", over those questions;
    - F1: from precision and recall as printed (percentages rounded to 0.1), ``2PR / (P + R + 0.0001)``.
    Each is rounded to 0.1 percent as the script prints it, and returned as a fraction (85.8 -> 0.858). Where
    the script divides by zero and stops, the value is 0.
    """
    if len(responses) != len(truths):
        raise ValueError(f"amber_discriminative: {len(responses)} responses but {len(truths)} truths; pass one per question")
    correct = sum((t == "yes" and r == "Yes") or (t != "yes" and r == "No") for r, t in zip(responses, truths))
    answered_no = sum(r == "No" for r in responses)
    answered_no_truly = sum(r == "No" and t == "no" for r, t in zip(responses, truths))
    truly_not = sum(t != "yes" for t in truths)
    found_not = sum(r == "No" and t != "yes" for r, t in zip(responses, truths))
    accuracy = round(_fraction(correct, len(truths)) * 100, 1)
    precision = round(_fraction(answered_no_truly, answered_no) * 100, 1)
    recall = round(_fraction(found_not, truly_not) * 100, 1)
    f1 = round(2 * (precision / 100) * (recall / 100) / ((precision / 100) + (recall / 100) + 0.0001) * 100, 1)
    return {"accuracy": accuracy / 100, "precision": precision / 100, "recall": recall / 100, "f1": f1 / 100}


def pope_answer(text: str) -> str:
    """'yes' or 'no' as RUCAIBox/POPE ``evaluate.py`` reads an answer: the text up to its first ".", commas
    removed, split at spaces; 'no' if a word is exactly "No", "no" or "not", else 'yes' (an empty or evasive
    answer counts as 'yes')."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def pope_scores(answers: Sequence[str], labels: Sequence[str]) -> dict:
    """POPE's scores as RUCAIBox/POPE ``evaluate.py`` computes them from raw answers (``pope_answer``) and labels
    ("no" is negative, any other label positive): accuracy, precision, recall and F1 with "yes" positive, and the
    ratio of "yes" answers. Unrounded, as the script prints them; 0 where it would divide by zero."""
    if len(answers) != len(labels):
        raise ValueError(f"pope_scores: {len(answers)} answers but {len(labels)} labels; pass one per question")
    predicted = [pope_answer(a) == "yes" for a in answers]
    positive = [label != "no" for label in labels]
    tp = sum(p and g for p, g in zip(predicted, positive))
    fp = sum(p and not g for p, g in zip(predicted, positive))
    tn = sum(not p and not g for p, g in zip(predicted, positive))
    fn = sum(not p and g for p, g in zip(predicted, positive))
    precision, recall = _fraction(tp, tp + fp), _fraction(tp, tp + fn)
    return {
        "accuracy": _fraction(tp + tn, len(labels)),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": _fraction(sum(predicted), len(predicted)),
    }


# ---- reading and judging a generated answer: evaluate's accuracy and GRPO's rewards (jobs.rewards) share these --------


def read_answer(completion: str, answer_after: str | None = None) -> str:
    """The answer in a generated completion, as the recipe's data source says where it stands (``answer_after``).

    None: the whole completion. Otherwise the text after the last ``answer_after`` ("</think>" for R1's "<think>...
    </think> answer"), up to its closing tag when it is an opening one ("<answer>" reads "<answer>3</answer>" as "3",
    as open-r1-multimodal's accuracy reward reads its solutions). A completion without the marker gave no answer in
    the asked format: "" (scored wrong)."""
    if answer_after is None:
        return completion
    start = completion.rfind(answer_after)
    if start < 0:
        return ""
    answer = completion[start + len(answer_after):]
    if answer_after.startswith("<") and not answer_after.startswith("</"):
        answer = answer.split("</" + answer_after[1:], 1)[0]
    return answer.strip()


def answer_correct(completion: str, targets: str | Sequence[str], *, relaxed: bool, answer_after: str | None = None) -> bool:
    """Whether a completion answers right: its answer (``read_answer``) relaxed-correct (ChartQA's rule, ``relaxed``)
    or an exact match (``exact_match``) against any gold answer. evaluate's accuracy and GRPO's accuracy reward."""
    answer = read_answer(completion, answer_after)
    return relaxed_accuracy(answer, targets) if relaxed else exact_match(answer, targets)


# ---- noise of a finite test set ---------------------------------------------------------------------------------

# evaluate's metrics that are no fraction of samples: a mean of per-sample values, whose noise their spread gives
NOT_PROPORTIONS = ("mean_margin",)


def proportion_standard_error(p: float, n: int) -> float:
    """Standard error of a fraction ``p`` of ``n`` samples (a binomial proportion): ``sqrt(p(1 - p) / n)``. F1,
    precision and recall are read the same way, an approximation (their denominators are not n). 0 for no samples."""
    return math.sqrt(p * (1 - p) / n) if n > 0 else 0.0


def mean_standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of per-sample values: their sample standard deviation (n - 1) over sqrt(n). 0 for
    fewer than two values, which tell no spread."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
