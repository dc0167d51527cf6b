"""Every shipped recipe's tiny twin runs its stages: the recipe itself, on the tiny model of its family and synthetic
data in its sources' formats, shrunk (jobs.twins). A recipe that rots (a TRL key renamed, a LoRA target its family
lacks, a split its data set lacks, a family quirk a stage trips on) fails here, not on the cluster."""

from __future__ import annotations

import fnmatch

import pytest
import yaml

from jobs import contract, memory, modeling, twins
from jobs import recipe as recipes
from tests.conftest import ROOT, run_stages

SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


def make_twin(path, tmp_path, tiny_model, synthetic_data):
    original = yaml.safe_load(path.read_text())
    twin = twins.twin(original, tiny_model, synthetic_data, tmp_path / "runs")
    out = tmp_path / path.name
    out.write_text(yaml.safe_dump(twin, sort_keys=False))
    return original, twin, out


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_a_twin_changes_only_the_knobs_it_documents(path, tmp_path, tiny_model, synthetic_data):
    original, twin, out = make_twin(path, tmp_path, tiny_model, synthetic_data)
    unexplained = {k for k in twins.changed_keys(original, twin) if not any(fnmatch.fnmatchcase(k, c) for c in twins.CHANGED)}
    assert unexplained == set()
    recipe = recipes.load(out)
    assert recipe.stages == recipes.load(path).stages
    assert recipe.model.family == original["model"]["family"]
    for stage in set(recipe.stages) & set(recipes.TRAINING_STAGES):  # `vlmjobs memory` applies the recipe's LoRA
        estimate, counts = memory.for_stage(recipe, stage)             # to its family's model
        if getattr(recipe, stage).method == "full":
            assert counts["trainable"] == counts["parameters"], stage
        else:
            assert 0 < counts["trainable"] < counts["parameters"] / 2, stage  # an adapter, not the model
        assert estimate.total > estimate.model > 0, stage


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_runs_its_stages_as_its_tiny_twin(path, tmp_path, tiny_model, synthetic_data):
    _, _, out = make_twin(path, tmp_path, tiny_model, synthetic_data)
    recipe = run_stages(out)
    for stage in recipe.stages:
        assert (recipe.run_dir / stage / contract.SUCCESS_FILE).is_file(), stage
    if "evaluate" in recipe.stages:
        from jobs.benchmarks import benchmark_metrics
        from jobs.metrics import METRICS

        report = contract.read_json(recipe.run_dir / "evaluate" / "report.json")
        benchmarks = set(benchmark_metrics(recipe.evaluate.benchmarks))
        for variant in report["variants"].values():  # the recipe's benchmarks, on synthetic files in their released layouts
            assert benchmarks <= set(variant["metrics"])
        # the names `vlmjobs validate` checks evaluate.primary_metric against (issue 13)
        reported = {metric for variant in report["variants"].values() for metric in variant["metrics"]}
        assert reported <= {m for names in METRICS.values() for m in names} | benchmarks, reported
        assert recipe.evaluate.primary_metric in reported
    if "merge_push" in recipe.stages:
        trained = recipe.shipped_stage
        record = contract.read_json(recipe.run_dir / "merge_push" / contract.SUCCESS_FILE)
        if modeling.is_adapter(recipe.run_dir / trained / "model"):
            assert record["logits_max_diff"] <= recipe.merge_push.logits_atol
        assert record["pushed_to"] is None
