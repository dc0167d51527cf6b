"""Padding-free SFT batches: a batch's rows joined into one sequence, positions restarting at 0 for each row.

TRL 1.16's SFTTrainer refuses ``padding_free`` and ``packing`` for vision data, so its vision collator pads every
batch to its longest row; with dynamic-resolution images (Qwen2-VL) rows differ several-fold in length. transformers 5
turns restarting ``position_ids`` with no ``attention_mask`` into a block-diagonal causal mask
(``masking_utils.find_packed_sequence_indices``) for eager, sdpa and flex attention, and into varlen kernels for flash
attention, so each row sees only itself, with the positions it has in a padded batch. A mask over the joined batch
costs every query-key pair of it, so under sdpa the text attends each row alone instead (``attend_by_row``).

``PaddingFree`` wraps the collator SFTTrainer built (its labels, completion-only masking and image inputs unchanged)
and takes the padding out of what it returns:
- per-token tensors (input_ids, labels, token types) keep each row's real tokens, rows one after another, batch 1;
- each row's first label is -100: in a padded batch it is never a target (the loss shifts labels by one), packed it
  would be the target of the previous row's last token. The trainer's token count (num_items_in_batch) and so the
  loss normalisation are then those of the padded batch;
- image inputs are already in row order; Idefics2/3's per-row image slots (batch, images, ...) become one row's
  (1, batch * images, ...), the all-zero padding images that the model drops included;
- Qwen2-VL's, Qwen2.5-VL's and Qwen3-VL's multimodal rotary positions are computed per row on the padded batch, by
  the model class's own get_rope_index, and joined, under ``mrope_position_ids`` (3, 1, length); ``position_ids``
  stays the text positions (1, length), which TRL counts a padding-free batch's tokens by (its ``num_tokens``, the
  throughput). A forward pre-hook on the model's inner Qwen model puts the text positions in front ((4, 1, length)),
  which these models read as packed input.

torch is imported only where a batch is packed.
"""

from __future__ import annotations

from jobs.contract import UserError, is_main_process
from jobs.families import PER_ROW_ATTENTION, Family

TOKEN_KEYS = ("input_ids", "labels", "token_type_ids", "mm_token_type_ids")  # one value per token, per row
IMAGE_SLOT_KEYS = ("pixel_values", "pixel_attention_mask")  # Idefics2/3: (batch, images per row, ...)
MROPE_KEY = "mrope_position_ids"  # Qwen2-VL's (temporal, height, width) rotary positions of a packed batch


def enabled(setting: bool | None, family: Family, attn_implementation: str | None) -> bool:
    """Whether SFT batches go padding-free: ``sft.padding_free`` (None: where the family supports it and the attention
    implementation attends within each row, ``PER_ROW_ATTENTION``, sdpa as ``attend_by_row`` runs it); true where they
    do not is the user's error."""
    why_not = family.why_not_packed(attn_implementation)
    if setting is None:
        return why_not is None and attn_implementation in PER_ROW_ATTENTION
    if setting and why_not:
        raise UserError(f"sft.padding_free: {why_not}; set it false (or remove the key)")
    return setting


class WithoutColumns:
    """A collator that drops ``columns`` before the collator it wraps sees the rows: columns the stage adds for what
    reads them besides the model (a sampler, a collator wrapper), which reach the collator since the trainer removes
    none (``remove_unused_columns: False``, set by the stage)."""

    def __init__(self, collator, columns: tuple[str, ...]):
        self.collator, self.columns = collator, columns

    def __call__(self, examples: list[dict]) -> dict:
        return self.collator([{k: v for k, v in example.items() if k not in self.columns} for example in examples])


class PaddingFree:
    """Wraps a padding collator: its batch, rows concatenated (batch dimension 1), positions restarting per row.
    ``model`` is the one trained on these batches: for the Qwen families it gets the hook that hands it its rotary positions."""

    def __init__(self, collator, model=None):
        self.collator = collator
        # Qwen2-VL's rotary positions depend on each image's grid: computed with the model class's own function. The
        # collator keeps the config alone, not the model: data loader workers copy it.
        self.rope_index = _rope_index(model.config) if model is not None else None
        if self.rope_index is not None:
            _take_packed_rope(model)

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
    if "cross_attention_mask" in batch:  # Llama 3.2 Vision: (batch, tokens, images per row, tiles)
        packed |= _one_row_of_images(batch, real)
    packed["position_ids"] = torch.cat([torch.arange(int(n)) for n in lengths])[None]
    if rope_index is not None:
        rope = rope_index(batch)  # (3, batch, padded length), each row's own
        packed[MROPE_KEY] = rope[:, real][:, None]  # (3, 1, packed length), rows in order
    return packed


