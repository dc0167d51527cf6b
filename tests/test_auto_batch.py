"""per_device_train_batch_size: auto (issue 14, the batch-halving loop): out of memory above a chosen micro-batch.

No CPU runs out of memory on a tiny model, so the tests make the forward pass do it: a global forward pre-hook
(torch's ``register_module_forward_pre_hook``) on every ``nn.Embedding`` raises a real ``torch.OutOfMemoryError``
when the token ids it embeds hold more rows than the limit, inside the model's forward, where CUDA would raise
it. The hook is installed around the stage's own ``main`` (in-process), or by a two-line wrapper module before
``runpy`` runs ``jobs.sft`` as ``__main__`` under ``accelerate launch`` (two processes, gloo); the stages' code
is the code that runs on a GPU, nothing in it knows of the test. A CPU's allocator raises no out-of-memory error,
so the stage probes only where one can be raised (``auto_batch.can_run_out_of_memory``): these tests say the CPU
can, as a GPU would, except the one that shows a CPU run settling without a probe.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from jobs import auto_batch, contract, dpo, modeling, packing, prepare, sft
from jobs import recipe as recipes
from tests.conftest import ROOT

CAN_RUN_OUT_OF_MEMORY = auto_batch.can_run_out_of_memory  # before the fixture below says yes for the GPU's tests


@contextmanager
def out_of_memory_above(rows: int, *, sigint_at_forward: int | None = None, out_of_memory_at_batch: int | None = None):
    """Every forward that embeds more than ``rows`` sequences at once runs out of memory; the forward numbered
    ``sigint_at_forward`` (of those that fit) sends this process SIGINT, as Ctrl-C would; the embedding of several
    sequences numbered ``out_of_memory_at_batch`` runs out of memory, as a batch the probe did not foresee would (a
    vision tower's position embedding embeds one row)."""
    forwards, batches = [], []

    def hook(module, args):
        if isinstance(module, torch.nn.Embedding) and args and args[0].dim() == 2:
            batches.extend([args[0].shape[0]] if args[0].shape[0] > 1 else [])
            if args[0].shape[0] > rows or (args[0].shape[0] > 1 and len(batches) == out_of_memory_at_batch):
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (simulated: {args[0].shape[0]} rows)")
            forwards.append(args[0].shape[0])
            if len(forwards) == sigint_at_forward:
                os.kill(os.getpid(), signal.SIGINT)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture(autouse=True)
def runs_out_of_memory_as_a_gpu_does(monkeypatch):
    monkeypatch.setattr(auto_batch, "can_run_out_of_memory", lambda device: True)


@pytest.fixture
def write_recipe(write_recipe):
    """The shared fixture, SFT padded: the hook above counts a batch's rows, and padding-free SFT joins them into one
    (the probe and the halving are the same either way)."""

    def write(**sections):
        sections["sft"] = {**sections.get("sft", TRAIN), "padding_free": False}
        return write_recipe(**sections)

    return write


def logged_steps(folder) -> list[dict]:
    """What the stage logged at each step (loss, grad norm, TRL's metrics, token count), without the clock."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"loss"' in line]


TRAIN = {"method": "full", "args": {"max_steps": 2, "logging_steps": 1, "save_steps": 2}}


@pytest.mark.parametrize(
    "stage, main, rows_per_sample",
    [("sft", sft.main, 1), ("dpo", dpo.main, 1)],  # DPO's shared prefix packs a pair's chosen and rejected in one row
)
def test_auto_batch_halves_until_it_fits_keeps_the_effective_batch_and_trains_as_the_size_found(
    write_recipe, tiny_model, capsys, stage, main, rows_per_sample
):
    auto = {**TRAIN, "effective_batch_size": 8, "args": {**TRAIN["args"], "per_device_train_batch_size": "auto"}}
    path = write_recipe(stages=["prepare", stage], prepare={"max_rows": 40}, **{"sft": TRAIN, stage: auto})
    prepare.main(recipe=str(path))
    capsys.readouterr()
    with out_of_memory_above(2 * rows_per_sample):
        main(recipe=str(path))
    out = capsys.readouterr().out
    assert f"{stage}: micro-batch 8 ran out of memory; trying 4 x accumulation 2" in out
    assert f"{stage}: micro-batch 4 ran out of memory; trying 2 x accumulation 4" in out
    assert f"{stage}: micro-batch 2 x accumulation 4 fits (effective batch 8)" in out
    assert f"{stage}: parameters" in out and "effective batch 8," in out, "the effective batch never changes"

    run = recipes.load(path).run_dir
    record = contract.read_json(run / stage / auto_batch.RECORD_FILE)
    assert record == {"effective_batch_size": 8, "processes": 1, "device": "cpu", "model": str(tiny_model("llava")),
                      "method": f"{stage} full", "max_length": None, "precision": "weights float32, trainable float32, compute float32",
                      "per_device_train_batch_size": "auto", "activation_checkpointing": True, "padding_free": False,
                      "trainer": {"sft": "SFTTrainer", "dpo": "SharedPrefixDPOTrainer"}[stage],  # sdpa: prompts shared
                      "micro_batch": 2, "gradient_accumulation_steps": 4, "recomputes_activations": True,
                      "recompute_every_n_layers": 1, "ran_out_of_memory_at": [8, 4]}
    state = json.loads((run / stage / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["train_batch_size"] == 2, "optimizer steps as asked, micro-batches of 2"
    args = torch.load(run / stage / "checkpoints" / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 4)

    # The same recipe with the size found written out: the probe changed nothing (weights, random state, metrics)
    direct = {**TRAIN, "args": {**TRAIN["args"], "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}}
    twin = write_recipe(name="direct", stages=["prepare", stage], prepare={"max_rows": 40}, **{"sft": TRAIN, stage: direct})
    prepare.main(recipe=str(twin))
    main(recipe=str(twin))
    direct_run = recipes.load(twin).run_dir / stage
    logged, expected = logged_steps(run / stage), logged_steps(direct_run)
    assert len(logged) == 2 and logged[0].keys() == expected[0].keys()
    for step, want in zip(logged, expected):
        assert step == pytest.approx(want, rel=1e-5), "the same losses, metrics and token counts as the size found set directly"


def test_auto_batch_a_resumed_or_redone_stage_starts_from_the_recorded_size(write_recipe, capsys):
    auto = {"method": "full", "effective_batch_size": 4,
            "args": {"max_steps": 3, "logging_steps": 1, "save_steps": 1, "per_device_train_batch_size": "auto"}}
    path = write_recipe(prepare={"max_rows": 24}, sft=auto)
    prepare.main(recipe=str(path))
    run = recipes.load(path).run_dir
    # Ctrl-C a few forwards into training (the probe's forward at micro-batch 1 came first)
    with out_of_memory_above(1, sigint_at_forward=1 + 4 + 2), pytest.raises(SystemExit) as stopped:
        sft.main(recipe=str(path))
    assert stopped.value.code == 130
    assert contract.read_json(run / ".sft.partial" / auto_batch.RECORD_FILE)["micro_batch"] == 1
    checkpoint = contract.newest_complete_checkpoint(run / ".sft.partial" / "checkpoints")
    assert checkpoint and not checkpoint.endswith("-3"), "stopped during training, before its end"
    capsys.readouterr()
    with out_of_memory_above(1):
        sft.main(recipe=str(path))
        resumed = capsys.readouterr().out
        sft.main(recipe=str(path), force=True)
        redone = capsys.readouterr().out
    for out in (resumed, redone):
        assert "sft: per_device_train_batch_size auto: starting at micro-batch 1 (recorded in" in out
        assert "ran out of memory" not in out, "no try repeated"
        assert "sft: micro-batch 1 x accumulation 4 fits" in out
    assert f"sft: resuming from {checkpoint}" in resumed
    assert contract.read_json(run / "sft" / auto_batch.RECORD_FILE)["ran_out_of_memory_at"] == [4, 2]
    state = json.loads((run / "sft" / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["train_batch_size"] == 1


@pytest.mark.parametrize("checkpointing, advice", [
    (False, r"turn on activation_checkpointing, train lora"),
    # TRL's SFTConfig recomputes by default: advising to turn it on was wrong there
    (None, r" even with activation checkpointing: train lora"),
])
def test_auto_batch_says_in_one_line_when_even_1_does_not_fit(write_recipe, checkpointing, advice):
    args = {**TRAIN["args"], "per_device_train_batch_size": "auto"}
    if checkpointing is not None:
        args["activation_checkpointing"] = checkpointing
    path = write_recipe(prepare={"max_rows": 16}, sft={**TRAIN, "effective_batch_size": 2, "args": args})
    prepare.main(recipe=str(path))
    with out_of_memory_above(0), pytest.raises(contract.UserError, match=(
        rf"^sft: micro-batch 1 ran out of memory.*{advice} .* \(vlmjobs memory <recipe> shows the arithmetic\)$")):
        sft.main(recipe=str(path))
    assert not (recipes.load(path).run_dir / "sft").exists()


def test_auto_batch_out_of_memory_in_training_says_what_to_write_instead_of_auto(write_recipe):
    """Issue 23: out of memory in training after the probe, the stage contract's advice (halve
    per_device_train_batch_size) meant nothing for auto, and a rerun would start from the recorded size again."""
    auto = {**TRAIN, "effective_batch_size": 4, "args": {**TRAIN["args"], "per_device_train_batch_size": "auto"}}
    path = write_recipe(prepare={"max_rows": 16}, sft=auto)
    prepare.main(recipe=str(path))
    with out_of_memory_above(1000, out_of_memory_at_batch=2), pytest.raises(contract.UserError, match=(
        r"^sft: out of GPU memory in training \(CUDA out of memory\. .*\) at micro-batch 4 x accumulation 1, the size "
        r"per_device_train_batch_size: auto found on the longest training rows; give a smaller one in its place: "
        r"sft.args.per_device_train_batch_size: 2 and sft.args.gradient_accumulation_steps: 2, without "
        r"sft.effective_batch_size \(the same effective batch\), or turn on activation_checkpointing$")):
        sft.main(recipe=str(path))


@pytest.mark.parametrize(
    "name, sft_section, resources, message",
    [
        ("effective batch missing", {"args": {"per_device_train_batch_size": "auto"}}, {},
         "sft.effective_batch_size: required with per_device_train_batch_size: auto"),
        ("accumulation given too", {"effective_batch_size": 8, "args": {"per_device_train_batch_size": "auto", "gradient_accumulation_steps": 2}},
         {}, "sft.args.gradient_accumulation_steps: set by the stage with per_device_train_batch_size: auto"),
        ("uneven over the processes", {"effective_batch_size": 6, "args": {"per_device_train_batch_size": "auto"}},
         {"gpus": 4}, "sft.effective_batch_size: 6 does not split evenly over the stage's 4 processes; use a multiple of 4"),
        ("effective batch without auto", {"effective_batch_size": 8, "args": {"per_device_train_batch_size": 2}}, {},
         "sft.effective_batch_size: only read with sft.args.per_device_train_batch_size: auto"),
    ],
)
def test_auto_batch_recipe_errors_name_the_key(name, sft_section, resources, message):
    data = {"name": "t", "model": {"name_or_path": "org/m", "family": "llava"}, "stages": ["prepare", "sft"],
            "data": {"sft": {"path": "d", "format": "chartqa"}}, "sft": sft_section, "resources": resources}
    with pytest.raises(contract.UserError, match=f"^recipe: .*{message}"):
        recipes.from_dict(data)


def test_auto_batch_recipe_passes_the_schema_check():
    data = {"name": "t", "model": {"name_or_path": "org/m", "family": "llava"}, "stages": ["prepare", "sft"],
            "data": {"sft": {"path": "d", "format": "chartqa"}},
            "sft": {"effective_batch_size": 64, "args": {"per_device_train_batch_size": "auto"}}, "resources": {"gpus": 4}}
    recipe = recipes.from_dict(data)
    assert recipes.passthrough_errors(recipe) == []
    assert [auto_batch.smaller(m, 16) for m in (16, 8, 4, 2)] == [8, 4, 2, 1]
    assert [auto_batch.smaller(m, 12) for m in (12, 6, 3)] == [6, 3, 1], "accumulation stays whole: 12 = 3 x 4 = 1 x 12"


@contextmanager
def out_of_memory_when_saving_more_than(limit: float):
    """The memory that activation checkpointing saves, as the memory that runs out: each training step counts the
    bytes of the tensors autograd saves for its backward (torch's ``saved_tensors_hooks``; what checkpointed layers
    keep goes through checkpointing's own hooks instead, as on a GPU it does not stay), and raises a real
    ``torch.OutOfMemoryError`` past ``limit``. Yields the most a training step saved."""
    import transformers

    seen = {"step": 0, "most": 0}

    def pack(tensor):
        seen["step"] += tensor.numel() * tensor.element_size()
        seen["most"] = max(seen["most"], seen["step"])
        if seen["step"] > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {seen['step']} bytes saved > {limit})")
        return tensor

    original = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        seen["step"] = 0
        return original(self, *args, **kwargs)

    transformers.Trainer.training_step = training_step
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield seen
    finally:
        transformers.Trainer.training_step = original


def test_activation_checkpointing_auto_recomputes_only_where_the_batch_does_not_fit_without(write_recipe, capsys):
    """Issue 24: the recipes' activation checkpointing recomputes a forward per row in every step (the FLOPs table's
    largest gap to the ideal), needed or not. With auto, the probe trains without it where the batch fits; where it
    does not, with one layer in 8, 4 or 2 checkpointed (transformers' every_n_layers), then every layer: the first that
    fits. Either way the training is the one its setting given directly gives."""
    def recipe(name, every: int):
        args = {**TRAIN["args"], "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                "activation_checkpointing": every if every == "auto" else every > 0,
                **({} if every in ("auto", 0, 1) else {"activation_checkpointing_kwargs": {"every_n_layers": every}})}
        path = write_recipe(name=name, prepare={"max_rows": 24}, sft={**TRAIN, "args": args})
        prepare.main(recipe=str(path))
        return path, recipes.load(path).run_dir / "sft"

    def trained_with(run) -> int:
        """Every how many layers one was checkpointed in training (0: none), as the saved training args say."""
        args = torch.load(run / "checkpoints" / "checkpoint-2" / "training_args.bin", weights_only=False)
        if not args.activation_checkpointing:
            return 0
        return (args.activation_checkpointing_kwargs or {}).get("every_n_layers", 1)

    given = {every: recipe(f"every-{every}", every) for every in (0, 4, 2, 1)}
    saved = {}
    with out_of_memory_when_saving_more_than(math.inf) as unchecked:
        for every, (path, _) in given.items():
            unchecked["most"] = 0
            sft.main(recipe=str(path))
            saved[every] = unchecked["most"]
    # the tiny LLaVA's 2 vision and 2 text layers: one in 4 checkpoints the first, one in 2 the first of each tower
    assert saved[0] > saved[4] > saved[2] > saved[1] > 0, f"each keeps less; the simulated memory tells: {saved}"
    assert [trained_with(run) for _, run in given.values()] == [0, 4, 2, 1]

    auto_path, auto = recipe("auto", "auto")
    capsys.readouterr()
    with out_of_memory_when_saving_more_than(math.inf):
        sft.main(recipe=str(auto_path))
    out = capsys.readouterr().out
    assert "sft: micro-batch 2 x accumulation 2 fits without activation checkpointing (effective batch 4)" in out
    assert trained_with(auto) == 0
    assert_same_steps(logged_steps(auto), logged_steps(given[0][1]))

    tight_path, tight = recipe("tight", "auto")
    capsys.readouterr()
    with out_of_memory_when_saving_more_than((saved[4] + saved[2]) / 2):
        sft.main(recipe=str(tight_path))
    out = capsys.readouterr().out
    assert ("sft: micro-batch 2 ran out of memory without activation checkpointing; trying micro-batch 2 with "
            "activation checkpointing of one layer in 8") in out
    assert ("sft: micro-batch 2 ran out of memory with activation checkpointing of one layer in 4; trying micro-batch "
            "2 with activation checkpointing of one layer in 2") in out
    assert ("sft: micro-batch 2 x accumulation 2 fits with activation checkpointing of one layer in 2 (effective batch "
            "4)") in out
    assert trained_with(tight) == 2
    assert_same_steps(logged_steps(tight), logged_steps(given[2][1]))
    record = contract.read_json(tight / auto_batch.RECORD_FILE)
    assert (record["activation_checkpointing"], record["recomputes_activations"], record["recompute_every_n_layers"]) \
        == ("auto", True, 2)
    # micro-batch 2 ran out without recomputation, and with one layer in 8 and in 4: kept apart, for a resumed stage
    assert (record["ran_out_without_recomputation_at"], record["ran_out_of_memory_at"]) == ([2], [2])

    all_path, every_layer = recipe("all", "auto")
    with out_of_memory_when_saving_more_than((saved[2] + saved[1]) / 2):
        sft.main(recipe=str(all_path))
    assert trained_with(every_layer) == 1
    assert_same_steps(logged_steps(every_layer), logged_steps(given[1][1]))

    # Neither fits: one line that says what to change, and nothing trained
    capsys.readouterr()
    impossible_path, impossible = recipe("impossible", "auto")
    with out_of_memory_when_saving_more_than(saved[1] / 4), pytest.raises(contract.UserError, match=(
            r"^sft: micro-batch 2 ran out of memory even with activation checkpointing \(activation_checkpointing auto "
            r"probed it on the longest training rows\); give sft.args.per_device_train_batch_size a smaller number")):
        sft.main(recipe=str(impossible_path))
    assert not impossible.exists()


def assert_same_steps(logged: list[dict], expected: list[dict]) -> None:
    assert len(logged) == len(expected) == 2 and logged[0].keys() == expected[0].keys()
    for step, want in zip(logged, expected):
        assert step == pytest.approx(want, rel=1e-5), "the same losses, metrics and token counts"


def test_the_probe_tries_every_micro_batch_at_one_recomputation_before_the_next():
    """The order the stage's probe (and make bench's prediction of it) follows: each step of recomputation in turn,
    at each every micro-batch from the top down, halved to a divisor of the per-process batch; a given micro-batch
    alone at each step."""
    assert list(auto_batch.tries([0, 8, 1], 12, 12, True)) == [
        (0, 12), (0, 6), (0, 3), (0, 1), (8, 12), (8, 6), (8, 3), (8, 1), (1, 12), (1, 6), (1, 3), (1, 1)]
    assert list(auto_batch.tries([0, 4, 2], 4, 8, False)) == [(0, 4), (4, 4), (2, 4)]
    assert list(auto_batch.tries([2], 4, 16, True)) == [(2, 4), (2, 2), (2, 1)], "a recorded start below the top"


def test_on_a_cpu_auto_takes_the_whole_batch_without_recomputation_and_spends_no_step_probing(
        write_recipe, monkeypatch, capsys):
    """A CPU's allocator raises no OutOfMemoryError, so a probe there always found that the first try fits, after a
    training step on the longest rows: in the real-geometry SFT bench 28.9 s of a 152.9 s run, for that answer.
    Now the stage takes that answer without the step; the training is the one the settings given directly give."""
    monkeypatch.setattr(auto_batch, "can_run_out_of_memory", CAN_RUN_OUT_OF_MEMORY)  # the stage's own answer
    both = {**TRAIN, "effective_batch_size": 4,
            "args": {**TRAIN["args"], "per_device_train_batch_size": "auto", "activation_checkpointing": "auto"}}
    direct = {**TRAIN, "args": {**TRAIN["args"], "per_device_train_batch_size": 4, "activation_checkpointing": False}}
    auto_path = write_recipe(name="auto", prepare={"max_rows": 24}, sft=both)
    direct_path = write_recipe(name="direct", prepare={"max_rows": 24}, sft=direct)
    for path in (auto_path, direct_path):
        prepare.main(recipe=str(path))
    import transformers

    steps = []
    original = transformers.Trainer.training_step
    monkeypatch.setattr(transformers.Trainer, "training_step",
                        lambda self, *a, **k: steps.append(self.state.global_step) or original(self, *a, **k))
    capsys.readouterr()
    sft.main(recipe=str(auto_path))
    out = capsys.readouterr().out
    assert ("sft: per_device_train_batch_size auto and activation_checkpointing auto: micro-batch 4 without activation "
            "checkpointing (effective batch 4 over 1 process), not probed: a cpu raises no out-of-memory error") in out
    assert steps == [0, 1], "the two optimizer steps' training steps, and no probe's before them"
    run = recipes.load(auto_path).run_dir / "sft"
    record = contract.read_json(run / auto_batch.RECORD_FILE)
    assert (record["micro_batch"], record["recomputes_activations"], record["ran_out_of_memory_at"]) == (4, False, [])
    sft.main(recipe=str(direct_path))
    assert_same_steps(logged_steps(run), logged_steps(recipes.load(direct_path).run_dir / "sft"))


@pytest.mark.parametrize("key", ["activation_checkpointing", "gradient_checkpointing"])
def test_activation_checkpointing_auto_is_for_the_stages_that_probe(key):
    def recipe(stage: str):
        kind = "sft" if stage == "sft" else "dpo"
        return {"name": "t", "model": {"name_or_path": "org/m", "family": "llava"}, "stages": ["prepare", stage],
                "data": {kind: {"path": "d", "format": "chartqa" if kind == "sft" else "rlaif-v"}},
                stage: {"args": {key: "auto"}}}

    assert recipes.passthrough_errors(recipes.from_dict(recipe("sft"))) == [], "TRL is handed no 'auto'"
    with pytest.raises(contract.UserError, match=f"grpo.args.{key}: auto is for sft and dpo, whose stages probe"):
        recipes.from_dict({**recipe("grpo"), "grpo": {"args": {key: "auto"}, "rewards": [{"name": "yes_no"}]}})


WRAPPER = """
import os, runpy, sys
import torch

