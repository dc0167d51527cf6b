"""Counted FLOPs (issue 24): the hollow run that lets `make bench` count a 7B model's step on a CPU counts what the
same step computed for real counts, on the tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trl import DPOConfig, DPOTrainer

from jobs import flops, modeling
from jobs.families import get_family
from jobs.recipe import Model
from tests.test_shared_prefix import pairs


def dpo_trainer(model, processor, family, tmp_path, *, shared: bool, rows: list[dict] | None = None, batch: int = 3,
                dora: bool = False):
    from datasets import Dataset
    from peft import LoraConfig

    from jobs import shared_prefix

    fam = get_family(family)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
                     max_steps=1, report_to=[], use_cpu=True, max_length=None, save_strategy="no",
                     gradient_checkpointing=True, disable_tqdm=True)
    trainer_class = shared_prefix.SharedPrefixDPOTrainer if shared else DPOTrainer
    trainer = trainer_class(
        model=model, ref_model=None, args=args, train_dataset=fam.close_answers(Dataset.from_list(rows or pairs()), processor),
        processing_class=fam.rendering_processor(processor),
        peft_config=LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", use_dora=dora))
    trainer.data_collator = fam.collator(trainer.data_collator, processor)
    return trainer


@pytest.mark.parametrize("family, shared, dora", [("qwen2_vl", False, False), ("llava", True, False), ("idefics3", True, True)],
                         ids=["trl-qwen2_vl", "shared-prefix-llava", "shared-prefix-idefics3-dora"])
def test_a_hollow_training_step_counts_what_the_real_one_computes(family, shared, dora, tiny_model, tmp_path):
    """One DPO step (forward with TRL's fused head, the reference with the adapter off, activation checkpointing's
    recomputation, LoRA's backward) counted computed for real, then on a hollow copy of the same model: the same FLOPs,
    and the hollow weights never took a value. Idefics3 (SmolVLM) with DoRA, as its recipes train it: image tiles,
    pixel shuffle, the image-token scatter, and DoRA's adapter weight taken through an identity at every forward."""
    spec = Model(name_or_path=str(tiny_model(family)), family=family, dtype="float32")
    processor = modeling.load_processor(spec)
    torch.manual_seed(0)
    real = modeling.load_model(spec, dtype=torch.float32)
    expected = flops.count(dpo_trainer(real, processor, family, tmp_path / "real", shared=shared, dora=dora).train)

    with flops.hollow(hollow_from=1) as mode:  # every floating weight hollow, as a 7B model's large ones are
        model = flops.hollow_model(get_family(family).model_class, real.config, mode)
        weights = [p for p in model.parameters()]
        assert weights and all(mode.holds(p) for p in weights)
        counted = flops.count(dpo_trainer(model, processor, family, tmp_path / "hollow", shared=shared, dora=dora).train)
    assert counted == expected > 0


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from Linux's /proc")
def test_hollow_tensors_take_no_pages_that_real_ones_wrote_and_freed():
    """Issue 24: SmolVLM's hollow count grew to 20 GB and was killed. Its DoRA adapters write weight-sized real
    tensors and free them; glibc's malloc, having freed a larger mapped block, serves blocks of up to that size from
    its heap, so an uninitialised hollow tensor got the written pages of a freed real one, and the next real tensor
    wrote new pages. 16 rounds of a real 16 MiB tensor written and freed, then a hollow one kept: the process holds
    about one real tensor's pages, not 16."""
    block = 4 << 20  # float32 elements: 16 MiB
    with flops.hollow() as mode:
        torch.ones(2 * block).sum()  # a larger block freed: glibc's threshold rises above a block, as in a real count
        kept, before = [], resident_bytes()
        for _ in range(16):
            torch.ones(block).sum()
            with flops.building(mode):
                kept.append(torch.empty(block))
        grown = resident_bytes() - before
        assert all(mode.holds(t) for t in kept)
    assert grown < 4 * block * 4, f"grew {grown / 2**20:.0f} MiB"


def test_an_identity_as_large_as_a_weight_is_hollow_while_counting():
    """PEFT's DoRA takes its adapter's weight as lora_B(lora_A(eye(in_features))) at every forward: the identity of
    a weight's size is hollow, and so is everything computed from it; a small one stays real."""
    with flops.hollow() as mode:
        assert mode.holds(torch.eye(256))  # 65536 elements: HOLLOW_FROM
        assert not mode.holds(torch.eye(8))
        assert torch.equal(torch.eye(8), torch.diag(torch.ones(8)))


def test_the_reference_pass_batches_rows_of_like_length_and_gives_each_rows_own_logprobs(tiny_model, tmp_path, monkeypatch):
    """Issue 24: the cached reference pass (jobs.reference_logprobs.compute) pads each batch to its longest pair; taking
    the rows shortest first, long and short rows alternating cost fewer FLOPs than in their own order, and every row
    still gets the log-probs it has scored alone (no padding), in its place."""
    from jobs import reference_logprobs

    family = "llava"
    spec = Model(name_or_path=str(tiny_model(family)), family=family, dtype="float32")
    processor = modeling.load_processor(spec)
    torch.manual_seed(0)
    model = modeling.load_model(spec, dtype=torch.float32)
    short, _, long = pairs()
    trainer = dpo_trainer(model, processor, family, tmp_path / "a", shared=False, rows=[long, short, long, short], batch=2)
    rows = trainer.train_dataset
    sorted_flops = flops.count(lambda: reference_logprobs.compute(trainer, rows, "train"))
    chosen, rejected = reference_logprobs.compute(trainer, rows, "train")

    monkeypatch.setattr(reference_logprobs, "shortest_first", lambda rows: list(range(len(rows))))
    own_order_flops = flops.count(lambda: reference_logprobs.compute(trainer, rows, "train"))
    alone = [reference_logprobs.compute(trainer, rows.select([i]), "train") for i in range(len(rows))]
    assert sorted_flops < own_order_flops, "the rows' own order pads every batch to the long row"
    assert torch.allclose(chosen, torch.cat([c for c, _ in alone]), atol=1e-5)
    assert torch.allclose(rejected, torch.cat([r for _, r in alone]), atol=1e-5)
    assert not torch.allclose(chosen[0], chosen[1]), "long and short rows differ"


def test_saved_for_backward_counts_the_activations_autograd_keeps_not_the_weights():
    """What linear layers and ReLUs keep for their backward, as autograd's formulas need them: each linear layer its
    input (for its weight's gradient; the input to the model needs none), each ReLU its output, which is the next
    layer's input, one storage; 4 bytes an element; the weights are the model's, not activations. Checkpointed, the
    first four layers keep only what enters them (torch saves a checkpointed region's inputs to recompute it)."""
    torch.manual_seed(0)
    first = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU())
    model = torch.nn.Sequential(first, torch.nn.Linear(16, 2))
    x = torch.randn(4, 8)
    assert flops.saved_for_backward(lambda: model(x).sum().backward(), model) == (4 * 8 + 4 * 16 + 4 * 16) * 4

    from torch.utils.checkpoint import checkpoint

    checkpointed = flops.saved_for_backward(
        lambda: model[1](checkpoint(first, x, use_reentrant=False)).sum().backward(), model)
    assert checkpointed == (4 * 8 + 4 * 16) * 4, "the region's input and the last layer's; the ReLUs' are recomputed"


