"""Sharded training (issue 14): a recipe with resources.gpus 2 and sharding fsdp runs each training stage as two
CPU processes (gloo) under torch's fully_shard, launched as the local runner and the Job launch them. Against one
process on the same global batch (2 processes x 2 rows = 1 x 4 rows, the same seed and so the same rows in each
step), the logged losses agree within TOLERANCE and the saved model within WEIGHT_TOLERANCE; a sharded checkpoint
resumes; merge_push works from a sharded run; GRPO, its completions sampled alike in both runs
(tests/grpo_sampling.py), trains the same model. Kept small: two optimizer steps of tiny models, and the stages of
both runs shared by the tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs import contract, reference_logprobs
from jobs import recipe as recipes
from tests.conftest import recipe_file, run_stages, subprocess_env, with_sitecustomize

# fp32 on one CPU: the two runs differ only in the order of the sums (a gradient reduced over two processes, a loss
# averaged over their tokens), a few float32 roundings apart
TOLERANCE = 1e-5
# Saved weights: Adam divides each gradient element by its own running RMS, so the few elements whose gradient is
# near zero turn those roundings into up to a step's difference; seen up to 1.1e-5 in 3 of Qwen2-VL's 65536 merger
# weights after 2 steps at learning rate 1e-3, against 1.9e-6 for lm_head. 5% of one step.
WEIGHT_TOLERANCE = 5e-5
STEPS = 2
LEARNING_RATE = 1e-3  # large enough that two steps move every trained weight well past TOLERANCE
SHARDED = {"resources": {"gpus": 2, "sharding": "fsdp"}}


def args(batch: int) -> dict:
    return {"max_steps": STEPS, "per_device_train_batch_size": batch, "logging_steps": 1, "save_steps": 1,
            "learning_rate": LEARNING_RATE}


def vlmjobs(*argv: str, sitecustomize: tuple[Path, str] | None = None):
    """``vlmjobs`` as a user runs it; ``sitecustomize``: (folder, source) that its processes import as they start."""
    env = subprocess_env(CUDA_VISIBLE_DEVICES="")
    if sitecustomize:
        env = with_sitecustomize(env, *sitecustomize)
    return subprocess.run([sys.executable, "-m", "launcher.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=900)


def both_runs(folder, model, sources, family: str, sft: dict, dpo: dict, stages: list[str],
              dpo_args: dict | None = None):
    """The same recipe run by one process (in-process, a batch of 4) and sharded over two (a batch of 2 each);
    ``dpo_args`` added to both DPO's args."""
    lora = {"r": 4, "lora_alpha": 8}
    dpo_args = dpo_args or {}
    # 10 rows: DPO keeps 8 for training (one each held out), so both steps take 4 whole rows. With 6, step 2 has 2
    # left, which one process takes as its batch and two processes fill to 2 each from the start (accelerate's
    # even_batches), and the comparison would be between different rows.
    common = {"family": family, "stages": stages, "prepare": {"max_rows": 10}}
    def stages_with_batch(batch: int) -> dict:
        return {"sft": {**sft, "lora": lora, "args": args(batch)},
                "dpo": {**dpo, "lora": lora, "args": {**args(batch), **dpo_args}}}

    one = recipe_file(folder, model, sources, name="one", **common, **stages_with_batch(4))
    two = recipe_file(folder, model, sources, name="two", **common, **stages_with_batch(2), **SHARDED)
    run_stages(one, *[s for s in stages if s != "merge_push"])
    # The one process's cached reference log-probs set aside, so that the sharded run computes its own
    store = reference_logprobs.store_for(recipes.load(one).run_dir)
    if store.is_dir():
        store.rename(store.with_name("one-process"))
    sharded = vlmjobs("run", str(two), "--stages", ",".join(s for s in stages if s != "merge_push"))
    assert sharded.returncode == 0, sharded.stdout[-3000:] + sharded.stderr[-5000:]
    return recipes.load(one).run_dir, recipes.load(two).run_dir, sharded.stdout


