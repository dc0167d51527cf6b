"""What each stage's pods ask for, resolved once from the recipe and handed on as one value (``StageResources``):
the launcher renders the stage's Job from it and picks the stage's command by it.

    resolve(recipe, "evaluate")  -> StageResources(gpus=1, nodes=1, cpu="8", memory="33Gi", ...)

- prepare reads and resizes data on CPU: no GPU, a few cores (one per ``prepare.num_proc`` worker) and modest memory,
  so that it schedules on any node and costs no GPU time.
- sft and dpo keep the recipe's ``resources``: what their training needs is the recipe's to say (``vlmjobs memory``).
- evaluate and merge_push hold one model at a time, for inference: sized by the memory arithmetic (jobs.memory) from
  ``model.parameters``, in the GPU the recipe names (``resources.gpu_product``, ``gpu_memory_gib``), on one node.
  evaluate loads the base in ``model.dtype`` (bf16 where ``auto``); merge_push merges in float32 (4 bytes a
  parameter: the merge's arithmetic, merge_push.py). Where the recipe gives no parameter count or GPU size, they keep
  the recipe's GPUs per node, as before.

A stage's own ``<stage>.resources`` overrides any of this, field by field.

- grpo with its vLLM server as a pod (``grpo.vllm_server``, vllm_mode server) adds the server's (``ServerResources``):
  ``grpo.vllm_server.gpus``, or the fewest GPUs of the stage's size whose vLLM share holds the weights in
  ``model.dtype`` (bf16 where ``auto``) with room for the KV cache (``memory.vllm_server_gpus``); one GPU where the
  recipe gives no parameter count or GPU size. The stage then renders as a JobSet of the trainer and the server.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from jobs import memory
from jobs.recipe import TRAINING_STAGES, Recipe

# prepare: decoding and resizing images is CPU work, a core per datasets.map worker; the rows are written to Arrow as
# they go, so memory holds the process (~4 GiB with the processor loaded) and each worker's (~1.5 GiB with torch
# imported, a few batches of images), not the data set.
PREPARE_MIN_CPU = 2
PREPARE_BASE_GIB = 4
PREPARE_WORKER_GIB = 2
PREPARE_SHM = "1Gi"
# evaluate and merge_push: the weights pass through host memory as they load (safetensors, then to the GPU), on top of
# the process with torch, transformers and the test data (~8 GiB) and /dev/shm (no DataLoader workers: little).
INFERENCE_CPU = "8"
INFERENCE_HOST_OVERHEAD_GIB = 12
INFERENCE_SHM = "4Gi"
DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}  # auto: bf16 on the GPUs evaluate runs on
MERGE_BYTES = 4  # merge_push loads and merges in float32


SERVER_CPU = "8"  # vLLM's API server and its tokenizing and image processing of the prompts
SERVER_SHM = "8Gi"  # vLLM's tensor-parallel workers exchange through /dev/shm (NCCL, its shared-memory broadcast)


@dataclass(frozen=True)
class ServerResources:
    """What GRPO's vLLM server pod asks for; ``basis`` says how its GPUs were decided."""

    image: str
    gpus: int  # its tensor-parallel size
    gpu_memory_utilization: float
    cpu: str
    memory: str
    shm: str
    basis: str


@dataclass(frozen=True)
class StageResources:
    """What one stage's pods ask for; ``basis`` says how it was decided (for messages)."""

    stage: str
    gpus: int  # per node
    nodes: int
    cpu: str
    memory: str
    shm: str
    gpu_product: str | None
    basis: str
    gpu_resource: str  # nvidia.com/gpu, or a MIG slice (resources.gpu_resource)
    shared_gpu: bool = False  # a training stage may land on time-sliced GPUs (resources.shared_gpu); others always may
    server: ServerResources | None = None  # grpo's vLLM server pod, beside the trainer's

    @property
    def jobset(self) -> bool:
        """Rendered as a JobSet: several nodes, or a trainer and its vLLM server (launcher.render)."""
        return self.multi_node or self.server is not None

    @property
    def processes(self) -> int:
        return max(self.gpus, 1) * self.nodes

    @property
    def multi_node(self) -> bool:
        return self.nodes > 1


def resolve(recipe: Recipe, stage: str) -> StageResources:
    if stage in TRAINING_STAGES:
        return _training(recipe, stage)  # the stage's overrides are applied by Recipe.resources_for
    resolved = _prepare(recipe) if stage == "prepare" else _inference(recipe, stage)
    return _overridden(resolved, getattr(recipe, stage).resources)


