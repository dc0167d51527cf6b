"""A shipped recipe's tiny twin: the same recipe on the tiny model of its family and on synthetic data in the
formats of its sources, shrunk to run every stage on a CPU in seconds. The tests run every shipped recipe's twin,
so a recipe cannot rot unnoticed: an SFTConfig key TRL dropped, a LoRA target its family lacks, a split name
its data set does not have, a quirk of its family that breaks a stage.

    twin(yaml.safe_load(open("recipes/idefics2-8b-rlaif-v-dpo.yaml")), tiny_model, synthetic_data, run_root)

What the twin changes, and nothing else (``CHANGED`` lists the keys; the tests hold every other key equal):
- model.name_or_path: the tiny model of model.family (jobs.tiny), a local folder, so model.revision goes too.
- data.<kind>.path: synthetic data in data.<kind>.format (jobs.synthetic); a hub config name and revision go, and
  each split keeps its name but not its slice ("train[:10%]" -> "train"): a slice is a size, and 1% of a small
  synthetic split can be no rows. prepare.max_rows caps every split instead.
- LoRA rank: 8 at most. The tiny models are 64 wide: a rank-64 adapter on every linear layer would outweigh the model
  it adapts, and `vlmjobs memory` could no longer tell an adapter from full fine-tuning.
- sizes: one optimizer step of a batch of 2 at most (per process, for ``effective_batch_size``), no accumulation,
  logging/eval/save intervals of one step (so that each of them runs once), a few evaluation samples and new tokens.
- parallelism: no data-processing or DataLoader worker processes; the recipe's 32 on a 2-core test machine
  would only spend the seconds the twin is meant to save.
- evaluate.benchmarks: each keeps its name and format, its files become synthetic ones in that benchmark's
  released layout (jobs.synthetic), and it is cut to a few questions.
- merge_push.push: off, so a twin never reaches the hub.
- run.root: where the test wants the run folder.
Resources and kubernetes are left alone: the local runner ignores them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

STEPS = 1  # optimizer steps per training stage
LORA_RANK = 8  # at most (issue 20's recipes ask for 32 and 64)
BATCH = 2  # at most, per device
ROWS = 12  # per split, after prepare's conversion
SAMPLES = 2  # evaluated per test split
NEW_TOKENS = 4
INTERVALS = ("logging_steps", "eval_steps", "save_steps")
WORKERS = ("dataloader_num_workers", "dataset_num_proc")
CHANGED = (  # dotted keys a twin may change; "*" stands for sft or dpo
    "model.name_or_path", "model.revision", "model.parameters",
    "data.*.path", "data.*.name", "data.*.revision", "data.*.train_split", "data.*.eval_split", "data.*.test_split",
    "prepare.max_rows", "prepare.num_proc",
    "*.args.max_steps", "*.args.per_device_train_batch_size", "*.args.per_device_eval_batch_size",
    "*.lora.r", "*.args.gradient_accumulation_steps", "*.effective_batch_size", *(f"*.args.{key}" for key in INTERVALS + WORKERS),
    "evaluate.max_samples", "evaluate.max_new_tokens", "evaluate.batch_size", "evaluate.benchmarks",
    "merge_push.push", "run.root",
)


def twin(
    recipe: dict, tiny_model: Callable[[str], Path], synthetic_data: Callable[[str], Path], run_root: Path
) -> dict:
    """The tiny twin of a recipe as read from its YAML; ``tiny_model(family)`` and ``synthetic_data(format)``
    give the folders to use."""
    data = copy.deepcopy(recipe)
    model = data["model"]
    model["name_or_path"] = str(tiny_model(model["family"]))
    model.pop("revision", None)
    model.pop("parameters", None)  # the real checkpoint's count, which sizes its pods; not the tiny model's

    for source in (data.get("data") or {}).values():
        if source is None:
            continue
        source["path"] = str(synthetic_data(source["format"]))
        source.pop("name", None)
        source.pop("revision", None)
        for split in ("train_split", "eval_split", "test_split"):
            if source.get(split):
                source[split] = re.sub(r"\[.*\]$", "", source[split])

    data["prepare"] = {**data.get("prepare", {}), "max_rows": ROWS, "num_proc": 1}
    for stage in ("sft", "dpo"):
        if stage in data:
            data[stage]["args"] = _shrunk_args(data[stage].get("args", {}))
            if data[stage].get("lora", {}).get("r", 0) > LORA_RANK:
                data[stage]["lora"]["r"] = LORA_RANK
            if "effective_batch_size" in data[stage]:  # per_device_train_batch_size: auto; a multiple of the processes
                resources = {**data.get("resources", {}), **data[stage].get("resources", {})}
                processes = max(resources.get("gpus", 1), 1) * resources.get("nodes", 1)
                data[stage]["effective_batch_size"] = min(data[stage]["effective_batch_size"], BATCH * processes)
    evaluate = data.setdefault("evaluate", {})
    evaluate["max_samples"] = SAMPLES
    evaluate["max_new_tokens"] = min(evaluate.get("max_new_tokens", NEW_TOKENS), NEW_TOKENS)
    evaluate["batch_size"] = min(evaluate.get("batch_size", BATCH), BATCH)
    evaluate["benchmarks"] = [_synthetic_benchmark(bench, synthetic_data) for bench in evaluate.get("benchmarks", [])]
    data.setdefault("merge_push", {})["push"] = False
    data.setdefault("run", {})["root"] = str(run_root)
    return data


def _synthetic_benchmark(bench: dict, synthetic_data: Callable[[str], Path]) -> dict:
    """The entry pointed at synthetic files of its format, where the benchmark's repository keeps them."""
    folder = Path(synthetic_data(bench["format"]))
    if bench["format"] == "amber":
        files = {"path": folder / "data" / "query" / "query_discriminative.json",
                 "annotations": folder / "data" / "annotations.json", "images": folder / "image"}
    else:  # pope: the same subset's question file, over the synthetic val2014
        files = {"path": folder / "output" / "coco" / Path(bench["path"]).name, "images": folder / "val2014"}
    return {**bench, **{key: str(value) for key, value in files.items()}, "max_samples": SAMPLES}


def _shrunk_args(args: dict) -> dict:
    auto = args.get("per_device_train_batch_size") == "auto"  # the stage sets the accumulation (jobs.auto_batch)
    args = {**args, "max_steps": STEPS, **({} if auto else {"gradient_accumulation_steps": 1})}
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        if args.get(key) != "auto":
            args[key] = min(args.get(key, BATCH), BATCH)
    for key in INTERVALS:
        if key in args:
            args[key] = min(args[key], STEPS)
    for key in WORKERS:
        args.pop(key, None)
    return args


def changed_keys(original: dict, twin_: dict) -> set[str]:
    """Dotted keys whose values differ between a recipe and its twin, sft/dpo written as "*" (see CHANGED)."""
    a, b = _flatten(original), _flatten(twin_)
    keys = {k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING)}
    return {re.sub(r"^(sft|dpo)\.", "*.", re.sub(r"^data\.(sft|dpo)\.", "data.*.", k)) for k in keys}


_MISSING = object()


def _flatten(data, prefix: str = "") -> dict:
    if not isinstance(data, dict):
        return {prefix[:-1]: data}
    out = {}
    for key, value in data.items():
        out |= _flatten(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value}
    return out
