"""Shared-prefix DPO: each pair's image and prompt encoded once, its two answers continuing from it.

TRL's DPOTrainer scores B pairs as 2B rows, [prompt + chosen] then [prompt + rejected] (its
DataCollatorForVisionPreference, rows flushed left), so the policy and the reference each run the vision tower and the
prompt twice per pair. Here the model sees the same batch packed into B rows,

    [prompt, chosen, last prompt token again, rejected]

under a 4D attention mask in which the prompt attends as in TRL's rows (causally; PaliGemma's prefix both ways) and
each answer sees the prompt and itself, never the other answer; every token keeps the position it has in TRL's row
(Qwen2-VL's multimodal rotary positions from the model's own get_rope_index). The repeated last prompt token scores the
rejected answer's first token: it has the original's token, position and context (the prompt before it), so its
hidden state is the original's, and the rejected answer attends to it instead of the original, which the chosen
answer's first token already needs. The outputs of TRL's fused LM head (per-token log-probs, entropy, ...) are laid
back out as TRL's 2B rows, so TRL's own loss, rewards and metrics run unchanged, and gradients reach the prompt's
computation through both answers.

A text model with a sliding window attends, in its sliding layers, to the tokens of the window before each token in
TRL's row (transformers builds that mask from ``config.sliding_window``), but it hands a 4D mask as is to every layer.
Where every layer slides (Mistral: Idefics2, and LLaVA on a Mistral), the packed mask keeps each token's window over
its own row's columns. Where full and sliding layers alternate (Gemma 2: PaliGemma 2), one mask cannot serve both, so
a batch with a row longer than the window is scored as TRL's rows, said once.

The packing wraps the model's forward only while the trainer computes the DPO loss or reference log-probs.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from peft import PeftModel
from trl import DPOTrainer

from jobs import upstream
from jobs.contract import UserError
from jobs.families import family_of

# A custom 4D mask is what these attention implementations take as is; flash-attention takes only padding (or
# varlen sequences, which cannot let two answers share one prompt), flex-attention a BlockMask.
ATTENTION = ("eager", "sdpa")
FIRST_POSITION = {"paligemma": 1}  # PaliGemmaModel counts positions from 1, the others from 0
IGNORE = -100  # TRL's label for a token that is not scored (the prompt, padding)
# The processors' image outputs in the families' batches: each lists the batch's images, their patches or its rows
IMAGE_INPUTS = ("pixel_values", "pixel_attention_mask", "image_sizes", "image_grid_thw", "aspect_ratio_ids", "aspect_ratio_mask")
# The layer kinds (config.layer_types) whose mask the packing can build: causal, or causal within a sliding window
LAYER_KINDS = {"full_attention", "sliding_attention"}


@dataclass(frozen=True)
class Window:
    """The text model's sliding window as its config declares it (``config.sliding_window``)."""

    tokens: int | None
    everywhere: bool  # every layer slides, so the one mask the model hands all its layers can carry the window

    @classmethod
    def of(cls, text_config) -> Window:
        tokens = getattr(text_config, "sliding_window", None)
        # Where the config also lists full layers, or lists no sliding one, the packed rows cannot say which layers
        # the window applies to (Mistral reads sliding_window alone), so long rows go to TRL's (outrun_by): correct
        return cls(tokens, tokens is not None and layer_kinds(text_config) == {"sliding_attention"})

    def outrun_by(self, attention_mask: torch.Tensor) -> int | None:
        """The longest row of TRL's batch where one packed mask cannot give every layer what TRL's rows get (a row
        longer than a window that not every layer has), else None."""
        if self.tokens is None or self.everywhere:
            return None
        longest = int(attention_mask.sum(1).max())
        return longest if longest > self.tokens else None


def layer_kinds(text_config) -> set[str]:
    """The kinds of attention layer the text model's config lists; one that lists none (Llama, Mistral) has one kind,
    sliding where it sets a window."""
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types:
        return set(layer_types)
    return {"full_attention" if getattr(text_config, "sliding_window", None) is None else "sliding_attention"}