def losses(out, key: str = "loss") -> list[float]:
    """The stage's logged ``key`` (loss, eval_loss, grad_norm), step by step."""
    return [r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


def weights(model_dir) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (model_dir / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(model_dir / name)


def assert_same_training(one, two, stage: str, start: dict[str, torch.Tensor]):
    """Losses, gradient norms and saved weights of one stage within their tolerances, and the weights trained far
    past them (from ``start``)."""
    assert all(norm > 0 for norm in losses(one / stage, "grad_norm")), f"{stage} computed no gradient: the comparison would prove nothing"
    assert losses(one / stage) == pytest.approx(losses(two / stage), rel=TOLERANCE, abs=TOLERANCE)
    a, b = weights(one / stage / "model"), weights(two / stage / "model")
    bf16 = any(value.dtype == torch.bfloat16 for value in a.values())
    # Adam's first steps barely depend on the gradient's scale: a gradient summed rather than averaged (2x) shows here.
    # bf16 gradients (QLoRA's adapter) are reduced over the processes in another order: a few roundings apart
    norm_tolerance = 2 * torch.finfo(torch.bfloat16).eps if bf16 else TOLERANCE
    assert losses(one / stage, "grad_norm") == pytest.approx(losses(two / stage, "grad_norm"), rel=norm_tolerance)
    assert len(losses(two / stage)) == STEPS
    assert a.keys() == b.keys()
    if bf16:
        assert_within_bf16(a, b, stage)
    for key in (k for k in a if a[k].dtype != torch.bfloat16):
        assert torch.allclose(a[key], b[key], atol=WEIGHT_TOLERANCE, rtol=0), f"{stage} {key}: {(a[key] - b[key]).abs().max()}"
    moved = max(float((a[k].float() - start.get(k, torch.zeros_like(a[k])).float()).abs().max()) for k in a)
    assert moved > 100 * TOLERANCE, f"{stage} barely trained: the comparison would prove nothing"


def assert_within_bf16(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], stage: str):
    """QLoRA's adapter and its gradients are bf16 (TRL casts them), a few roundings apart on 1 and 2 processes, and
    Adam moves an element whose gradient is near zero by a whole step either way: every element within the two
    steps' 2 x learning rate, and all but 1% of the adapter within 2 bf16 roundings of its value (seen: 0.1%)."""
    beyond, elements = 0, 0
    for key in (k for k in a if a[k].dtype == torch.bfloat16):
        difference = (a[key].float() - b[key].float()).abs()
        assert float(difference.max()) <= STEPS * LEARNING_RATE * 1.01, f"{stage} {key}: {difference.max()}"
        beyond += int((difference > 2 * torch.finfo(torch.bfloat16).eps * a[key].float().abs() + WEIGHT_TOLERANCE).sum())
        elements += a[key].numel()
    assert beyond <= 0.01 * elements, f"{stage}: {beyond} of {elements} adapter weights beyond bf16's roundings"


def checkpoint_is_sharded(out) -> bool:
    """Each process wrote its shards with torch.distributed.checkpoint, not one model.safetensors (plain DDP)."""
    checkpoint = out / "checkpoints" / "checkpoint-1"
    return (checkpoint / "pytorch_model_fsdp_0").is_dir() and not (checkpoint / "model.safetensors").exists()


@pytest.fixture(scope="module")
def llava(tmp_path_factory, tiny_model, synthetic_data):
    """LLaVA: full SFT, and DPO with LoRA on the base model (so that each is compared on its own); one process and two."""
    folder = tmp_path_factory.mktemp("fsdp-llava")
    sources = {kind: synthetic_data(kind) for kind in ("chartqa", "rlaif-v")}
    one, two, out = both_runs(folder, tiny_model("llava"), sources, "llava", {"method": "full"}, {"method": "lora", "init": "base"},
                              ["prepare", "sft", "dpo", "merge_push"])
    return {"one": one, "two": two, "stdout": out, "folder": folder, "base": tiny_model("llava")}


# Where lm_head trains, these held only once TRL's fused LM head was made to average lm_head's gradient over the
# processes (jobs.upstream.averaging_lm_head_gradient): without it, step 1's lm_head gradient of LLaVA's full
# SFT was 4.59 sharded against 3.68 on one process, and every later step differed.


def test_fsdp_llava_runs_sharded(llava):
    """What does hold for LLaVA: both stages ran sharded, checkpointed in shards and saved a whole model."""
    assert "processes 2, effective batch 4" in llava["stdout"] and "per GPU, sharded over 2" in llava["stdout"]
    assert checkpoint_is_sharded(llava["two"] / "sft") and checkpoint_is_sharded(llava["two"] / "dpo")
    assert weights(llava["two"] / "sft" / "model").keys() == weights(llava["one"] / "sft" / "model").keys()
    assert contract.read_json(llava["two"] / "dpo" / contract.SUCCESS_FILE)["reference"] == "the model with its adapter switched off"


def test_fsdp_llava_lora_dpo_matches_one_process(llava):
    """On reference log-probs computed by the sharded model, adapter switched off, when training starts. peft
    switches an adapter off and on through requires_grad, which FSDP took from the projector's sharded parameters
    while the root unit held its gathered ones: until reference_logprobs.keeping_what_trains, the projector's adapter
    silently stopped training after step 1, and this failed."""
    assert "reference copy False, reference log-probs cached, sharded over 2" in llava["stdout"]
    assert "dpo: reference log-probs of 8 train rows computed by the sharded model" in llava["stdout"]
    assert_same_training(llava["one"], llava["two"], "dpo", {})  # LoRA's B starts at zero


def test_fsdp_lora_dpo_rerun_reads_the_log_probs_the_sharded_run_stored(llava):
    """A rerun on the same reference and rows (a nightly run, a beta sweep) reads them from the store, never runs the
    reference, and trains as the run that computed them."""
    run = llava["two"].with_name("rerun")
    for stage in ("prepare", "sft"):
        shutil.copytree(llava["two"] / stage, run / stage)
    done = vlmjobs("run", str(llava["folder"] / "two.yaml"), "--stages", "dpo", "--run.id=rerun")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "dpo: reference log-probs of 8 train rows read from" in done.stdout and "computed" not in done.stdout
    assert losses(run / "dpo") == pytest.approx(losses(llava["two"] / "dpo"), rel=TOLERANCE, abs=TOLERANCE)
    a, b = weights(run / "dpo" / "model"), weights(llava["two"] / "dpo" / "model")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=WEIGHT_TOLERANCE, rtol=0), key


