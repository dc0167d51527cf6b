"""Llama 3.2 Vision (mllama): its processor and batches made to give TRL's collators what the checkpoint's own use gives.

Mllama's text holds one ``<|image|>`` token per image; the image reaches the text through cross-attention layers, and
which text tokens see which image's tiles is ``cross_attention_mask`` (batch, tokens, images, tiles), built by
``MllamaProcessor`` from the token ids it is given: from an image's token to the next image's, or to the end of the text.

TRL 1.16 tokenizes a batch's prompts with their images and its answers alone, then joins them (its vision collators for
SFT and DPO; vlmjobs' evaluate does the same). Measured on the tiny twin, that goes wrong twice:

- ``MllamaProcessor`` puts BOS in front of any text that has none (``build_string_from_input``), so an answer tokenized
  alone becomes ``<|begin_of_text|>Yes<|eot_id|>``: the model would be trained to emit BOS inside every answer.
- The batch keeps the prompts' ``cross_attention_mask``, which has the prompts' length and their left padding, not the
  joined rows' (the answers would see no image: transformers slices the mask to the rows' length).

So the answers are tokenized as text (``CrossAttentionProcessor``: the template already wrote the conversation's BOS), and
the mask is rebuilt over the joined rows with transformers' own functions (``complete_masks``, through
``upstream.mllama_mask_functions``), which gives what the processor gives for the whole conversation in one text, as
the model card calls it.

A third, in transformers 5.23 itself: ``MllamaImageProcessor`` cannot batch a row without an image beside rows with one
(an image-less first row raises IndexError in ``pad_batches_and_tiles``; a later one leaves aspect_ratio_ids a row short,
which the model refuses). ``CrossAttentionProcessor`` then processes the rows that have images and gives the others
empty image slots, as the processor pads a row with fewer images than the batch's most.

Imported only for families with ``cross_attention`` (it imports transformers).
"""

from __future__ import annotations

import torch
from transformers import MllamaProcessor

from jobs import upstream

class CrossAttentionProcessor(MllamaProcessor):
    def __call__(self, images=None, text=None, **kwargs):
        if images is None and text is not None:  # an answer on its own (or a row without images): text as it is
            return self.tokenizer(text, **kwargs)
        if text is not None and isinstance(images, list) and any(not row for row in images) and any(images):
            return self._beside_imageless_rows(images, text, **kwargs)
        return super().__call__(images=images, text=text, **kwargs)

    def _beside_imageless_rows(self, images: list[list], text: list[str], return_tensors=None, **kwargs):
        """A batch in which some rows have no image: the image inputs of the rows that have, each other row's slots
        empty (zero pixels, aspect-ratio id 0, only the first tile marked, as the processor pads a missing image), and
        cross_attention_mask from the ids (complete_masks). The texts come from the template, which wrote their BOS."""
        from transformers import BatchFeature

        encoded = self.tokenizer(text, return_tensors="pt", **kwargs)
        with_images = [i for i, row in enumerate(images) if row]
        pictures = self.image_processor([images[i] for i in with_images], return_tensors="pt")
        for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
            value = pictures[key]
            full = value.new_zeros((len(images), *value.shape[1:]))
            if key == "aspect_ratio_mask":
                full[..., 0] = 1
            full[with_images] = value
            encoded[key] = full
        return BatchFeature(data=dict(complete_masks(encoded, self.image_token_id)), tensor_type=return_tensors)

    def to_dict(self):
        # Saved as the processor it is on disk, so that AutoProcessor loads a saved model without vlmjobs
        return {**super().to_dict(), "processor_class": MllamaProcessor.__name__}


def complete_masks(batch, image_token_id: int):
    """Set ``batch["cross_attention_mask"]`` to what MllamaProcessor builds for each row's whole ids (the images' tile
    counts read back from ``aspect_ratio_mask``), in place; a batch without images is left alone."""
    if "aspect_ratio_mask" not in batch:
        return batch
    get_cross_attention_token_mask, convert_sparse_cross_attention_mask_to_dense = upstream.mllama_mask_functions()
    ids, tiles = batch["input_ids"], batch["aspect_ratio_mask"]
    spans = [get_cross_attention_token_mask(row, image_token_id) for row in ids.tolist()]
    dense = convert_sparse_cross_attention_mask_to_dense(
        spans, num_tiles=tiles.sum(-1).tolist(), max_num_tiles=tiles.shape[-1], length=ids.shape[1]
    )
    mask = torch.zeros((*ids.shape, tiles.shape[1], tiles.shape[-1]), dtype=torch.long)  # every image slot the batch has
    mask[:, :, : dense.shape[2]] = torch.from_numpy(dense)
    batch["cross_attention_mask"] = mask.to(ids.device)
    return batch


class CompleteMasks:
    """A collator whose batches get ``complete_masks``: TRL's vision collators, wrapped for mllama."""

    def __init__(self, collator, image_token_id: int):
        self.collator, self.image_token_id = collator, image_token_id

    def __call__(self, examples):
        return complete_masks(self.collator(examples), self.image_token_id)
