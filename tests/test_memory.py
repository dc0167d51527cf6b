"""The memory arithmetic against the DPO blog's own numbers for Idefics2-8B."""

from __future__ import annotations

import pytest
import torch

from jobs.memory import Estimate, arithmetic, estimate


def test_full_fp32_fine_tune_with_a_reference_copy_is_the_blogs_160_gb():
    parts = arithmetic(8e9, 8e9, 4, reference_copy=True)
    assert (parts.model, parts.reference, parts.gradients, parts.optimizer) == (32, 32, 32, 64)
    assert parts.total == 160


def test_bf16_lora_is_the_blogs_32_3_gb_when_every_part_is_counted_at_two_bytes():
    """The blog's 32.3 GB: 16 + 16 + 0.11 + 0.22 (its table rounds to 0.1 and 0.2), gradients and AdamW states of
    the 55,348,736 trainable parameters at bf16's 2 bytes, as the weights."""
    blog = arithmetic(8e9, 55.3e6, 2, reference_copy=True)
    assert (blog.model, blog.reference) == (16, 16)
    assert (round(blog.gradients, 1), round(blog.optimizer, 1)) == (0.1, 0.2)
    assert blog.total == pytest.approx(32.3, abs=0.05)


def test_lora_adapter_states_are_fp32_as_peft_keeps_them_issue_11():
    """peft keeps the adapter in fp32 on a bf16 base: 4 bytes of weight, 4 of gradient and 8 of AdamW states per
    trainable parameter. The blog's reference copy: 32.9 GB, not 32.3; vlmjobs' (the adapter switched off): 16.8."""
    blog = arithmetic(8e9, 55.3e6, 2, trainable_bytes=4, reference_copy=True)
    assert blog.gradients == pytest.approx(55.3e6 * 4 / 1e9) and blog.optimizer == pytest.approx(55.3e6 * 8 / 1e9)
    assert blog.model == pytest.approx((8e9 - 55.3e6) * 2 / 1e9 + 55.3e6 * 4 / 1e9)
    assert blog.total == pytest.approx(32.9, abs=0.05)
    ours = arithmetic(8e9, 55.3e6, 2, trainable_bytes=4, reference_copy=False)
    assert ours.total == pytest.approx(16.8, abs=0.05)


def test_estimate_of_a_loaded_model_counts_the_bytes_its_weights_take():
    model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 10)).to(torch.bfloat16)
    model[1].requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts = estimate(model, trainable=trainable, reference_copy=False)
    assert parts.model == pytest.approx((10100 + 1010) * 2 / 1e9)
    assert parts.gradients == pytest.approx(10100 * 2 / 1e9) and parts.optimizer == pytest.approx(2 * 10100 * 2 / 1e9)
    assert str(Estimate(1, 0, 0.5, 1)) == "model 1 GB + reference 0 GB + gradients 0.5 GB + optimizer 1 GB = 2.5 GB"


