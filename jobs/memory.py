"""Memory arithmetic before training, as the DPO blog does it: weights, a reference copy, gradients
and AdamW's two states per trainable parameter. Activations come on top; they depend on batch size
and sequence length and are left to measurement (``make bench``).

The blog's two tables, for Idefics2-8B (8B parameters):

    full fine-tune, fp32, with a reference copy: 32 + 32 + 32 + 64 = 160 GB
    LoRA on bf16 (55.3M trainable), reference counted: 16 + 16 + 0.1 + 0.2 = 32.3 GB

The second counts every part at bf16's 2 bytes: 55.3M x 2 B = 0.11 GB of gradients and 2 x 0.11 = 0.22 GB
of AdamW states, which the table rounds to 0.1 and 0.2 (16 + 16 + 0.11 + 0.22 = 32.33). peft keeps a LoRA
adapter in fp32 on a bf16 base (autocast_adapter_dtype), so its weights take 4 bytes and its gradients and
AdamW states 4 + 8: 16 + 16 + 0.22 + 0.44 (+ 0.11 for the adapter's own weights at 4 bytes, not 2) = 32.9 GB
with the blog's reference copy. With LoRA vlmjobs takes the reference by switching the adapter off, so it
holds no second copy: 16.8 GB. QLoRA's adapter is bf16 (TRL casts it, as the QLoRA paper does).

Full fine-tuning keeps fp32 master weights under bf16 autocast (``modeling.training_precision``), which is
the blog's first table; ``pure_bf16`` halves every part. Its reference copy is held only with
``dpo.reference_logprobs: recompute``: with the default ``cache`` the reference's log-probs are computed once by the
policy before its first step (jobs.reference_logprobs), so the first table drops to 32 + 32 + 64 = 128 GB.

Sharded (``resources.sharding``: FSDP's fully_shard over the stage's N processes), every GPU holds 1/N of each
part, a reference copy included (TRL shards it like the policy): the blog's 160 GB is 40 GB per GPU on 4, and
32 GB with the cached log-probs (computed by the sharded policy when training starts).

GRPO generates before it trains: each process samples its share of the generation batch at once, and transformers'
``generate`` keeps a key-value cache of every row's prompt and completion, per layer, in the compute precision
(``kv_cache_gb``). Qwen2.5-VL-3B in bf16 (36 layers, 2 key-value heads of 128) holds 36 KiB a token: 16 rows of a
1,024-token prompt and 512 completion tokens are 0.9 GB, on every GPU (FSDP shards weights, not each process's own
rows). TRL's vLLM colocate mode reserves its ``vllm_gpu_memory_utilization`` share of each GPU instead; server mode
generates on the server's own GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

GB = 1e9  # the blog's gigabytes
GIB = 2**30


@dataclass(frozen=True)
class Estimate:
    model: float  # GB of weights
    reference: float  # GB of a second, frozen copy for DPO's reference
    gradients: float
    optimizer: float
    shards: int = 1  # the GPUs each part is sharded over (FSDP); the parts are then what one GPU holds
    # GB each GPU holds for generating (GRPO's key-value cache, or vLLM's share in colocate mode): per process, so
    # never divided by sharding
    generation: float = 0.0

    @property
    def total(self) -> float:
        return self.model + self.reference + self.gradients + self.optimizer + self.generation

    def sharded(self, shards: int) -> Estimate:
        """What one of ``shards`` GPUs holds when every part is sharded over them."""
        whole = self.shards
        return replace(self, **{part: getattr(self, part) * whole / shards for part in PARTS}, shards=shards)

    def __str__(self) -> str:
        per_gpu = f" per GPU, sharded over {self.shards}" if self.shards > 1 else ""
        return (
            f"model {self.model:.3g} GB + reference {self.reference:.3g} GB + gradients {self.gradients:.3g} GB"
            f" + optimizer {self.optimizer:.3g} GB" + (f" + generation {self.generation:.3g} GB" if self.generation else "")
            + f" = {self.total:.3g} GB{per_gpu}"
        )


PARTS = ("model", "reference", "gradients", "optimizer")


def gpu_gb(gpu_memory_gib: float) -> float:
    """A GPU's size as products name it (GiB) in the blog's GB."""
    return gpu_memory_gib * GIB / GB


def fewest_shards(estimate: Estimate, available: float) -> int | None:
    """The fewest GPUs of ``available`` GB whose shards of the whole estimate fit (before activations); what each GPU
    holds for generation is not sharded."""
    whole = estimate.sharded(1)
    room = available - whole.generation
    if room <= 0:  # generation alone fills the GPU: no number of shards helps
        return None
    return math.floor((whole.total - whole.generation) / room) + 1


def shard_count(recipe, stage: str, estimate: Estimate | None = None) -> int:
    """Over how many GPUs a training stage shards its weights, gradients and optimizer states: all of its processes
    under ``resources.sharding: fsdp``, and under ``auto`` when one GPU of ``resources.gpu_memory_gib`` cannot hold
    the stage (``estimate``, computed when not given); 1 (each GPU holds everything) otherwise."""
    res = recipe.resources_for(stage)
    processes = max(res.gpus, 1) * res.nodes
    if processes == 1 or res.sharding in (None, "none"):
        return 1
    if res.sharding == "fsdp":
        return processes
    estimate = estimate or for_stage(recipe, stage)[0]
    return processes if estimate.sharded(1).total >= gpu_gb(res.gpu_memory_gib) else 1


def parts(stored_bytes: float, trainable: float, trainable_bytes: float, *, reference_copy: bool) -> Estimate:
    """The blog's formula: the weights as stored (and again for a reference copy), gradients and AdamW's two
    states in the trainable parameters' precision."""
    model = stored_bytes / GB
    return Estimate(
        model=model,
        reference=model if reference_copy else 0.0,
        gradients=trainable * trainable_bytes / GB,
        optimizer=2 * trainable * trainable_bytes / GB,
    )