def test_fsdp_lora_dpo_shorter_than_an_epoch_scores_the_rows_both_processes_draw(llava, tmp_path):
    """Issue 24: one step of an 8-row epoch of 2 x 2 rows, on an empty store: the sharded model scores when training
    starts the 4 rows the two processes' batches hold (gathered from both), and trains step 1 as the whole-epoch run
    did. A row it missed would stop the step (its log-probs NaN, refused by compute_loss)."""
    run = tmp_path / "short"
    for stage in ("prepare", "sft"):
        shutil.copytree(llava["two"] / stage, run / stage)
    done = vlmjobs("run", str(llava["folder"] / "two.yaml"), "--stages", "dpo", f"--run.root={tmp_path}",
                   "--run.id=short", "--dpo.args.max_steps=1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "dpo: the reference pass scores the 4 of 8 train rows that optimizer steps 1-1 draw" in done.stdout
    assert "dpo: reference log-probs of 4 train rows computed by the sharded model" in done.stdout
    assert losses(run / "dpo") == pytest.approx(losses(llava["two"] / "dpo")[:1], rel=TOLERANCE, abs=TOLERANCE)


def test_fsdp_llava_full_sft_matches_one_process(llava):
    assert_same_training(llava["one"], llava["two"], "sft", load_file(llava["base"] / "model.safetensors"))


def test_fsdp_merge_push_works_from_a_sharded_run(llava):
    run_stages(llava["folder"] / "two.yaml", "merge_push")  # checks merged against adapter logits itself
    merged = llava["two"] / "merge_push"
    assert contract.read_json(merged / contract.SUCCESS_FILE)
    assert any(merged.rglob("*.safetensors"))


def stopped_after_checkpoint_1(run, stage: str):
    """Beside the finished stage, its attempt as a stop after checkpoint-1 leaves it: the checkpoint, the first
    step's metrics and the config; returns the attempt's folder."""
    done = contract.read_json(run / stage / contract.SUCCESS_FILE)
    attempt = run / f".{stage}.partial"
    (attempt / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / stage / "checkpoints" / "checkpoint-1", attempt / "checkpoints" / "checkpoint-1")
    (attempt / "metrics.jsonl").write_text((run / stage / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    contract.write_json_atomic(attempt / contract.CONFIG_FILE, {"fingerprint": done["fingerprint"], "config": done["config"]})
    return attempt


def test_fsdp_sharded_checkpoint_resumes(llava):
    """Interrupted after checkpoint-1 (the folder as a stopped attempt leaves it), the stage resumes from the sharded
    checkpoint, optimizer state included: step 2 and the saved model as in the run that was not interrupted."""
    run = llava["two"]
    uninterrupted = {"losses": losses(run / "sft"), "weights": weights(run / "sft" / "model")}
    attempt = stopped_after_checkpoint_1(run, "sft")
    shutil.rmtree(run / "sft")

    resumed = vlmjobs("run", str(llava["folder"] / "two.yaml"), "--stages", "sft")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert f"sft: resuming from {attempt / 'checkpoints' / 'checkpoint-1'}" in resumed.stdout
    assert losses(run / "sft") == pytest.approx(uninterrupted["losses"], rel=TOLERANCE)
    again = weights(run / "sft" / "model")
    for key, value in uninterrupted["weights"].items():
        assert torch.allclose(again[key], value, atol=TOLERANCE, rtol=0), key


def test_fsdp_sharded_checkpoint_resumes_on_another_number_of_processes(llava, tmp_path):
    """Written by 2 processes, checkpoint-1 resumes on 3: torch's distributed checkpoint reshards the weights and the
    optimizer state as it loads them. Step 2 then takes 6 rows, not 4, so the result is near the uninterrupted run's,
    not equal: within two Adam steps (2 x learning rate 1e-3) per weight, where shards loaded into the wrong places
    would be off by the weights' own size (about 0.02), and the eval loss within 1%."""
    run = llava["two"]
    uninterrupted = {"eval": losses(run / "sft", "eval_loss"), "weights": weights(run / "sft" / "model")}
    attempt = stopped_after_checkpoint_1(run, "sft")
    kept = tmp_path / "sft"
    shutil.move(run / "sft", kept)
    try:
        resumed = vlmjobs("run", str(llava["folder"] / "two.yaml"), "--stages", "sft", "--resources.gpus=3")
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
        assert "sharded over 3" in resumed.stdout and f"sft: resuming from {attempt / 'checkpoints' / 'checkpoint-1'}" in resumed.stdout
        assert losses(run / "sft", "eval_loss")[-1] == pytest.approx(uninterrupted["eval"][-1], rel=0.01)
        again = weights(run / "sft" / "model")
        assert again.keys() == uninterrupted["weights"].keys()
        worst = max(float((again[k] - v).abs().max()) for k, v in uninterrupted["weights"].items())
        print(f"resumed on 3 processes against 2 uninterrupted: eval loss {losses(run / 'sft', 'eval_loss')[-1]:.5f} against "
              f"{uninterrupted['eval'][-1]:.5f}, largest weight difference {worst:.2e}")
        assert worst <= 2e-3
    finally:
        shutil.rmtree(run / "sft", ignore_errors=True)
        shutil.rmtree(attempt, ignore_errors=True)
        shutil.move(kept, run / "sft")


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory, tiny_model, synthetic_data):
    """Qwen2-VL: LoRA SFT, then full DPO from its merged weights, the reference's log-probs cached (computed by the
    sharded policy when training starts), evaluated at its last step (so that the eval rows are scored too); one
    process and two."""
    folder = tmp_path_factory.mktemp("fsdp-qwen2-vl")
    sources = {kind: synthetic_data(kind) for kind in ("chartqa", "rlaif-v")}
    one, two, out = both_runs(folder, tiny_model("qwen2_vl"), sources, "qwen2_vl", {"method": "lora"}, {"method": "full"},
                              ["prepare", "sft", "dpo"], dpo_args={"eval_strategy": "steps", "eval_steps": STEPS})
    return {"one": one, "two": two, "stdout": out, "folder": folder}


def test_fsdp_qwen2_vl_lora_sft_matches_one_process(qwen2_vl):
    assert checkpoint_is_sharded(qwen2_vl["two"] / "sft")
    assert_same_training(qwen2_vl["one"], qwen2_vl["two"], "sft", {})


def test_fsdp_qwen2_vl_full_dpo_caches_the_reference_computed_by_the_sharded_policy(qwen2_vl):
    """No reference copy: the log-probs computed by the sharded policy before its first step, split by split those
    one process computed before training. Not the same files: each run's reference is its own SFT model, equal to
    the other's within the SFT test's tolerance, so the log-probs (sums over answer tokens) agree to 1e-4."""
    from safetensors import safe_open

    def by_split(store):
        files = {}
        for path in store.glob("*.safetensors"):
            with safe_open(path, "pt") as f:
                files[f.metadata()["split"]] = {key: f.get_tensor(key) for key in f.keys()}
        return files

    assert checkpoint_is_sharded(qwen2_vl["two"] / "dpo")
    assert "reference copy False, reference log-probs cached, sharded over 2" in qwen2_vl["stdout"]
    assert "rows computed by the sharded model" in qwen2_vl["stdout"]
    store = reference_logprobs.store_for(qwen2_vl["two"])
    sharded, one = by_split(store), by_split(store.with_name("one-process"))
    assert sharded.keys() == one.keys() == {"train", "eval"}, "evaluating: the eval rows scored too"
    assert len(losses(qwen2_vl["two"] / "dpo", "eval_loss")) == 1
    assert losses(qwen2_vl["one"] / "dpo", "eval_loss") == pytest.approx(losses(qwen2_vl["two"] / "dpo", "eval_loss"),
                                                                         rel=TOLERANCE, abs=TOLERANCE)
    for split, logps in sharded.items():
        for key, value in logps.items():
            assert torch.allclose(value, one[split][key], atol=1e-4, rtol=0), f"{split} {key}: {(value - one[split][key]).abs().max()}"


def test_fsdp_qwen2_vl_full_dpo_recomputing_shards_a_reference_copy(qwen2_vl):
    """dpo.reference_logprobs: recompute keeps TRL's reference forward, its frozen copy sharded like the policy: the
    same losses as the cached reference."""
    run = qwen2_vl["two"].with_name("recompute")
    for stage in ("prepare", "sft"):
        shutil.copytree(qwen2_vl["two"] / stage, run / stage)
    done = vlmjobs("run", str(qwen2_vl["folder"] / "two.yaml"), "--stages", "dpo", "--run.id=recompute",
                   "--dpo.reference_logprobs=recompute")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "reference copy True, reference log-probs recomputed, sharded over 2" in done.stdout
    assert contract.read_json(run / "dpo" / contract.SUCCESS_FILE)["reference"] == "frozen copy of the model"
    assert losses(run / "dpo") == pytest.approx(losses(qwen2_vl["two"] / "dpo"), rel=TOLERANCE, abs=TOLERANCE)


def test_fsdp_full_dpo_resumed_without_its_stored_log_probs_stops_in_one_line(qwen2_vl, tmp_path):
    """Sharded, the log-probs are computed when training starts; a resumed full DPO has trained its policy since, so it
    is no longer the reference: with the stored files gone it stops (exit 2, not retried) rather than train on the
    wrong reference, and says what to do. The attempt stays, to resume once they are back."""
    run = qwen2_vl["two"]
    attempt = stopped_after_checkpoint_1(run, "dpo")
    store = reference_logprobs.store_for(run)
    finished, kept = tmp_path / "dpo", tmp_path / "store"
    shutil.move(run / "dpo", finished)
    shutil.move(store, kept)
    try:
        resumed = vlmjobs("run", str(qwen2_vl["folder"] / "two.yaml"), "--stages", "dpo")
        assert resumed.returncode == 2, resumed.stdout[-3000:] + resumed.stderr[-5000:]
        assert "the resumed policy is no longer the reference: rerun the stage from the start (--force)" in resumed.stderr
        assert "Traceback" not in resumed.stderr and (attempt / "checkpoints" / "checkpoint-1").is_dir()
    finally:
        shutil.rmtree(attempt, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
        shutil.move(kept, store)
        shutil.move(finished, run / "dpo")


def test_fsdp_qwen2_vl_full_dpo_matches_one_process(qwen2_vl, tiny_model):
    assert_same_training(qwen2_vl["one"], qwen2_vl["two"], "dpo", load_file(tiny_model("qwen2_vl") / "model.safetensors"))


@pytest.fixture(scope="module")
def qlora(tmp_path_factory, tiny_model, synthetic_data):
    """LLaVA in 4 bits: QLoRA SFT, and QLoRA DPO on the base model (its reference log-probs computed by the sharded
    model, adapter off); one process and two."""
    folder = tmp_path_factory.mktemp("fsdp-qlora")
    sources = {kind: synthetic_data(kind) for kind in ("chartqa", "rlaif-v")}
    one, two, out = both_runs(folder, tiny_model("llava"), sources, "llava", {"method": "qlora"},
                              {"method": "qlora", "init": "base"}, ["prepare", "sft", "dpo"])
    return {"one": one, "two": two, "stdout": out}


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_fsdp_qlora_shards_the_4_bit_weights_and_matches_one_process(qlora, stage):
    """Sharded, the 4-bit weights are packed into the weights' dtype (bnb_4bit_quant_storage), and fully_shard splits
    them like any other: packed into bytes, accelerate would have kept them whole on every process."""
    record = contract.read_json(qlora["two"] / stage / contract.SUCCESS_FILE)
    assert record["quantized"] and record["sharding"]["processes"] == 2
    assert record["sharding"]["whole on every process"] == []
    assert checkpoint_is_sharded(qlora["two"] / stage)
    assert_same_training(qlora["one"], qlora["two"], stage, {})


# GRPO against 1 process x 12 rows: TRL's default loss (beta 0, no reference) on the whole model, 2 processes x 3 rows
# x 2 accumulation steps (one generation batch per step); LoRA with a KL term to the adapter switched off, 2 x 6 rows.
GRPO = {
    "full": {"recipe": {"method": "full"},
             "sharded": {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 2}},
    "lora-kl": {"recipe": {"method": "lora", "lora": {"r": 4, "lora_alpha": 8}, "args": {"beta": 0.04}},
                "sharded": {"per_device_train_batch_size": 6}},
}
# Metrics of the completions themselves: equal when both runs sampled the same ones
COMPLETIONS = ("rewards/brevity/mean", "rewards/brevity/std", "completions/mean_length", "completions/min_length",
               "completions/max_length", "completions/mean_terminated_length", "num_tokens")


@pytest.mark.parametrize("case", GRPO)
def test_fsdp_grpo_matches_one_process(case, tmp_path, tiny_model, synthetic_data):
    """Sharded GRPO trains as one process on the same completions: losses, gradient norms and saved weights within
    the tolerances above, and for LoRA the KL to its reference (the adapter switched off under FSDP).

    The same completions need help: generate draws each process's completions from its own random state, so one
    process and two sample different ones for the same rows and seed (without help, full: mean rewards 0.272, 0.248
    on one process, 0.402, 0.113 on two). tests/grpo_sampling.py draws each token from the model's own
    distribution, keyed by the row's place in the generation batch of all processes rather than by the process.
    What stays TRL's and vlmjobs' is all that sharding changes: RepeatSampler's rows split over the processes (rows
    0-5 and 6-11, 4 completions per prompt: the second prompt's group spans both); the rewards, computed where each
    completion was generated, gathered in process order (accelerate's gather) for each group's mean and standard
    deviation, each process keeping its own rows' advantages; TRL's default loss (dapo) dividing each process's token
    sum by all processes' tokens over the number of processes, which FSDP's gradient average turns back into one
    process's division; for full, the generation batch consumed in two accumulation steps; the gradients and the
    sharded optimizer steps. (Rewards gathered in the wrong process order: step 1's loss 0.124 against 0.375, on the
    same completions.) TRL's bnpo loss does not match (GRPOConfig: normalised over the local batch only; LoRA's step 2
    KL came out 2% off), nor does the KL logged over accumulation steps (a mean of their token means).

    A tiny random model almost never writes its end token (1 in 453), so every completion would be 8 tokens long
    and the loss, -(sum of advantage x length) / tokens with each group's advantages summing to zero, exactly 0:
    the end token is boosted (generation_kwargs' sequence_bias), and a reward that tells short from long
    (grpo_sampling.brevity) replaces evaluate's accuracy, which gives a random model's answers all 0."""
    from transformers import AutoTokenizer

    from tests import grpo_sampling

    sources = {kind: synthetic_data(kind) for kind in ("chartqa", "rlaif-v")}
    end = AutoTokenizer.from_pretrained(tiny_model("llava")).eos_token_id

    def section(**batch) -> dict:
        recipe = GRPO[case]["recipe"]
        return {**recipe, "rewards": [{"name": "tests.grpo_sampling.brevity"}],
                "args": {**args(12), "num_generations": 4, "max_completion_length": 8,
                         "activation_checkpointing": False, "generation_kwargs": {"sequence_bias": [[[end], 4.0]]},
                         **recipe.get("args", {}), **batch}}

    common = {"stages": ["prepare", "grpo"], "prepare": {"max_rows": 10}}
    one = recipe_file(tmp_path, tiny_model("llava"), sources, name="one", grpo=section(), **common)
    two = recipe_file(tmp_path, tiny_model("llava"), sources, name="two", grpo=section(**GRPO[case]["sharded"]),
                      **common, **SHARDED)
    undo = grpo_sampling.install()
    try:
        run_stages(one)
    finally:
        undo()
    sharded = vlmjobs("run", str(two), sitecustomize=(tmp_path / "site", grpo_sampling.SITECUSTOMIZE))
    assert sharded.returncode == 0, sharded.stdout[-3000:] + sharded.stderr[-5000:]
    assert "processes 2, effective batch" in sharded.stdout and "generation batch 12" in sharded.stdout

    one, two = recipes.load(one).run_dir, recipes.load(two).run_dir
    for key in COMPLETIONS:
        assert losses(one / "grpo", key) == pytest.approx(losses(two / "grpo", key), rel=TOLERANCE), key
    assert min(losses(one / "grpo", "completions/min_length")) < 8, "no completion ended: the loss would be 0"
    if case == "lora-kl":
        assert losses(one / "grpo", "kl")[-1] > 0, "the policy is its reference after a step: the KL compares nothing"
        # Step 2's KL, about 5e-5, is a difference of nearly equal float32 log-probs
        assert losses(one / "grpo", "kl") == pytest.approx(losses(two / "grpo", "kl"), rel=1e-3)
    assert all(abs(loss) > 100 * TOLERANCE for loss in losses(one / "grpo")), "a loss near 0 would compare nothing"
    assert checkpoint_is_sharded(two / "grpo")
    start = load_file(tiny_model("llava") / "model.safetensors") if case == "full" else {}  # LoRA's B starts at zero
    assert_same_training(one, two, "grpo", start)


# ---------------------------------------------------------------------------------------------
# The arithmetic and the recipe keys, without training


def test_fsdp_memory_per_gpu_verdict_and_the_fewest_gpus_that_fit(write_recipe, capsys):
    from jobs import memory
    from launcher import cli

    path = write_recipe(sft={"method": "full"})
    whole = memory.for_stage(recipes.load(path), "sft")[0].total
    between = whole * 0.7 * memory.GB / 2**30  # GiB: holds half of the stage, not all of it
    with pytest.raises(contract.UserError, match=r"^memory: sft needs .* GB before activations"):
        cli.memory(str(path), **{"resources.gpu_memory_gib": between, "resources.gpus": 2, "resources.sharding": "none"})
    out = capsys.readouterr().out
    assert "on 2 GPUs, each holding all of it (resources.sharding none)" in out
    assert f"2 GPUs of this size with FSDP: {whole / 2:.3g} GB per GPU (--sft.resources.gpus=2 --sft.resources.sharding=fsdp)" in out

    for sharding in ("fsdp", "auto"):  # auto shards, since one GPU cannot hold it
        cli.memory(str(path), **{"resources.gpu_memory_gib": between, "resources.gpus": 2, "resources.sharding": sharding})
        out = capsys.readouterr().out
        assert f"on 2 GPUs sharded with FSDP (resources.sharding {sharding}): " in out and "per GPU, sharded over 2" in out
        assert f"= {whole / 2:.3g} GB per GPU" in out and "fits in one GPU of" in out
    roomy = whole * 1.5 * memory.GB / 2**30
    cli.memory(str(path), **{"resources.gpu_memory_gib": roomy, "resources.gpus": 2, "resources.sharding": "auto"})
    assert "each holding all of it (resources.sharding auto)" in capsys.readouterr().out, "auto shards only what does not fit"


def test_fsdp_estimate_divides_every_part_and_counts_the_reference_or_not():
    from jobs import memory

    blog = memory.arithmetic(8e9, 8e9, 4, reference_copy=True)  # the blog's 160 GB
    assert blog.sharded(4).total == pytest.approx(40) and blog.sharded(4).reference == pytest.approx(8)
    assert memory.arithmetic(8e9, 8e9, 4, reference_copy=False).sharded(4).total == pytest.approx(32)
    assert memory.fewest_shards(blog, 80 * 2**30 / memory.GB) == 2 and memory.fewest_shards(blog, 40) == 5


@pytest.mark.parametrize("case", [
    {"name": "unknown", "resources": {"sharding": "zero3"}, "error": "resources.sharding: 'zero3' is not one of none, fsdp, auto"},
    {"name": "auto without a GPU size", "resources": {"sharding": "auto"},
     "error": "resources.sharding: auto shards sft when one GPU cannot hold it, which needs resources.gpu_memory_gib"},
    {"name": "qlora packed in bytes", "resources": {"sharding": "fsdp"},
     "sft": {"method": "qlora", "quantization": {"bnb_4bit_quant_storage": "uint8"}},
     "error": "sft.quantization.bnb_4bit_quant_storage: uint8 packs the 4-bit weights into bytes, which FSDP cannot shard"},
    {"name": "fsdp is the recipe's to choose", "resources": {"sharding": "fsdp"}, "sft": {"method": "full", "args": {"fsdp": True}},
     "error": "sft.args.fsdp: set by the stage (resources.sharding decides; fsdp_config tunes it); remove it"},
], ids=lambda case: case["name"])
def test_fsdp_recipe_keys_refused_in_one_line(write_recipe, case):
    sections = {key: case[key] for key in ("resources", "sft") if key in case}
    path = write_recipe(**sections)
    with pytest.raises(contract.UserError, match=__import__("re").escape(case["error"])):
        recipes.check_passthrough(recipes.load(path))