def test_a_hollow_training_step_keeps_the_activations_the_real_one_keeps(tiny_model, tmp_path):
    """The FLOPs table's memory column (issue 24): the bytes a hollow training step saves for its backward are those
    the same step computed for real saves, without activation checkpointing and with it."""
    family = "llava"
    spec = Model(name_or_path=str(tiny_model(family)), family=family, dtype="float32")
    processor = modeling.load_processor(spec)
    torch.manual_seed(0)
    real = modeling.load_model(spec, dtype=torch.float32)

    def saved(model, folder, recompute: bool) -> int:
        trainer = dpo_trainer(model, processor, family, tmp_path / folder, shared=True, batch=2)
        if recompute:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
        return flops.training_step_activations(trainer, trainer.train_dataset.select(range(2)))

    expected = {recompute: saved(real, f"real-{recompute}", recompute) for recompute in (False, True)}
    with flops.hollow(hollow_from=1) as mode:
        model = flops.hollow_model(get_family(family).model_class, real.config, mode)
        counted = {recompute: saved(model, f"hollow-{recompute}", recompute) for recompute in (False, True)}
    assert counted == expected
    assert expected[True] < expected[False], "checkpointing keeps less"


def test_a_counted_step_runs_layer_norms_in_float32_as_cuda_autocast_does():
    """Under bf16 autocast CUDA runs layer_norm in float32 (torch's amp docs, "CUDA Ops that can autocast to
    float32"); a CPU runs it in bf16. What the FLOPs table counts a GPU's step to keep is what CUDA's policy keeps: a
    bf16 layer norm then linear layer keep the norm's input cast to float32, its float32 mean and 1/std (one a row)
    and the float32 casts of its weight and bias, and the linear layer's input cast back to bf16. Without the policy
    the CPU keeps less. Checkpointed, the region's recomputation in the backward runs the norm as its forward did
    (torch checks that it recomputes tensors of the same dtypes)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    rows, width = 4, 8
    model = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, 2)).to(torch.bfloat16)
    x = torch.randn(rows, width, dtype=torch.bfloat16)

    def step(recompute: bool = False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = checkpoint(model, x, use_reentrant=False) if recompute else model(x)
            out.float().sum().backward()

    original = torch.nn.functional.layer_norm
    with flops.cuda_autocast_norms():
        as_on_cuda = flops.saved_for_backward(step, model)
        assert flops.saved_for_backward(lambda: step(recompute=True), model) == rows * width * 2, "the region's input"
        assert torch.nn.functional.layer_norm(x, (width,)).dtype == torch.bfloat16, "no autocast, no cast"
    assert as_on_cuda == rows * width * 4 + 2 * rows * 4 + 2 * width * 4 + rows * width * 2
    assert flops.saved_for_backward(step, model) < as_on_cuda
    assert torch.nn.functional.layer_norm is original, "put back"


def test_a_norm_that_goes_around_the_float32_swap_fails_the_count_loudly():
    """cuda_autocast_norms swaps torch.nn.functional's norms; a norm that calls torch's own op directly would run in
    bf16 unseen, and the count would leave its float32 copy out. It fails instead, naming the op."""
    class DirectLayerNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return torch.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    x = torch.randn(2, 8, dtype=torch.bfloat16)
    norms = [torch.nn.LayerNorm(8).to(torch.bfloat16), DirectLayerNorm(8).to(torch.bfloat16)]
    with flops.cuda_autocast_norms():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert norms[0](x).dtype == torch.float32, "through the swap: float32, as on CUDA"
            with pytest.raises(RuntimeError, match="layer_norm ran in torch.bfloat16 under autocast"):
                norms[1](x)
        assert norms[1](x).dtype == torch.bfloat16, "without autocast a bf16 norm is what CUDA runs too"


def test_a_qlora_recipes_hollow_model_gets_the_adapter_dtypes_its_4bit_base_gets(tiny_model, tmp_path):
    """The FLOPs table counts a step's activations in the dtypes the stage trains in on a bf16 GPU. A QLoRA recipe's
    hollow model, loaded as jobs.flops.hollow_model loads it, is given by TRL the adapter dtypes that the same model
    loaded in 4 bits by bitsandbytes, as the stage loads it (jobs.modeling), is given: the LoRA matrices cast to bf16,
    DoRA's magnitudes left float32. Counted with float32 adapters (peft's default for a base it does not know to be
    quantised), SmolVLM DPO's step kept twice the activations."""
    from jobs.recipe import Train

    family = "idefics3"
    spec = Model(name_or_path=str(tiny_model(family)), family=family, dtype="bfloat16")
    train = Train(method="qlora")
    precision = modeling.training_precision(spec, train, bf16_gpu=True)
    processor = modeling.load_processor(spec)
    real = modeling.load_model(spec, quantize=modeling.quantization(train), dtype=precision.weights)
    assert real.is_loaded_in_4bit

    def adapter_dtypes(model, folder: str) -> dict:
        trainer = dpo_trainer(model, processor, family, tmp_path / folder, shared=True, dora=True)
        return {name: p.dtype for name, p in trainer.model.named_parameters() if p.requires_grad}

    expected = adapter_dtypes(real, "real")
    assert set(expected.values()) == {torch.bfloat16, torch.float32}
    with flops.hollow(hollow_from=1) as mode:
        hollow = flops.hollow_model(get_family(family).model_class, real.config, mode, precision, four_bit=True)
        assert adapter_dtypes(hollow, "hollow") == expected
        plain = flops.hollow_model(get_family(family).model_class, real.config, mode, precision)
        assert set(adapter_dtypes(plain, "plain").values()) == {torch.float32}, "unmarked, peft keeps them float32"


