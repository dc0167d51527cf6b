"""A recipe's nights (issue 22): the history each run adds to, regressions against the last good night, pruning.

The nights are the demo's recipe run by the local runner (every stage its own process), three times under nightly run
ids, the third with SFT's learning rate 0. To keep three runs cheap they leave out what the history does not need:
DPO and its data (the run then ships SFT's model) and the prompted variant (merge_push's gate needs base). SFT keeps
the demo's 10 epochs: after 3 its accuracy was 0.025, too close to a learning rate of 0 to show anything. Whether a
night regressed is worked out here from evaluate's per-sample answers (predictions.jsonl), not taken from the code.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs import contract, history, metrics
from tests.conftest import ROOT, subprocess_env

NIGHTS = ("tiny-demo-20261201", "tiny-demo-20261202", "tiny-demo-20261203")
WORSE = {"tiny-demo-20261203": ["--sft.args.learning_rate=0"]}  # made worse on purpose: SFT teaches nothing


def vlmjobs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], env=subprocess_env(), capture_output=True,
                          text=True, timeout=1800)


@pytest.fixture(scope="module")
def nights(tmp_path_factory, tiny_model, synthetic_data):
    """The three nights, run once for the module: {"root", "recipe", "overrides", "runs": {run id: CompletedProcess}}."""
    root = tmp_path_factory.mktemp("nights")
    demo = yaml.safe_load((ROOT / "recipes" / "tiny-demo.yaml").read_text())
    demo["stages"] = ["prepare", "sft", "evaluate", "merge_push"]
    del demo["data"]["dpo"], demo["dpo"]
    demo["evaluate"]["variants"] = ["base", "sft"]
    recipe = root / "tiny-demo.yaml"
    recipe.write_text(yaml.safe_dump(demo, sort_keys=False))
    overrides = [f"--model.name_or_path={tiny_model('llava')}", f"--data.sft.path={synthetic_data('chartqa')}",
                 f"--run.root={root}"]
    runs = {run_id: vlmjobs("run", str(recipe), *overrides, f"--run.id={run_id}", *WORSE.get(run_id, [])) for run_id in NIGHTS}
    return {"root": root, "recipe": str(recipe), "overrides": overrides, "runs": runs}


def shipped_answers(root: Path, run_id: str) -> list[bool]:
    """The shipped (sft) model's per-answer ChartQA verdicts on the test split, as evaluate saved them."""
    rows = [json.loads(line) for line in (root / run_id / "evaluate" / "predictions.jsonl").read_text().splitlines()]
    return [row["correct"] for row in rows if row["variant"] == "sft" and row["split"] == "sft/test"]


def expected_regressed(good: list[bool], night: list[bool]) -> tuple[bool, float, float]:
    """The issue's rule from the answers: accuracy p over n answers, standard error sqrt(p(1-p)/n) each; regressed when
    the night is below the last good one by more than the standard error of the difference."""
    p_good, p_night = sum(good) / len(good), sum(night) / len(night)
    error = math.sqrt(p_good * (1 - p_good) / len(good) + p_night * (1 - p_night) / len(night))
    return p_good - p_night > error, p_good - p_night, error