# Under sdpa, transformers attends a packed row through one block-diagonal mask over the whole joined batch: every
# query-key pair of it computed, (8L)^2 for eight rows of L tokens against 8 L^2, and no flash kernel (it takes no
# mask). The padding-free text attention runs sdpa on each row instead, causal and maskless: what flash attention's
# varlen kernels do, with the kernels torch ships.
ROW_SDPA = "sdpa_by_row"  # its name in transformers' AttentionInterface and AttentionMaskInterface


def unpad(trainer, model) -> str:
    """Make ``trainer``'s batches padding-free (TRL refuses ``padding_free`` for vision data: its collator's batches,
    unpadded) and ``model``'s text attend each row alone (``attend_by_row``); the text attention it now runs."""
    trainer.data_collator = PaddingFree(trainer.data_collator, trainer.model)
    return attend_by_row(model)


def attend_by_row(model) -> str:
    """Switch ``model``'s text attention from sdpa to ROW_SDPA (registered here with transformers' public attention
    interfaces); the vision tower's is left as it is. Returns the text attention the model now runs."""
    config = getattr(model.config, "text_config", None)
    if config is None:
        raise RuntimeError(f"padding-free: {type(model.config).__name__} has no text_config to set the attention of")
    from jobs import upstream

    attention = upstream.attention_implementation(config)
    if attention != "sdpa":
        return attention
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ROW_SDPA, _by_row(AttentionInterface()["sdpa"]))
    AttentionMaskInterface.register(ROW_SDPA, AttentionMaskInterface()["sdpa"])  # where a batch is not packed: sdpa's
    model.set_attn_implementation({"text_config": ROW_SDPA})
    return upstream.attention_implementation(config)


def _by_row(sdpa):
    """An attention function that runs transformers' ``sdpa`` on each row of a packed batch (position_ids restarting,
    one sequence), causal and without a mask, and joins the rows' outputs; anything else (a padded batch,
    cross-attention, a row longer than a sliding window, a non-causal module) is sdpa's as transformers runs it, with
    the mask it built. Called by every text layer of every forward: torch is imported once, here."""
    import torch

    def sdpa_by_row(module, query, key, value, attention_mask, position_ids=None, **kwargs):
        lengths = None
        if (position_ids is not None and query.shape[0] == 1
                and query.shape[2] == key.shape[2] == position_ids.shape[-1]
                and kwargs.get("is_causal", getattr(module, "is_causal", True))):
            lengths = _row_lengths(position_ids)
            window = kwargs.get("sliding_window")  # a row within it sees every token before it: plain causal attention
            if window is not None and max(lengths) > window:
                lengths = None
        if lengths is None or len(lengths) == 1:
            return sdpa(module, query, key, value, attention_mask, position_ids=position_ids, **kwargs)
        kwargs = {name: value for name, value in kwargs.items() if name != "is_causal"}
        rows = zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
        outputs = [sdpa(module, q, k, v, None, is_causal=True, **kwargs)[0] for q, k, v in rows]
        return torch.cat(outputs, dim=1), None  # (1, tokens, heads, head_dim) as sdpa's

    return sdpa_by_row


class _LastRowLengths:
    """The rows' lengths of the position_ids the layers of one forward are all handed: read from the device once a
    forward, not once a layer. A new row starts where a position does not follow the one before (transformers'
    ``find_packed_sequence_indices``)."""

    def __init__(self):
        self.positions, self.lengths = None, None

    def __call__(self, position_ids) -> list[int]:
        if position_ids is not self.positions:  # held, so its id is not reused by another tensor
            import torch

            positions = position_ids.reshape(-1)
            starts = torch.nonzero(positions[1:] - positions[:-1] != 1).flatten() + 1
            bounds = [0, *starts.tolist(), positions.numel()]
            self.positions, self.lengths = position_ids, [b - a for a, b in zip(bounds, bounds[1:])]
        return self.lengths


_row_lengths = _LastRowLengths()


