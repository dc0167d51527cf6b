"""The learning checks, on the demo as `make demo` runs it: the local runner, every stage its own
process, the demo recipe's own settings, only the tiny model and data folders pointed elsewhere.

SFT: held-out exact match of the random tiny LLaVA rises from <= 0.2 before to >= 0.7 after.
DPO: held-out preference accuracy rises from about chance (the SFT model) to >= 0.8, and at
least 0.2 above the base model's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env


@pytest.mark.slow
def test_the_demo_learns_what_each_stage_teaches(tmp_path, tiny_model, synthetic_data):
    overrides = [
        f"--model.name_or_path={tiny_model('llava')}",
        f"--data.sft.path={synthetic_data('chartqa')}",
        f"--data.dpo.path={synthetic_data('rlaif-v')}",
        f"--run.root={tmp_path}",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "run", str(ROOT / "recipes" / "tiny-demo.yaml"), *overrides],
        env=subprocess_env(), capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "tiny-demo" / "evaluate" / "report.json").read_text())
    scores = {variant: entry["metrics"] for variant, entry in report["variants"].items()}
    print(json.dumps(scores, indent=1))

    assert scores["base"]["exact_match"] <= 0.2
    assert scores["sft"]["exact_match"] >= 0.7
    assert 0.3 <= scores["sft"]["preference_accuracy"] <= 0.7, "before DPO the preference is about chance"
    assert scores["dpo"]["preference_accuracy"] >= 0.8
    assert scores["dpo"]["preference_accuracy"] >= scores["base"]["preference_accuracy"] + 0.2
    assert scores["dpo"]["yes_no_accuracy"] > scores["sft"]["yes_no_accuracy"], "DPO lifts the yes/no answers too"

    table = done.stdout[done.stdout.rindex("variant"):]
    assert all(variant in table for variant in ("base", "prompted", "sft", "dpo")), "the run ends with the table"
    assert (tmp_path / "tiny-demo" / "merge_push" / "model" / "README.md").is_file()
