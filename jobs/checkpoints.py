"""The seed recipes' checkpoints at their real geometry, without the hub: each config.json's values that decide a
weight's shape or a sequence's length, as published, and its processor's image geometry (issue 24).

Used where a model must have the real checkpoint's sizes but no weights are to be had: the counted FLOPs table
(``tests/bench/flops_table.py``) and the GPU check (``scripts/gpu_check.py``), which both build the model from
``config`` with random or no weights. The tokenizer is not the checkpoint's (that needs the hub): the tiny model's
byte-level BPE (jobs.tiny) renders the text, so text lengths are its own (its 600-token vocabulary cuts words into
more pieces than the real tokenizers do), while the image-token counts, vocabulary sizes and every width are the
checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Checkpoint:
    name: str  # the hub id
    family: str  # jobs.families
    recipe: str  # the shipped recipe that trains it (recipes/)
    config_class: str  # transformers' config class
    config: dict  # config.json's shape-deciding values
    image_processor: tuple[str, dict]  # transformers class, kwargs as preprocessor_config.json (and the recipe) set them
    processor: dict = field(default_factory=dict)  # the processor's own kwargs (image tokens per image)
    image_token: str = "<image>"  # the placeholder the config's image_token_id names
    rows: dict = field(default_factory=dict)  # the recipe's data: rows in the train and eval splits, as prepared
    # The source script's (per_device_train_batch_size, gradient_accumulation_steps), where the recipe leaves the
    # micro-batch to the stage (per_device_train_batch_size: auto) and keeps the script's effective batch
    source_batch: tuple[int, int] | None = None


IDEFICS2_8B = Checkpoint(
    "HuggingFaceM4/idefics2-8b", "idefics2", "recipes/idefics2-8b-rlaif-v-dpo.yaml", "Idefics2Config",
    {
        "text_config": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32003,
                        "max_position_embeddings": 32768, "sliding_window": 4096, "rms_norm_eps": 1e-5},
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                          "num_attention_heads": 16, "image_size": 980, "patch_size": 14},
        "perceiver_config": {"hidden_act": "silu", "resampler_n_latents": 64, "resampler_depth": 3, "resampler_n_heads": 16,
                             "resampler_head_dim": 96, "num_key_value_heads": 4},
        "tie_word_embeddings": False,
    },
    # the blog loads the processor with do_image_splitting=False: 64 tokens an image
    ("Idefics2ImageProcessor", {"size": {"longest_edge": 980, "shortest_edge": 378}, "do_image_splitting": False,
                                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}),
    {"image_seq_len": 64},
    rows={"train": 74_819, "eval": 4_156},  # RLAIF-V's 83,132 rows, eval and test 5% each carved by prepare
)

LLAVA_15_7B = Checkpoint(
    "llava-hf/llava-1.5-7b-hf", "llava", "recipes/llava-1.5-7b-rlaif-v-dpo.yaml", "LlavaConfig",
    {
        "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                          "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                          "projection_dim": 768},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
    },
    ("CLIPImageProcessor", {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
                            "image_mean": [0.48145466, 0.4578275, 0.40821073],
                            "image_std": [0.26862954, 0.26130258, 0.27577711]}),
    {"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1},  # 576 tokens
    rows={"train": 75_241, "eval": 3_960},  # rlaif-v_formatted's 79.2k train rows, eval 5% carved by prepare
)

QWEN2_VL_7B = Checkpoint(
    "Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl", "recipes/qwen2vl-7b-chartqa-qlora-sft.yaml", "Qwen2VLConfig",
    {
        "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                        "max_position_embeddings": 32768,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
        "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "mlp_ratio": 4, "num_heads": 16,
                          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "tie_word_embeddings": False,
    },
    ("Qwen2VLImageProcessor", {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
                               "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280}),
    image_token="<|image_pad|>",
    rows={"train": 2_830, "eval": 192},  # ChartQA train[:10%] and val[:10%]
    source_batch=(4, 8),  # the cookbook's SFTConfig
)

SMOLVLM = Checkpoint(
    "HuggingFaceTB/SmolVLM-Instruct", "idefics3", "recipes/smolvlm-rlaif-v-dpo.yaml", "Idefics3Config",
    {
        "text_config": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49155,
                        "max_position_embeddings": 16384, "rope_theta": 273768.0},
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                          "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
        "scale_factor": 3, "tie_word_embeddings": False,
    },
    # images resized to a longest edge of 4 x 384 and split into 384 px tiles plus the whole: 81 tokens each
    ("Idefics3ImageProcessor", {"size": {"longest_edge": 1536}, "max_image_size": {"longest_edge": 384},
                                "do_image_splitting": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}),
    {"image_seq_len": 81},
    rows={"train": 4_752, "eval": 42},  # rlaif-v_formatted train[:6%], test[:1%]
)
SMOLVLM_SFT = Checkpoint(**{**SMOLVLM.__dict__, "recipe": "recipes/smolvlm-chartqa-sft.yaml",
                            "rows": {"train": 2_830, "eval": 192}, "source_batch": (4, 4)})  # the cookbook's SFTConfig

# Image sizes like the data sets' (width, height), in turn: RLAIF-V's photos (COCO-like, mostly 640 on the long side)
# and ChartQA's charts (a few hundred to 1,200 pixels wide), so that a processor gives its real image-token counts
# (Qwen2-VL: 165 to 1,230 tokens for these charts) and a vision tower sees its real patches
RLAIF_V_SIZES = [(640, 480), (500, 375), (427, 640), (640, 360), (448, 448), (612, 612), (375, 500), (640, 426)]
CHARTQA_SIZES = [(800, 557), (850, 600), (310, 420), (1000, 800), (640, 480), (420, 320), (1200, 900), (760, 500)]

# (checkpoint, the stage its seed recipe trains)
SEEDS = {
    "idefics2-8b DPO": (IDEFICS2_8B, "dpo"),
    "llava-1.5-7b DPO": (LLAVA_15_7B, "dpo"),
    "SmolVLM DPO": (SMOLVLM, "dpo"),
    "qwen2-vl-7b SFT": (QWEN2_VL_7B, "sft"),
    "SmolVLM SFT": (SMOLVLM_SFT, "sft"),
}


def config(checkpoint: Checkpoint, tokenizer):
    """The transformers config of ``checkpoint`` with ``tokenizer``'s special token ids (its vocabulary lies within
    the checkpoint's, whose size the config keeps)."""
    import transformers

    ids = tokenizer.convert_tokens_to_ids
    fields = {key: dict(value) if isinstance(value, dict) else value for key, value in checkpoint.config.items()}
    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
               "bos_token_id": tokenizer.bos_token_id}
    fields["text_config"].update({k: v for k, v in special.items() if v is not None})
    image = ids(checkpoint.image_token)
    fields["image_token_id" if checkpoint.family != "llava" else "image_token_index"] = image
    if checkpoint.family == "qwen2_vl":
        fields |= {"video_token_id": ids("<|video_pad|>"), "vision_start_token_id": ids("<|vision_start|>"),
                   "vision_end_token_id": ids("<|vision_end|>")}
    return getattr(transformers, checkpoint.config_class)(**fields)


