"""Training precision (issue 11, item 3): with model.dtype bf16, full fine-tuning keeps fp32 master weights, gradients
and AdamW states under bf16 autocast unless the recipe asks for pure_bf16; LoRA keeps the base bf16 and the adapter,
its gradients and AdamW states fp32 (peft's default). Checked on what the sft stage wrote after one optimizer step (its
checkpoint's weights and optimizer states) and against the arithmetic it printed, which must be `vlmjobs memory`'s."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors import safe_open

from jobs import memory, sft
from jobs import recipe as recipes
from jobs.contract import UserError

CASES = [
    pytest.param({"method": "full"}, "model.safetensors", torch.float32, id="full-fp32-master-weights"),
    pytest.param({"method": "full", "pure_bf16": True}, "model.safetensors", torch.bfloat16, id="full-pure-bf16"),
    pytest.param({"method": "lora", "lora": {"r": 4, "lora_alpha": 8}}, "adapter_model.safetensors", torch.float32,
                 id="lora-fp32-adapter"),
]


def with_model_dtype(path, dtype: str):
    recipe = yaml.safe_load(path.read_text())
    recipe["model"]["dtype"] = dtype
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.parametrize("section, weights_file, trained_dtype", CASES)
def test_trained_weights_and_adamw_states_after_one_step_on_a_bf16_recipe(
    section, weights_file, trained_dtype, write_recipe, capsys
):
    args = {"max_steps": 1, "save_steps": 1, "per_device_train_batch_size": 2, "logging_steps": 1}
    path = with_model_dtype(write_recipe(prepare={"max_rows": 8}, sft={**section, "args": args}), "bfloat16")
    recipe = recipes.load(path)
    from jobs import prepare

    prepare.main(recipe=str(path))
    sft.main(recipe=str(path))

    checkpoint = recipe.run_dir / "sft" / "checkpoints" / "checkpoint-1"
    with safe_open(checkpoint / weights_file, "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {str(trained_dtype).removeprefix("torch.").replace("float32", "F32").replace("bfloat16", "BF16")}
    states = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert states and {s[k].dtype for s in states.values() for k in ("exp_avg", "exp_avg_sq")} == {trained_dtype}

    estimate, _ = memory.for_stage(recipe, "sft")  # vlmjobs memory, from the config alone
    assert f"sft: memory before activations, per process: {estimate}" in capsys.readouterr().out


def test_pure_bf16_is_for_full_fine_tuning_with_a_bf16_model_only(write_recipe):
    with pytest.raises(UserError) as error:
        recipes.load(with_model_dtype(write_recipe(sft={"method": "full", "pure_bf16": True},
                                                   dpo={"method": "lora", "pure_bf16": True}), "float16"))
    assert "dpo.pure_bf16: only full fine-tuning has master weights to keep in bf16; lora's adapter stays fp32" in str(error.value)
    assert "sft.pure_bf16: trains bf16 weights, but model.dtype is float16; set auto or bfloat16" in str(error.value)


@pytest.mark.parametrize(
    "train, bf16_gpu, expected",
    [
        pytest.param({"method": "full"}, True, ("float32", "float32", "bfloat16"), id="full-on-a-bf16-gpu"),
        pytest.param({"method": "full", "pure_bf16": True}, True, ("bfloat16",) * 3, id="full-pure-bf16"),
        pytest.param({"method": "lora"}, True, ("bfloat16", "float32", "bfloat16"), id="lora-on-a-bf16-gpu"),
        pytest.param({"method": "qlora"}, True, ("bfloat16",) * 3, id="qlora-adapter-cast-to-bf16-by-trl"),
        pytest.param({"method": "full"}, False, ("float32",) * 3, id="full-without-a-bf16-gpu"),
    ],
)
def test_model_dtype_auto_gives_each_method_its_precision(train, bf16_gpu, expected):
    """(weights loaded, trainable parameters and their states, autocast) with model.dtype auto."""
    from jobs.modeling import training_precision
    from jobs.recipe import Model, Train

    precision = training_precision(Model(name_or_path="org/m", family="llava"), Train(**train), bf16_gpu=bf16_gpu)
    assert tuple(str(d).removeprefix("torch.") for d in (precision.weights, precision.trainable, precision.compute)) == expected
