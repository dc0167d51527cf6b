"""Cached reference log-probs of DPO (issue 12, dpo.reference_logprobs: cache): they equal what TRL computes in-step,
for LoRA, continued SFT adapter and full fine-tuning, on every family; they are reused across a beta sweep and on
resume, and recomputed for other data or another SFT model; full fine-tuning on them holds no reference copy.

Tolerance: float32 on CPU, the cache scored in batches of 8 and the step in batches of 1, so padding differs: the
mean log-probs a step logs agree within 1e-4 (relative, or absolute near zero), where a wrong row or model is off by
whole nats."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from collections import Counter
from pathlib import Path

import pytest
import yaml

from jobs import contract, reference_logprobs, training
from jobs import recipe as recipes
from jobs.families import FAMILIES
from tests.conftest import recipe_file, run_stages

TOLERANCE = dict(rel=1e-4, abs=1e-4)
# One row per step, so that a step's logged means are one row's log-probs: a permutation within a batch cannot cancel.
DPO = {"method": "lora", "lora": {"r": 4, "lora_alpha": 8},
       "args": {"max_steps": 3, "per_device_train_batch_size": 1, "logging_steps": 1, "learning_rate": 1e-3,
                "save_steps": 1}}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model, synthetic_data):
    """prepare and a LoRA SFT of the tiny LLaVA, once; tests run DPO on copies of its run folder."""
    folder = tmp_path_factory.mktemp("reference")
    sources = {kind: synthetic_data(kind) for kind in ("chartqa", "rlaif-v")}
    sft = {"method": "lora", "lora": {"r": 4, "lora_alpha": 8},
           "args": {"max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-2}}
    path = recipe_file(folder, tiny_model("llava"), sources, name="ref", stages=["prepare", "sft", "dpo"],
                       prepare={"max_rows": 12}, sft=sft, dpo=DPO)
    run_stages(path, "prepare", "sft")
    return path


def copy_run(source: Path, root: Path, run_id: str, **dpo) -> Path:
    """The recipe with its run folder copied to ``root/run_id`` and ``dpo`` merged into its dpo section."""
    data = yaml.safe_load(source.read_text())
    shutil.copytree(Path(data["run"]["root"]) / data["name"], root / run_id)
    data["run"] = {"root": str(root), "id": run_id}
    data["dpo"] = {**data["dpo"], **dpo, "args": {**data["dpo"]["args"], **dpo.get("args", {})}}
    path = root / f"{run_id}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_dpo(path: Path) -> tuple[dict, list[dict]]:
    """The dpo stage's record and its logged training steps."""
    recipe = run_stages(path, "dpo", force=True)
    out = recipe.run_dir / "dpo"
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return contract.read_json(out / contract.SUCCESS_FILE), [s for s in steps if "loss" in s]


def reference_means(step: dict, beta: float = 0.1) -> tuple[float, float]:
    """The reference log-probs a step used, from what TRL logs: rewards = beta * (policy - reference)."""
    return (step["logps/chosen"] - step["rewards/chosen"] / beta, step["logps/rejected"] - step["rewards/rejected"] / beta)


def no_recomputation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("reference log-probs recomputed although the store holds them")

    monkeypatch.setattr(reference_logprobs, "compute", refuse)


@pytest.mark.slow
@pytest.mark.parametrize("name, dpo, reference", [
    ("lora on SFT merged", {}, "the model with its adapter switched off"),
    ("SFT's adapter continued", {"sft_adapter": "continue"}, "frozen copy of the adapter"),
    # from the base: full DPO on SFT's merged LoRA trains no parameter (its weights come back with requires_grad off)
    ("full fine-tuning", {"method": "full", "init": "base"}, "the model before its first step"),
])
def test_cached_reference_logprobs_equal_those_trl_computes_in_step(sft_run, tmp_path, name, dpo, reference):
    cached, cached_steps = run_dpo(copy_run(sft_run, tmp_path / "a", "cached", **dpo))
    recomputed, recomputed_steps = run_dpo(copy_run(sft_run, tmp_path / "b", "recomputed", reference_logprobs="recompute", **dpo))

    assert cached["reference"] == reference
    assert cached["reference_logprobs"]["splits"]["train"]["computed"] == 3, "the rows of 3 steps of 1"
    assert recomputed["reference_logprobs"] == "recomputed at every step"
    assert len(cached_steps) == len(recomputed_steps) == 3
    for ours, trls in zip(cached_steps, recomputed_steps):
        assert reference_means(ours) == pytest.approx(reference_means(trls), **TOLERANCE), name
        assert ours["loss"] == pytest.approx(trls["loss"], **TOLERANCE), "the same training, step by step"
    assert any(abs(s["rewards/margins"]) > 1e-3 for s in cached_steps[1:]), "the policy moved away from the reference"


