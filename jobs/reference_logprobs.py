"""DPO's reference log-probs computed once and reused (issue 12): ``dpo.reference_logprobs: cache``, the default.

DPO compares the policy's log-probs of each pair's chosen and rejected answers with the reference model's, and the
reference never changes: yet TRL runs it at every step, in every epoch, in every resumed attempt and in every rerun.
Here the stage computes them once before training, with TRL's own ``compute_ref_log_probs`` (the adapter switched
off, SFT's adapter kept as "ref", or the policy itself before its first step) under ``torch.no_grad`` in batches of
``precompute_ref_batch_size`` (else ``per_device_eval_batch_size``), sharded over the processes and gathered, and
stores them as ``<run.root>/.cache/reference_logprobs/<fingerprint>.safetensors``, one file per split, written by one
process and renamed into place, so that no half-written file ever looks complete.

It scores every eval row where training evaluates (none where eval_strategy is "no"), and the train rows the run
will draw (issue 24): a run shorter than an epoch (a smoke run, a sweep with ``max_steps``) scored every row before,
a whole epoch's reference pass up front. The rows are those in the batches of the trainer's own train dataloader over
the steps the run takes (``rows_drawn``); a file holds every row's place and a mask of the rows it holds, so a later,
longer run or a second epoch computes only what it lacks. The pass batches rows of like length (``batching_order``).

The fingerprint is that of what the numbers depend on, and nothing else: the reference's weights as loaded (hashed,
so a new SFT model, another quantization or dtype misses), the rows as the trainer sees them, and how they are
rendered and scored (processor, tokenizer, chat template, max_length, ld_alpha, autocast, attention, library
versions). ``beta``, ``loss_type`` and the rest of the training config are not in it: a sweep over them reuses the
file. The store sits beside the run folders rather than in one, because a sweep is several runs and a nightly rerun
replaces its dpo folder, while the reference (SFT's model) and the data are the same; in a cluster it is on the runs
volume, as HF_HOME is. Deleting the folder only costs a recomputation.

Not ``torch.inference_mode``: a model that fills a buffer in its forward (a rotary cache) would keep an inference
tensor that training then cannot save for backward.

TRL 1.16 refuses ``precompute_ref_log_probs`` for vision data in ``DPOTrainer.__init__``, but its training and
evaluation steps read ``ref_chosen_logps``/``ref_rejected_logps`` from the batch whenever ``precompute_ref_logps`` is
set. So the stage builds the trainer as usual, then adds the two columns to its datasets, keeps them through
``remove_unused_columns: False`` (set by the stage) and passes them around the vision collator (which drops them),
and sets the flag (``upstream.read_reference_logps_from_batches``).

Under FSDP the model is placed and sharded only when training starts (before that it is whole, on the CPU), so what
the store lacks is computed then, by the sharded model before its first step: those rows carry their number beside
the two columns (NaN until then), and the collator looks them up in a table filled at ``on_train_begin``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

from transformers import TrainerCallback

from jobs import upstream
from jobs.packing import WithoutColumns, grouped_by_length

COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
ROW = "ref_logps_row"  # under FSDP, until training starts: the row's number in the table of computed log-probs
MODES = ("cache", "recompute")
FORMAT = 3  # bump when what a file holds, or how its fingerprint is made, changes
DIGEST_BATCH_ROWS = 1000  # rows hashed per Arrow batch; part of how the rows' fingerprint is made


def cached(train, args) -> bool:
    """Whether the stage reads the reference's log-probs from its batches: ``dpo.reference_logprobs: cache`` where the
    launch allows it. Where it does not, the stage recomputes the reference at every step, and says why."""
    from jobs.contract import is_main_process

    why_not = why_not_cached(args) if train.reference_logprobs == "cache" else None
    if why_not and is_main_process():
        print(f"dpo: recomputing the reference at every step, not caching its log-probs: {why_not}")
    return train.reference_logprobs == "cache" and not why_not


def why_not_cached(args) -> str | None:
    """Why the stage recomputes the reference despite ``cache``, or None: DeepSpeed places and shards the model when
    training starts, and vlmjobs does not hook its start as it does FSDP's (``ComputeWhenTrainingStarts``)."""
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    if getattr(args, "deepspeed_plugin", None) is not None or deepspeed:
        return "DeepSpeed places the model only when training starts"
    return None


