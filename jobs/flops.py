"""FLOPs counted by running the real code on weights that hold no numbers (issue 24).

``torch.utils.flop_counter.FlopCounterMode`` counts each matrix product, convolution and attention that a step
dispatches, from its operands' shapes. To count a 7-8B model's step on a CPU in seconds, the model is built
*hollow*: every large weight is an uninitialised tensor that is never read, and each operation that touches a hollow
tensor is run on the meta device for its output's shape and returns another uninitialised tensor of that shape, never
written (its memory is reserved, not used: hollow() has glibc map each large block afresh, so that none is given the
written pages of a freed real tensor). Everything else runs for real: token ids, attention masks, label masks,
position ids (Qwen2-VL's get_rope_index), the processor's pixel values and the image-token bookkeeping, so the
data-dependent paths (which rows hold images, where the answers start, how shared-prefix DPO packs a pair) take the
same branches as with real weights. Meta or fake tensors alone cannot do this: they carry shapes, not the values of the
ids and masks that those branches read.

What the counter sees is what a real step dispatches: TRL's forward with its fused LM head, the reference pass,
gradient checkpointing's recomputation, the backward of the trainable parameters only (a frozen base under LoRA gives
its inputs' gradients, not its own). ``tests/test_flops.py`` checks that the hollow count equals the count of the same
step computed for real on a tiny model.

Convention (the counter's): a matrix product of [m, k] by [k, n] is 2mkn FLOPs; attention counts every query-key
pair of its operands' shapes, causal or masked alike, as the kernels that take a mask compute them.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils import flop_counter
from jobs import upstream

TorchDispatchMode, tree_leaves, tree_map = upstream.torch_dispatch()

HOLLOW_FROM = 1 << 16  # elements: a parameter this large is built hollow; smaller ones (norms, biases) are real


# Factories that make weight-sized operands while counting, not only while building: PEFT's DoRA takes its adapter's
# weight as lora_B(lora_A(eye(in_features))) at every forward (the FSDP-safe way), for a norm that meets the hollow
# base weight. Real, the in x in identity and the in x out products it feeds cost what a weight's would: in SmolVLM's
# count, 2.7-3.6 times the time of a training step with them hollow.
WEIGHT_SIZED_FACTORIES = (torch.ops.aten.eye,)

upstream.cpu_attention_flop_formulas()  # sdpa on a CPU: torch's counter lists only the CUDA kernels


class Hollow(TorchDispatchMode):
    """Runs what touches no hollow tensor; gives every operation on one an uninitialised output of the right shape.
    While ``building``, factory calls for HOLLOW_FROM elements or more make hollow tensors (a model's large weights)."""

    def __init__(self, hollow_from: int = HOLLOW_FROM):
        super().__init__()
        self.hollow_from = hollow_from
        self.hollow = weakref.WeakKeyDictionary()  # the storages: a view, or a Parameter made of a tensor, shares it
        self.building = False

    def holds(self, tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.untyped_storage() in self.hollow

    def _mark(self, value):
        for leaf in tree_leaves(value):
            if isinstance(leaf, torch.Tensor):
                self.hollow[leaf.untyped_storage()] = True
        return value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        if not any(self.holds(leaf) for leaf in leaves):
            factory = not any(isinstance(leaf, torch.Tensor) for leaf in leaves)
            if factory and (self.building or func.overloadpacket in WEIGHT_SIZED_FACTORIES):  # a weight, or its like?
                shape = func(*_on_meta(args), **_on_meta(kwargs))
                if isinstance(shape, torch.Tensor) and shape.is_floating_point() and shape.numel() >= self.hollow_from:
                    return self._mark(_unwritten(shape))
            return func(*args, **kwargs)
        view, written = upstream.operator_writes(func, args, kwargs)
        if view:  # a view computes nothing and shares the storage
            return self._mark(func(*args, **kwargs))
        meta_args, meta_kwargs = _on_meta(args), _on_meta(kwargs)
        originals = {id(m): o for m, o in zip(tree_leaves((meta_args, meta_kwargs)), leaves) if isinstance(o, torch.Tensor)}
        try:
            meta_out = func(*meta_args, **meta_kwargs)
        except (NotImplementedError, RuntimeError):  # no meta kernel, or data-dependent: run it on the hollow memory
            return self._mark(func(*args, **kwargs))
        self._mark(written)
        # an in-place or out= operation returns its argument: the caller gets that very object back
        def real(m):
            return self._mark(originals[id(m)] if id(m) in originals else _unwritten(m)) if isinstance(m, torch.Tensor) else m

        return tree_map(real, meta_out)


def _on_meta(value):
    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to("meta") if x.device.type != "meta" else x
        if isinstance(x, torch.device):
            return torch.device("meta")
        return x
    return tree_map(move, value)


def _unwritten(meta: torch.Tensor) -> torch.Tensor:
    """Uninitialised memory of ``meta``'s shape on the CPU: reserved by the allocator, never touched, so it takes no
    room in RAM however large."""
    return torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device="cpu")


MMAP_FROM = 128 << 10  # bytes: glibc's own default threshold, held fixed
M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def _fresh_pages_for_large_blocks() -> None:
    """Have glibc's malloc map every block of MMAP_FROM bytes or more afresh and unmap it when freed.

    By default glibc raises its threshold to the size of each mapped block freed (up to 32 MiB), so later blocks of
    that size come from its heap, where a freed block keeps the pages that were written into it. An uninitialised
    hollow tensor given such a block holds those pages, and the next real tensor is written into new ones: in
    SmolVLM's count (its DoRA adapters compute weight-sized products for real) the process grew by every real block
    of up to 32 MiB it ever wrote, to 20 GB. Fresh mappings are read as zeros and never resident until written."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator is not the one measured here
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_FROM)


@contextlib.contextmanager
def hollow(hollow_from: int = HOLLOW_FROM):
    """Inside: weights built of ``hollow_from`` elements or more are hollow and every operation on them is shapes
    only. Yields the mode."""
    _fresh_pages_for_large_blocks()
    mode = Hollow(hollow_from)
    with mode:
        yield mode


@contextlib.contextmanager
def building(mode: Hollow):
    mode.building = True
    try:
        yield
    finally:
        mode.building = False


def count(step) -> int:
    """The FLOPs ``step()`` dispatches, forward and backward, as torch's FlopCounterMode counts them."""
    counter = flop_counter.FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------
# Counting a stage's phases per row, as the stage or TRL's defaults run them


def hollow_model(model_class: str, config, mode: Hollow, precision=None, *, four_bit: bool = False):
    """``config``'s model, its large weights hollow (built inside ``mode``), loaded as a stage loads it: in
    ``precision``'s weights dtype (jobs.modeling.Precision; float32 where none is given), and, ``four_bit``, marked as
    transformers marks a base it quantised to 4 bits, so that TRL casts a QLoRA adapter to bf16 as it does on one.
    The hollow linear weights stand for the 4-bit ones: a count is of shapes, and what a step keeps for its backward
    are activations, in the compute dtype either way."""
    import transformers

    with building(mode):
        model = getattr(transformers, model_class)(config)
    if precision is not None:
        model.to(precision.weights)
    if four_bit:
        model.is_loaded_in_4bit = True  # the attribute transformers sets and TRL's trainers read (_is_quantized_model)
    return model


LOWER_PRECISION = (torch.bfloat16, torch.float16)
AUTOCAST_NORMS = ("layer_norm", "group_norm")  # torch.nn.functional's, which CUDA's autocast runs in float32


class NormsInFloat32(torch.overrides.TorchFunctionMode):
    """Fails loudly on a layer or group norm that runs in bf16 or fp16 under autocast, where ``cuda_autocast_norms``
    runs them in float32: one that reached torch by another way than torch.nn.functional (``torch.layer_norm``), which
    the swap cannot see, and whose float32 copy the count would leave out. (A function mode: below it, in the
    dispatcher, autocast reads as off.)"""

    NORMS = {torch.layer_norm, torch.native_layer_norm, torch.group_norm, torch.native_group_norm}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in LOWER_PRECISION
        if func in self.NORMS and autocast and args[0].dtype in LOWER_PRECISION:
            raise RuntimeError(f"{func.__name__} ran in {args[0].dtype} under autocast, around "
                               "jobs.flops.cuda_autocast_norms (not through torch.nn.functional): the count of what "
                               "a GPU's step keeps would miss its float32 copy")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cuda_autocast_norms():
    """CPU autocast with CUDA autocast's float32 layer and group norms, for counting what a GPU's step keeps.

    Under bf16 autocast the two devices' policies differ (torch's amp docs, "CUDA Ops that can autocast to float32"):
    CUDA runs layer_norm and group_norm in float32, their inputs cast and their outputs float32; a CPU runs them in the
    input's dtype. A vision tower's layer norms then keep a float32 copy of their input on a GPU: in SmolVLM's 27
    SigLIP layers, two a layer over 729 patches a tile. The module-level functions are swapped, not dispatched
    around, so that activation checkpointing's recomputation in the backward runs them as the forward did. The rest
    of CUDA's float32 list meets tensors that are float32 here already: the RMS norms upcast themselves, eager
    attention's softmax is asked for float32, and the logits reach the loss's log-softmax in float32 (accelerate
    converts a forward's outputs: jobs.upstream.forward_as_training_runs). A norm that goes around the swap fails
    loudly (``NormsInFloat32``)."""
    functional = torch.nn.functional
    originals = {name: getattr(functional, name) for name in AUTOCAST_NORMS}

    def as_float32(x):
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    def in_float32(original):
        def norm(*args, **kwargs):
            if not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in LOWER_PRECISION):
                return original(*args, **kwargs)
            with torch.autocast("cpu", enabled=False):
                return original(*tree_map(as_float32, args), **tree_map(as_float32, kwargs))
        return norm

    for name, original in originals.items():
        setattr(functional, name, in_float32(original))
    try:
        with NormsInFloat32():
            yield
    finally:
        for name, original in originals.items():
            setattr(functional, name, original)


