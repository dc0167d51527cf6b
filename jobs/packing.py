"""Padding-free SFT batches: a batch's rows joined into one sequence, positions restarting at 0 for each row.

TRL 1.16's SFTTrainer refuses ``padding_free`` and ``packing`` for vision data, so its vision collator pads every
batch to its longest row; with dynamic-resolution images (Qwen2-VL) rows differ several-fold in length. transformers 5
turns restarting ``position_ids`` with no ``attention_mask`` into a block-diagonal causal mask
(``masking_utils.find_packed_sequence_indices``) for eager, sdpa and flex attention, and into varlen kernels for flash
attention, so each row sees only itself, with the positions it has in a padded batch.

``PaddingFree`` wraps the collator SFTTrainer built (its labels, completion-only masking and image inputs unchanged)
and takes the padding out of what it returns:
- per-token tensors (input_ids, labels, token types) keep each row's real tokens, rows one after another, batch 1;
- each row's first label is -100: in a padded batch it is never a target (the loss shifts labels by one), packed it
  would be the target of the previous row's last token. The trainer's token count (num_items_in_batch) and so the
  loss normalisation are then those of the padded batch;
- image inputs are already in row order; Idefics2/3's per-row image slots (batch, images, ...) become one row's
  (1, batch * images, ...), the all-zero padding images that the model drops included;
- Qwen2-VL's multimodal rotary positions are computed per row on the padded batch, by the model class's own
  get_rope_index, and joined; the text positions go in front ((4, 1, length)), which Qwen2-VL reads as packed input.

torch is imported only where a batch is packed.
"""

from __future__ import annotations

from jobs.contract import UserError, is_main_process
from jobs.families import VARLEN_ATTENTION, Family

TOKEN_KEYS = ("input_ids", "labels", "token_type_ids", "mm_token_type_ids")  # one value per token, per row
IMAGE_SLOT_KEYS = ("pixel_values", "pixel_attention_mask")  # Idefics2/3: (batch, images per row, ...)


def enabled(setting: bool | None, family: Family, attn_implementation: str | None) -> bool:
    """Whether SFT batches go padding-free: ``sft.padding_free`` (None: where the family supports it and the attention
    implementation attends within each row, ``VARLEN_ATTENTION``); true where they do not is the user's error."""
    why_not = family.why_not_packed(attn_implementation)
    if setting is None:
        return why_not is None and attn_implementation in VARLEN_ATTENTION
    if setting and why_not:
        raise UserError(f"sft.padding_free: {why_not}; set it false (or remove the key)")
    return setting


class PaddingFree:
    """Wraps a padding collator: its batch, rows concatenated (batch dimension 1), positions restarting per row."""

    def __init__(self, collator, model_config=None):
        self.collator = collator
        # Qwen2-VL's rotary positions depend on each image's grid: computed with the model class's own function
        self.rope_index = _rope_index(model_config) if model_config is not None else None

    def __call__(self, examples: list[dict]) -> dict:
        return pack(self.collator(examples), self.rope_index)


def pack(batch: dict, rope_index=None) -> dict:
    """A padded batch (input_ids, attention_mask, labels, image inputs) as one padding-free row."""
    import torch

    real = batch["attention_mask"].bool()
    lengths = real.sum(dim=1)
    packed = {key: value for key, value in batch.items() if key != "attention_mask"}
    for key in TOKEN_KEYS:
        if key in batch:
            packed[key] = batch[key][real][None]
    starts = torch.cumsum(lengths, 0) - lengths
    packed["labels"][0, starts] = -100
    if batch.get("pixel_values") is not None and batch["pixel_values"].ndim == 5:
        for key in IMAGE_SLOT_KEYS:
            if key in batch:
                packed[key] = batch[key].flatten(0, 1)[None]
    positions = torch.cat([torch.arange(int(n)) for n in lengths])[None]
    if rope_index is not None:
        rope = rope_index(batch)  # (3, batch, padded length), each row's own
        rope = rope[:, real][:, None]  # (3, 1, packed length), rows in order
        positions = torch.cat([positions[None], rope])
    packed["position_ids"] = positions
    return packed


def _rope_index(model_config):
    """Qwen2-VL's get_rope_index bound to the config alone, so the collator holds no model (data loader workers copy
    it); None for the families whose positions are plain 0, 1, 2, ..."""
    if model_config.model_type != "qwen2_vl":
        return None
    from jobs import upstream

    return upstream.qwen2vl_rope_index(model_config)


GROUPING = ("group_by_length", "batch_rebalance")  # transformers' samplers that read each row's length
CHUNK = 64  # rows measured per collator call


def with_lengths(trainer) -> bool:
    """Let transformers' ``train_sampling_strategy: group_by_length`` (or ``batch_rebalance``) batch rows of like
    length together, so that a padded batch pads little. Its sampler reads each row's length from
    ``length_column_name``, else from the rows' input_ids, which vision rows do not have. Here each train and eval
    row's length is the number of tokens the trainer's own collator makes of it, image tokens included (Qwen2-VL's
    grow with the image). Before any padding-free wrap: the padded batch's attention mask counts them. Returns whether
    the rows are grouped."""
    import time

    args = trainer.args
    if args.train_sampling_strategy not in GROUPING:
        return False
    column, started = args.length_column_name, time.time()
    collator = trainer.data_collator
    for split in ("train_dataset", "eval_dataset"):
        rows = getattr(trainer, split)
        if rows is not None and column not in rows.column_names:
            lengths = []
            for start in range(0, len(rows), CHUNK):  # the processor batched: each row's real tokens, unpadded
                chunk = rows.select(range(start, min(start + CHUNK, len(rows))))
                lengths += collator(list(chunk))["attention_mask"].sum(dim=1).tolist()
            setattr(trainer, split, rows.add_column(column, lengths))
    from jobs.training import WithoutColumns

    trainer.data_collator = WithoutColumns(collator, (column,))  # the sampler's, not the model's
    if is_main_process():
        print(f"sft: rows batched by length ({args.train_sampling_strategy}); lengths of {len(trainer.train_dataset)} "
              f"rows in {time.time() - started:.1f}s", flush=True)
    return True

