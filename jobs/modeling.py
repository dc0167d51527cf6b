"""Loading processors and models the same way in every stage, from a hub id or a local folder.

A trained stage's ``model/`` folder carries ``lineage.json`` saying how to rebuild it: which weights
it starts from, which adapters were merged into them, and which adapter sits on top. Paths in it
are relative to the run folder, so a run folder can move between a laptop and a cluster volume.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.contract import UserError, read_json
from jobs.families import FAMILIES, Family, family_of, get_family
from jobs.recipe import Model, Recipe, Train

LINEAGE_FILE = "lineage.json"
BASE = "base"  # lineage["base"] naming the recipe's base model rather than a run folder path


def resolve_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


@dataclass(frozen=True)
class Precision:
    """The dtypes of a training stage, decided here only (the stages load and configure with it, ``vlmjobs memory``
    counts with it)."""

    weights: Any  # torch dtype the model is loaded in
    trainable: Any  # of the trained parameters, hence of their gradients and AdamW states
    compute: Any  # autocast dtype (TrainingArguments bf16 / fp16); float32 means none

    def __str__(self) -> str:
        parts = ("weights", "trainable", "compute")
        return ", ".join(f"{part} {str(getattr(self, part)).removeprefix('torch.')}" for part in parts)


def training_precision(spec: Model, train: Train, *, bf16_gpu: bool | None = None) -> Precision:
    """Full fine-tuning: fp32 master weights under autocast in model.dtype (bf16 on a GPU that has it, with ``auto``),
    unless ``pure_bf16``; the blog's 160 GB arithmetic assumes these. LoRA: the frozen base in model.dtype, the adapter
    in fp32 (peft's autocast_adapter_dtype). QLoRA: TRL casts the adapter to bf16, as the QLoRA paper does.
    ``bf16_gpu`` says whether ``auto`` means bf16 (default: whether this machine has such a GPU)."""
    import torch

    if bf16_gpu is None:
        bf16_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    compute = (torch.bfloat16 if bf16_gpu else torch.float32) if spec.dtype == "auto" else getattr(torch, spec.dtype)
    if train.method == "full":
        if train.pure_bf16:
            return Precision(weights=torch.bfloat16, trainable=torch.bfloat16, compute=torch.bfloat16)
        return Precision(weights=torch.float32, trainable=torch.float32, compute=compute)
    adapter = torch.bfloat16 if train.method == "qlora" else torch.float32
    return Precision(weights=compute, trainable=adapter, compute=compute)


def load_processor(spec: Model, path: str | Path | None = None):
    """The processor of the base model (or of a saved stage output), with the family's options and, for a
    checkpoint that ships none, the family's chat template."""
    from transformers import AutoProcessor

    family = get_family(spec.family)
    kwargs = {**family.processor_kwargs, **spec.processor}
    source = str(path or spec.name_or_path)
    processor_class = AutoProcessor
    if family.prefix_lm:
        from jobs.prefix_lm import PrefixLMProcessor as processor_class
    if family.cross_attention:
        from jobs.cross_attention import CrossAttentionProcessor as processor_class
    with user_errors(source, None if path else spec.revision):
        processor = processor_class.from_pretrained(source, revision=None if path else spec.revision, **kwargs)
    if processor.chat_template is None and family.chat_template:
        processor.chat_template = family.chat_template
    return processor


def load_model(spec: Model, *, path: str | Path | None = None, quantize: dict | None = None, dtype=None, device_map=None):
    """The family's model class from a hub id or folder; ``quantize`` holds BitsAndBytesConfig fields for 4-bit.

    Training leaves placement to the Trainer (one process per GPU); evaluation and merging pass
    ``device_map="auto"`` to spread one model over the GPUs the pod has (or keep it on the CPU).
    """
    import torch
    import transformers
    from transformers import AutoConfig, BitsAndBytesConfig

    family = get_family(spec.family)
    source = str(path or spec.name_or_path)
    revision = None if path else spec.revision
    with user_errors(source, revision):
        config = AutoConfig.from_pretrained(source, revision=revision)
    if config.model_type not in family.model_types:
        match = family_of(config.model_type)
        fix = (f"set model.family: {match.name}" if match else f"no supported family has {config.model_type} models; "
               f"adding one is a row of jobs/families.py and a tiny model in jobs/tiny.py (README: Adding a family)")
        raise UserError(
            f"model {source} is a {config.model_type} model, but the recipe says family {family.name} "
            f"({family.model_class}); {fix} (supported: {', '.join(FAMILIES)})"
        )
    dtype = dtype or resolve_dtype(spec.dtype)
    kwargs = {"dtype": dtype, "revision": revision}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantize is not None:
        compute = torch.bfloat16 if dtype == torch.float32 and torch.cuda.is_available() else dtype
        kwargs["quantization_config"] = BitsAndBytesConfig(
            **{"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
               "bnb_4bit_compute_dtype": compute, **quantize}
        )
        # bitsandbytes places weights at load time; each process takes its own GPU
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            print(f"warning: model {source} in 4 bits without CUDA: bitsandbytes' CPU fallback runs it, far slower "
                  "than a GPU (fine for a test, not for a real run)", file=sys.stderr, flush=True)
        kwargs["device_map"] = {"": device}
    model_class = getattr(transformers, family.model_class)
    with user_errors(source, revision):
        model = model_class.from_pretrained(source, **kwargs)
    if quantize is not None and not torch.cuda.is_available():
        # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight for its bf16 kernel at the first forward
        # in eval mode, and its dequantize_4bit, which peft's DoRA and transformers' dequantize call, then misreads
        # it (a DoRA model scored garbage). The plain path dequantizes per call, in the compute dtype.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def lora_config(train: Train, family: Family):
    """peft's LoraConfig from the recipe, target modules defaulting to the family's."""
    from peft import LoraConfig

    fields = {"target_modules": _listify(family.lora_target_modules), "task_type": "CAUSAL_LM", **train.lora}
    return LoraConfig(**fields)


def quantization(train: Train, *, sharded: bool = False, dtype=None) -> dict | None:
    """BitsAndBytesConfig fields for qlora, else None. Sharded, the 4-bit weights are packed into ``dtype`` (the
    weights' dtype) rather than bytes, so that FSDP shards them like every other weight (peft's and accelerate's
    FSDP-QLoRA recipe); accelerate leaves byte-packed ones out of the shards, whole on every GPU."""
    if train.method != "qlora":
        return None
    fields = dict(train.quantization)
    if sharded:
        fields.setdefault("bnb_4bit_quant_storage", dtype)
    return fields


# ---------------------------------------------------------------------------------------------
# Trained models in the run folder


def write_lineage(model_dir: Path, *, base: str = BASE, merged: list[str] = (), adapter: str | None = None) -> None:
    (Path(model_dir) / LINEAGE_FILE).write_text(
        json.dumps({"base": base, "merged": list(merged), "adapter": adapter}, indent=2) + "\n"
    )


def read_lineage(run_dir: Path, stage: str) -> dict:
    path = Path(run_dir) / stage / "model" / LINEAGE_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: the {stage} stage's output has no model")
    return read_json(path)


def load_trained(
    recipe: Recipe, run_dir: Path, stage: str, *, quantize: dict | None = None, merge: bool = False,
    trainable: bool = False, dtype=None, device_map=None,
):
    """Rebuild the model a stage trained: its starting weights, merged adapters, and its own adapter.

    With ``merge`` the top adapter is folded in too; with ``trainable`` it stays trainable; with ``quantize`` the
    weights under the top adapter (or, merged, all of them) are loaded in 4-bit, as a QLoRA stage trains on them.

    Every adapter is merged into the weights it was trained against (issue 11): a QLoRA stage's adapter into its
    base's NF4 weights dequantized (transformers' ``dequantize``), not into the original ones. NF4 rounds each weight
    to one of 16 levels scaled by its 64-weight block's largest magnitude; the adapter learnt to correct the model
    that rounding gave, so merged into the originals it yields a model nobody trained or evaluated. Merging into
    the dequantized weights gives, up to float rounding, the very model evaluate scored (merge_push checks it), at
    the price of shipping the NF4 rounding in full-precision weights. Merges happen in ``dtype``, never in 4-bit.
    """
    from peft import PeftModel

    lineage = read_lineage(run_dir, stage)
    dtype = dtype or resolve_dtype(recipe.model.dtype)
    base_path = None if lineage["base"] == BASE else Path(run_dir) / lineage["base"]
    merges = [Path(run_dir) / p for p in lineage["merged"]]
    adapter = Path(run_dir) / lineage["adapter"] if lineage["adapter"] else None
    if merge and adapter:
        merges, adapter = merges + [adapter], None
    model = None  # None: the starting weights, not loaded yet (so a 4-bit load reads them straight from disk)
    for path in merges:
        trained_against = quantization(_trainer_of(recipe, run_dir, path))
        if trained_against is not None:
            model = dequantized(_in_4bit(model, recipe, run_dir, base_path, trained_against, dtype, device_map), dtype)
        model = model or load_model(recipe.model, path=base_path, dtype=dtype, device_map=device_map)
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    if quantize is not None:
        model = _in_4bit(model, recipe, run_dir, base_path, quantize, dtype, device_map)
    model = model or load_model(recipe.model, path=base_path, dtype=dtype, device_map=device_map)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    return model


def _trainer_of(recipe: Recipe, run_dir: Path, adapter: Path) -> Train:
    """The recipe section of the stage that trained an adapter in the run folder (``<run>/<stage>/model``)."""
    return getattr(recipe, Path(adapter).relative_to(run_dir).parts[0])


def _in_4bit(model, recipe: Recipe, run_dir: Path, base_path, quantize: dict, dtype, device_map):
    """The weights in 4-bit: loaded so when still on disk, else saved and reloaded (bitsandbytes quantizes at load).
    With several processes (one per GPU) the main one writes the copy while the others wait for it; all load it; the
    main one deletes it once every process has. The processes are the ones the stage's TrainingArguments set up (built
    before this is called)."""
    if model is None:
        return load_model(recipe.model, path=base_path, quantize=quantize, dtype=dtype, device_map=device_map)
    from accelerate import PartialState

    state = PartialState()
    scratch = Path(run_dir) / ".merged-scratch"
    if state.is_main_process:
        shutil.rmtree(scratch, ignore_errors=True)  # left by an attempt that died here
        model.save_pretrained(scratch)
    state.wait_for_everyone()
    model = load_model(recipe.model, path=scratch, quantize=quantize, dtype=dtype, device_map=device_map)
    state.wait_for_everyone()
    if state.is_main_process:
        shutil.rmtree(scratch)
    return model


def dequantized(model, dtype):
    """A 4-bit model with its weights as the full-precision values its NF4 codes stand for (transformers' dequantize,
    bitsandbytes' dequantize_4bit: the same values its 4-bit layers compute with)."""
    model = model.dequantize(dtype=dtype)
    # transformers 5.23 leaves the flag set, and TRL's trainers and peft read it to treat the model as 4-bit
    model.is_loaded_in_4bit = False
    return model


def is_adapter(model_dir: Path) -> bool:
    return (Path(model_dir) / "adapter_config.json").is_file()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting 4-bit packed weights as the parameters they hold."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * 2 if p.dtype.itemsize == 1 and hasattr(p, "quant_state") else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


@contextmanager
def user_errors(source: str, revision: str | None = None):
    """Turn 'no such folder, repo or revision', a gated repo without a token, an unreachable hub into one line
    naming the model and the fix (``jobs.hub``): UserError for the recipe or the token, Failure for the network."""
    from jobs import hub

    try:
        yield
    except Exception as error:
        looks_like_path = source.startswith((".", "/", "~")) or source.count("/") != 1
        if looks_like_path and not Path(source).exists():
            raise UserError(f"model {source}: no such folder (nor a hub id, which is org/name)") from None
        if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
            raise UserError(f"model {source}: the folder holds no config.json, so it is not a saved model "
                            "(save_pretrained writes one beside the weights)") from None
        if Path(source).exists():
            raise
        problem = hub.problem(error, "model", source, revision)
        if problem is not None:
            raise problem from None
        raise


def _listify(value):
    return list(value) if isinstance(value, tuple) else value