def store_for(run_dir: Path) -> Path:
    """The store shared by the runs under one root: ``<run.root>/.cache/reference_logprobs``."""
    return Path(run_dir).parent / ".cache" / "reference_logprobs"


def building_without_reference_model(build):
    """``build()`` (the DPOTrainer's construction) for full fine-tuning with no reference model: given none, TRL loads
    a second copy from the model's id (for a vision dataset it cannot know that the log-probs will come from the
    batches). With cached log-probs the reference is the policy itself, before its first step, and no copy is ever
    made (``upstream.building_dpo_without_reference_copy``). Returns the trainer."""
    return upstream.building_dpo_without_reference_copy(build)


def use_cached(trainer, store: Path) -> dict:
    """Give the trainer's train and eval rows their reference log-probs, from the store or computed and stored first,
    and make the trainer read them from its batches: every eval row, and the train rows the run draws
    (``rows_drawn``). Returns what the stage's record says about it."""
    from accelerate.utils import broadcast_object_list

    splits = {"train": trainer.train_dataset, "eval": trainer.eval_dataset if evaluates(trainer.args) else None}
    splits = {name: rows for name, rows in splits.items() if rows is not None}
    if trainer.eval_dataset is not None and "eval" not in splits and trainer.accelerator.is_main_process:
        print(f"dpo: no evaluation during training (eval_strategy no): the reference pass leaves the "
              f"{len(trainer.eval_dataset)} eval rows out", flush=True)
    drawn = {"train": rows_drawn(trainer)}  # the eval rows: every one
    later = {}  # under FSDP, what the store lacks: {name: (rows, file, first row number, held, missing)}
    keys = [None]
    if trainer.accelerator.is_main_process:  # hashing weights and rows once; every process uses the same files
        keys = [fingerprints(trainer, splits)]
    broadcast_object_list(keys, from_process=0)
    record = {"store": str(store), "fingerprint": keys[0]["reference"], "splits": {}}
    for name, rows in list(splits.items()):
        path = store / f"{keys[0]['splits'][name]}.safetensors"
        wanted = range(len(rows)) if drawn.get(name) is None else drawn[name]
        held = [_read(path, len(rows)) if trainer.accelerator.is_main_process else None]
        broadcast_object_list(held, from_process=0)  # one decision for all, or they would wait on each other
        chosen, rejected, held = held[0] or _nothing_held(len(rows))
        holds = held.tolist()
        missing = [i for i in wanted if not holds[i]]
        said = f"{len(wanted)} {name} rows" if len(wanted) == len(rows) else f"{len(wanted)} of {len(rows)} {name} rows"
        record["splits"][name] = {"file": path.name, "computed": len(missing), "read": len(wanted) - len(missing)}
        if not missing:
            if trainer.accelerator.is_main_process:
                print(f"dpo: reference log-probs of {said} read from {path}", flush=True)
        elif trainer.is_fsdp_enabled:
            first = sum(len(r) for r, *_ in later.values())
            later[name] = (rows, path, first, (chosen, rejected, held), missing)
            rows = rows.add_column(ROW, list(range(first, first + len(rows))))
        else:
            started = time.time()
            stored = (chosen, rejected, held)
            chosen, rejected, held = _store(trainer, path, rows, missing, stored, name, keys[0]["parts"])
            if trainer.accelerator.is_main_process:
                print(f"dpo: reference log-probs of {said}: {len(missing)} computed in {time.time() - started:.1f}s, "
                      f"{len(wanted) - len(missing)} read, stored in {path}", flush=True)
        splits[name] = rows.add_column(COLUMNS[0], chosen.tolist()).add_column(COLUMNS[1], rejected.tolist())
    trainer.train_dataset = splits["train"]
    trainer.eval_dataset = splits.get("eval", trainer.eval_dataset)  # unscored where nothing evaluates
    table = {}
    if later:
        trainer.add_callback(ComputeWhenTrainingStarts(trainer, later, table, parts=keys[0]["parts"]))
    read_from_batches(trainer, table)
    return record


def evaluates(args) -> bool:
    """Whether training evaluates at all: where it does not (TRL's default eval_strategy "no"), scoring the eval rows'
    reference is work nothing reads (the dpo stage runs no evaluate() of its own)."""
    return args.eval_strategy != "no" or bool(args.eval_on_start)


