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
                            "rows": {"train": 2_830, "eval": 192}})

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