@pytest.mark.slow
def test_the_third_night_regressed_by_the_answers_and_exits_with_its_own_code(nights):
    root, runs = nights["root"], nights["runs"]
    answers = {run_id: shipped_answers(root, run_id) for run_id in NIGHTS}
    first, second, third = NIGHTS
    second_regressed, drop, error = expected_regressed(answers[first], answers[second])
    third_regressed, drop3, error3 = expected_regressed(answers[second if not second_regressed else first], answers[third])
    print(f"night 2: down {drop:.3f} vs se {error:.3f}; night 3: down {drop3:.3f} vs se {error3:.3f}")
    assert not second_regressed and third_regressed, "the nights did not come out as planned: the test shows nothing"

    assert runs[first].returncode == 0, runs[first].stderr[-3000:]
    assert runs[second].returncode == 0, runs[second].stderr[-3000:]
    assert runs[third].returncode == 3 == contract.EXIT_REGRESSED, runs[third].stdout[-2000:] + runs[third].stderr[-3000:]
    assert f"evaluate: regressed: sft scores {sum(answers[third]) / len(answers[third]):.3f} accuracy" in runs[third].stderr
    assert not (root / third / "merge_push").exists(), "the chain stops at evaluate: the regressed model is not merged"
    assert (root / second / "merge_push" / "model" / "README.md").is_file()

    report = json.loads((root / third / "evaluate" / "report.json").read_text())
    assert report["regression"]["regressed"] and report["regression"]["against"] == second
    assert "**Regressed.**" in (root / third / "evaluate" / "report.md").read_text()
    lines = [json.loads(line) for line in history.history_path(root, "tiny-demo").read_text().splitlines()]
    assert [(n["run_id"], n["regressed"]) for n in lines] == [(first, False), (second, False), (third, True)]
    for night, run_id in zip(lines, NIGHTS):
        n = len(answers[run_id])
        p = sum(answers[run_id]) / n
        assert (night["samples"], night["value"]) == (n, pytest.approx(p))
        assert night["standard_error"] == pytest.approx(math.sqrt(p * (1 - p) / n))
        assert night["image"] == "local" and night["date"].startswith("20") and night["variant"] == "sft"
    assert lines[0]["fingerprint"] == lines[1]["fingerprint"] != lines[2]["fingerprint"], "the third changed the recipe"

    again = vlmjobs("run", nights["recipe"], *nights["overrides"], f"--run.id={third}", *WORSE[third])
    assert again.returncode == 3, "a regressed night stays one when its command runs again (evaluate is done)"
    assert "already done" in again.stdout and "evaluate: regressed" in again.stderr


@pytest.mark.slow
def test_merge_push_refuses_to_push_the_regressed_night(nights):
    third = NIGHTS[2]
    pushing = ["--merge_push.push=true", "--merge_push.repo_id=vlmjobs-test/never-pushed", "--merge_push.license=apache-2.0"]
    done = vlmjobs("run", nights["recipe"], *nights["overrides"], f"--run.id={third}", *WORSE[third], "--stages=merge_push", *pushing)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-3000:]
    assert "merge_push: not pushing: regressed: sft scores" in done.stderr
    assert f"the last good night {NIGHTS[1]}" in done.stderr
    assert not (nights["root"] / third / "merge_push").exists()


@pytest.mark.slow
def test_history_prints_the_nights_and_plots_them(nights):
    from PIL import Image

    figure = nights["root"] / "plot.png"
    shown = vlmjobs("history", nights["recipe"], *nights["overrides"], f"--plot={figure}")
    assert shown.returncode == 0, shown.stderr[-3000:]
    rows = [line for line in shown.stdout.splitlines() if line.startswith("tiny-demo-")]
    assert [row.split()[0] for row in rows] == list(NIGHTS)
    assert "REGRESSED" not in rows[0] + rows[1] and f"REGRESSED (vs {NIGHTS[1]})" in rows[2]
    assert "3 nights, 1 regressed" in shown.stdout
    with Image.open(figure) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200


@pytest.mark.slow
def test_prune_keeps_the_last_good_run_and_any_in_use(nights):
    root, overrides, recipe = nights["root"], nights["overrides"], nights["recipe"]
    first, second, third = NIGHTS
    lock = os.open(root / first / contract.RUN_LOCK, os.O_RDWR)  # as a stage running in the first run's folder holds it
    fcntl.flock(lock, fcntl.LOCK_SH)
    try:
        busy = vlmjobs("prune", recipe, *overrides, "--keep=2")
    finally:
        os.close(lock)
    assert busy.returncode == 0, busy.stderr[-3000:]
    assert f"kept {root / first}: in use" in busy.stdout and (root / first).is_dir()

    pruned = vlmjobs("prune", recipe, *overrides, "--keep=2")
    assert pruned.returncode == 0, pruned.stderr[-3000:]
    assert f"removed {root / first}" in pruned.stdout
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("tiny-demo-")) == [second, third]

    newest_only = vlmjobs("prune", recipe, *overrides, "--keep=1")
    assert newest_only.returncode == 0, newest_only.stderr[-3000:]
    assert f"kept {root / second}: the last good run" in newest_only.stdout, "the third regressed: the second is the last good"
    assert (root / second).is_dir() and (root / third).is_dir()
    shown = vlmjobs("history", recipe, *overrides)
    assert len([line for line in shown.stdout.splitlines() if line.startswith("tiny-demo-")]) == 3, "pruning keeps the history"


# ---- the history file and the rule, without a model --------------------------------------------------------------