def watch_rows(monkeypatch) -> tuple[list, list]:
    """(the train rows the reference pass scored, the rows the training steps trained on), each row as its content: the
    first seen where the pass is called, the second in transformers' training_step, carried there in the batches of
    the trainer's own train dataloader, whatever decided which rows those are (a batch collated but not trained on,
    as the dataloader collates one ahead, is not counted)."""
    from transformers import Trainer

    def text(row: dict) -> str:  # and the images' pixels: the synthetic rows repeat their texts
        pixels = hashlib.sha256(b"".join(image.tobytes() for image in row.get("images") or [])).hexdigest()
        return json.dumps([row["prompt"], row["chosen"], row["rejected"], pixels], sort_keys=True)

    scored, carried = [], []
    compute = reference_logprobs.compute
    get_train_dataloader, training_step = Trainer.get_train_dataloader, Trainer.training_step

    def scoring(trainer, rows, name, **kwargs):
        if name == "train":
            scored.extend(map(text, rows))
        return compute(trainer, rows, name, **kwargs)

    def carrying(self):
        collate = self.data_collator
        self.data_collator = lambda examples: {**collate(examples), "watched rows": [text(e) for e in examples]}
        try:
            return get_train_dataloader(self)
        finally:
            self.data_collator = collate

    def training(self, model, inputs, *args, **kwargs):
        carried.extend(inputs.pop("watched rows"))
        return training_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(reference_logprobs, "compute", scoring)
    monkeypatch.setattr(Trainer, "get_train_dataloader", carrying)
    monkeypatch.setattr(Trainer, "training_step", training)
    return scored, carried


@pytest.mark.slow
def test_a_run_shorter_than_an_epoch_scores_only_the_rows_its_batches_carry(sft_run, tmp_path, monkeypatch):
    """Issue 24: with max_steps short of an epoch, the reference pass before training scored every train row (a bench
    run of 12 steps drawing 96 rows scored all 246). It scores the rows the run's batches carry, trains as TRL's
    in-step reference does, and a later, longer run scores only the rows the store lacks. A constant learning rate, so
    that the longer run's first steps are the short run's."""
    short = {"max_steps": 2, "per_device_train_batch_size": 2, "lr_scheduler_type": "constant"}
    with monkeypatch.context() as patched:
        scored, carried = watch_rows(patched)
        first, first_steps = run_dpo(copy_run(sft_run, tmp_path, "short", args=short))
    assert len(carried) == 4 and len(set(carried)) > 1, "2 steps of 2 rows, told apart"
    assert Counter(scored) == Counter(carried), f"scored {len(scored)} rows for the {len(carried)} the batches carried"
    assert first["reference_logprobs"]["splits"]["train"]["computed"] == 4
    assert "eval" not in first["reference_logprobs"]["splits"], "no evaluation (TRL's eval_strategy no), no eval rows"

    recomputed = copy_run(sft_run, tmp_path / "trl", "recomputed", reference_logprobs="recompute", args=short)
    _, trl_steps = run_dpo(recomputed)
    assert len(first_steps) == len(trl_steps) == 2
    for ours, theirs in zip(first_steps, trl_steps):
        assert reference_means(ours) == pytest.approx(reference_means(theirs), **TOLERANCE)
        assert ours["loss"] == pytest.approx(theirs["loss"], **TOLERANCE)

    with monkeypatch.context() as patched:
        scored, carried = watch_rows(patched)
        evaluated = {"eval_strategy": "steps", "eval_steps": 5}
        longer = {**short, "max_steps": 5, **evaluated}
        whole, whole_steps = run_dpo(copy_run(sft_run, tmp_path, "whole-epoch", args=longer))
    assert len(carried) == 10, "5 steps of 2: every train row"
    assert Counter(scored) == Counter(carried[4:]), "only the rows the short run left, the same 4 first"
    assert whole["reference_logprobs"]["splits"]["train"] | {"file": None} == {"file": None, "computed": 6, "read": 4}
    assert whole["reference_logprobs"]["splits"]["eval"]["computed"] == 1, "evaluating: every eval row"
    for ours, shorter in zip(whole_steps, first_steps):
        assert reference_means(ours) == pytest.approx(reference_means(shorter), **TOLERANCE)
        assert ours["loss"] == pytest.approx(shorter["loss"], **TOLERANCE)