def _one_row_of_images(batch: dict, real) -> dict:
    """Llama 3.2 Vision's image inputs for the packed row: every row's image slots in one row, in order (pixel_values
    (1, batch x images, tiles, ...), aspect_ratio_ids and _mask alike), and each token's cross_attention_mask over its own
    row's slots only, so that no token attends to another row's image through the cross-attention layers."""
    import torch

    mask = batch["cross_attention_mask"]
    rows, length, images, tiles = mask.shape
    own = torch.zeros(rows, length, rows, images, tiles, dtype=mask.dtype, device=mask.device)
    own[torch.arange(rows), :, torch.arange(rows)] = mask
    joined = {"cross_attention_mask": own.flatten(2, 3)[real][None]}
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        joined[key] = batch[key].flatten(0, 1)[None]
    return joined


# The families with multimodal rotary positions (3 per token) and the model class whose get_rope_index computes them;
# each reads position_ids of shape (4, 1, length) as packed input, the text positions in front
ROPE_MODELS = {
    "qwen2_vl": ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLModel"),
    "qwen2_5_vl": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLModel"),
    "qwen3_vl": ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLModel"),
}


def _take_packed_rope(model) -> None:
    """The Qwen models of ROPE_MODELS read packed input as position_ids (4, 1, length), the text positions in front of
    the three rotary axes; TRL counts a padding-free batch's tokens as ``position_ids.size(1)``, which is 1 there. So
    the batch carries the text positions as position_ids (1, length), as every other family's, and the rotary ones
    beside them; this forward pre-hook on the Qwen model inside ``model`` (under any PEFT or FSDP wrapping, and under
    TRL's fused LM head, which calls it too) joins them as the model reads them."""
    inner_class = _rope_model_class(model.config.model_type)
    inner = [module for module in model.modules() if isinstance(module, inner_class)]
    if len(inner) != 1:
        raise RuntimeError(f"padding-free {model.config.model_type}: expected one {inner_class.__name__} in "
                           f"{type(model).__name__}, found {len(inner)}")
    inner[0].register_forward_pre_hook(_join_rope, with_kwargs=True)  # a second one finds nothing left to join


def _join_rope(module, args, kwargs):
    import torch

    rope = kwargs.pop(MROPE_KEY, None)
    if rope is not None:
        kwargs["position_ids"] = torch.cat([kwargs["position_ids"][None], rope])
    return args, kwargs


def _rope_model_class(model_type: str):
    import importlib

    module, name = ROPE_MODELS[model_type]
    return getattr(importlib.import_module(module), name)


def _rope_index(model_config):
    """The model class's get_rope_index bound to the config alone, so the collator holds no model (data loader workers
    copy it); None for the families whose positions are plain 0, 1, 2, ..."""
    if model_config.model_type not in ROPE_MODELS:
        return None
    from jobs import upstream

    return upstream.qwen_rope_index(model_config, _rope_model_class(model_config.model_type))


CHUNK = 64  # rows measured per collator call


def token_counts(collator, rows) -> list[int]:
    """How many tokens ``collator`` (the trainer's own) makes of each of ``rows``: image tokens included, which grow
    with the image's area in Qwen2-VL and with its tiles in Idefics3, and truncation applied. The real tokens of the
    padded batch, counted by its attention mask (a padding-free collator's batch before it is joined), the processor
    called on CHUNK rows at a time. A collator that makes several sequences of each row lists them as blocks of the
    batch (TRL's preference collator: every pair's prompt + chosen, then every pair's prompt + rejected): a row
    counts them all, as its memory does."""
    padded = collator.collator if isinstance(collator, PaddingFree) else collator
    counts = []
    for start in range(0, len(rows), CHUNK):
        chunk = rows.select(range(start, min(start + CHUNK, len(rows))))
        per_sequence = padded(list(chunk))["attention_mask"].sum(dim=1)
        counts += per_sequence.view(-1, len(chunk)).sum(dim=0).tolist()
    return counts


GROUPING = ("group_by_length", "batch_rebalance")  # transformers' samplers that read each row's length
TOKENS = "tokens_per_row"  # each row's token count, where the length column holds its place by image size instead


def grouped_by_length(args) -> bool:
    """Whether the run's rows are batched by transformers' length-grouped sampler: the order ``with_lengths`` gives
    the lengths for and the seed, and the one the reference pass follows."""
    return args.train_sampling_strategy == "group_by_length"