limit = int(os.environ["OOM_ABOVE_RANK" + os.environ["RANK"]])
def hook(module, args):
    if isinstance(module, torch.nn.Embedding) and args and args[0].dim() == 2 and args[0].shape[0] > limit:
        raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {args[0].shape[0]} rows > {limit})")
torch.nn.modules.module.register_module_forward_pre_hook(hook)
from jobs import auto_batch
auto_batch.can_run_out_of_memory = lambda device: True
sys.argv = ["jobs.sft", *sys.argv[1:]]
runpy.run_module("jobs.sft", run_name="__main__", alter_sys=True)
"""


def test_auto_batch_two_processes_agree_when_only_one_runs_out_of_memory(write_recipe, tiny_model, tmp_path):
    """Rank 1 runs out above micro-batch 2, rank 0 never: both train with 2 x accumulation 2 (8 over 2 processes)."""
    auto = {**TRAIN, "effective_batch_size": 8, "args": {**TRAIN["args"], "per_device_train_batch_size": "auto"}}
    path = write_recipe(prepare={"max_rows": 40}, sft=auto, resources={"gpus": 2})
    prepare.main(recipe=str(path))
    (tmp_path / "oom_wrapper.py").write_text(WRAPPER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]), "CUDA_VISIBLE_DEVICES": "",
           "OOM_ABOVE_RANK0": "1000", "OOM_ABOVE_RANK1": "2"}
    argv = [sys.executable, "-m", "launcher.distributed", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "oom_wrapper", f"--recipe={path}"]  # fmt: skip
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    print(done.stdout)  # the auto-batch log, for the note

    assert "sft: micro-batch 4 ran out of memory; trying 2 x accumulation 2" in done.stdout
    assert "sft: micro-batch 2 x accumulation 2 fits (effective batch 8)" in done.stdout
    assert "processes 2, effective batch 8," in done.stdout
    run = recipes.load(path).run_dir / "sft"
    assert contract.read_json(run / auto_batch.RECORD_FILE) == {
        "effective_batch_size": 8, "processes": 2, "device": "cpu", "model": str(tiny_model("llava")), "method": "sft full",
        "max_length": None, "precision": "weights float32, trainable float32, compute float32",
        "per_device_train_batch_size": "auto", "activation_checkpointing": True, "padding_free": False,
        "trainer": "SFTTrainer", "micro_batch": 2, "gradient_accumulation_steps": 2, "recomputes_activations": True,
        "recompute_every_n_layers": 1, "ran_out_of_memory_at": [4]}
    state = json.loads((run / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["train_batch_size"] == 2


def test_auto_batch_tiny_twin_of_a_recipe_with_auto_stays_valid(tmp_path):
    """A shipped recipe may say auto: its twin (jobs.twins) keeps auto and shrinks the effective batch, per process."""
    from jobs import twins

    recipe = {"name": "t", "model": {"name_or_path": "org/m", "family": "llava"}, "stages": ["prepare", "dpo"],
              "data": {"dpo": {"path": "org/d", "format": "rlaif-v"}}, "resources": {"gpus": 4},
              "dpo": {"effective_batch_size": 64, "args": {"per_device_train_batch_size": "auto"}}}
    data = twins.twin(recipe, lambda family: tmp_path, lambda kind: tmp_path, tmp_path)
    assert data["dpo"]["effective_batch_size"] == 2 * 4
    assert data["dpo"]["args"]["per_device_train_batch_size"] == "auto"
    assert "gradient_accumulation_steps" not in data["dpo"]["args"], "the stage sets it"
    assert recipes.from_dict(data).dpo.effective_batch_size == 8


# Issue 23, defect 1: the probe's rows are the ones the collator makes the most tokens of. On the tiny Qwen2-VL with
# a realistic pixel budget (up to 1024 image tokens an image, as Qwen2-VL-7B gives an 896x896 image) a row's tokens
# follow its image's area, not its text: the longest text here has a small chart, the shortest a large one.
PIXEL_BUDGET = {"size": {"shortest_edge": 64, "longest_edge": 256 * 256}}
CHART_SIZES = [(48, 40), (24, 48), (256, 240), (40, 56)]  # the third makes ~900 image tokens, the others under 40


SPEC = recipes.Model(name_or_path="tiny-qwen2-vl", family="qwen2_vl")  # the recipe's model, as the key names it
FP32 = modeling.Precision(weights=torch.float32, trainable=torch.float32, compute=torch.float32)
BF16_LORA = modeling.Precision(weights=torch.bfloat16, trainable=torch.float32, compute=torch.bfloat16)


def chart_rows(preference: bool) -> list[dict]:
    """Rows as prepare writes them: the first has the longest question and answers and a small image, the third
    a one-word question and answer and the largest image."""
    questions = ["What is the value of the highest bar, and of the one beside it? " * 4, "Which?", "Max?",
                 "How many bars are there in the chart?"]
    answers = [("twelve and fourteen " * 8, "eleven and three " * 8), ("no", "yes"), ("7", "9"), ("three bars", "two")]
    rows = []
    for i, (size, question, (good, bad)) in enumerate(zip(CHART_SIZES, questions, answers)):
        row = {"images": [Image.new("RGB", size, (30 * i, 200, 90))],
               "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]}
        if preference:
            row["chosen"] = [{"role": "assistant", "content": [{"type": "text", "text": good}]}]
            row["rejected"] = [{"role": "assistant", "content": [{"type": "text", "text": bad}]}]
        else:
            row["completion"] = [{"role": "assistant", "content": [{"type": "text", "text": good}]}]
        rows.append(row)
    return rows


def qwen2_vl_trainer(kind: str, model_dir, tmp_path, pixel_budget: dict = PIXEL_BUDGET, **args):
    """TRL's own trainer of ``kind`` (sft or dpo) on the tiny Qwen2-VL with the pixel budget above, in float32 (with
    ``args``' config fields over these)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from jobs.families import get_family

    spec = recipes.Model(name_or_path=str(model_dir), family="qwen2_vl", attn_implementation="sdpa", processor=pixel_budget)
    processor = get_family("qwen2_vl").rendering_processor(modeling.load_processor(spec))
    model = modeling.load_model(spec, dtype=torch.float32)
    common = {**dict(output_dir=str(tmp_path / "checkpoints"), report_to="none", use_cpu=True, bf16=False,
                     dataloader_pin_memory=False, per_device_train_batch_size=1), **args}
    if kind == "sft":
        return SFTTrainer(model=model, args=SFTConfig(**common, max_length=None), processing_class=processor,
                          train_dataset=Dataset.from_list(chart_rows(preference=False)))
    return DPOTrainer(model=model, args=DPOConfig(**common, max_length=None), processing_class=processor,
                      train_dataset=Dataset.from_list(chart_rows(preference=True)))


