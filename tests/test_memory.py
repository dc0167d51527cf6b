"""The memory arithmetic against the DPO blog's own numbers for Idefics2-8B."""

from __future__ import annotations

import pytest
import torch

from jobs.memory import Estimate, arithmetic, estimate


def test_full_fp32_fine_tune_with_a_reference_copy_is_the_blogs_160_gb():
    parts = arithmetic(8e9, 8e9, 4, reference_copy=True)
    assert (parts.model, parts.reference, parts.gradients, parts.optimizer) == (32, 32, 32, 64)
    assert parts.total == 160


def test_bf16_lora_is_the_blogs_32_3_gb_and_half_that_without_a_second_copy():
    blog = arithmetic(8e9, 55.3e6, 2, reference_copy=True)  # 55,348,736 trainable in the blog's LoRA
    assert blog.total == pytest.approx(32.3, abs=0.05)
    ours = arithmetic(8e9, 55.3e6, 2, reference_copy=False)  # the reference is the adapter switched off
    assert ours.total == pytest.approx(16.3, abs=0.05)


def test_estimate_of_a_loaded_model_counts_the_bytes_its_weights_take():
    model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 10)).to(torch.bfloat16)
    model[1].requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts = estimate(model, trainable=trainable, reference_copy=False)
    assert parts.model == pytest.approx((10100 + 1010) * 2 / 1e9)
    assert parts.gradients == pytest.approx(10100 * 2 / 1e9) and parts.optimizer == pytest.approx(2 * 10100 * 2 / 1e9)
    assert str(Estimate(1, 0, 0.5, 1)) == "model 1 GB + reference 0 GB + gradients 0.5 GB + optimizer 1 GB = 2.5 GB"
