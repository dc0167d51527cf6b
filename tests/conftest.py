"""Shared fixtures: tiny random models of the real classes and synthetic data in the real schemas,
built once per session, offline. Stages run in-process on them, as TRL's CLI tests do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

# Nothing in the suite may reach the hub: a stray download fails instead of hanging or passing by luck.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent


def run_stages(path: Path, *stages: str, force: bool = False):
    """Run a recipe's stages (or the ones named) in-process, in order; returns the loaded recipe."""
    from jobs import dpo, evaluate, grpo, merge_push, prepare, sft
    from jobs import recipe as recipes

    mains = {"prepare": prepare.main, "sft": sft.main, "dpo": dpo.main, "grpo": grpo.main, "evaluate": evaluate.main,
             "merge_push": merge_push.main}
    recipe = recipes.load(path)
    for stage in stages or recipe.stages:
        mains[stage](recipe=str(path), force=force)
    return recipe


def run_stages_answering(path: Path, answer_of) -> object:
    """run_stages with evaluate's generated answers scripted: ``answer_of(row)`` stands in for the model, so that the
    scoring is what a test checks, not what a tiny random model says."""
    def answers(model, processor, rows, **kwargs):
        return [answer_of(row) for row in rows]

    patch = pytest.MonkeyPatch()
    patch.setattr("jobs.inference.generate_answers", answers)
    try:
        return run_stages(path)
    finally:
        patch.undo()


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a stage run as its own process: this checkout first on the import path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **extra}


def with_sitecustomize(env: dict[str, str], folder: Path, source: str) -> dict[str, str]:
    """``env`` with ``folder`` first on its import path, ``source`` written there as the sitecustomize module that
    Python imports as each process starts (how a test reaches into a stage run as its own process)."""
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(source)
    return {**env, "PYTHONPATH": os.pathsep.join([str(folder), env["PYTHONPATH"]])}


def tiny_cache() -> Path:
    """Where the tests' tiny models are kept between sessions: $VLMJOBS_TINY_CACHE, else ~/.cache/vlmjobs/tiny."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("VLMJOBS_TINY_CACHE", Path(base) / "vlmjobs" / "tiny"))


@pytest.fixture(scope="session")
def tiny_model():
    """tiny_model("llava") -> folder of a tiny LLaVA saved with save_pretrained; built once for every session of the
    same jobs/tiny.py, jobs/synthetic.py and libraries (tiny.cached), so that make mutate's variants load it instead
    of each building it again. Read-only by agreement: a test that changes a model copies it first."""
    from jobs import tiny

    root, built = tiny_cache(), {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tiny.cached(family, root)
        return built[family]

    return get


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """synthetic_data("chartqa") -> folder laid out like the hub data set, 400 training rows."""
    from jobs import synthetic

    written: dict[str, Path] = {}

    def get(kind: str, rows: int = 400) -> Path:
        key = f"{kind}-{rows}"
        if key not in written:
            written[key] = synthetic.write(kind, tmp_path_factory.mktemp(key), rows=rows)
        return written[key]

    return get


def recipe_file(folder: Path, model: Path, sources: dict[str, Path], family: str = "llava", name: str = "t", **sections) -> Path:
    """A recipe on a tiny model and synthetic data, its run folder under ``folder``; sections given replace
    the defaults below (prepare and a 2-step full SFT)."""
    recipe = {
        "name": name,
        "model": {"name_or_path": str(model), "family": family},
        "data": {
            "sft": {"path": str(sources["chartqa"]), "format": "chartqa", "eval_split": "val", "test_split": "test"},
            "dpo": {"path": str(sources["rlaif-v"]), "format": "rlaif-v"},
        },
        "run": {"root": str(folder / "runs")},
        "stages": ["prepare", "sft"],
        "sft": {"method": "full", "args": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1}},
    }
    recipe.update(sections)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def write_recipe(tmp_path, tiny_model, synthetic_data):
    """write_recipe(family="llava", **sections) -> path of a recipe (see ``recipe_file``), run folder under tmp_path."""

    def write(family: str = "llava", name: str = "t", **sections) -> Path:
        sources = {kind: synthetic_data(kind) for kind in ("chartqa", "rlaif-v")}
        return recipe_file(tmp_path, tiny_model(family), sources, family=family, name=name, **sections)

    return write


# ---------------------------------------------------------------------------------------------
# The real control plane (issue 10): tests marked `cluster`, see tests/simcluster.py


@pytest.fixture(scope="session")
def real_cluster(tmp_path_factory):
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok on loopback, once per session."""
    from scripts.cluster import ClusterError
    from tests import simcluster

    if simcluster.go_missing():
        pytest.skip(simcluster.NO_GO)
    try:
        sim, started = simcluster.start(tmp_path_factory.mktemp("sim"))
    except ClusterError as e:
        pytest.fail(f"the simulated cluster did not start: {e}", pytrace=False)
    yield sim
    if started:  # stopped; its logs and audit log stay in pytest's temporary folder, for a failure's post-mortem
        import shutil

        from scripts.cluster import down

        down(sim.control_plane.state, keep=True)
        shutil.rmtree(sim.control_plane.state / "etcd", ignore_errors=True)


@pytest.fixture
def real_namespace(real_cluster):
    """A fresh namespace prepared like make k8s-apply's (restricted Pod Security, the PVC, the driver's RBAC)."""
    with real_cluster.namespace() as namespace:
        yield namespace


@pytest.fixture
def queued_namespace(real_cluster):
    """A fresh namespace prepared like make k8s-apply's, with the LocalQueue scripts.cluster.LOCAL_QUEUE, where Kueue
    manages every Job and JobSet (one without the queue label stays suspended, as on a platform enforcing it)."""
    with real_cluster.namespace("q", queued=True) as namespace:
        yield namespace


def pytest_collection_modifyitems(items):
    for item in items:  # a test on the control plane is a cluster test, marked or not
        if "real_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped cluster test is a failure: CI has Go, so a skip there hides a broken set-up."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and item.get_closest_marker("cluster"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: a cluster test may not be skipped ({reason})"
