"""Tiny random models of the real classes, built offline, for tests and the demo.

Each is the family's real model class with its real processor class and image processor, a
byte-level BPE tokenizer trained here with ``tokenizers``, and the family's own chat template,
saved with ``save_pretrained`` so that the stages load it through the same ``from_pretrained`` path
as a hub id. Deterministic from the seed; nothing is downloaded.

    vlmjobs tiny-model --family llava --out .cache/tiny/llava
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from jobs import synthetic

# The chat templates of the checkpoints the source documents use, as their hubs ship them.
LLAVA_TEMPLATE = (  # llava-hf/llava-1.5-7b-hf
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN2_VL_TEMPLATE = (  # Qwen/Qwen2-VL-7B-Instruct
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

VOCAB_SIZE = 600
IMAGE_SIZE = 32  # pixels; small enough to train in seconds on a CPU, large enough to see a bar
# Every linear layer takes a multiple of 64 features and gives a multiple of 32: bitsandbytes' 4-bit inference
# kernel for CPUs with AVX512-BF16 packs weights in blocks of that size, so evaluating a QLoRA run on such a CPU
# fails on anything narrower (``check_4bit_shapes``). Real checkpoints' widths are all multiples of 64.
VISION_WIDTH = 64


def build(family: str, out: str | Path, seed: int = 0) -> Path:
    """Build and save the tiny model of ``family`` into ``out``; returns ``out``."""
    import torch

    if family not in BUILDERS:
        raise ValueError(f"no tiny model for family {family!r} (have: {', '.join(BUILDERS)})")
    torch.manual_seed(seed)
    model, processor = BUILDERS[family]()
    check_4bit_shapes(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def train_tokenizer(special: list[str], bos: str | None, eos: str, pad: str, unk: str | None = None, **extra):
    """A byte-level BPE tokenizer trained on the synthetic data's text, wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(synthetic.corpus(), trainer)
    if bos:  # Llama-style tokenizers put <s> in front of every encoded text
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, **extra
    )


def _llava():
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = train_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], bos="<s>", eos="</s>", pad="<pad>", unk="<unk>")
    patch = 8
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=LLAVA_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_hidden_layers=2, num_attention_heads=2,
            image_size=IMAGE_SIZE, patch_size=patch, projection_dim=VISION_WIDTH,
        ),
        text_config=LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=len(tokenizer), max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    _widen_vision_init(model, ("model.vision_tower", "model.multi_modal_projector"))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def _qwen2_vl():
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = train_tokenizer(special, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    patch, merge = 4, 2
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch, merge_size=merge, temporal_patch_size=2,
        min_pixels=(patch * merge) ** 2, max_pixels=IMAGE_SIZE * IMAGE_SIZE,
    )
    video_processor = Qwen2VLVideoProcessor(patch_size=patch, merge_size=merge, temporal_patch_size=2)
    processor = Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=QWEN2_VL_TEMPLATE
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=2, embed_dim=VISION_WIDTH, hidden_size=64, num_heads=2, mlp_ratio=2,
            patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2,
        ),
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=len(tokenizer), max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    return model, processor


def check_4bit_shapes(model) -> None:
    """Fail on a linear layer that bitsandbytes' CPU inference kernel cannot pack (see VISION_WIDTH)."""
    import torch

    odd = [f"{name} ({m.in_features} -> {m.out_features})" for name, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and name != "lm_head" and (m.in_features % 64 or m.out_features % 32)]
    if odd:
        raise ValueError(f"tiny model: linear layers a 4-bit CPU forward cannot run: {', '.join(odd)}")


def _widen_vision_init(model, prefixes: tuple[str, ...], std: float = 0.1) -> None:
    """Re-draw the vision weights wider than the usual 0.02. At that scale a tiny random vision tower's
    features barely differ between images, so a few hundred training steps learn the answers' prior and
    ignore the picture; wider, the picture matters within the demo's budget (0.3 -> 0.9 held-out accuracy)."""
    import torch

    widened = [p for name, p in model.named_parameters() if name.startswith(prefixes) and p.dim() > 1]
    if not widened:  # transformers 5 moved the towers under model.: a stale prefix would widen nothing, silently
        raise ValueError(f"tiny model: no weights under {prefixes} to widen")
    for parameter in widened:
        torch.nn.init.normal_(parameter, std=std)


BUILDERS: dict[str, Callable] = {"llava": _llava, "qwen2_vl": _qwen2_vl}