def test_a_stages_estimate_from_the_config_alone_counts_what_loading_the_model_counts(write_recipe):
    from peft import get_peft_model

    from jobs import memory, modeling
    from jobs import recipe as recipes
    from jobs.families import get_family

    recipe = recipes.load(write_recipe(sft={"method": "lora", "lora": {"r": 4}}))
    estimate, counts = memory.for_stage(recipe, "sft")
    loaded = get_peft_model(modeling.load_model(recipe.model), modeling.lora_config(recipe.sft, get_family("llava")))
    trainable, total = modeling.count_parameters(loaded)
    assert (counts["trainable"], counts["parameters"] + counts["trainable"]) == (trainable, total)
    # as on a GPU: the base in bf16, the adapter, its gradients and AdamW states in fp32
    assert estimate.model == pytest.approx((counts["parameters"] * 2 + trainable * 4) / 1e9)
    assert estimate.gradients == pytest.approx(trainable * 4 / 1e9)
    assert estimate.reference == 0 and estimate.optimizer == pytest.approx(2 * estimate.gradients)
    assert counts["precision"] == "bfloat16 base, float32 adapter, bfloat16 compute"

    recomputing = {"method": "full", "reference_logprobs": "recompute"}  # cached log-probs need no copy (issue 12)
    full_dpo, counts = memory.for_stage(recipes.load(write_recipe(stages=["prepare", "dpo"], dpo=recomputing)), "dpo")
    assert full_dpo.reference == full_dpo.model, "full DPO recomputing the reference holds a frozen copy"
    assert full_dpo.model == pytest.approx(counts["parameters"] * 4 / 1e9), "fp32 master weights"
    assert (full_dpo.gradients, full_dpo.optimizer) == (full_dpo.model, 2 * full_dpo.model), "the blog's 32 + 32 + 32 + 64"
    assert counts["precision"] == "float32 weights, bfloat16 compute"
    sharded = {"resources": {"gpus": 2, "sharding": "fsdp"}, "stages": ["prepare", "dpo"]}
    cached, _ = memory.for_stage(recipes.load(write_recipe(**sharded, dpo={"method": "full"})), "dpo")
    assert cached.reference == 0, "sharded too, the cached log-probs (computed when training starts) need no copy"
    assert memory.for_stage(recipes.load(write_recipe(**sharded, dpo=recomputing)), "dpo")[0].reference == full_dpo.model

    pure, counts = memory.for_stage(recipes.load(write_recipe(sft={"method": "full", "pure_bf16": True})), "sft")
    assert pure.model == pytest.approx(counts["parameters"] * 2 / 1e9) and pure.optimizer == 2 * pure.model
    assert counts["precision"] == "bfloat16 weights"


# Issue 20: `vlmjobs memory` counts a published checkpoint's parameters from its config alone. Each config
# holds the checkpoint's config.json values that decide a weight's shape; each count is the one the model's hub page
# gives ("Model size", the safetensors' total).
PUBLISHED = [
    pytest.param(
        "qwen2_5_vl", "Qwen2_5_VLConfig", 8.29e9, {  # Qwen/Qwen2.5-VL-7B-Instruct: 8.29B params
            "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                            "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
            "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                              "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                              "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
            "tie_word_embeddings": False,
        }, id="Qwen2.5-VL-7B-Instruct"),
    pytest.param(
        "qwen3_vl", "Qwen3VLConfig", 8.77e9, {  # Qwen/Qwen3-VL-8B-Instruct: 8.77B params
            "text_config": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                            "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                                "mrope_interleaved": True}},
            "vision_config": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                              "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                              "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]},
            "tie_word_embeddings": False,
        }, id="Qwen3-VL-8B-Instruct"),
    pytest.param(
        "smolvlm2", "SmolVLMConfig", 2.25e9, {  # HuggingFaceTB/SmolVLM2-2.2B-Instruct: 2.25B params
            "text_config": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49280},
            "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                              "num_attention_heads": 16, "patch_size": 14, "image_size": 384},
            "scale_factor": 3, "tie_word_embeddings": False,
        }, id="SmolVLM2-2.2B-Instruct"),
    pytest.param(
        # meta-llama/Llama-3.2-11B-Vision-Instruct: "11B (10.6)" params, Meta's Llama 3.2 Vision model card
        # (meta-llama/llama-models, models/llama3_2/MODEL_CARD_VISION.md); a Llama 3.1 8B decoder with 8 cross-attention
        # layers added (40 in all), a 32 + 8 layer ViT-H/14 on 560 px tiles, the embedding 8 rows wider than the LM head
        "mllama", "MllamaConfig", 10.6e9, {
            "text_config": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 40,
                            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                            "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "tie_word_embeddings": False},
            "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_global_layers": 8,
                              "attention_heads": 16, "image_size": 560, "patch_size": 14, "max_num_tiles": 4,
                              "vision_output_dim": 7680, "intermediate_layers_indices": [3, 7, 15, 23, 30]},
            "image_token_index": 128256,
        }, id="Llama-3.2-11B-Vision-Instruct"),
    pytest.param(
        # OpenGVLab/InternVL3-8B-hf: no count is published beside it (its card's table names the parts, InternViT-300M-448px-
        # V2.5 and Qwen2.5-7B, and "8B"), so the count is its weights' bytes over 2: the hub's file listing
        # (huggingface.co/OpenGVLab/InternVL3-8B-hf/tree/main) shows four bf16 shards of 4.88, 4.99, 4.93 and 1.09 GB,
        # 15.89 GB, 7.945B parameters (each size rounded to 10 MB: within 0.1%). Its config.json is the one transformers'
        # convert_internvl_weights_to_hf.py wrote under transformers 4.52: untied embeddings said in text_config alone
        "internvl", "InternVLConfig", 15.89e9 / 2, {
            "text_config": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                            "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 151674,
                            "tie_word_embeddings": False},
            "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                              "image_size": [448, 448], "patch_size": [14, 14], "attention_bias": True, "use_qk_norm": False,
                              "use_absolute_position_embeddings": True},
            "downsample_ratio": 0.5, "image_token_id": 151667,
        }, id="InternVL3-8B-hf"),
]