@pytest.mark.slow
def test_full_fine_tuning_on_cached_logprobs_makes_no_copy_of_the_model(sft_run, tmp_path, monkeypatch, capsys):
    import copy

    copies = []
    deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda obj, *a: copies.append(type(obj).__name__) or deepcopy(obj, *a))
    record, _ = run_dpo(copy_run(sft_run, tmp_path, "full", method="full", init="base", args={"max_steps": 1}))
    assert record["reference"] == "the model before its first step"
    assert not [c for c in copies if c.endswith("ForConditionalGeneration")], copies
    assert "+ reference 0 GB +" in capsys.readouterr().out, "the memory arithmetic counts no reference copy"


def test_the_memory_arithmetic_counts_a_reference_copy_only_when_full_dpo_recomputes(write_recipe):
    from jobs import memory

    def full_dpo(**dpo):
        recipe = recipes.load(write_recipe(stages=["prepare", "dpo"], dpo={"method": "full", **dpo}))
        return memory.for_stage(recipe, "dpo")[0]

    cached, recomputed = full_dpo(), full_dpo(reference_logprobs="recompute")
    assert cached.reference == 0 and recomputed.reference == recomputed.model
    assert recomputed.total - cached.total == pytest.approx(cached.model)


def test_vlmjobs_memory_shows_the_saving_and_suggests_the_cache_where_it_makes_full_dpo_fit(write_recipe, capsys):
    from jobs import memory
    from launcher import cli

    path = write_recipe(stages=["prepare", "dpo"], dpo={"method": "full", "reference_logprobs": "recompute"})
    recomputed = memory.for_stage(recipes.load(path), "dpo")[0]
    cached = memory.for_stage(recipes.load(path, {"dpo.reference_logprobs": "cache"}), "dpo")[0]
    between = (cached.total + recomputed.total) / 2 * memory.GB / 2**30  # GiB where only the cached run fits
    with pytest.raises(contract.UserError, match=r"^memory: dpo needs"):
        cli.memory(str(path), **{"resources.gpu_memory_gib": between})
    assert f"--dpo.reference_logprobs=cache: {cached.total:.3g} GB, fits" in capsys.readouterr().out
    cli.memory(str(path), **{"resources.gpu_memory_gib": between, "dpo.reference_logprobs": "cache"})
    assert "+ reference 0 GB +" in capsys.readouterr().out


@pytest.mark.slow
def test_a_beta_sweep_in_another_run_reuses_them_and_another_sft_model_or_data_does_not(sft_run, tmp_path, monkeypatch):
    one_step = {"max_steps": 1, "eval_strategy": "steps", "eval_steps": 1}  # evaluating: the eval rows are scored too
    first, _ = run_dpo(copy_run(sft_run, tmp_path, "first", args=one_step))
    assert first["reference_logprobs"]["splits"]["train"]["computed"] == 1
    store = Path(first["reference_logprobs"]["store"])
    assert store == tmp_path / ".cache" / "reference_logprobs", "beside the run folders, shared by the runs of a root"

    with monkeypatch.context() as patched:
        no_recomputation(patched)
        swept, _ = run_dpo(copy_run(sft_run, tmp_path, "sweep", args={**one_step, "beta": 0.5}))
    assert swept["reference_logprobs"]["splits"] == {split: {**entry, "computed": 0, "read": entry["computed"]}
                                                     for split, entry in first["reference_logprobs"]["splits"].items()}

    other_sft = copy_run(sft_run, tmp_path, "other-sft", args=one_step)
    adapter = tmp_path / "other-sft" / "sft" / "model" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter)
    save_file({name: w + 0.01 for name, w in weights.items()}, adapter)  # another SFT model
    retrained, _ = run_dpo(other_sft)
    assert retrained["reference_logprobs"]["splits"]["train"]["computed"] == 1
    assert retrained["reference_logprobs"]["fingerprint"] != first["reference_logprobs"]["fingerprint"]

    other_data = copy_run(sft_run, tmp_path, "other-data", args=one_step)
    recipe = recipes.load(other_data)
    from datasets import load_from_disk

    prepared = recipe.run_dir / "prepare" / "dpo" / "train"
    rows = load_from_disk(prepared)
    rows.select(range(len(rows) - 1)).save_to_disk(tmp_path / "train-rows")  # one row fewer
    shutil.rmtree(prepared)
    shutil.copytree(tmp_path / "train-rows", prepared)
    changed, _ = run_dpo(other_data)
    assert changed["reference_logprobs"]["splits"]["train"]["computed"] == 1
    assert changed["reference_logprobs"]["splits"]["eval"]["computed"] == 0, "the eval rows are the same"
    assert changed["reference_logprobs"]["fingerprint"] == first["reference_logprobs"]["fingerprint"]