def probed_batches(trainer) -> list[dict]:
    """Spies on the trainer's public training_step: every batch the probe runs, as it runs it."""
    seen, step = [], trainer.training_step

    def recording(model, inputs, *args, **kwargs):
        seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
        return step(model, inputs, *args, **kwargs)

    trainer.training_step = recording
    return seen


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_auto_batch_probes_the_rows_with_the_most_tokens_not_the_longest_text(kind, tiny_model, tmp_path):
    """Issue 23: the probe ranked rows by their text and picked the long-text row with a small chart (247 tokens)
    over the one-word row with a large one (990). The oracle is the collator on each row (pair) alone: its attention
    mask counts the row's tokens, image tokens included; a DPO pair is its chosen and rejected sequences together."""
    trainer = qwen2_vl_trainer(kind, tiny_model("qwen2_vl"), tmp_path)
    alone = [int(trainer.data_collator([dict(row)])["attention_mask"].sum()) for row in trainer.train_dataset]
    longest = max(range(len(alone)), key=alone.__getitem__)
    text = [len(json.dumps(row)) for row in trainer.train_dataset.remove_columns("images")]
    assert longest == 2 and max(range(len(text)), key=text.__getitem__) == 0, (alone, text)  # the case in point
    assert alone[2] > 2 * max(alone[:2] + alone[3:]), alone

    stage = contract.Stage(kind, tmp_path / "run", {}, "fingerprint")
    stage.work.mkdir(parents=True)
    train = (recipes.SFT if kind == "sft" else recipes.DPO)(
        method="full", effective_batch_size=1, args={"per_device_train_batch_size": "auto"})
    seen = probed_batches(trainer)
    assert auto_batch.fit(stage, trainer, train, model=SPEC, precision=FP32) == auto_batch.Batch(1, 1)
    want = trainer.data_collator([dict(trainer.train_dataset[longest])])
    probed_longest = len(seen) == 1 and torch.equal(seen[0]["input_ids"], want["input_ids"])
    assert probed_longest, f"probed a row of {int(seen[0]['attention_mask'].sum())} tokens; the longest has {alone[longest]}"