def with_lengths(trainer, stage: str, *, by_image_size: bool = False) -> bool:
    """Let transformers' ``train_sampling_strategy: group_by_length`` (or ``batch_rebalance``) batch rows of like
    length together, so that a padded batch pads little. Its sampler reads each row's length from
    ``length_column_name``, else from the rows' input_ids, which vision rows do not have. Here each train and eval
    row's length is the number of tokens the trainer's own collator makes of it, image tokens included (Qwen2-VL's
    grow with the image). Before any padding-free wrap: the padded batch's attention mask counts them.

    ``by_image_size``, for families whose processor pads a batch's images to the largest
    (``Family.pads_images_to_batch``): group_by_length then sorts by each row's place in the rows ordered by their
    images' count and largest size, then by tokens (``batching_keys``), so that a batch's images share one size where
    the data allow; the token counts stay under ``TOKENS`` for what needs them (auto_batch's longest rows).
    batch_rebalance balances tokens over the processes: it always reads tokens. group_by_length's sampler is seeded by
    the run's seed and the epoch (``upstream.seeded_length_grouping``). Returns whether the rows are grouped."""
    import time

    args = trainer.args
    if args.train_sampling_strategy not in GROUPING:
        return False
    column, started = args.length_column_name, time.time()
    by_image_size = by_image_size and grouped_by_length(args)
    collator = trainer.data_collator

    def measured(rows):
        if rows is None or column in rows.column_names:
            return rows
        return lengths_added(rows, collator, column, by_image_size=by_image_size)

    trainer.train_dataset = measured(trainer.train_dataset)
    held_out = trainer.eval_dataset  # transformers also takes several evaluation sets, by name
    trainer.eval_dataset = ({name: measured(rows) for name, rows in held_out.items()} if isinstance(held_out, dict)
                            else measured(held_out))
    trainer.data_collator = WithoutColumns(collator, (column, TOKENS))  # the sampler's, not the model's
    if grouped_by_length(args):  # each epoch's order from the seed: a resumed run's the same
        from jobs import upstream

        upstream.seeded_length_grouping(trainer)
    if is_main_process():
        how = "image size, then length" if by_image_size else "length"
        print(f"{stage}: rows batched by {how} ({args.train_sampling_strategy}); lengths of "
              f"{len(trainer.train_dataset)} rows in {time.time() - started:.1f}s", flush=True)
    return True


def lengths_added(rows, collator, column: str, *, by_image_size: bool = False):
    """``rows`` with the length transformers' length grouping reads under ``column``: the tokens ``collator`` makes of
    each row, or its place by image size, then tokens, the tokens kept under ``TOKENS`` (see ``with_lengths``)."""
    tokens = token_counts(collator, rows)
    if not by_image_size:
        return rows.add_column(column, tokens)
    rows = rows.add_column(TOKENS, tokens)
    return rows.add_column(column, batching_keys(tokens, image_sizes(rows)))


def batching_keys(tokens: list[int], sizes: list[tuple]) -> list[int]:
    """Each row's place in the rows ordered by what its images come out of the processor as, then by its tokens: the
    length that transformers' LengthGroupedSampler sorts each megabatch by. A row's images are padded to their largest
    width and height, and make a number of image tokens each: rows of the same count and largest size (from
    ``image_sizes``) pad none of each other's pixels or image tokens, and neighbours then differ in text only."""

    def geometry(row_sizes: tuple) -> tuple[int, int, int]:
        if not row_sizes:
            return 0, 0, 0
        return len(row_sizes), max(w for w, _ in row_sizes), max(h for _, h in row_sizes)

    order = sorted(range(len(tokens)), key=lambda i: (geometry(sizes[i]), tokens[i]))
    places = [0] * len(order)
    for place, row in enumerate(order):
        places[row] = place
    return places


def image_sizes(rows, column: str = "images") -> list[tuple[tuple[int, int], ...]]:
    """Each row's images' (width, height), in order, read from their files' headers, not decoded. Rows of the same
    sizes come out of any processor in one geometry."""
    if column not in rows.column_names:
        return [()] * len(rows)
    sizes = []
    for batch in rows.select_columns([column]).with_format("arrow").iter(batch_size=CHUNK):
        for images in batch.column(column).to_pylist():
            sizes.append(tuple(_header_size(image) for image in images or []))
    return sizes


def _header_size(image: dict) -> tuple[int, int]:
    import io

    from PIL import Image

    source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    with Image.open(source) as opened:  # reads the header; the pixels only when asked for
        return opened.size

