"""sft: LoRA/QLoRA paths and resuming after an interruption (the learning check is in test_demo.py)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peft import PeftModel

from jobs import contract, modeling, prepare, sft
from jobs import recipe as recipes
from tests.conftest import subprocess_env


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_methods_save_an_adapter_that_rebuilds_on_the_base(write_recipe, family, method, capsys):
    path = write_recipe(family=family, sft={"method": method, "lora": {"r": 4, "lora_alpha": 8}, "args": {"max_steps": 2, "per_device_train_batch_size": 2}})
    prepare.main(recipe=str(path))
    sft.main(recipe=str(path))
    captured = capsys.readouterr()
    warned = "in 4 bits without CUDA: bitsandbytes' CPU fallback runs it" in captured.err
    assert warned is (method == "qlora" and not __import__("torch").cuda.is_available()), "issue 13 (8): say when 4-bit runs on CPU"
    recipe = recipes.load(path)
    out = recipe.run_dir / "sft"
    record = contract.read_json(out / contract.SUCCESS_FILE)
    assert modeling.is_adapter(out / "model")
    assert record["quantized"] is (method == "qlora")
    assert record["padding_free"] is True, "issue 24: padding-free by default with sdpa, each row attended alone"
    assert record["metrics"]["train_loss"] > 0
    assert modeling.read_lineage(recipe.run_dir, "sft") == {"base": "base", "merged": [], "adapter": "sft/model"}
    tensorboard = recipe.run_dir / ".sft.partial" / "tensorboard"
    assert f"sft: curves in {tensorboard} (watch them: tensorboard --logdir {recipe.run_dir})" in captured.out
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "issue 13 (9): the stage's curves moved with it"
    model = modeling.load_trained(recipe, recipe.run_dir, "sft", quantize=modeling.quantization(recipe.sft))
    assert isinstance(model, PeftModel)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_sigterm_writes_a_checkpoint_and_a_restart_resumes_from_it(write_recipe):
    """Preemption sends SIGTERM: the stage checkpoints, exits 143 (worth a retry), and the retry resumes."""
    # The signal comes after step 3; the tiny model trains ~35 steps a second, so 10 steps left it no time to arrive in
    # (the run had finished: "assert 10 < 10"): 100 leave it about 3 s, and the retry trains the rest
    steps = 100
    path = write_recipe(sft={"method": "full", "args": {"max_steps": steps, "save_steps": 1000, "per_device_train_batch_size": 2, "logging_steps": 1}})
    prepare.main(recipe=str(path))
    run = path.parent / "runs" / "t"
    argv = [sys.executable, "-m", "jobs.sft", f"--recipe={path}"]
    process = subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / ".sft.partial" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output
    checkpoint = contract.newest_complete_checkpoint(run / ".sft.partial" / "checkpoints")
    stopped_at = int(checkpoint.rsplit("-", 1)[1])
    assert 3 <= stopped_at < steps, output
    assert not (run / "sft").exists(), "an interrupted stage must not look finished"

    resumed = subprocess.run(argv, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"sft: resuming from {checkpoint}" in resumed.stdout
    record = contract.read_json(run / "sft" / contract.SUCCESS_FILE)
    assert record["resumed_from"] == checkpoint
    logged = [line for line in (run / "sft" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(logged) == steps, "each step logged once: the resumed run starts after the checkpoint"


def test_report_to_from_the_recipe_replaces_tensorboard_and_none_writes_no_events(write_recipe, capsys):
    """Issue 13 (9): the recipe's args.report_to passes through to TRL; "none" turns tracking off."""
    path = write_recipe(sft={"method": "full", "args": {"max_steps": 1, "per_device_train_batch_size": 2, "report_to": "none"}})
    prepare.main(recipe=str(path))
    sft.main(recipe=str(path))
    assert "curves in" not in capsys.readouterr().out
    out = recipes.load(path).run_dir / "sft"
    assert (out / contract.SUCCESS_FILE).is_file()
    assert not (out / "tensorboard").exists()
    assert not list(out.rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("asked", [{}, {"eval_strategy": "steps", "eval_steps": 1}], ids=["default", "asked"])
def test_the_default_eval_loss_runs_on_the_eval_splits_first_rows_and_an_asked_evaluation_on_all(
        write_recipe, monkeypatch, asked):
    """Issue 24: SFT's default eval loss (a curve to watch) on the eval split's first 64 rows, however large the split;
    a recipe that asks for evaluation evaluates all of it. Seen where the trainer evaluates."""
    from datasets import load_from_disk
    from transformers import Trainer

    evaluated = []
    evaluate = Trainer.evaluate

    def counting(self, *args, **kwargs):
        evaluated.append([row["prompt"] for row in self.eval_dataset])
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", counting)
    path = write_recipe(sft={"method": "full", "args": {"max_steps": 1, "per_device_train_batch_size": 2, **asked}})
    prepare.main(recipe=str(path))
    sft.main(recipe=str(path))
    recipe = recipes.load(path)
    split = load_from_disk(recipe.run_dir / "prepare" / "sft")["eval"]
    assert len(split) == 80, "the synthetic eval split is larger than the default's rows"
    expected = split["prompt"] if asked else split["prompt"][:64]
    assert evaluated == [expected], "one evaluation (the last step), on these rows in this order"
    record = contract.read_json(recipe.run_dir / "sft" / contract.SUCCESS_FILE)
    assert record["rows"]["eval"] == 80 and record["rows"]["eval loss"] == len(expected)


def sft_config(**args):
    from trl import SFTConfig

    from jobs import training

    return training.trl_config(SFTConfig, recipes.SFT(args=args), output_dir=Path("unused"), seed=0, dtype=None,
                               defaults=training.SFT_DEFAULTS)


def test_sft_evaluates_as_often_as_it_checkpoints_unless_the_recipe_says_otherwise():
    """Issue 13 (9): SFT's eval loss by default, beside every checkpoint; DPO's only when asked."""
    from trl import DPOConfig

    from jobs import training

    assert (sft_config().eval_strategy, sft_config().eval_steps) == ("steps", 100)
    assert sft_config(save_steps=50).eval_steps == 50
    assert sft_config(save_steps=50, eval_steps=10).eval_steps == 10
    assert sft_config(eval_strategy="no").eval_strategy == "no"
    assert sft_config().report_to == ["tensorboard"] and sft_config(report_to=["none"]).report_to == []
    dpo = training.trl_config(DPOConfig, recipes.DPO(), output_dir=Path("unused"), seed=0, dtype=None)
    assert dpo.eval_strategy == "no" and dpo.report_to == ["tensorboard"]


def test_recomputation_is_configured_by_transformers_5s_names_whichever_the_recipe_uses():
    """TRL's configs default gradient_checkpointing (True), transformers 5's old name, which it warns about in every
    stage's log; and a recipe's gradient_checkpointing_kwargs was dropped for the stage's own default kwargs, since
    transformers reads the new name first."""
    import warnings

    from trl import DPOConfig

    from jobs import training

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        default = sft_config()
        old_names = sft_config(gradient_checkpointing=False, gradient_checkpointing_kwargs={"use_reentrant": True})
        dpo = training.trl_config(DPOConfig, recipes.DPO(), output_dir=Path("unused"), seed=0, dtype=None)
    assert default.activation_checkpointing is True and dpo.activation_checkpointing is True, "TRL's default"
    assert default.activation_checkpointing_kwargs == {"use_reentrant": False}, "the stage's default"
    assert old_names.activation_checkpointing is False
    assert old_names.activation_checkpointing_kwargs == {"use_reentrant": True}, "the recipe's, under its old name"
    assert sft_config(activation_checkpointing=False).activation_checkpointing is False


@pytest.mark.parametrize("report_to, message", [
    ("wandb", "sft.args.report_to: wandb is not installed in this environment (pip install wandb, or remove report_to"),
    (["tensorboard", "tensorbord"], "sft.args.report_to: 'tensorbord' is not a tracker transformers knows"),
])
def test_a_tracker_the_environment_lacks_is_a_one_line_user_error(report_to, message):
    with pytest.raises(contract.UserError, match=re.escape(message)):
        sft_config(report_to=report_to)