def rows_drawn(trainer) -> list[int] | None:
    """The numbers of the train rows that the run's optimizer steps draw, over all processes, or None where it draws
    every row (a whole epoch or more). Read from the batches of the trainer's own train dataloader
    (``get_train_dataloader``, which ``train()`` builds again: the same sampler, seed, batch, processes and
    accumulation), from a resumed attempt's step on, as ``train()`` skips them. A row the prediction missed is no
    silent error: the step that draws it stops (``refusing_unscored_rows``)."""
    import itertools
    import math

    from accelerate.utils import gather_object

    args = trainer.args
    loader = trainer.get_train_dataloader()
    per_epoch = max(math.ceil(len(loader) / args.gradient_accumulation_steps), 1)  # as transformers counts them
    steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    if steps >= per_epoch or not drawn_alike(trainer):
        return None
    done = 0 if args.ignore_data_skip else resumed_step(trainer)
    batches = itertools.islice(loader.batch_sampler, done * args.gradient_accumulation_steps,
                               steps * args.gradient_accumulation_steps)
    drawn = sorted(set(gather_object([row for batch in batches for row in batch])))
    if trainer.accelerator.is_main_process:
        print(f"dpo: the reference pass scores the {len(drawn)} of {len(trainer.train_dataset)} train rows that "
              f"optimizer steps {done + 1}-{steps} draw", flush=True)
    return drawn


def drawn_alike(trainer) -> bool:
    """Whether a train dataloader built before ``train()`` draws the rows that ``train()``'s own will: its order is
    seeded (accelerate's seedable sampler, transformers' default, from the seed ``set_seed`` gave; the length-grouped
    sampler as the stages seed it, ``jobs.packing.with_lengths``) or none. transformers' length-grouped sampler alone
    shuffles from the RNG's state when iterated, and the rebalancing one is not ours to vouch for: those runs score
    every row."""
    args = trainer.args
    if grouped_by_length(args):
        return upstream.length_grouping_is_seeded(trainer)
    seeded = args.train_sampling_strategy == "random" and args.accelerator_config.use_seedable_sampler
    return seeded or args.train_sampling_strategy == "sequential"


def resumed_step(trainer) -> int:
    """The optimizer step a resumed attempt starts after: that of the newest complete checkpoint, which
    ``training.start`` resumes from; 0 for a first attempt."""
    from transformers import TrainerState

    from jobs.contract import newest_complete_checkpoint

    checkpoint = newest_complete_checkpoint(Path(trainer.args.output_dir))
    return TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json")).global_step if checkpoint else 0


def _store(trainer, path: Path, rows, missing: list[int], held: tuple, name: str, parts: dict, collator=None):
    """The log-probs of the ``missing`` rows computed and added to those ``held``, the whole stored by one process:
    (chosen, rejected, held) of every row."""
    import torch

    chosen, rejected, held = (t.clone() for t in held)
    computed = compute(trainer, rows.select(missing), name, collator=collator)
    where = torch.tensor(missing, dtype=torch.long)
    chosen[where], rejected[where], held[where] = computed[0], computed[1], 1
    if trainer.accelerator.is_main_process:
        _write(path, chosen, rejected, held, parts={"split": name, **parts})
    trainer.accelerator.wait_for_everyone()
    return chosen, rejected, held


def read_from_batches(trainer, table: dict | None = None) -> None:
    """Make the trainer take the reference log-probs from its batches (TRL's precompute path), not from a forward."""
    trainer.data_collator = WithReferenceLogps(trainer.data_collator, table=table)
    trainer.compute_loss = refusing_unscored_rows(trainer.compute_loss)
    upstream.read_reference_logps_from_batches(trainer)