def evaluations_transformers_runs(steps: int, eval_steps: int, tmp_path) -> int:
    """How many evaluations transformers' own DefaultFlowCallback asks for over ``steps`` optimizer steps."""
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import DefaultFlowCallback

    args = TrainingArguments(output_dir=str(tmp_path), eval_strategy="steps", eval_steps=eval_steps, use_cpu=True,
                             report_to=[])
    state = TrainerState(max_steps=steps)
    state.compute_steps(args, steps)
    flow, evaluations = DefaultFlowCallback(), 0
    for step in range(1, steps + 1):
        state.global_step = step
        evaluations += flow.on_step_end(args, state, TrainerControl()).should_evaluate
    return evaluations


@pytest.mark.parametrize("name", ["qwen2-vl-7b SFT", "SmolVLM SFT", "SmolVLM DPO"])
def test_the_table_schedules_an_epochs_evaluations_as_the_trainer_does(name, tmp_path):
    """make bench's FLOPs table scales a counted evaluation by the evaluations an epoch runs: as many as transformers'
    callback asks for (the last step's included, which the table once left out), each over the rows the stage hands
    the trainer (SFT's default eval loss: the split's first 64; the seed script's, or an evaluation the recipe asks
    for: all)."""
    from jobs import checkpoints
    from jobs import recipe as recipes
    from tests.bench import flops_table

    checkpoint, stage = checkpoints.SEEDS[name]
    cfg = recipes.load(Path(__file__).parents[1] / checkpoint.recipe)
    for seed_defaults in (False, True):
        sched = flops_table.schedule(cfg, stage, checkpoint, seed_defaults=seed_defaults)
        args = getattr(cfg, stage).args
        if args.get("eval_strategy") == "steps":
            assert sched["evals"] == evaluations_transformers_runs(sched["steps"], args["eval_steps"], tmp_path)
            assert sched["eval_rows"] == checkpoint.rows["eval"]
        elif stage == "sft" and not seed_defaults:  # the stage's default: every save_steps
            assert sched["evals"] == evaluations_transformers_runs(sched["steps"], args["save_steps"], tmp_path)
            assert sched["eval_rows"] == 64 < checkpoint.rows["eval"]
        else:
            assert sched["evals"] == 0