def test_auto_batch_a_changed_recipe_misses_the_stored_size(tiny_model, tmp_path, capsys):
    """Issue 23: the stored size was keyed by effective batch, processes and device only, so a --force'd stage with a
    longer max_length (or full instead of lora, fp32 instead of bf16, checkpointing off, another model) started from
    a size found for a lighter recipe. Each change must probe from the top; the same recipe reads the record."""
    trainer = qwen2_vl_trainer("sft", tiny_model("qwen2_vl"), tmp_path, pixel_budget={})  # small images: quick probes
    stage = contract.Stage("sft", tmp_path / "run", {}, "fingerprint")
    stage.work.mkdir(parents=True)
    base = dict(train=recipes.SFT(method="lora", effective_batch_size=1, args={"per_device_train_batch_size": "auto"}),
                max_length=512, checkpointing=False, model=SPEC, precision=BF16_LORA)

    padded = trainer.data_collator

    def starts_from_record(padding_free=False, **changes) -> bool:
        recipe = {**base, **changes}
        trainer.args.max_length, trainer.args.activation_checkpointing = recipe["max_length"], recipe["checkpointing"]
        trainer.data_collator = packing.PaddingFree(padded, trainer.model) if padding_free else padded
        capsys.readouterr()
        auto_batch.fit(stage, trainer, recipe["train"], model=recipe["model"], precision=recipe["precision"])
        return "starting at micro-batch 1 (recorded in" in capsys.readouterr().out

    assert not starts_from_record(), "nothing recorded yet"
    assert starts_from_record(), "the same recipe: the size found"
    record = (stage.work / auto_batch.RECORD_FILE).read_text()
    changes = {
        "max_length": dict(max_length=2048),
        "method": dict(train=recipes.SFT(**{**vars(base["train"]), "method": "full"})),
        "precision": dict(precision=FP32),
        "activation checkpointing": dict(checkpointing=True),
        "model": dict(model=recipes.Model(name_or_path="Qwen/Qwen2-VL-7B-Instruct", family="qwen2_vl")),
        "padding-free batches": dict(padding_free=True),
    }
    for name, change in changes.items():
        (stage.work / auto_batch.RECORD_FILE).write_text(record)  # the unchanged recipe's record, as it was written
        assert not starts_from_record(**change), f"{name} changed: the size found for another recipe was used"