class ComputeWhenTrainingStarts(TrainerCallback):
    """Under FSDP: the log-probs the store lacks, computed by the sharded model when training starts, before its
    first step, stored, and put in the table the collator reads."""

    def __init__(self, trainer, later: dict, table: dict, parts: dict):
        self.trainer, self.later, self.table, self.parts = trainer, later, table, parts

    def on_train_begin(self, args, state, control, **kwargs):
        from jobs.contract import UserError

        policy_is_reference = self.trainer.ref_model is None and not hasattr(self.trainer.model, "peft_config")
        if state.global_step > 0 and policy_is_reference:  # resumed full DPO: the policy has trained since
            missing = ", ".join(str(path) for _, path, *_ in self.later.values())
            raise UserError(f"dpo: the reference log-probs in {missing} are gone, and the resumed policy is no longer "
                            "the reference: rerun the stage from the start (--force), or set dpo.reference_logprobs: recompute")
        collator = self.trainer.data_collator.collator  # TRL's own, around which WithReferenceLogps reads the table
        for name, (rows, path, first, held, missing) in self.later.items():
            started = time.time()
            chosen, rejected, _ = _store(self.trainer, path, rows, missing, held, name, self.parts, collator=collator)
            if self.trainer.accelerator.is_main_process:
                print(f"dpo: reference log-probs of {len(missing)} {name} rows computed by the sharded model in "
                      f"{time.time() - started:.1f}s, stored in {path}", flush=True)
            self.table.update((first + i, (float(chosen[i]), float(rejected[i]))) for i in missing)
        self.trainer.accelerator.wait_for_everyone()


@contextlib.contextmanager
def as_if_cached(trainer):
    """While ``auto_batch`` probes the micro-batch, before the log-probs exist: the trainer steps as it will train,
    reading (zero) reference log-probs from its batches rather than running a reference, so that the probe measures
    training's memory; the precompute then runs in batches no larger than the one found."""
    collator = trainer.data_collator
    trainer.data_collator = WithReferenceLogps(collator, zeros=True)
    flag = upstream.read_reference_logps_from_batches(trainer)
    try:
        yield
    finally:
        trainer.data_collator = collator
        upstream.read_reference_logps_from_batches(trainer, flag)


class WithReferenceLogps(WithoutColumns):
    """A collator that passes the rows' reference log-probs through as tensors, around one that drops them (TRL's
    vision collator); with ``zeros``, zeros in their place, for rows that have none yet. A row whose log-probs were not
    computed before training (NaN) reads them from ``table`` by its number (``ROW``), where they are computed when
    training starts (under FSDP)."""

    def __init__(self, collator, zeros: bool = False, table: dict | None = None):
        super().__init__(collator, (*COLUMNS, ROW))
        self.zeros, self.table = zeros, {} if table is None else table  # shared with ComputeWhenTrainingStarts

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        batch = super().__call__(examples)
        pairs = [(0.0, 0.0) if self.zeros else self.logps(example) for example in examples]
        for i, column in enumerate(COLUMNS):
            batch[column] = torch.tensor([pair[i] for pair in pairs], dtype=torch.float32)
        return batch

    def logps(self, example: dict) -> tuple[float, float]:
        import math

        pair = (example[COLUMNS[0]], example[COLUMNS[1]])
        if math.isnan(pair[0]) or math.isnan(pair[1]):
            return self.table.get(example.get(ROW), pair)  # NaN still where none was computed: refused at the step
        return pair


def refusing_unscored_rows(compute_loss):
    """The trainer's ``compute_loss``, stopping at a batch with a row whose reference log-probs were never computed
    (NaN): the pass before training scores the rows the run's steps draw (``rows_drawn``), so a step that meets
    another means the prediction was wrong, and TRL's loss would be NaN (which the logs hide, as
    ``logging_nan_inf_filter`` replaces it). Not in the collator: the dataloader collates one batch ahead, and the
    batch after the last step is collated but never trained on."""
    import functools

    @functools.wraps(compute_loss)
    def checked(model, inputs, *args, **kwargs):
        from jobs.contract import Failure

        if any(bool(inputs[column].isnan().any()) for column in COLUMNS):
            raise Failure("dpo: a training step drew a row whose reference log-probs the pass before training did not "
                          "compute (it scores the rows the trainer's dataloader draws in the run's steps, and the "
                          "trainer drew others): set dpo.reference_logprobs: recompute")
        return compute_loss(model, inputs, *args, **kwargs)

    return checked


