"""merge_push's push gate on the cases where its rule's edges decide (issue 26: mutants make mutate found surviving
the gate tests of test_chain.py). The rule (merge_push.compare_with_base's docstring): worse when base - tuned exceeds
sqrt((b(1 - b) + t(1 - t)) / n), the scores read as proportions of n samples; no allowance for a metric that is no
proportion. Each standard error below is worked from that formula by hand."""

from __future__ import annotations

import pytest

from jobs import contract, merge_push
from tests.test_chain import gate_report, quick_recipe


def test_the_verdict_records_the_comparison_it_made():
    # sqrt((.5 * .5 + .45 * .55) / 100) = sqrt(.004975) = .070534
    verdict = merge_push.compare_with_base(gate_report(0.5, 0.45, 100), "dpo", "accuracy")
    assert verdict == {"metric": "accuracy", "scores": {"base": 0.5, "dpo": 0.45}, "samples": 100,
                       "standard_error": pytest.approx(0.070534, abs=1e-6), "worse": False,
                       "summary": "dpo scores 0.450 accuracy, base 0.500 over 100 samples, standard error of the difference 0.071"}


def test_the_same_score_is_never_worse_even_without_noise():
    # all right on both: b(1 - b) = t(1 - t) = 0, so the allowance is 0, and 0 > 0 is false
    assert not merge_push.compare_with_base(gate_report(1.0, 1.0, 10), "dpo", "accuracy")["worse"]
    assert not merge_push.compare_with_base(gate_report(2.5, 2.5, 10, "mean_margin"), "dpo", "mean_margin")["worse"]


def test_a_margin_gets_no_allowance_however_many_samples():
    # 0.05 lower; read as proportions the allowance would be sqrt((.25 + .2475) / 100) = .0705 and hide it
    verdict = merge_push.compare_with_base(gate_report(0.5, 0.45, 100, "mean_margin"), "dpo", "mean_margin")
    assert verdict["worse"] and verdict["standard_error"] == 0.0


def test_scores_outside_zero_to_one_are_no_proportions():
    verdict = merge_push.compare_with_base(gate_report(1.5, 1.4, 100, "score"), "dpo", "score")
    assert verdict["worse"] and verdict["summary"] == "dpo scores 1.400 score, base 1.500"


@pytest.mark.parametrize("base, tuned, n, error", [
    (0.0, 0.1, 10, 0.094868),  # sqrt((0 + .1 * .9) / 10): a score of 0 is a proportion too
    (1.0, 0.9, 10, 0.094868),  # and so is 1
    (1.0, 0.0, 1, 0.0),  # one sample: proportions still, with nothing to allow
])
def test_scores_at_the_ends_of_zero_to_one_and_one_sample_are_proportions(base, tuned, n, error):
    verdict = merge_push.compare_with_base(gate_report(base, tuned, n), "dpo", "accuracy")
    assert verdict["standard_error"] == pytest.approx(error, abs=1e-6)
    assert verdict["summary"].endswith(f" over {n} samples, standard error of the difference {error:.3f}")


def test_a_report_without_sample_counts_allows_no_noise():
    """report.json of a run without `counts` (or a metric missing from them): n is 0, so any drop is worse."""
    report = {"variants": {v: {"metrics": {"accuracy": s}} for v, s in (("base", 0.5), ("dpo", 0.45))}}
    verdict = merge_push.compare_with_base(report, "dpo", "accuracy")
    assert verdict["worse"] and verdict["samples"] == 0 and verdict["summary"] == "dpo scores 0.450 accuracy, base 0.500"
    report["variants"]["base"]["counts"] = {"exact_match": 100}
    assert merge_push.compare_with_base(report, "dpo", "accuracy")["samples"] == 0


def test_a_push_missing_both_scores_names_both():
    pushing = quick_recipe(merge_push={"push": True, "repo_id": "org/x"})
    with pytest.raises(contract.UserError, match=r"^merge_push: not pushing: evaluate reported no accuracy for base, dpo; "
                                                 r"add base and dpo to evaluate.variants, or set"):
        merge_push.gate({"variants": {}}, "dpo", pushing)
