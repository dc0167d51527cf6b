"""PaliGemma's processor made to tokenize an answer on its own, as TRL's collators and vlmjobs' inference do.

TRL 1.16 tokenizes a batch's prompts with their images and its answers separately, without images, then joins them.
transformers' ``PaliGemmaProcessor`` refuses a call without images, and marks every token it returns as prefix
(``token_type_ids`` 0), which PaliGemma attends to in both directions: an answer marked so could see its own next
token. Here an answer tokenized on its own is PaliGemma's suffix, token type 1, exactly as the processor's own
``suffix=`` argument marks it; the prompt with its images stays the prefix. The ``labels`` the processor derives from
the token types are dropped: the collators make their own, and a prompt's labels would reach the model in DPO.

Imported only for families with ``prefix_lm`` (it imports transformers).
"""

from __future__ import annotations

from transformers import PaliGemmaProcessor

SUFFIX = 1  # PaliGemma's token type of the causal suffix; the prefix is 0


class PrefixLMProcessor(PaliGemmaProcessor):
    def __call__(self, images=None, text=None, suffix=None, **kwargs):
        if images is None and text is not None and suffix is None:
            encoded = self.tokenizer(text, **kwargs)
            encoded["token_type_ids"] = _like(encoded["input_ids"], SUFFIX)
            return encoded
        encoded = super().__call__(images=images, text=text, suffix=suffix, **kwargs)
        if suffix is None:
            encoded.pop("labels", None)
        return encoded

    def to_dict(self):
        # Saved as the processor it is on disk, so that AutoProcessor loads a saved model without vlmjobs
        return {**super().to_dict(), "processor_class": PaliGemmaProcessor.__name__}


def _like(ids, value: int):
    """``value`` in the shape of ``ids``: a tensor, a list of token lists, or one token list."""
    if hasattr(ids, "new_full"):
        return ids.new_full(ids.shape, value)
    if ids and isinstance(ids[0], list):
        return [[value] * len(row) for row in ids]
    return [value] * len(ids)
