"""What differs between model families, in one table. Adding a family is one entry here plus its
tiny model in ``jobs.tiny``; every stage reads this table and nothing else about families.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from jobs.contract import UserError

# How a processor bounds image size, which decides how prepare shrinks images before they are stored:
#   longest_edge  the longest side is scaled down to size["longest_edge"] (Idefics2/3, SmolVLM)
#   shortest_edge the shortest side is scaled to size["shortest_edge"], then cropped (CLIP, LLaVA)
#   fixed         squashed to size["height"] x size["width"] (SigLIP, PaliGemma)
#   max_pixels    scaled to keep height*width within size["longest_edge"] pixels (Qwen2-VL)
IMAGE_BOUNDS = ("longest_edge", "shortest_edge", "fixed", "max_pixels")
ANSWER_COLUMNS = {"completion", "chosen", "rejected"}


@dataclass(frozen=True)
class Family:
    name: str
    model_class: str  # the transformers class the stages load
    model_types: tuple[str, ...]  # config.model_type values of checkpoints of this family
    image_bound: str  # one of IMAGE_BOUNDS
    processor_kwargs: dict = field(default_factory=dict)  # what the source documents pass to from_pretrained
    lora_target_modules: str | tuple[str, ...] = "all-linear"
    answer_needs_eos: bool = False  # the chat template closes an answer with no end token
    hub_ids: tuple[str, ...] = ()  # checkpoints of the source documents

    def max_image_edge(self, processor, scale: float = 1.0) -> tuple[int, int]:
        """(longest, shortest) side limits for stored images; 0 means no limit on that side."""
        size = processor.image_processor.size
        if self.image_bound == "longest_edge":
            return int(size["longest_edge"] * scale), 0
        if self.image_bound == "shortest_edge":
            return 0, int(size["shortest_edge"] * scale)
        if self.image_bound == "fixed":
            return 0, int(max(size["height"], size["width"]) * scale)
        max_pixels = size.get("longest_edge") or processor.image_processor.max_pixels
        return int(math.sqrt(max_pixels) * scale), 0

    def shrink(self, image, processor, scale: float = 1.0):
        """Shrink (never enlarge) an image to what the processor will use anyway: the blog's thumbnail step."""
        longest, shortest = self.max_image_edge(processor, scale)
        w, h = image.size
        factor = 1.0
        if longest and max(w, h) > longest:
            factor = longest / max(w, h)
        if shortest and min(w, h) > shortest:
            factor = shortest / min(w, h)
        if factor < 1.0:
            image = image.resize((max(1, round(w * factor)), max(1, round(h * factor))))
        return image

    def close_answers(self, dataset, processor):
        """Append the end token to every answer where the chat template closes none (see answer_needs_eos)."""
        if not self.answer_needs_eos:
            return dataset
        eos = processor.tokenizer.eos_token
        columns = sorted(ANSWER_COLUMNS.intersection(dataset.column_names))

        def close(*answers):
            for messages in answers:
                text_parts = [part for part in messages[-1]["content"] if part["type"] == "text"]
                text_parts[-1]["text"] += eos
            return dict(zip(columns, answers))

        return dataset.map(close, input_columns=columns, desc=f"closing answers with {eos}")


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in [
        Family(
            name="llava",
            model_class="LlavaForConditionalGeneration",
            model_types=("llava",),
            image_bound="shortest_edge",
            # llava-hf's template ends an answer with a space, no </s>: without one the model never learns
            # to stop (the original LLaVA training format closed every answer with </s>).
            answer_needs_eos=True,
            hub_ids=("llava-hf/llava-1.5-7b-hf",),
        ),
        Family(
            name="qwen2_vl",
            model_class="Qwen2VLForConditionalGeneration",
            model_types=("qwen2_vl",),
            image_bound="max_pixels",
            hub_ids=("Qwen/Qwen2-VL-7B-Instruct",),
        ),
    ]
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"model family {name!r} is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[name]
