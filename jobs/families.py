"""What differs between model families, in one table. Adding a family is one entry here plus its
tiny model in ``jobs.tiny``; every stage reads this table and nothing else about families.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jobs.contract import UserError
from jobs.formats import Drop

# How a processor bounds image size, which decides how prepare shrinks images before they are stored:
#   longest_edge  the longest side is scaled down to size["longest_edge"] (Idefics2/3, SmolVLM)
#   shortest_edge the shortest side is scaled to size["shortest_edge"], then cropped (CLIP, LLaVA)
#   fixed         squashed to size["height"] x size["width"] (SigLIP, PaliGemma)
#   max_pixels    an area budget: height*width within size["longest_edge"] pixels, sides multiples of patch x merge,
#                 the aspect ratio kept (Qwen2-VL's smart_resize; "longest_edge" is its name for max_pixels)
#   tiles         cut into tiles of size["height"] x size["width"] on the grid closest to the aspect ratio, at most
#                 max_patches of them (InternVL's crop_to_patches): the longest side is bounded by max_patches tiles
IMAGE_BOUNDS = ("longest_edge", "shortest_edge", "fixed", "max_pixels", "tiles")
ANSWER_COLUMNS = {"prompt", "completion", "chosen", "rejected"}  # a multi-turn prompt holds answers too
# Attention implementations that give packed rows (restarting position_ids, no attention_mask) a per-row mask in
# transformers 5 (masking_utils.find_packed_sequence_indices; varlen kernels for flash attention): sft.padding_free
PACKED_ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
# Of those, the ones under which each packed row attends within itself: padding-free by default only there. Flash
# attention's varlen kernels do; sdpa does as the sft stage runs it (jobs.packing.attend_by_row: sdpa on each row).
# Eager and flex materialise one mask over the whole joined batch, whose attention grows with its length squared
# (eight rows of L tokens: (8L)^2 against 8 L^2); `make bench` measured padding-free SFT with sdpa so at 0.58x padded.
PER_ROW_ATTENTION = ("flash_attention_2", "flash_attention_3", "sdpa")

# PaliGemma's own format is a prefix and a suffix: "<image>...<bos>{prefix}\n" attended bidirectionally, then
# "{suffix}<eos>" causally. The processor writes the "<bos>" and "\n" itself around a text that starts with the image
# placeholders, so the template puts every image first, the prompt's texts after them, and closes the answer with
# <eos>. It has no roles or turn markers: a pretrained PaliGemma has never seen any.
PALIGEMMA_TEMPLATE = (
    "{%- for message in messages -%}{%- for part in message['content'] if part['type'] == 'image' -%}<image>"
    "{%- endfor -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- if message['role'] == 'assistant' -%}{{ text }}{{ eos_token }}"
    "{%- else -%}{{ ' ' if not loop.first }}{{ text }}{%- endif -%}"
    "{%- endfor -%}"
)

# For a template that refuses a system message beside images (Family.system_beside_images): where the conversation has an
# image, the system message's text goes at the head of the first user turn, a blank line after it, and the message goes.
SYSTEM_INTO_FIRST_TURN = (
    "{%- set found = namespace(image=false) -%}{%- for message in messages if message['content'] is not string -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{%- set found.image = true -%}{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if found.image and messages[0]['role'] == 'system' and messages | length > 1 -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string else messages[0]['content'] "
    "| selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- set messages = [{'role': messages[1]['role'], 'content': [{'type': 'text', 'text': system + '\\n\\n'}] "
    "+ messages[1]['content']}] + messages[2:] -%}"
    "{%- endif -%}"
)

# Whether the conversation holds a video part: has_video.found (Family.video_template_swapped)
VIDEO_FOUND = (
    "{% set has_video = namespace(found=false) %}{% for message in messages if message['content'] is not string %}"
    "{% for part in message['content'] if part['type'] == 'video' %}{% set has_video.found = true %}{% endfor %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    model_class: str  # the transformers class the stages load
    model_types: tuple[str, ...]  # config.model_type values of checkpoints of this family
    image_bound: str  # one of IMAGE_BOUNDS
    processor_kwargs: dict = field(default_factory=dict)  # what the source documents pass to from_pretrained
    lora_target_modules: str | tuple[str, ...] = "all-linear"
    answer_needs_eos: bool = False  # the chat template closes an answer with no end token
    end_of_turn: str | None = None  # the token the template closes a turn with, where it is not the tokenizer's eos
    chat_template: str | None = None  # used where the checkpoint ships none
    prefix_lm: bool = False  # image and prompt attend both ways (token_type_ids 0), the answer causally (1)
    # The checkpoint's tokenizer adds BOS (add_special_tokens) and its chat template writes none; TRL's collators tokenize
    # with add_special_tokens=False, so the stages write it into the text they render (rendering_processor).
    prepend_bos: bool = False
    packing_unsupported: str | None = None  # why SFT cannot join this family's rows into one sequence (jobs.packing)
    shared_prefix_unsupported: str | None = None  # why DPO cannot score a pair's answers off one prompt (jobs.shared_prefix)
    multi_turn_unsupported: str | None = None  # why a conversation with earlier answers cannot be trained on (jobs.turns)
    # The processor pads a batch's images to its largest height and width, and the vision tower computes over every
    # patch of the padding (Idefics2: pixel_attention_mask masks it in attention only): batched by image size, rows
    # pad none (jobs.packing.with_lengths)
    pads_images_to_batch: bool = False
    takes_video: bool = False  # video rows (format video-messages) are trained on; for the others they are drops
    # The processor renders a conversation holding a video with transformers' own template, whatever its own
    # (SmolVLMProcessor.apply_chat_template: SmolVLM2's template has no video branch); the stages render it so too
    video_template_swapped: bool = False
    max_images: int | None = None  # images a conversation may hold; prepare drops a row with more, counted
    # The checkpoint's template refuses a system message in a conversation with images; the stages then render the system
    # text at the head of the first user turn (rendering_processor), as Gemma 3's template does with its system message
    system_beside_images: bool = True
    # Images reach the text through cross-attention, per token as cross_attention_mask says (jobs.cross_attention)
    cross_attention: bool = False
    # The model card calls the processor with add_special_tokens=False: the template writes BOS, which the tokenizer would
    # put in front a second time (the usage snippet of a pushed model does the same)
    card_special_tokens: bool = True
    hub_ids: tuple[str, ...] = ()  # checkpoints of the source documents

    def why_not_packed(self, attn_implementation: str | None) -> str | None:
        """Why SFT cannot join rows of this family under this attention implementation into one sequence
        (``sft.padding_free``, jobs.packing), or None."""
        if self.packing_unsupported:
            return f"{self.name} cannot train packed rows: {self.packing_unsupported}"
        if attn_implementation is not None and attn_implementation not in PACKED_ATTENTION:
            return (f"attention implementation {attn_implementation!r} gets no per-row mask from restarting positions "
                    f"(packing works with {', '.join(PACKED_ATTENTION)})")
        return None

    def max_image_edge(self, processor, scale: float = 1.0) -> tuple[int, int]:
        """(longest, shortest) side limits for stored images; 0 means no limit on that side."""
        image_processor = processor.image_processor
        size = image_processor.size
        if self.image_bound == "longest_edge":
            # Idefics3 squashes an image to one tile of max_image_size when it does not split it into tiles
            tile = getattr(image_processor, "max_image_size", None)
            if tile and not getattr(image_processor, "do_image_splitting", True):
                return int(tile["longest_edge"] * scale), 0
            return int(size["longest_edge"] * scale), 0
        if self.image_bound == "shortest_edge":
            return 0, int(size["shortest_edge"] * scale)
        if self.image_bound == "fixed":
            return 0, int(max(size["height"], size["width"]) * scale)
        if self.image_bound == "tiles":  # the widest canvas the processor tiles to: that many tiles in a row
            most = getattr(image_processor, "max_patches", None) or image_processor.max_image_tiles  # InternVL's, Mllama's
            return int(most * max(size["height"], size["width"]) * scale), 0
        return 0, 0  # max_pixels bounds the area, not a side (pixel_budget)

    def pixel_budget(self, processor, scale: float = 1.0) -> int | None:
        """Pixels (height * width) an image may keep, for processors that bound the area; the scale applies to the sides."""
        if self.image_bound != "max_pixels":
            return None
        return int(processor.image_processor.size["longest_edge"] * scale**2)

    def shrink(self, image, processor, scale: float = 1.0):
        """Shrink (never enlarge) an image to what the processor will use anyway: the blog's thumbnail step."""
        if self.image_bound == "max_pixels":
            return self._shrink_to_budget(image, processor, scale)
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

    def _shrink_to_budget(self, image, processor, scale: float):
        """An image over the pixel budget goes to the size Qwen2-VL's own smart_resize gives it for that budget (sides
        multiples of patch x merge, 28 on the real model, aspect ratio kept), so the processor resizes it no further; one
        within the budget is left alone (the processor only rounds its sides)."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        budget, image_processor = self.pixel_budget(processor, scale), processor.image_processor
        w, h = image.size
        if w * h <= budget:
            return image
        factor = image_processor.patch_size * image_processor.merge_size
        min_pixels = min(image_processor.size["shortest_edge"], budget)
        try:
            height, width = smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=budget)
        except ValueError as e:  # an aspect ratio over 200, which the processor refuses too
            raise Drop(f"image {w}x{h}: {e}") from None
        return image.resize((width, height))

    def rendering_processor(self, processor):
        """The processor the stages train and evaluate with: a copy whose chat template renders a conversation so that
        tokenizing it with add_special_tokens=False, as TRL's collators and jobs.inference do, gives the ids the
        checkpoint's own usage gives (``processor(text=processor.apply_chat_template(...), images=...)``): BOS where the
        tokenizer would add it (prepend_bos), and nothing after a closing answer's end of turn, so that the labelled span
        is the answer and the end token the model must learn to emit, not the separator the template puts after it.
        The processor saved beside a model keeps the checkpoint's own template: its users add BOS the card's way."""
        import copy
        from functools import partial

        rendering = copy.copy(processor)
        template = processor.chat_template
        if self.video_template_swapped:  # the card's rendering: transformers' template where a video is, else its own
            from jobs.upstream import smolvlm_video_template

            template = (VIDEO_FOUND + "{% if has_video.found %}" + smolvlm_video_template() + "{% else %}" + template
                        + "{% endif %}")
        rendering.chat_template = (
            ("" if self.system_beside_images else SYSTEM_INTO_FIRST_TURN)
            + "{% set rendered %}" + template + "{% endset %}"
            + ("{{ bos_token }}" if self.prepend_bos else "")
            + "{{ rendered.rstrip() if messages[-1]['role'] == 'assistant' and not add_generation_prompt else rendered }}"
        )
        if self.video_template_swapped:  # its apply_chat_template would swap this one out for a conversation with a video
            rendering.apply_chat_template = partial(type(processor).apply_chat_template, rendering,
                                                    chat_template=rendering.chat_template)
        return rendering

    def collator(self, collator, processor):
        """The trainer's collator (TRL's), or for a cross-attention family the same whose batches carry
        cross_attention_mask over their whole rows, prompt and answers (jobs.cross_attention)."""
        if not self.cross_attention:
            return collator
        from jobs.cross_attention import CompleteMasks

        return CompleteMasks(collator, processor.image_token_id)

    def close_answers(self, dataset, processor, *, scratch=None):
        """Append the end token to every answer where the chat template closes none (see answer_needs_eos). The
        mapped rows are cached in ``scratch`` (a stage's ``Stage.scratch``), not beside the rows read: those are
        another stage's finished output."""
        if not self.answer_needs_eos:
            return dataset
        eos = processor.tokenizer.eos_token
        columns = sorted(ANSWER_COLUMNS.intersection(dataset.column_names))

        def close(*conversations):
            for column, messages in zip(columns, conversations):
                # every answer of a multi-turn prompt too: SFT trains on each (jobs.turns), and DPO's context shows them closed
                for message in messages if column == "prompt" else messages[-1:]:
                    if message["role"] == "assistant":
                        [part for part in message["content"] if part["type"] == "text"][-1]["text"] += eos
            return dict(zip(columns, conversations))

        if scratch is not None:
            from jobs.upstream import dataset_fingerprint

            cache = str(Path(scratch) / f"closed-answers-{dataset_fingerprint(dataset)}.arrow")
        else:
            cache = None
        if cache:
            Path(scratch).mkdir(parents=True, exist_ok=True)
        return dataset.map(close, input_columns=columns, desc=f"closing answers with {eos}", cache_file_name=cache)

    def stop_token_ids(self, processor, generation_config) -> list[int]:
        """Ids that end a generated answer: the checkpoint's eos ids, the tokenizer's, and the template's end of turn."""
        eos = generation_config.eos_token_id
        ids = [*(eos if isinstance(eos, (list, tuple)) else [eos]), processor.tokenizer.eos_token_id]
        if self.end_of_turn:
            ids.append(processor.tokenizer.convert_tokens_to_ids(self.end_of_turn))
        return list(dict.fromkeys(i for i in ids if i is not None))


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
            prepend_bos=True,  # its Llama tokenizer adds <s> (add_bos_token); the template has none
            hub_ids=("llava-hf/llava-1.5-7b-hf",),
        ),
        Family(
            name="qwen2_vl",
            model_class="Qwen2VLForConditionalGeneration",
            model_types=("qwen2_vl",),
            image_bound="max_pixels",
            # no BOS: Qwen2's tokenizer has none and the template opens with <|im_start|>, as the model was trained
            hub_ids=("Qwen/Qwen2-VL-7B-Instruct",),
        ),
        Family(
            name="idefics2",
            model_class="Idefics2ForConditionalGeneration",
            model_types=("idefics2",),
            image_bound="longest_edge",
            # as the blog loads it: an image is 64 tokens, not 5 x 64 (four crops and the whole image)
            processor_kwargs={"do_image_splitting": False},
            pads_images_to_batch=True,
            end_of_turn="<end_of_utterance>",
            prepend_bos=True,  # its Mistral (Llama) tokenizer adds <s> (add_bos_token); the template has none
            hub_ids=("HuggingFaceM4/idefics2-8b",),
        ),
        Family(
            name="idefics3",
            model_class="Idefics3ForConditionalGeneration",
            model_types=("idefics3",),  # SmolVLM (v1) checkpoints are Idefics3 models; SmolVLM2 is model type smolvlm
            image_bound="longest_edge",
            # turns end with <end_of_utterance>, which Idefics3 checkpoints do not all list as eos (mlx-vlm#1932)
            end_of_turn="<end_of_utterance>",
            # no prepend_bos: SmolVLM's template writes its BOS (<|im_start|>) itself and its tokenizer adds nothing
            hub_ids=("HuggingFaceTB/SmolVLM-Instruct",),
        ),
        Family(
            name="paligemma",
            model_class="PaliGemmaForConditionalGeneration",
            model_types=("paligemma",),
            image_bound="fixed",  # SigLIP squashes every image to 224 x 224
            chat_template=PALIGEMMA_TEMPLATE,  # the pretrained checkpoints ship none
            # TRL's collators tokenize answers without images, which PaliGemmaProcessor refuses, and would mark
            # them as prefix (jobs.prefix_lm)
            prefix_lm=True,
            # transformers gives every prefix token the same block id (token_type_ids 0 -> 0) and lets blocks attend
            # both ways after the per-row mask is applied: packed, one row's prefix would see the other rows' prefixes
            packing_unsupported="its prefix-LM mask joins the prompts of packed rows",
            # an earlier answer would be prefix, which attends both ways: labelled, each token would see the next
            multi_turn_unsupported="its template has no turns and earlier answers would sit in its two-way prefix",
            # no prepend_bos: PaliGemmaProcessor writes "<bos>" after the image tokens itself, whatever add_special_tokens
            hub_ids=("google/paligemma-3b-pt-224",),
        ),
        Family(
            name="qwen2_5_vl",
            model_class="Qwen2_5_VLForConditionalGeneration",
            model_types=("qwen2_5_vl",),
            # Qwen2-VL's image processor (transformers' auto mapping) with 14 px patches merged 2 x 2: the same area
            # budget and smart_resize; the vision tower differs inside (window attention over 112 px windows but in
            # fullatt_block_indexes, RMSNorm and SwiGLU), which changes no input the stages build
            image_bound="max_pixels",
            # no BOS: Qwen2.5's tokenizer has none and its template (Qwen2-VL's) opens with <|im_start|>
            # Its class sets accepts_loss_kwargs = False (Qwen3-VL's too, Qwen2-VL's not): the Trainer passes no
            # num_items_in_batch, so under gradient accumulation each micro-batch's loss is its own token mean
            takes_video=True,  # frames spaced in time by second_per_grid_ts (jobs.video)
            hub_ids=("Qwen/Qwen2.5-VL-7B-Instruct",),
        ),
        Family(
            name="qwen3_vl",
            model_class="Qwen3VLForConditionalGeneration",
            model_types=("qwen3_vl",),  # the dense checkpoints; the MoE ones are qwen3_vl_moe, another class
            # Qwen2-VL's image processor again, with 16 px patches merged 2 x 2 (32 px per image token)
            image_bound="max_pixels",
            # no BOS, no default system prompt (unlike Qwen2/2.5-VL's template): the template opens with the first turn
            # Video frames carry their timestamps as text (<t seconds>), from the stored metadata (jobs.video)
            takes_video=True,
            hub_ids=("Qwen/Qwen3-VL-8B-Instruct",),
        ),
        Family(
            name="smolvlm2",
            model_class="SmolVLMForConditionalGeneration",
            model_types=("smolvlm",),  # SmolVLM2 checkpoints; SmolVLM (v1) ones are idefics3
            image_bound="longest_edge",  # Idefics3's tiling: max_image_size tiles within size["longest_edge"]
            end_of_turn="<end_of_utterance>",  # its template closes every turn with it, as SmolVLM's does
            # no prepend_bos: the template writes <|im_start|> itself and SmolLM2's tokenizer adds nothing
            # Video frames: at most 64, one a second (its video processor's num_frames and fps), each one tile with
            # its timestamp in the text, the conversation rendered by transformers' template with a <video> branch
            takes_video=True,
            video_template_swapped=True,
            hub_ids=("HuggingFaceTB/SmolVLM2-2.2B-Instruct",),
        ),
        Family(
            name="gemma3",
            model_class="Gemma3ForConditionalGeneration",
            model_types=("gemma3",),
            # SigLIP squashes every image (and, with pan-and-scan, each crop) to 896 x 896; stored with the shortest side
            # at that size, an image keeps the aspect ratio pan-and-scan decides its crops from
            image_bound="fixed",
            # turns end with <end_of_turn>; gemma-3-12b-it's generation config stops there and at <eos>
            end_of_turn="<end_of_turn>",
            # no prepend_bos: its template writes {{ bos_token }} itself. Images: token_type_ids 1 on an image's soft
            # tokens, which attend to each other both ways (Gemma3Processor marks them; the model builds the mask)
            # A shared-prefix pair is one custom 4D mask, which transformers hands every layer as it is (masking_utils):
            # it would give the image tokens no two-way attention and the sliding-window layers no window.
            shared_prefix_unsupported="its images' two-way attention (token_type_ids) and its sliding-window layers need "
                                      "masks of their own, which one custom attention mask for the pair cannot give",
            # Measured: tests/test_padding_free.py's tiny Gemma 3 gave 6.15764 packed against 6.15745 padded (eager and
            # sdpa alike). The padded rows' logits equal each row's alone; packed, every row after the first drifts from
            # some token on (up to 0.44), and only with token_type_ids: transformers' image-block mask (block ids over
            # the joined row) and the per-row mask of packed rows do not compose in 5.23. Without images typed, equal.
            packing_unsupported="its packed loss differs from padded SFT's (6.15764 against 6.15745 on the tests' tiny "
                                "Gemma 3: image blocks and a sliding window under the per-row mask)",
            card_special_tokens=False,  # its template writes BOS, and so would its tokenizer (the card tokenizes in the template)
            hub_ids=("google/gemma-3-12b-it",),
        ),
        Family(
            name="internvl",
            model_class="InternVLForConditionalGeneration",
            model_types=("internvl",),  # the -hf conversions of InternVL2.5, InternVL3 and InternVL3.5
            image_bound="tiles",  # 448-px tiles, up to 12 and a thumbnail (InternVLProcessor's crop_to_patches)
            # no prepend_bos and no end_of_turn: Qwen2's tokenizer has no BOS, and <|im_end|> closing a turn is its eos
            hub_ids=("OpenGVLab/InternVL3-8B-hf",),
        ),
        Family(
            name="mllama",
            model_class="MllamaForConditionalGeneration",
            model_types=("mllama",),  # Llama 3.2 Vision (11B, 90B)
            # 560-px tiles, the image resized onto the canvas of up to max_image_tiles (4) nearest its aspect ratio
            # (MllamaImageProcessor's get_optimal_tiled_canvas): the longest side is bounded by 4 tiles in a row
            image_bound="tiles",
            # no prepend_bos: the template writes <|begin_of_text|> itself, and the card calls the processor with
            # add_special_tokens=False; no end_of_turn: <|eot_id|> closes every turn and is the Instruct tokenizer's eos
            cross_attention=True,
            # "the model works best when attending to a single image ... You can't query about two different images at
            # the same time" (Hugging Face's Llama 3.2 release post): a row with more is dropped at prepare, counted
            max_images=1,
            # "the system role is not supported" (the same post): its template raises "Prompting with images is
            # incompatible with system messages." for a conversation with images, and takes one without
            system_beside_images=False,
            # Llama-3.2-11B-Vision-Instruct's card: processor(image, input_text, add_special_tokens=False, ...)
            card_special_tokens=False,
            hub_ids=("meta-llama/Llama-3.2-11B-Vision-Instruct",),
        ),
    ]
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"model family {name!r} is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def family_of(model_type: str) -> Family | None:
    """The family whose checkpoints have this config.model_type, if any."""
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)
