"""The seed checkpoints narrowed for the real-geometry benches (jobs.checkpoints.narrowed): a narrow, shallow model
that still turns a real-size image into as many image tokens as the checkpoint does, with its whole vocabulary.
The expected counts are the model cards' and the processors' documented arithmetic, not the code's."""

from __future__ import annotations

import pytest
import torch
import transformers
from PIL import Image

from jobs import checkpoints
from jobs.families import get_family

# (checkpoint, an image size, the image tokens its processor gives that image, by the card's arithmetic)
CASES = {
    # Idefics2 without image splitting: the perceiver's 64 latents, whatever the size
    "idefics2-8b": (checkpoints.IDEFICS2_8B, (640, 480), 64),
    # CLIP at 336 px, patches of 14: 24 x 24
    "llava-1.5-7b": (checkpoints.LLAVA_15_7B, (640, 480), 576),
    # each side rounded to a multiple of 28 (patch 14, merged 2 x 2): 812 x 560 for 800 x 557, 29 x 20 merged patches
    "qwen2-vl-7b": (checkpoints.QWEN2_VL_7B, (800, 557), 580),
    # 384 px tiles, 729 patches each shuffled by 3 x 3 into 81 tokens: a 640 x 480 image is resized to a longest edge
    # of 1536 (1536 x 1152), cut into 4 x 3 tiles of 384, plus the whole image: 13 x 81
    "SmolVLM": (checkpoints.SMOLVLM, (640, 480), 13 * 81),
}


@pytest.mark.parametrize("name", CASES)
def test_a_narrowed_checkpoint_keeps_its_vocabulary_head_width_and_image_tokens(name):
    checkpoint, size, image_tokens = CASES[name]
    narrow = checkpoints.narrowed(checkpoint)
    processor = checkpoints.processor(narrow)
    real_text = checkpoints.config(checkpoint, processor.tokenizer).get_text_config()
    config = checkpoints.config(narrow, processor.tokenizer)
    text = config.get_text_config()
    assert text.vocab_size == real_text.vocab_size
    assert text.hidden_size // text.num_attention_heads == real_text.hidden_size // real_text.num_attention_heads
    assert (text.num_hidden_layers, text.hidden_size) < (real_text.num_hidden_layers, real_text.hidden_size)

    torch.manual_seed(0)
    model = getattr(transformers, get_family(checkpoint.family).model_class)(config).eval()
    assert sum(p.numel() for p in model.parameters()) < 100e6, "small enough for a 2-core CPU"
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text_in = processor.apply_chat_template(conversation, add_generation_prompt=True)
    batch = processor(text=text_in, images=[Image.new("RGB", size, "white")], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(checkpoint.image_token)
    assert int((batch["input_ids"] == image_id).sum()) == image_tokens
    with torch.no_grad():  # the model makes as many image features as the processor left places: no mismatch error
        logits = model(**batch).logits
    assert logits.shape[-1] == real_text.vocab_size


def test_head_share_is_the_vocabulary_projections_part_of_a_tokens_matrix_work():
    processor = checkpoints.processor(checkpoints.LLAVA_15_7B)
    config = checkpoints.config(checkpoints.LLAVA_15_7B, processor.tokenizer)
    # llava-1.5-7b by hand: a layer has 4 x 4096^2 attention and 3 x 4096 x 11008 MLP weights, 32 layers; the head
    # 4096 x 32064
    body = 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    head = 4096 * 32064
    assert checkpoints.head_share(config) == pytest.approx(head / (body + head))
    assert checkpoints.head_share(config) == pytest.approx(0.0199, abs=1e-4)


def test_at_sizes_resizes_the_rows_images_in_turn():
    from jobs import synthetic

    rows = checkpoints.at_sizes(synthetic.chartqa_rows(3), [(100, 50), (30, 60)])
    import io

    assert [Image.open(io.BytesIO(row["image"]["bytes"])).size for row in rows] == [(100, 50), (30, 60), (100, 50)]
    assert [row["query"] for row in rows] == [row["query"] for row in synthetic.chartqa_rows(3)]