def compute(trainer, rows, name: str, collator=None):
    """(chosen, rejected) reference log-probs of every row, in order: the rows sharded over the processes in batches,
    each scored by TRL's ``compute_ref_log_probs`` (which picks the reference: ref_model, the "ref" adapter or the
    adapter switched off), and gathered."""
    import torch
    from torch.utils.data import DataLoader

    from jobs.progress import Progress

    args = trainer.args
    order = batching_order(args, rows)  # batches of like rows pad little; the results go back in the rows' order
    loader = trainer.accelerator.prepare(DataLoader(
        rows.select(order), batch_size=args.precompute_ref_batch_size or args.per_device_eval_batch_size, shuffle=False,
        collate_fn=collator or trainer.data_collator, num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
    ))
    model = trainer.ref_model or trainer.model
    progress = Progress(f"dpo: reference log-probs of the {name} rows", len(rows)) if trainer.accelerator.is_main_process else None
    chosen, rejected = [], []
    with as_reference(model), keeping_what_trains(trainer.model):
        for batch in loader:
            pair = trainer.compute_ref_log_probs(model, batch)
            pair = trainer.accelerator.gather_for_metrics(tuple(t.float() for t in pair))
            chosen.append(pair[0].cpu())
            rejected.append(pair[1].cpu())
            if progress:
                progress.update(sum(len(c) for c in chosen))
    if not chosen:  # a split without rows (a small eval_fraction)
        return torch.empty(0), torch.empty(0)
    where = torch.tensor(order)
    return (torch.empty(len(order)).index_copy_(0, where, torch.cat(chosen)),
            torch.empty(len(order)).index_copy_(0, where, torch.cat(rejected)))


TEXT_COLUMNS = ("prompt", "chosen", "rejected")


def batching_order(args, rows) -> list[int]:
    """The order the pass batches ``rows`` in: where the stage gave them the lengths transformers' length grouping
    batches the training by (``jobs.packing.with_lengths``: tokens counted by the collator, or for families that pad
    a batch's images to the largest, each row's place by image size, then tokens), theirs; else shortest text first."""
    column = args.length_column_name
    if grouped_by_length(args) and column in rows.column_names:
        lengths = rows[column]
        return sorted(range(len(lengths)), key=lengths.__getitem__)
    return shortest_first(rows)


def shortest_first(rows) -> list[int]:
    """The rows' numbers, shortest text first: the pass's batches of ``precompute_ref_batch_size`` (8 by default) are
    padded to their longest pair, and rows of like length pad little (tests/test_flops.py counts the difference). Text
    only, as the characters of the prompt and both answers: reading the images to count their tokens would cost what
    the pass saves, and rows with one image each (RLAIF-V) differ by their text; images of different sizes still pad
    (idefics2-8b's pass counted 1.13x the unpadded one in `make bench`): length grouping's order, where the rows carry
    it, takes them by size first (``batching_order``). Stable: rows of equal length keep their order."""
    import json

    columns = [column for column in TEXT_COLUMNS if column in rows.column_names]
    if not columns:
        return list(range(len(rows)))
    text = rows.select_columns(columns)
    sizes = [sum(len(json.dumps(row[column])) for column in columns) for row in text]
    return sorted(range(len(sizes)), key=sizes.__getitem__)


