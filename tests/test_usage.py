"""``--help`` on every vlmjobs command and stage script (issue 13, item 1): usage with the override syntax, the
stages and an example; exit 0; no file written, no cluster or hub call, no pager."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jobs.recipe import STAGES
from launcher.cli import COMMANDS
from tests.conftest import ROOT, subprocess_env, with_sitecustomize

# Any socket connection in the command's process fails it: help must not reach a cluster or the hub.
NO_NETWORK = """
import socket
def _refuse(*args, **kwargs):
    raise SystemExit("network call during --help")
socket.socket.connect = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
"""


def help_of(argv: list[str], cwd):
    env = with_sitecustomize(
        subprocess_env(PAGER="false", KUBECONFIG=str(cwd / "no-kubeconfig"), HF_ENDPOINT="http://127.0.0.1:9"),
        cwd / "_site", NO_NETWORK)
    before = sorted(p.name for p in cwd.iterdir())
    done = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert sorted(p.name for p in cwd.iterdir()) == before, f"{argv} wrote files"
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == "", done.stderr
    return done.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_help_without_acting(command, tmp_path):
    out = help_of(["-m", "launcher.cli", command, "--help"], tmp_path)
    assert out.startswith("Usage:\n    vlmjobs " + command), out
    assert f"\nExample:\n    vlmjobs {command}" in out
    if command not in ("tiny-model", "synth-data"):
        assert "--SECTION.KEY=VALUE" in out and ", ".join(STAGES) in out


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_script_answers_help(stage, tmp_path):
    out = help_of(["-m", f"jobs.{stage}", "--help"], tmp_path)
    assert f"python -m jobs.{stage}" in out and "--SECTION.KEY=VALUE" in out and ", ".join(STAGES) in out
    assert f"Example:\n    python -m jobs.{stage} --recipe=recipes/tiny-demo.yaml" in out


def test_help_after_a_recipe_and_overrides_is_the_commands_help(tmp_path):
    recipe = str(ROOT / "recipes" / "tiny-demo.yaml")
    out = help_of(["-m", "launcher.cli", "run", recipe, "--sft.args.max_steps=3", "--help"], tmp_path)
    assert out.startswith("Usage:\n    vlmjobs run RECIPE")
    assert help_of(["-m", "launcher.cli", "-h"], tmp_path) == help_of(["-m", "launcher.cli"], tmp_path)
    assert "vlmjobs COMMAND --help" in help_of(["-m", "launcher.cli", "--help"], tmp_path)
