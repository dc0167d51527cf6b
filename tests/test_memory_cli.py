"""`vlmjobs memory` as a check (issue 13, item 6): exit 2 when a stage does not fit, naming the GPU it checked
(resources.gpu_memory_gib, not a product name of another size) and what would fit."""

from __future__ import annotations

import pytest

from jobs import memory
from jobs import recipe as recipes
from jobs.contract import UserError
from launcher import cli


def test_a_stage_that_does_not_fit_fails_naming_the_gpu_checked_and_what_would_fit(write_recipe, capsys):
    path = write_recipe(sft={"method": "full"}, resources={"gpu_product": "NVIDIA-H100-80GB-HBM3", "gpu_memory_gib": 80})
    full = memory.for_stage(recipes.load(path), "sft")[0].total
    lora = memory.for_stage(recipes.load(path, {"sft.method": "lora"}), "sft")[0].total
    qlora = memory.for_stage(recipes.load(path, {"sft.method": "qlora"}), "sft")[0].total
    assert qlora < lora < full
    between = (lora + full) / 2 * memory.GB / 2**30  # GiB where LoRA fits and full fine-tuning does not

    with pytest.raises(UserError, match=r"^memory: sft needs .* GB before activations, more than the GPU checked"):
        cli.memory(str(path), **{"resources.gpu_memory_gib": between})
    out = capsys.readouterr().out
    assert f"does NOT fit in one GPU of {between:g} GiB (resources.gpu_memory_gib)" in out
    assert "NVIDIA-H100-80GB-HBM3 names a 80 GB GPU, but resources.gpu_memory_gib is" in out
    assert f"--sft.method=lora: {lora:.3g} GB, fits" in out and f"--sft.method=qlora: {qlora:.3g} GB, fits" in out
    assert "a GPU of 16 GiB or more: --sft.resources.gpu_memory_gib=16" in out
    assert "--sft.args.per_device_train_batch_size=1" in out


def test_a_stage_that_fits_says_so_and_exits_0(write_recipe, capsys):
    path = write_recipe(sft={"method": "lora"}, resources={"gpu_product": "NVIDIA-H100-80GB-HBM3", "gpu_memory_gib": 80})
    cli.memory(str(path))
    assert "fits in one NVIDIA-H100-80GB-HBM3 of 80 GiB (85.9 GB) before activations" in capsys.readouterr().out