@pytest.mark.parametrize("family, config_class, published, fields", PUBLISHED)
def test_vlmjobs_memory_counts_a_published_checkpoints_parameters_from_its_config(family, config_class, published, fields, tmp_path):
    import transformers

    from jobs import memory
    from jobs import recipe as recipes

    folder = tmp_path / "model"
    getattr(transformers, config_class)(**fields).save_pretrained(folder)  # config.json only: no weights anywhere
    recipe = recipes.from_dict({"name": "m", "model": {"name_or_path": str(folder), "family": family},
                                "data": {"sft": {"path": str(tmp_path), "format": "chartqa"}},
                                "run": {"root": str(tmp_path)}, "stages": ["prepare", "sft"], "sft": {"method": "lora"}})
    estimate, counts = memory.for_stage(recipe, "sft")
    assert counts["parameters"] == pytest.approx(published, rel=0.02)
    assert estimate.model == pytest.approx((counts["parameters"] * 2 + counts["trainable"] * 4) / 1e9)  # bf16 base


# google/gemma-3-12b-it's config.json as published (the keys it names; transformers' defaults fill the rest, as they do
# when it is loaded): a 48-layer Gemma 3 decoder of width 3840 and SigLIP-so400m at 896 px, embeddings tied.
GEMMA3_12B = {
    "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
    "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "text_config": {"hidden_size": 3840, "intermediate_size": 15360, "model_type": "gemma3_text", "num_attention_heads": 16,
                    "num_hidden_layers": 48, "num_key_value_heads": 8, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False},
}
# Published parameter counts: keras-hub's gemma3_instruct_12b preset (keras_hub/src/models/gemma3/gemma3_presets.py,
# "params": 12187079280; the hub's safetensors of google/gemma-3-12b-it: 12.2B).
PUBLISHED_CONFIG_JSON = {"gemma3": (GEMMA3_12B, 12_187_079_280)}


@pytest.mark.parametrize("family", sorted(PUBLISHED_CONFIG_JSON))
def test_vlmjobs_memory_counts_a_real_checkpoints_published_parameters_from_its_config(family, synthetic_data, tmp_path):
    """Issue 20: the count `vlmjobs memory` starts from, for the real checkpoint's config, within 2% of the published one.
    Tied input and output embeddings are one matrix (Gemma's 262208 x 3840, 1.0B of the 12.2B)."""
    import json

    from jobs import memory
    from jobs import recipe as recipes
    from tests.conftest import recipe_file

    config, published = PUBLISHED_CONFIG_JSON[family]
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    sources = {kind: synthetic_data(kind) for kind in ("chartqa", "rlaif-v")}
    recipe = recipes.load(recipe_file(tmp_path, folder, sources, family=family))
    _, counts = memory.for_stage(recipe, "sft")
    assert counts["parameters"] == pytest.approx(published, rel=0.02)