def arithmetic(
    parameters: float, trainable: float, bytes_per_parameter: float, *, reference_copy: bool,
    trainable_bytes: float | None = None,
) -> Estimate:
    """The blog's arithmetic: every part in the training precision, unless the trainable parameters (and so their
    gradients and AdamW states) are kept in another (``trainable_bytes``: 4 for a LoRA adapter on a bf16 base)."""
    trainable_bytes = trainable_bytes or bytes_per_parameter
    stored = (parameters - trainable) * bytes_per_parameter + trainable * trainable_bytes
    return parts(stored, trainable, trainable_bytes, reference_copy=reference_copy)


def estimate(model, *, trainable: int, reference_copy: bool, shards: int = 1) -> Estimate:
    """The same arithmetic for a loaded model (not yet sharded), taking the bytes its weights really occupy (4-bit
    included); per GPU when sharded over ``shards``."""
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable_bytes = next((p.element_size() for p in model.parameters() if p.requires_grad), 4)
    return parts(stored, trainable, trainable_bytes, reference_copy=reference_copy).sharded(shards)


def for_stage(recipe, stage: str, prompt_tokens: int | None = None) -> tuple[Estimate, dict]:
    """The arithmetic for a training stage of a recipe from the model's config alone, before any weight is
    loaded or GPU asked for: parameters counted on the meta device, LoRA applied there too; for GRPO, what generating
    holds, with prompts of ``prompt_tokens`` (PROMPT_TOKENS when not given). Returns the estimate and the counts it
    was made from."""
    import torch
    import transformers
    from transformers import AutoConfig

    from jobs.families import get_family
    from jobs.modeling import lora_config, training_precision, user_errors

    family = get_family(recipe.model.family)
    train = getattr(recipe, stage)
    with user_errors(recipe.model.name_or_path, recipe.model.revision):
        config = AutoConfig.from_pretrained(recipe.model.name_or_path, revision=recipe.model.revision)
    # A checkpoint converted under transformers 4 (InternVL's -hf ones) says its embeddings are untied in text_config
    # alone; transformers 5.23 reads the top-level key (InternVLConfig's default: tied) and, loading, keeps the two
    # matrices apart because the checkpoint holds both. Counted tied, InternVL3-8B-hf was 7.40B, not its 7.945B
    text_config = config.get_text_config()
    if text_config is not config and getattr(text_config, "tie_word_embeddings", None) is False:
        config.tie_word_embeddings = False
    # Built on the meta device rather than under accelerate's init_empty_weights, which re-registers every parameter
    # as its own meta copy and so unties tied embeddings: Gemma 3's 262208 x 3840 matrix counted twice (13.2B, not 12.2B)
    with torch.device("meta"):
        model = getattr(transformers, family.model_class)(config)
    total = sum(p.numel() for p in model.parameters())
    # bitsandbytes stores every Linear but the output head in 4 bits; the rest stays in the compute dtype
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    if train.method == "full":
        trainable = total
    else:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(train, family))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    precision = training_precision(recipe.model, train, bf16_gpu=True)  # as on a GPU with bf16
    width = precision.weights.itemsize
    stored = (linear * 0.5 + (total - linear) * width) if train.method == "qlora" else total * width
    if train.method != "full":  # the adapter, on top of the base counted above
        stored += trainable * precision.trainable.itemsize
    # DPO recomputing the reference, and GRPO with a KL term (beta > 0), hold a frozen copy when every weight trains
    reference_copy = train.method == "full" and (
        (stage == "dpo" and train.reference_logprobs == "recompute") or (stage == "grpo" and bool(train.args.get("beta", 0.0))))
    estimate = parts(stored, trainable, precision.trainable.itemsize, reference_copy=reference_copy)
    counted = {}
    if stage == "grpo":
        generation = grpo_generation(recipe, prompt_tokens)
        generation_gb = grpo_generation_gb(recipe, config, precision.compute.itemsize, generation)
        estimate = replace(estimate, generation=generation_gb)
        # What a vLLM server pod would hold to generate the whole batch at once (TRL's main process sends it every
        # process's prompts), in the weights' precision as vLLM keeps its cache
        counted = {**generation, "batch_cache_gb": grpo_batch_cache_gb(config, precision.weights.itemsize, generation)}
    names = {name: str(getattr(precision, name)).removeprefix("torch.") for name in ("weights", "trainable", "compute")}
    described = (f"{names['weights']} weights" if train.method == "full" else f"{names['weights']} base, {names['trainable']} adapter")
    if names["compute"] != names["weights"] or train.method != "full":
        described += f", {names['compute']} compute"
    return estimate, {"parameters": total, "trainable": trainable, "dtype": names["weights"], "precision": described, **counted}