def unsupported(model) -> str | None:
    """Why this model cannot run the shared-prefix forward, or None when it can."""
    family = family_of(model.config.model_type)
    if family is None:
        return f"no shared-prefix forward for model type {model.config.model_type!r}"
    if family.shared_prefix_unsupported:
        return f"{family.name}: {family.shared_prefix_unsupported}"
    attention = upstream.attention_implementation(model.config.get_text_config())
    if attention not in ATTENTION:
        return (f"model.attn_implementation {attention} takes no custom attention mask, which each answer's view of "
                f"the shared prompt needs; use {' or '.join(ATTENTION)}")
    other = layer_kinds(model.config.get_text_config()) - LAYER_KINDS
    if other:  # transformers would hand these layers the packed mask too, and lose what sets them apart
        return f"the text model's {', '.join(sorted(other))} layers take no packed mask"
    return None


def wanted(setting: bool | None, model) -> bool:
    """Whether the stage packs pairs: the recipe's dpo.shared_prefix, None meaning wherever the model can."""
    if setting is False:
        return False
    reason = unsupported(model)
    if reason and setting:
        raise UserError(f"dpo.shared_prefix: {reason}; or set dpo.shared_prefix: false")
    return reason is None


@dataclass(frozen=True)
class Packing:
    """Where each token of the B packed rows comes from in TRL's 2B rows, and where each of TRL's per-token outputs
    comes from in the packed rows. Built from the batch's attention mask and labels alone."""

    rows: torch.Tensor  # [B, N] source row in TRL's batch
    cols: torch.Tensor  # [B, N] source column: the token's position in its own sequence
    real: torch.Tensor  # [B, N] false for padding
    segment: torch.Tensor  # [B, N] 0 prompt, 1 chosen, 2 rejected (from the repeated last prompt token on)
    start: torch.Tensor  # [B, N] the column the token's segment starts at: an answer sees prompt columns before it
    out_cols: torch.Tensor  # [2B, L-1] packed column of each of TRL's outputs (row i and B+i come from packed row i)
    out_real: torch.Tensor  # [2B, L-1] false where TRL's output is 0 (no label there)

    @classmethod
    def of(cls, attention_mask: torch.Tensor, labels: torch.Tensor) -> Packing:
        pairs, length = attention_mask.size(0) // 2, attention_mask.size(1)
        real = attention_mask.bool()
        answer = real & (labels != IGNORE)
        prompt_len, answer_len = (real & ~answer).sum(1), answer.sum(1)
        shared = torch.equal(prompt_len[:pairs], prompt_len[pairs:])
        if attention_mask.size(0) % 2 or not shared or prompt_len.min() < 1:
            raise ValueError("shared prefix: the batch is not TRL's [prompt + chosen; prompt + rejected] rows")
        prompts, chosen, rejected = (t.tolist() for t in (prompt_len[:pairs], answer_len[:pairs], answer_len[pairs:]))
        width = max(p + c + 1 + r for p, c, r in zip(prompts, chosen, rejected))
        device = attention_mask.device
        rows, cols, segment, start = (torch.zeros(pairs, width, dtype=torch.long) for _ in range(4))
        packed_real = torch.zeros(pairs, width, dtype=torch.bool)
        for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
            n = p + c + 1 + r
            rows[i] = i
            rows[i, p + c:n] = pairs + i
            cols[i, :p + c] = torch.arange(p + c)
            cols[i, p + c:n] = torch.arange(p - 1, p + r)
            segment[i, p:p + c], segment[i, p + c:n] = 1, 2
            start[i, p:p + c], start[i, p + c:n] = p, p - 1
            packed_real[i, :n] = True
        # TRL's output j of a row scores its token j+1 from the hidden state at j
        j = torch.arange(length - 1)[None]
        p, c, r = (torch.tensor(v)[:, None] for v in (prompts, chosen, rejected))
        out_cols = torch.cat([j.expand(pairs, -1), j + c + 1])
        out_real = torch.cat([j < p + c - 1, (j >= p - 1) & (j < p + r - 1)])
        out_cols = torch.where(out_real, out_cols, 0)
        return cls(*(t.to(device) for t in (rows, cols, packed_real, segment, start, out_cols, out_real)))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """TRL's [2B, L] (or [k, 2B, L]) per-token tensor in the packed layout, [B, N] (or [k, B, N])."""
        return tensor[..., self.rows, self.cols]

    def attention(self, prefix: torch.Tensor | None, dtype: torch.dtype | None,
                  window: int | None = None) -> torch.Tensor:
        """The [B, 1, N, N] mask: bool, or additive in ``dtype`` (eager attention adds it to the scores).
        ``prefix``: PaliGemma's bidirectional prompt tokens (token type 0), packed. ``window``: a sliding window in
        tokens, over the columns of TRL's rows as transformers' sliding mask has it (the prefix still sees itself
        whole, as transformers adds its blocks on top of the window)."""
        q, k = (lambda t: t[:, :, None]), (lambda t: t[:, None, :])
        shares = (k(self.segment) == q(self.segment)) | ((k(self.segment) == 0) & (k(self.cols) < q(self.start)))
        sees = k(self.real) & shares & (k(self.cols) <= q(self.cols))
        if window is not None:
            sees &= k(self.cols) > q(self.cols) - window
        if prefix is not None:
            prompt = self.real & prefix & (self.segment == 0)
            sees |= q(prompt) & k(prompt)
        # a padding row attends to itself: a row that sees nothing gives sdpa NaN
        sees |= torch.eye(sees.size(-1), dtype=torch.bool, device=sees.device)
        sees = sees[:, None]
        if dtype is None:
            return sees
        return torch.zeros(sees.shape, dtype=dtype, device=sees.device).masked_fill(~sees, torch.finfo(dtype).min)

    def unpack(self, per_token: torch.Tensor) -> torch.Tensor:
        """A packed [B, N-1] output of the fused LM head as TRL's [2B, L-1], zero where TRL's is."""
        pairs = per_token.size(0)
        rows = torch.arange(pairs, device=per_token.device).repeat(2)[:, None]
        return per_token[rows, self.out_cols].masked_fill(~self.out_real, 0)


