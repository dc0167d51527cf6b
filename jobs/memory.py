"""Memory arithmetic before training, as the DPO blog does it: weights, a reference copy, gradients
and AdamW's two states per trainable parameter. Activations come on top; they depend on batch size
and sequence length and are left to measurement (``make bench``).

    8B parameters, fp32, full fine-tune with a reference copy: 32 + 32 + 32 + 64 = 160 GB
    8B parameters, bf16, LoRA (55.3M trainable), reference counted: 16 + 16 + 0.11 + 0.22 = 32.3 GB

With LoRA vlmjobs takes the reference by switching the adapter off, so it holds no second copy.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9  # the blog's gigabytes


@dataclass(frozen=True)
class Estimate:
    model: float  # GB of weights
    reference: float  # GB of a second, frozen copy for DPO's reference
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.model + self.reference + self.gradients + self.optimizer

    def __str__(self) -> str:
        return (
            f"model {self.model:.3g} GB + reference {self.reference:.3g} GB + gradients {self.gradients:.3g} GB"
            f" + optimizer {self.optimizer:.3g} GB = {self.total:.3g} GB"
        )


def parts(stored_bytes: float, trainable: float, trainable_bytes: float, *, reference_copy: bool) -> Estimate:
    """The blog's formula: the weights as stored (and again for a reference copy), gradients and AdamW's two
    states in the trainable parameters' precision."""
    model = stored_bytes / GB
    return Estimate(
        model=model,
        reference=model if reference_copy else 0.0,
        gradients=trainable * trainable_bytes / GB,
        optimizer=2 * trainable * trainable_bytes / GB,
    )


def arithmetic(parameters: float, trainable: float, bytes_per_parameter: float, *, reference_copy: bool) -> Estimate:
    """The blog's arithmetic: every part in the training precision."""
    return parts(parameters * bytes_per_parameter, trainable, bytes_per_parameter, reference_copy=reference_copy)


def estimate(model, *, trainable: int, reference_copy: bool) -> Estimate:
    """The same arithmetic for a loaded model, taking the bytes its weights really occupy (4-bit included)."""
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable_bytes = next((p.element_size() for p in model.parameters() if p.requires_grad), 4)
    return parts(stored, trainable, trainable_bytes, reference_copy=reference_copy)


def for_stage(recipe, stage: str) -> tuple[Estimate, dict]:
    """The arithmetic for a training stage of a recipe from the model's config alone, before any weight is
    loaded or GPU asked for: parameters counted on the meta device, LoRA applied there too.
    Returns the estimate and the counts it was made from."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from jobs.families import get_family
    from jobs.modeling import lora_config, resolve_dtype, user_errors

    family = get_family(recipe.model.family)
    train = getattr(recipe, stage)
    with user_errors(recipe.model.name_or_path, recipe.model.revision):
        config = AutoConfig.from_pretrained(recipe.model.name_or_path, revision=recipe.model.revision)
    with init_empty_weights():
        model = getattr(transformers, family.model_class)._from_config(config)
    total = sum(p.numel() for p in model.parameters())
    # bitsandbytes stores every Linear but the output head in 4 bits; the rest stays in the compute dtype
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    if train.method == "full":
        trainable = total
    else:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(train, family))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dtype = resolve_dtype(recipe.model.dtype) if recipe.model.dtype != "auto" else torch.bfloat16  # auto on a GPU
    width = dtype.itemsize
    stored = (linear * 0.5 + (total - linear) * width) if train.method == "qlora" else total * width
    estimate = parts(stored, trainable, width, reference_copy=stage == "dpo" and train.method == "full")
    return estimate, {"parameters": total, "trainable": trainable, "dtype": str(dtype).removeprefix("torch.")}