@contextlib.contextmanager
def as_reference(model):
    """The reference as a model, not a training step: no dropout, whatever disable_dropout says."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


@contextlib.contextmanager
def keeping_what_trains(model):
    """Every parameter's requires_grad as it was, on the parameters FSDP keeps. peft switches an adapter off and on
    by setting requires_grad on the parameters its modules hold at that moment. Under FSDP2 a unit left gathered
    after its forward (the root's: LLaVA's projector, whatever sits outside the layers) holds its gathered copies by
    the time the adapter is switched back on, while it held the sharded ones when it was switched off: the sharded
    parameters, from which FSDP takes requires_grad at every gather, stayed off, and those adapter weights silently
    stopped training after the first step. Every unit resharded, the sharded parameters get their flags back."""
    from jobs.training import reshard

    trains = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    try:
        yield
    finally:
        reshard(model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trains[name])


def fingerprints(trainer, splits: dict) -> dict:
    """{"reference": hash of the reference's weights, "parts": what the file's numbers depend on besides the rows,
    "splits": {name: the file's key}}."""
    parts = {"format": FORMAT, "reference": reference_digest(trainer), **scoring(trainer)}
    common = _digest(json.dumps(parts, sort_keys=True, default=str).encode())
    return {
        "reference": parts["reference"],
        "parts": parts,
        "splits": {name: _digest(f"{common}:{rows_digest(rows)}".encode()) for name, rows in splits.items()},
    }


def reference_digest(trainer) -> str:
    """sha256 of the weights the reference runs with, as loaded (4-bit, dtype, merged adapters): the model's state
    without the adapter being trained, named as in the plain model, so that a LoRA rank or target change keeps it;
    and its config (rope, image tokens) without the paths it was loaded from."""
    import torch

    model = trainer.accelerator.unwrap_model(trainer.ref_model or trainer.model)
    trained = [f".{adapter}." for adapter in getattr(model, "peft_config", {}) if adapter != "ref"]
    h = hashlib.sha256()
    named = {}
    for name, value in model.state_dict().items():
        if not any(marker in name for marker in trained):
            named[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = value
    for name, value in sorted(named.items()):
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu").contiguous()
            h.update(f"{value.dtype}{tuple(value.shape)}".encode())
            h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()


def scoring(trainer) -> dict:
    """How rows become the numbers: rendering (processor, tokenizer, chat template), the collator and the parts of the
    config that change a log-prob (max_length, ld_alpha, autocast, attention), and the libraries doing it."""
    from importlib import metadata

    args, processor = trainer.args, trainer.processing_class
    tokenizer = getattr(processor, "tokenizer", processor)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return {
        "processor": processor.to_json_string() if hasattr(processor, "to_json_string") else repr(processor),
        "tokenizer": _digest((backend.to_str() if backend else repr(tokenizer.get_vocab())).encode()),
        "special_tokens": json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        "chat_template": processor.chat_template,
        "collator": type(trainer.data_collator).__qualname__,
        "max_length": args.max_length,
        "truncation_mode": args.truncation_mode,
        "ld_alpha": args.ld_alpha,
        "autocast": "bf16" if args.bf16 else "fp16" if args.fp16 else None,
        "attention": upstream.attention_implementation(trainer.model.config),
        "versions": {p: metadata.version(p) for p in ("torch", "transformers", "trl", "peft")},
    }


def rows_digest(rows) -> str:
    """sha256 of the rows' Arrow data as IPC, in the order the trainer reads them (a shuffle or a selection included:
    ``Dataset.iter`` reads through the rows' indices): the same rows read from the same files hash the same, other
    rows or another order differ (a slice may carry bytes of its parent, which only makes a match rarer)."""
    import pyarrow as pa

    sink = _HashingFile()
    with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), rows.data.schema) as writer:
        for batch in rows.with_format("arrow").iter(batch_size=DIGEST_BATCH_ROWS):
            writer.write_table(batch)
    return sink.hash.hexdigest()


class _HashingFile:
    """A write-only file that keeps nothing but the sha256 of what was written."""

    def __init__(self):
        self.hash, self.closed = hashlib.sha256(), False

    def write(self, data) -> int:
        self.hash.update(data)
        return len(data)

    def flush(self):
        pass

    def close(self):
        self.closed = True


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _nothing_held(rows: int):
    """(chosen, rejected, held) of a store that holds none of ``rows`` rows: NaN, and held 0."""
    import torch

    return torch.full((rows,), float("nan")), torch.full((rows,), float("nan")), torch.zeros(rows, dtype=torch.uint8)


def _read(path: Path, rows: int):
    """(chosen, rejected, held) from a stored file of ``rows`` rows, or None (absent, unreadable, another length):
    ``held`` is 1 for the rows whose log-probs the file holds, which are NaN elsewhere. A run that draws fewer rows
    than its data has stores only those: the mask, not the file's presence, says which rows are there."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
        chosen, rejected, held = tensors["chosen"], tensors["rejected"], tensors["held"]
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError):
        return None
    if not len(chosen) == len(rejected) == len(held) == rows:
        return None
    return chosen, rejected, held


def _write(path: Path, chosen, rejected, held, parts: dict) -> None:
    """Written beside its final name and renamed into place: a reader sees the whole file or none. The rows another
    run stored there meanwhile (a sweep's runs at once) are kept: ours are added to what the file holds now."""
    from safetensors.torch import save_file

    now = _read(path, len(held))
    if now is not None:
        theirs = (now[2] == 1) & (held == 0)
        chosen, rejected, held = chosen.clone(), rejected.clone(), held.clone()
        chosen[theirs], rejected[theirs], held[theirs] = now[0][theirs], now[1][theirs], 1
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    metadata = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str) for k, v in parts.items()}
    tensors = {"chosen": chosen, "rejected": rejected, "held": held}
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(partial), metadata=metadata)
    os.replace(partial, path)