def stopped_after_step_1(path: Path, monkeypatch) -> None:
    """The dpo stage of ``path`` stopped after its first step and checkpoint, as a preemption would stop it."""
    def stop_after_first_step(self, args, state, control, **kwargs):
        self.requested = signal.SIGTERM  # as a preemption would, after step 1
        control.should_save = control.should_training_stop = True

    with monkeypatch.context() as patched:
        patched.setattr(training.SaveOnSigterm, "on_step_end", stop_after_first_step)
        with pytest.raises(SystemExit) as stopped:
            run_stages(path, "dpo")
    assert stopped.value.code == 128 + signal.SIGTERM


@pytest.mark.slow
def test_a_resumed_attempt_reads_them_from_the_store(sft_run, tmp_path, monkeypatch, capsys):
    path = copy_run(sft_run, tmp_path, "resumed", args={"max_steps": 2})
    stopped_after_step_1(path, monkeypatch)

    no_recomputation(monkeypatch)
    recipe = run_stages(path, "dpo")
    out = capsys.readouterr().out
    assert "dpo: resuming from " in out and "checkpoint-1" in out
    assert "dpo: reference log-probs of 1 of 10 train rows read from " in out, "step 2's row"
    record = contract.read_json(recipe.run_dir / "dpo" / contract.SUCCESS_FILE)
    assert record["reference_logprobs"]["splits"]["train"]["computed"] == 0


@pytest.mark.slow
def test_a_resumed_attempt_without_the_store_scores_only_the_rows_of_the_steps_left(sft_run, tmp_path, monkeypatch):
    """Issue 24: the store gone (deleted, another volume), a resumed attempt scores the rows of the steps it has left,
    which transformers draws by skipping the batches of the steps done."""
    path = copy_run(sft_run, tmp_path, "resumed", args={"max_steps": 3})
    stopped_after_step_1(path, monkeypatch)
    shutil.rmtree(reference_logprobs.store_for(recipes.load(path).run_dir))

    scored, carried = watch_rows(monkeypatch)
    recipe = run_stages(path, "dpo")
    assert len(carried) == 2, "steps 2 and 3, of 1 row each"
    assert Counter(scored) == Counter(carried)
    record = contract.read_json(recipe.run_dir / "dpo" / contract.SUCCESS_FILE)
    assert record["reference_logprobs"]["splits"]["train"] | {"file": None} == {"file": None, "computed": 2, "read": 0}


@pytest.mark.parametrize("name, args, seeded, predicted", [
    ("the default: shuffled by accelerate's seedable sampler", {}, False, True),
    ("in order", {"train_sampling_strategy": "sequential"}, False, True),
    ("shuffled from the RNG's state", {"accelerator_config": {"use_seedable_sampler": False}}, False, False),
    ("grouped by length, shuffled from the RNG's state", {"train_sampling_strategy": "group_by_length"}, False, False),
    ("grouped by length, as the stages seed it", {"train_sampling_strategy": "group_by_length"}, True, True),
])
def test_a_run_whose_order_a_second_dataloader_cannot_foresee_scores_every_row(tmp_path, name, args, seeded, predicted):
    from types import SimpleNamespace

    from trl import DPOConfig

    from jobs import upstream

    trainer = SimpleNamespace(args=DPOConfig(output_dir=str(tmp_path), use_cpu=True, **args),
                              _get_train_sampler=lambda train_dataset=None: None)
    if seeded:
        upstream.seeded_length_grouping(trainer)
    assert reference_logprobs.drawn_alike(trainer) is predicted, name


def test_a_half_written_file_is_never_read_and_the_writer_renames_it_into_place(tmp_path):
    import torch

    path = tmp_path / "store" / "key.safetensors"
    held = torch.tensor([1, 1], dtype=torch.uint8)
    reference_logprobs._write(path, torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0]), held, parts={"split": "x"})
    assert [p.name for p in path.parent.iterdir()] == ["key.safetensors"]
    chosen, rejected, held = reference_logprobs._read(path, 2)
    assert chosen.tolist() == [-1.0, -2.0] and rejected.tolist() == [-3.0, -4.0] and held.tolist() == [1, 1]
    assert reference_logprobs._read(path, 3) is None, "another number of rows is another data set"
    path.write_bytes(path.read_bytes()[:-5])
    assert reference_logprobs._read(path, 2) is None, "a truncated file is recomputed, not read"