def first_images(kwargs: dict) -> dict:
    """The image inputs of TRL's first B rows (the chosen ones), which the packed rows share with the rejected ones.

    TRL's collator passes the processor the pairs' image lists twice over (``[example["images"] ...] * 2``), so every
    image tensor lists the chosen rows' entries first and the same entries again for the rejected rows: its first half,
    whatever the number of images in each row. That holds for a flat tensor of the batch's images (LLaVA's and
    PaliGemma's pixel_values, LLaVA-style image_sizes), one of their patches (Qwen2-VL's pixel_values, with one
    image_grid_thw per image), one of rows (Idefics2/3's pixel_values and pixel_attention_mask, padded to the most
    images in a row) and one of tiles (InternVL's, a varying number per image; Llama 3.2 Vision's pixel_values, aspect_ratio_ids
    and aspect_ratio_mask, one row per text row)."""
    kwargs = dict(kwargs)
    for key in IMAGE_INPUTS:
        value = kwargs.get(key)
        if value is not None:
            if value.size(0) % 2:
                raise ValueError(f"shared prefix: {key} has {value.size(0)} entries, not TRL's twice-listed images")
            kwargs[key] = value[: value.size(0) // 2]
    return kwargs


def positions(model, family: str, input_ids, attention_mask, kwargs) -> torch.Tensor:
    """The position ids the model gives TRL's rows itself: [2B, L], or [3, 2B, L] for multimodal rotary positions."""
    if kwargs.get("mm_token_type_ids") is not None:  # Qwen2-VL
        ids, _ = model.model.get_rope_index(
            input_ids, mm_token_type_ids=kwargs["mm_token_type_ids"], image_grid_thw=kwargs.get("image_grid_thw"),
            video_grid_thw=kwargs.get("video_grid_thw"), attention_mask=attention_mask,
        )
        return ids
    offset = FIRST_POSITION.get(family, 0)
    return (torch.arange(input_ids.size(1), device=input_ids.device) + offset).expand_as(input_ids)


def packed_forward(model, forward, family: str):
    """``forward`` (TRL's fused-LM-head forward of ``model``) scoring TRL's pair rows through the packed rows."""
    window = Window.of(model.config.get_text_config())

    @functools.wraps(forward)
    def pack(*args, fused_lm_head=False, labels=None, **kwargs):
        if args or not fused_lm_head or labels is None or kwargs.get("input_ids") is None:
            return forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        input_ids, attention_mask = kwargs.pop("input_ids"), kwargs.pop("attention_mask")
        token_types = kwargs.pop("token_type_ids", None)
        cross_attention = kwargs.pop("cross_attention_mask", None)
        position_ids = positions(model, family, input_ids, attention_mask, kwargs)
        kwargs.pop("mm_token_type_ids", None)  # only get_rope_index reads it
        packing = Packing.of(attention_mask, labels)
        if cross_attention is not None:  # Llama 3.2 Vision's [2B, L, images, tiles]: each token keeps its row's
            kwargs["cross_attention_mask"] = cross_attention[packing.rows, packing.cols]
        eager = upstream.attention_implementation(model.config.get_text_config()) == "eager"
        mask = packing.attention(None if token_types is None else packing.gather(token_types) == 0,
                                 torch.float32 if eager else None, window.tokens if window.everywhere else None)
        # Padding gets the pad token: a copy of a real one could be an image placeholder with no image behind it
        pad = model.config.get_text_config().pad_token_id or 0
        out = forward(
            input_ids=packing.gather(input_ids).masked_fill(~packing.real, pad), attention_mask=mask,
            position_ids=packing.gather(position_ids), labels=packing.gather(labels).masked_fill(~packing.real, IGNORE),
            fused_lm_head=True, **first_images(kwargs),
        )
        fields = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
        unpacked = {name: None if getattr(out, name) is None else packing.unpack(getattr(out, name)) for name in fields}
        return type(out)(loss=out.loss, **unpacked, label_mask=labels[:, 1:] != IGNORE, aux_loss=out.aux_loss)

    pack.shared_prefix = True
    return pack


class SharedPrefixDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer whose policy and reference passes score each pair's answers from one pass over its prompt."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        wanted(True, self.model)
        self._family = family_of(self.model.config.model_type).name
        for model in self._models():  # TRL's fused-head forward, which the packing wraps, is there as written for
            upstream.trl_fused_forward(model)
        self._window = Window.of(self.model.config.get_text_config())
        self._said_window = False

    def _models(self) -> list:
        """The policy and the reference (when a copy), as the models whose forward TRL fused with its LM head."""
        models = [self.accelerator.unwrap_model(m) for m in (self.model, self.ref_model) if m is not None]
        return [m.get_base_model() if isinstance(m, PeftModel) else m for m in models]

    def _shared_prefix(self, inputs):
        """Packed rows for this batch, or TRL's where its rows outrun a window that only some layers have."""
        longest = self._window.outrun_by(inputs["attention_mask"])
        if longest is None:
            return self._packed()
        if not self._said_window:
            print(f"shared prefix: rows of up to {longest} tokens outrun the text model's {self._window.tokens}-token "
                  "sliding window, which only some of its layers have (a packed mask serves all layers alike): such "
                  "batches are scored as TRL's rows, the prompt encoded twice per pair", flush=True)
            self._said_window = True
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _packed(self):
        wrapped = [m for m in self._models() if not getattr(m.forward, "shared_prefix", False)]
        originals = [vars(m).get("forward") for m in wrapped]  # TRL's fused-head forward, on the instance
        for model in wrapped:
            model.forward = packed_forward(model, model.forward, self._family)
        try:
            yield
        finally:
            for model, original in zip(wrapped, originals):
                if original is None:
                    del model.forward
                else:
                    model.forward = original

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self._shared_prefix(inputs):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def compute_ref_log_probs(self, model, inputs):
        with self._shared_prefix(inputs):
            return super().compute_ref_log_probs(model, inputs)