@pytest.mark.parametrize("kind, rows", [("sft", [2]), ("sft", [0, 2]), ("dpo", [0, 2])],
                         ids=["sft-large-chart", "sft-long-text-and-large-chart", "dpo-long-text-and-large-chart"])
def test_the_probe_keeps_the_activations_training_keeps_under_mixed_precision(tiny_model, tmp_path, kind, rows):
    """The probe runs before ``train()``, and ``train()`` is where accelerate wraps the model's forward in the run's
    autocast (bf16) and converts its outputs to float32. Unwrapped, the probe measured another step: full fine-tuning's
    float32 weights ran a float32 step where training runs a bf16 one, keeping about twice the activations, so a batch
    that fits was recomputed or halved. The oracle is ``train()`` itself: the most bytes its step keeps for the
    backward (jobs.flops.saved_for_backward, torch's saved-tensor hooks) on the same rows: the large chart alone, and
    batched with the long question and answers on a small image (padded to each other)."""
    from jobs import flops

    trainer = qwen2_vl_trainer(kind, tiny_model("qwen2_vl"), tmp_path, bf16=True, max_steps=1, save_strategy="no",
                               activation_checkpointing=False, per_device_train_batch_size=len(rows))
    trainer.train_dataset = rows = trainer.train_dataset.select(rows)
    own_forward = vars(trainer.model).get("forward")
    probed = flops.saved_for_backward(lambda: auto_batch.probe(trainer, rows), trainer.model)
    assert vars(trainer.model).get("forward") is own_forward, "the probe leaves the forward as it found it"
    trained = flops.saved_for_backward(trainer.train, trainer.model)
    # a float32 scalar apart: train() hands the step its batch's token count, which the probe's step goes without
    assert abs(probed - trained) <= 4, (probed, trained)  # unwrapped: 49.6 MB against 28.1