# Inference and merging (evaluate, merge_push): the weights alone on the GPU, one model at a time. Of a GPU's memory
# a fifth is left for what comes on top: the CUDA context (~0.5 GB), the activations and key-value cache of evaluate's
# batches (8 rows of a few thousand tokens) and the largest layer accelerate's device_map="auto" keeps free.
INFERENCE_USABLE = 0.8


def weights_gb(parameters: float, bytes_per_parameter: float) -> float:
    """GB of a model's weights in a precision: 8.29B in bf16 are 16.6 GB, in float32 33.2."""
    return parameters * bytes_per_parameter / GB


def gpus_to_hold(need_gb: float, gpu_memory_gib: float) -> int:
    """The fewest GPUs of ``gpu_memory_gib`` whose usable memory together holds ``need_gb`` of weights, which
    device_map="auto" spreads over a pod's GPUs layer by layer."""
    return max(1, math.ceil(need_gb / (gpu_gb(gpu_memory_gib) * INFERENCE_USABLE)))


# GRPO's generation. Prompts are not truncated by TRL 1.16 and their length (image tokens included) is known only from
# the data: vlmjobs memory assumes this many tokens unless told (--prompt_tokens)
PROMPT_TOKENS = 1024
TRL_MAX_COMPLETION_LENGTH = 512  # GRPOConfig's default (tests/test_memory.py compares it with the class's)
TRL_VLLM_GPU_MEMORY_UTILIZATION = 0.3  # GRPOConfig's default share of each GPU for colocated vLLM


