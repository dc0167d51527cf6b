"""Counted FLOPs (issue 24): the hollow run that lets `make bench` count a 7B model's step on a CPU counts what the
same step computed for real counts, on the tiny models."""

from __future__ import annotations

import pytest
import torch
from trl import DPOConfig, DPOTrainer

from jobs import flops, modeling
from jobs.families import get_family
from jobs.recipe import Model
from tests.test_shared_prefix import pairs


def dpo_trainer(model, processor, family, tmp_path, *, shared: bool):
    from datasets import Dataset
    from peft import LoraConfig

    from jobs import shared_prefix

    fam = get_family(family)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=1, report_to=[], use_cpu=True,
                     max_length=None, save_strategy="no", gradient_checkpointing=True, disable_tqdm=True)
    trainer_class = shared_prefix.SharedPrefixDPOTrainer if shared else DPOTrainer
    trainer = trainer_class(
        model=model, ref_model=None, args=args, train_dataset=fam.close_answers(Dataset.from_list(pairs()), processor),
        processing_class=fam.rendering_processor(processor),
        peft_config=LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.data_collator = fam.collator(trainer.data_collator, processor)
    return trainer


@pytest.mark.parametrize("family, shared", [("qwen2_vl", False), ("llava", True)], ids=["trl-qwen2_vl", "shared-prefix-llava"])
def test_a_hollow_training_step_counts_what_the_real_one_computes(family, shared, tiny_model, tmp_path):
    """One DPO step (forward with TRL's fused head, the reference with the adapter off, activation checkpointing's
    recomputation, LoRA's backward) counted computed for real, then on a hollow copy of the same model: the same FLOPs,
    and the hollow weights never took a value."""
    spec = Model(name_or_path=str(tiny_model(family)), family=family, dtype="float32")
    processor = modeling.load_processor(spec)
    torch.manual_seed(0)
    real = modeling.load_model(spec, dtype=torch.float32)
    expected = flops.count(dpo_trainer(real, processor, family, tmp_path / "real", shared=shared).train)

    with flops.hollow(hollow_from=1) as mode:  # every floating weight hollow, as a 7B model's large ones are
        model = flops.hollow_model(get_family(family).model_class, real.config, mode)
        weights = [p for p in model.parameters()]
        assert weights and all(mode.holds(p) for p in weights)
        counted = flops.count(dpo_trainer(model, processor, family, tmp_path / "hollow", shared=shared).train)
    assert counted == expected > 0