def processor(checkpoint: Checkpoint):
    """The checkpoint's processor class with its image geometry, around the tiny model's tokenizer and the checkpoint's
    chat template (both from jobs.tiny, which builds them offline)."""
    import transformers

    from jobs import tiny

    _, small = tiny.BUILDERS[checkpoint.family]()
    image_class, image_kwargs = checkpoint.image_processor
    image_processor = getattr(transformers, image_class)(**image_kwargs)
    parts = {"image_processor": image_processor, "tokenizer": small.tokenizer, "chat_template": small.chat_template}
    if checkpoint.family == "qwen2_vl":
        parts["video_processor"] = small.video_processor
    return type(small)(**parts, **checkpoint.processor)


def narrowed(checkpoint: Checkpoint, *, width: int = 256, layers: int = 2, vision_heads: int = 2,
             vision_layers: int = 2) -> Checkpoint:
    """``checkpoint`` made narrow and shallow enough to train on a 2-core CPU, keeping what decides how many tokens a
    row has and how wide its logits are: the vocabulary, the image geometry (image size, patch size, the perceiver's
    latents, the pixel-shuffle and spatial-merge factors: so the same image tokens per image) and every head's width.

    Shrunk: the language model to ``layers`` layers ``width`` wide (heads of the checkpoint's own width; grouped keys
    and values where it groups them; the MLP as many times wider as the checkpoint's), the vision tower to
    ``vision_layers`` layers of ``vision_heads`` heads of its own head width, the perceiver to one layer of 2 heads.
    The language model's body shrinks far more than its head: the share of a token's work in the vocabulary
    projection grows (``head_share`` says by how much)."""
    import dataclasses

    fields = {key: dict(value) if isinstance(value, dict) else value for key, value in checkpoint.config.items()}
    text = fields["text_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    heads = max(1, width // head_dim)
    groups = text["num_attention_heads"] // text.get("num_key_value_heads", text["num_attention_heads"])
    text.update(hidden_size=heads * head_dim, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // groups), head_dim=head_dim,
                intermediate_size=round(text["intermediate_size"] / text["hidden_size"] * heads * head_dim))
    vision = fields["vision_config"]
    if checkpoint.family == "qwen2_vl":  # its own keys: depth, embed_dim, num_heads; hidden_size is the merger's output
        vision_head_dim = vision["embed_dim"] // vision["num_heads"]
        vision.update(depth=vision_layers, num_heads=vision_heads, embed_dim=vision_heads * vision_head_dim,
                      hidden_size=text["hidden_size"])
    else:
        vision_head_dim = vision["hidden_size"] // vision["num_attention_heads"]
        width_ratio = vision["intermediate_size"] / vision["hidden_size"]
        vision.update(num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                      intermediate_size=round(width_ratio * vision_heads * vision_head_dim),
                      hidden_size=vision_heads * vision_head_dim)
        if "projection_dim" in vision:
            vision["projection_dim"] = vision["hidden_size"]
    if "perceiver_config" in fields:
        fields["perceiver_config"].update(resampler_depth=1, resampler_n_heads=2, num_key_value_heads=1)
    return dataclasses.replace(checkpoint, name=f"{checkpoint.name}, narrowed", config=fields)


def head_share(config) -> float:
    """The share of a text token's forward FLOPs spent in the vocabulary projection (the language model's matrices
    only: attention scores and the vision tower left out), to say how far a narrowed model is from its checkpoint."""
    text = config.get_text_config()
    width, head_dim = text.hidden_size, getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    attention = width * head_dim * (2 * text.num_attention_heads + 2 * text.num_key_value_heads)
    body = text.num_hidden_layers * (attention + 3 * width * text.intermediate_size)
    head = width * text.vocab_size
    return head / (body + head)


def at_sizes(rows: list[dict], sizes: list[tuple[int, int]]) -> list[dict]:
    """jobs.synthetic's rows (an ``image`` of PNG bytes each) with their images resized to ``sizes`` in turn."""
    import io

    from PIL import Image

    resized = []
    for i, row in enumerate(rows):
        image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB").resize(sizes[i % len(sizes)])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        resized.append({**row, "image": {"bytes": buffer.getvalue(), "path": None}})
    return resized


def save_narrowed(checkpoint: Checkpoint, out, seed: int = 0, **narrowing):
    """A model folder as save_pretrained writes it: ``narrowed(checkpoint)`` with random weights (seeded) and the
    checkpoint's processor (``processor``); loaded by from_pretrained as a downloaded checkpoint is."""
    import torch
    import transformers

    from jobs.families import get_family

    small = narrowed(checkpoint, **narrowing)
    processor_ = processor(small)
    torch.manual_seed(seed)
    model = getattr(transformers, get_family(checkpoint.family).model_class)(config(small, processor_.tokenizer))
    model.save_pretrained(out)
    processor_.save_pretrained(out)
    return out