def kv_cache_gb(config, rows: int, tokens: int, bytes_per_value: int, images: int = 1) -> float:
    """GB of the key-value cache transformers' ``generate`` holds for ``rows`` sequences of ``tokens`` (prompt and
    completion, the longest prompt of the batch as every row is padded to it): a key and a value vector per key-value
    head, layer and token. The layers are the ones ``DynamicCache(config=...)`` builds for the model: a sliding-window
    layer (Gemma 3's local layers, Mistral's in Idefics2) keeps its window less one token. A cross-attention layer
    (Llama 3.2 Vision's) keeps the images' states instead, ``max_num_tiles`` x (patches + 1) per image, every row
    padded to the ``images`` of the row with the most (none in a batch without images). Other families' images are
    tokens of the prompt. GRPO's arithmetic below assumes one image a prompt."""
    from jobs import upstream

    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    cross = set(getattr(text, "cross_attention_layers", None) or ())
    vision = getattr(config, "vision_config", None)
    image_states = images * vision.max_num_tiles * ((vision.image_size // vision.patch_size) ** 2 + 1) if cross else 0
    cached = 0
    for index, window in enumerate(upstream.cache_layer_windows(config)):
        if index in cross:
            cached += image_states
        elif window is not None:
            cached += min(tokens, window - 1)
        else:
            cached += tokens
    return 2 * kv_heads * head_dim * cached * rows * bytes_per_value / GB


def grpo_generation(recipe, prompt_tokens: int | None = None) -> dict:
    """GRPO's generation in numbers, worked out once for the estimate and for vlmjobs memory to print: the completions
    all processes generate at once (``generation_batch``), each process's share of them (``generation_rows``, rounded
    up), and the longest sequence's ``prompt_tokens`` (PROMPT_TOKENS when not given) and ``completion_tokens``."""
    from jobs import recipe as recipes

    args = recipe.grpo.args
    res = recipe.resources_for("grpo")
    processes = max(res.gpus, 1) * res.nodes
    batch = recipes.grpo_generation_batch(args, processes)
    return {"generation_batch": batch, "generation_rows": math.ceil(batch / processes),
            "prompt_tokens": prompt_tokens or PROMPT_TOKENS,
            "completion_tokens": args.get("max_completion_length", TRL_MAX_COMPLETION_LENGTH)}


def _generation_tokens(generation: dict) -> int:
    """Tokens a generated sequence feeds through the model: its prompt, and its completion less the last token."""
    return generation["prompt_tokens"] + generation["completion_tokens"] - 1


def grpo_batch_cache_gb(config, bytes_per_value: int, generation: dict) -> float:
    """The key-value cache of GRPO's whole generation batch (all processes' rows) at the longest completion;
    ``generation`` is grpo_generation's."""
    return kv_cache_gb(config, generation["generation_batch"], _generation_tokens(generation), bytes_per_value)


def grpo_generation_gb(recipe, config, bytes_per_value: int, generation: dict) -> float:
    """What each GPU of a GRPO stage holds for generating: vLLM's share of the GPU in colocate mode, nothing in server
    mode (the server's own GPUs), else the key-value cache of the process's share of the generation batch at the
    longest completion; ``generation`` is grpo_generation's."""
    args = recipe.grpo.args
    if args.get("use_vllm"):
        if args.get("vllm_mode", "colocate") == "server":
            return 0.0
        share = args.get("vllm_gpu_memory_utilization", TRL_VLLM_GPU_MEMORY_UTILIZATION)
        return share * gpu_gb(recipe.resources_for("grpo").gpu_memory_gib or 0)
    return kv_cache_gb(config, generation["generation_rows"], _generation_tokens(generation), bytes_per_value)


# GRPO's vLLM server (vllm_mode server, its own pod): vLLM takes gpu_memory_utilization of each of its GPUs and fills
# what its weights leave with the KV cache of the completions it generates. The weights are split over the GPUs by
# tensor parallelism, whose size must divide the attention heads: a power of two. Half of vLLM's share at most goes to
# the weights, so that the KV cache has the other half for a generation batch of long completions (at startup vLLM
# fails with no memory left for cache blocks; with little, it generates a few sequences at a time).
SERVER_WEIGHTS_SHARE = 0.5


@dataclass(frozen=True)
class ServerEstimate:
    weights: float  # GB of weights on each GPU
    reserved: float  # GB vLLM takes of each GPU (gpu_memory_utilization of it)
    gpus: int

    @property
    def cache(self) -> float:
        """GB of each GPU left for the KV cache and activations."""
        return self.reserved - self.weights

    @property
    def fits(self) -> bool:
        return self.weights <= self.reserved * SERVER_WEIGHTS_SHARE

    def __str__(self) -> str:
        over = f" over {self.gpus} GPUs (tensor parallel)" if self.gpus > 1 else ""
        return (f"weights {self.weights:.3g} GB per GPU{over} + KV cache {self.cache:.3g} GB = {self.reserved:.3g} GB, "
                f"vLLM's share of each GPU")


def vllm_server(parameters: float, bytes_per_parameter: float, gpu_memory_gib: float, utilization: float,
                gpus: int) -> ServerEstimate:
    """What each of the server's ``gpus`` holds: its part of the weights, and vLLM's share of the GPU around it."""
    return ServerEstimate(weights=weights_gb(parameters, bytes_per_parameter) / gpus,
                          reserved=gpu_gb(gpu_memory_gib) * utilization, gpus=gpus)


def vllm_server_gpus(parameters: float, bytes_per_parameter: float, gpu_memory_gib: float, utilization: float) -> int:
    """The fewest GPUs, a power of two, whose vLLM share holds the weights with room for the KV cache; 3.75B in bf16
    (7.5 GB) take one 80 GiB GPU at 0.9, 72B (144 GB) four."""
    gpus = 1
    while not vllm_server(parameters, bytes_per_parameter, gpu_memory_gib, utilization, gpus).fits:
        gpus *= 2
    return gpus