def test_a_file_says_which_rows_it_holds_and_a_writer_keeps_the_rows_another_stored_meanwhile(tmp_path):
    """Issue 24: a run shorter than an epoch stores some rows; the mask, not the file's presence, says which. Two runs
    of a sweep that add rows to one file at once both keep theirs (the second reads the file again as it writes)."""
    import math

    import torch

    path = tmp_path / "key.safetensors"
    nan = float("nan")
    reference_logprobs._write(path, torch.tensor([-1.0, nan, nan]), torch.tensor([-3.0, nan, nan]),
                              torch.tensor([1, 0, 0], dtype=torch.uint8), parts={"split": "train"})
    chosen, _, held = reference_logprobs._read(path, 3)
    assert held.tolist() == [1, 0, 0] and chosen[0] == -1.0 and math.isnan(chosen[1])
    # the second run read the file before the first wrote it: it holds only its own row
    reference_logprobs._write(path, torch.tensor([nan, nan, -5.0]), torch.tensor([nan, nan, -6.0]),
                              torch.tensor([0, 0, 1], dtype=torch.uint8), parts={"split": "train"})
    chosen, rejected, held = reference_logprobs._read(path, 3)
    assert held.tolist() == [1, 0, 1]
    assert (chosen[0], chosen[2], rejected[0], rejected[2]) == (-1.0, -5.0, -3.0, -6.0)


def test_the_rows_fingerprint_is_the_rows_own(tmp_path):
    from datasets import Dataset, load_from_disk

    rows = Dataset.from_dict({"prompt": ["a", "b", "c", "d"], "chosen": ["x"] * 4})
    digest = reference_logprobs.rows_digest
    assert digest(rows.select(range(2))) != digest(rows.select(range(2, 4))), "two slices of one table"
    assert digest(rows.select([1, 0])) != digest(rows.select([0, 1])), "the order is the rows' too"
    rows.save_to_disk(tmp_path / "a")
    rows.save_to_disk(tmp_path / "b")
    assert digest(load_from_disk(tmp_path / "a")) == digest(load_from_disk(tmp_path / "b")), "the same rows, saved twice"


@pytest.mark.parametrize("dpo, error", [
    ({"reference_logprobs": "sometimes"}, "dpo.reference_logprobs: 'sometimes' is not one of cache, recompute"),
    ({"args": {"precompute_ref_log_probs": True}}, "dpo.args.precompute_ref_log_probs: TRL refuses it for image data"),
    ({"args": {"sync_ref_model": True}}, "dpo.args.sync_ref_model: updates the reference during training"),
])
def test_recipe_errors_name_the_key(write_recipe, dpo, error):
    with pytest.raises(contract.UserError, match=error.replace("(", r"\(")):
        recipes.load(write_recipe(stages=["prepare", "dpo"], dpo=dpo))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_trains_on_cached_logprobs_equal_to_its_own_first_steps(family, tmp_path, tiny_model, synthetic_data):
    """A new adapter starts at zero, so at each step before it moves the policy TRL scores in-step is the reference:
    with one row per step and the learning rate 0, every step's rewards are 0 only if the cached row is that row."""
    sources = {kind: synthetic_data(kind) for kind in ("chartqa", "rlaif-v")}
    args = {"max_steps": 2, "per_device_train_batch_size": 1, "logging_steps": 1, "learning_rate": 0.0}
    path = recipe_file(tmp_path, tiny_model(family), sources, family=family, name=f"ref-{family.replace('_', '-')}",
                       stages=["prepare", "dpo"], prepare={"max_rows": 6}, dpo={**DPO, "args": args})
    recipe = run_stages(path)
    record = contract.read_json(recipe.run_dir / "dpo" / contract.SUCCESS_FILE)
    assert record["reference_logprobs"]["splits"]["train"]["computed"] == 2, "2 steps of 1"
    steps = [json.loads(line) for line in (recipe.run_dir / "dpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    assert len(steps) == 2
    for step in steps:
        assert abs(step["logps/chosen"]) > 1, "a real log-prob, not an empty answer"
        assert step["rewards/chosen"] == pytest.approx(0, abs=1e-5) and step["rewards/rejected"] == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize("args, env, why", [
    ({"fsdp_plugin_args": {"fsdp_sharding_strategy": "FULL_SHARD"}}, {}, None),  # computed when training starts
    ({}, {"ACCELERATE_USE_FSDP": "true"}, None),
    ({"deepspeed_plugin": object()}, {}, "DeepSpeed places the model only when training starts"),
    ({"fsdp_plugin_args": None, "deepspeed_plugin": None}, {}, None),
])
def test_deepspeed_recomputes_the_reference_and_says_why(args, env, why, monkeypatch):
    from types import SimpleNamespace

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert reference_logprobs.why_not_cached(SimpleNamespace(**args)) == why