def _training(recipe: Recipe, stage: str) -> StageResources:
    res = recipe.resources_for(stage)
    server = _vllm_server(recipe, res) if stage == "grpo" and recipe.grpo.server_pod else None
    return StageResources(stage=stage, gpus=res.gpus, nodes=res.nodes, cpu=res.cpu, memory=res.memory, shm=res.shm,
                          gpu_product=res.gpu_product, basis="the recipe's training resources",
                          gpu_resource=res.gpu_resource, shared_gpu=res.shared_gpu, server=server)


def _vllm_server(recipe: Recipe, res) -> ServerResources:
    """GRPO's vLLM server, on GPUs of the trainer's product and size: vLLM loads the weights through host memory."""
    server = recipe.grpo.vllm_server
    parameters, width = recipe.model.parameters, DTYPE_BYTES[recipe.model.dtype]
    utilization = server.gpu_memory_utilization
    if server.gpus:
        gpus, basis = server.gpus, "grpo.vllm_server.gpus"
    elif parameters and res.gpu_memory_gib:
        gpus = memory.vllm_server_gpus(parameters, width, res.gpu_memory_gib, utilization)
        estimate = memory.vllm_server(parameters, width, res.gpu_memory_gib, utilization, gpus)
        basis = (f"{parameters / 1e9:.3g}B parameters at {width} bytes, {utilization:g} of a {res.gpu_memory_gib:g} GiB "
                 f"GPU for vLLM: {estimate}")
    else:
        gpus, basis = 1, "one GPU (no model.parameters or resources.gpu_memory_gib to size it)"
    host = f"{math.ceil(memory.weights_gb(parameters, width) * memory.GB / memory.GIB) + INFERENCE_HOST_OVERHEAD_GIB}Gi" \
        if parameters else res.memory  # no count: the trainer's, which loads the same weights
    return ServerResources(image=server.image or "", gpus=gpus, gpu_memory_utilization=utilization, cpu=SERVER_CPU,
                           memory=host, shm=SERVER_SHM, basis=basis)


def _prepare(recipe: Recipe) -> StageResources:
    cpu = max(PREPARE_MIN_CPU, recipe.prepare.num_proc)
    memory = f"{PREPARE_BASE_GIB + PREPARE_WORKER_GIB * cpu}Gi"
    return StageResources(stage="prepare", gpus=0, nodes=1, cpu=str(cpu), memory=memory, shm=PREPARE_SHM,
                          gpu_product=None, gpu_resource=recipe.resources.gpu_resource, basis=f"CPU only, a core per prepare.num_proc worker (at least {PREPARE_MIN_CPU})")


def _inference(recipe: Recipe, stage: str) -> StageResources:
    res = recipe.resources
    parameters = recipe.model.parameters
    if not parameters or not res.gpu_memory_gib or res.gpus < 1:
        return StageResources(stage=stage, gpus=res.gpus, nodes=1, cpu=res.cpu, memory=res.memory, shm=res.shm,
                              gpu_product=res.gpu_product, gpu_resource=res.gpu_resource,
                              basis="the recipe's GPUs per node (no model.parameters or resources.gpu_memory_gib to size it)")
    width = MERGE_BYTES if stage == "merge_push" else DTYPE_BYTES[recipe.model.dtype]
    need = memory.weights_gb(parameters, width)
    gpus = memory.gpus_to_hold(need, res.gpu_memory_gib)
    host_gib = math.ceil(need * memory.GB / memory.GIB) + INFERENCE_HOST_OVERHEAD_GIB
    basis = (f"{parameters / 1e9:.3g}B parameters at {width} bytes = {need:.3g} GB of weights, "
             f"{memory.INFERENCE_USABLE:.0%} of a {res.gpu_memory_gib:g} GiB GPU usable: {gpus} GPU{'s' * (gpus > 1)}")
    return StageResources(stage=stage, gpus=gpus, nodes=1, cpu=INFERENCE_CPU, memory=f"{host_gib}Gi",
                          shm=INFERENCE_SHM, gpu_product=res.gpu_product, basis=basis, gpu_resource=res.gpu_resource)


def _overridden(resolved: StageResources, overrides: dict) -> StageResources:
    fields = {f.name for f in dataclasses.fields(StageResources)}
    chosen = {key: value for key, value in overrides.items() if key in fields}  # sharding etc. are the training's
    if not chosen:
        return resolved
    return dataclasses.replace(resolved, **chosen, basis=f"{resolved.stage}.resources ({', '.join(sorted(chosen))}) "
                                                           f"over {resolved.basis}")