def night(run_id: str, value: float, n: int = 100, **extra) -> dict:
    error = math.sqrt(value * (1 - value) / n)
    return {"run_id": run_id, "variant": "dpo", "primary_metric": "accuracy", "value": value, "samples": n,
            "standard_error": error, **extra}


def test_a_drop_within_the_noise_is_no_regression_and_the_baseline_is_the_last_good_night():
    # 0.80 and 0.74 over 100 answers each: the difference's standard error is sqrt(.16/100 + .1924/100) = 0.0594
    nights = [night("a", 0.80, against=None), night("b", 0.50, regressed=True, against="a")]
    within = history.judge(nights, night("c", 0.745))
    assert not within["regressed"] and within["against"] == "a", "a regressed night is no baseline"
    assert within["difference_error"] == pytest.approx(math.sqrt(0.16 / 100 + 0.745 * 0.255 / 100))
    beyond = history.judge(nights, night("c", 0.73))  # down 0.07 > sqrt(.0016 + .001971) = 0.0598
    assert beyond["regressed"] and beyond["summary"].startswith("regressed: dpo scores 0.730 accuracy over 100 samples")
    assert not history.judge([], night("a", 0.1))["regressed"], "the first night has nothing to fall below"


def test_the_mean_margins_standard_error_is_its_spread_over_root_n():
    import statistics

    margins = [0.5, 2.0, -1.0, 3.5, 1.25]
    assert metrics.mean_standard_error(margins) == pytest.approx(statistics.stdev(margins) / math.sqrt(5))
    assert metrics.proportion_standard_error(0.25, 48) == pytest.approx(0.0625)  # sqrt(.1875 / 48)


def test_a_writer_killed_mid_line_costs_only_its_own_line(tmp_path, capsys):
    path = history.history_path(tmp_path, "r")
    history.append(path, night("a", 0.8))
    with open(path, "a") as f:
        f.write('{"run_id": "b", "value": 0.7')  # what a writer killed mid-write leaves
    history.append(path, night("c", 0.9))
    assert [n["run_id"] for n in history.read(path)] == ["a", "c"]
    assert "skipped 1 unreadable line" in capsys.readouterr().err
    history.append(path, night("a", 0.85))  # evaluated again (--force): the latest counts, in its first place
    assert [(n["run_id"], n["value"]) for n in history.read(path, quiet=True)] == [("a", 0.85), ("c", 0.9)]


def test_writers_appending_at_once_never_interleave(tmp_path):
    path = history.history_path(tmp_path, "r")
    code = ("import sys; from jobs import history\n"
            "for i in range(200): history.append(sys.argv[1], {'run_id': f'{sys.argv[2]}-{i}', 'pad': 'x' * 5000})")
    writers = [subprocess.Popen([sys.executable, "-c", code, str(path), f"w{w}"], env=subprocess_env()) for w in range(4)]
    assert [w.wait(timeout=120) for w in writers] == [0] * 4
    # A writer that finds the last line still being written starts on a new line: a blank line, which reading skips
    lines = [line for line in path.read_text().splitlines() if line]
    assert len(lines) == 800 and all(json.loads(line)["pad"] == "x" * 5000 for line in lines)
    assert len(history.read(path)) == 800


def test_prune_spares_the_run_that_prunes_and_runs_the_caller_knows_are_in_use(tmp_path):
    """run.keep's pruning (evaluate, at the end of a run) spares its own run; --jobs names runs with unfinished Jobs."""
    path = history.history_path(tmp_path, "r")
    for run_id, regressed in (("n1", False), ("n2", True), ("n3", False), ("n4", True), ("n5", True)):
        history.append(path, night(run_id, 0.5, regressed=regressed))
        (tmp_path / run_id / "evaluate").mkdir(parents=True)
    (tmp_path / "other-recipe-run").mkdir()
    removed, kept = history.prune(tmp_path, "r", 1, spare=("n2",), in_use=lambda run_id: run_id == "n1")
    assert removed == ["n4"]
    assert kept == {"n5": "one of the newest 1", "n3": "the last good run", "n2": "this run", "n1": "in use"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".history", "n1", "n2", "n3", "n5", "other-recipe-run"]
    with pytest.raises(contract.UserError, match=r"^--keep: 0 keeps no run; at least 1$"):
        history.prune(tmp_path, "r", 0)