def per_row(flops: int, rows: int) -> float:
    return flops / rows if rows else 0.0


def count_training(trainer, rows: int) -> float:
    """FLOPs per row of the trainer's own training loop (``trainer.train()``: forward, backward, activation
    checkpointing's recomputation, the reference where TRL runs it) over its first ``rows`` rows; the trainer's args
    say max_steps and batch (one step per batch: no accumulation)."""
    return per_row(count(trainer.train), rows)


def count_evaluation(trainer, name: str | None = None) -> float:
    """FLOPs per eval row of the trainer's own ``evaluate()`` over its eval rows (those of ``name`` where it holds
    several sets)."""
    rows = trainer.eval_dataset if name is None else trainer.eval_dataset[name]
    return per_row(count(lambda: trainer.evaluate(name) if name else trainer.evaluate()), len(rows))


def count_reference(trainer, rows) -> float:
    """FLOPs per row of vlmjobs' reference pass over ``rows`` (jobs.reference_logprobs.compute, which the stage runs
    once per data set and caches)."""
    from jobs import reference_logprobs

    return per_row(count(lambda: reference_logprobs.compute(trainer, rows, "flops")), len(rows))


def saved_for_backward(step, model) -> int:
    """The most bytes that tensors autograd keeps for a backward take at once during ``step()`` (torch's
    ``saved_tensors_hooks``), each storage once, ``model``'s weights left out: the activations a training step holds
    at the end of its forward, where its memory peaks. A saved tensor counts until autograd lets it go (its graph
    freed by the backward, or discarded). Counted in the dtypes the step runs in; what activation checkpointing's own
    hooks take from checkpointed layers is not kept, and not counted."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    holders: dict[int, int] = {}  # storage -> saved tensors holding it
    held = {"now": 0, "most": 0}

    def release(storage: int, nbytes: int) -> None:
        holders[storage] -= 1
        if not holders[storage]:
            del holders[storage]
            held["now"] -= nbytes

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            if storage.data_ptr() not in holders:
                holders[storage.data_ptr()] = 0
                held["now"] += storage.nbytes()
                held["most"] = max(held["most"], held["now"])
            holders[storage.data_ptr()] += 1
            weakref.finalize(tensor, release, storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return held["most"]


def training_step_activations(trainer, rows) -> int:
    """Bytes of activations one training step of ``trainer`` keeps on ``rows`` (one batch, as its collator makes it):
    ``saved_for_backward`` of its own ``training_step``, run as the micro-batch probe runs it (jobs.auto_batch: the
    forward as training runs it), with CUDA autocast's float32 norms where the step autocasts
    (``cuda_autocast_norms``)."""
    batch = trainer.data_collator([rows[i] for i in range(len(rows))])
    with upstream.probe_leaves_no_trace(trainer), upstream.forward_as_training_runs(trainer), cuda_autocast_norms():
        saved = saved_for_backward(lambda: trainer.training_step(trainer.model, batch), trainer.model)
    trainer.model.zero_grad(set_to_none=True)
    return saved
