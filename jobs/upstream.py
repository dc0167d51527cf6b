"""Every place vlmjobs relies on a library's internals, each in one guarded function (issue 23).

TRL, transformers, accelerate and datasets rename or rework their private names between minor versions, and users
upgrade them to get new models. Where a public API does the job the stages use it (TRL's ``compute_loss``,
``remove_unused_columns=False`` with ``packing.WithoutColumns``, rows hashed through ``Dataset.iter``, a model class
built from its config by its constructor, the Kubernetes client's ``param_serialize``/``call_api``); what is left is
here, and nothing else in the project reads a private attribute of a third-party object or patches one
(tests/test_upstream.py reads the source). Each function checks, when the stage starts (or at the first step, where
only a step can show it), that the internal is there and behaves as the function was written for; if not, the stage
stops in one line naming the library, the version it was written for and the installed one (``UpstreamChanged``,
exit 1: the environment changed, not the recipe). tests/test_upstream.py takes each internal away and sees its guard
trip.

The couplings, what each relies on, why nothing public serves, and what would break silently without its guard:

``building_dpo_without_reference_copy`` (trl ``trl.trainer.dpo_trainer.create_model_from_path``)
    Replaced by a no-op while a full fine-tuning DPOTrainer on cached log-probs is built. TRL loads a second copy from
    the model's id whenever it gets no ``ref_model``, no adapter and no ``precompute_ref_log_probs``, which it refuses
    for vision data; no argument turns the load off. Unguarded, a TRL that loads through another name loads the
    checkpoint at the model's id (the base model, not the SFT weights DPO starts from) as the reference, and the cache
    stores its log-probs. Checked: the name is there, and the trainer built has no ``ref_model``.
``read_reference_logps_from_batches`` (trl ``DPOTrainer.precompute_ref_logps``)
    The flag TRL's loss reads to take ``ref_chosen_logps``/``ref_rejected_logps`` from the batch instead of running
    the reference; ``precompute_ref_log_probs`` would set it but is refused for vision data. Unguarded, setting a
    renamed flag does nothing: TRL runs its reference at every step, which for full DPO without a copy is the policy
    itself, and the reference term trains away. Checked: TRL set the flag when it built the trainer.
``attention_implementation`` (transformers ``PretrainedConfig._attn_implementation``)
    The attention implementation a loaded model runs; transformers resolves it at load (``set_attn_implementation``
    writes it) and has no public getter. Read by shared prefix (a 4-D mask needs eager or sdpa), padding-free SFT and
    the cache key. Unguarded, a renamed attribute read with a default drops attention from the cache key, so
    log-probs of another implementation are reused. Checked: a name of an implementation.
``no_split_modules`` (transformers ``PreTrainedModel._no_split_modules``)
    The layers FSDP wraps one by one, which accelerate reads from the same attribute; nothing public lists them.
    Unguarded, no layer is named, accelerate wraps the model as one unit, and every GPU gathers the whole model at
    once. Checked: the attribute is there and names a layer the model has.
``fsdp_on_cpu_processes`` (accelerate ``PartialState._shared_state["distributed_type"]``)
    accelerate turns FSDP on for accelerator backends only (``AcceleratorState.__init__``, 1.15); for CPU processes it
    drops the FSDP plugin without a word. While the trainer's accelerator is made, CPU processes pass for GPU ones.
    Unguarded, the sharded tests on CPU silently run plain data parallelism. Checked: the shared state holds the
    distributed type, and FSDP is on once the trainer is built.
``trl_fused_forward`` (trl ``add_fused_lm_head``: its forward set on the model instance, ``FusedCausalLMOutput``)
    TRL's fused LM head is a forward it puts on the model object, taking ``fused_lm_head=True`` and returning
    ``FusedCausalLMOutput``; shared prefix wraps it to pack the pair rows and lay its outputs back out, the FSDP
    gradient fix wraps it to run inside. TRL has no hook around it. Unguarded, a field TRL adds to its output is
    dropped by the shared-prefix unpacking (None in TRL's loss or metrics), and a forward TRL moves elsewhere is
    bypassed. Checked: the forward is on the instance, takes ``fused_lm_head``, and the output has the fields
    written for.
``averaging_lm_head_gradient`` (torch ``DTensor.full_tensor``, replaced while TRL's fused forward runs)
    TRL's fused head gathers FSDP's sharded lm_head weight with ``weight.full_tensor()``, whose backward hands each
    process only its own share of the gradient; gathered as a partial gradient to average, lm_head gets the gradient
    FSDP gives every other weight. No argument of TRL or torch does it. Unguarded, a TRL that gathers the head
    otherwise trains lm_head on one process's gradient (step-1 gradient norm 4.59 against 3.68 for LLaVA's full SFT).
    Checked: ``full_tensor`` takes ``grad_placements``, and the first sharded forward gathered through it.
``set_train_batch_size`` (transformers ``Trainer._train_batch_size``)
    The trainer's copy of the micro-batch, made in ``__init__`` and read by ``train()`` and its dataloader; the
    automatic micro-batch is found after the trainer is built and nothing public updates the copy. Unguarded,
    training batches the size the probe started from. Checked: the copy holds the args' value before it is set.
``forward_as_training_runs`` (accelerate ``Accelerator.native_amp`` and ``Accelerator.autocast``, as
    ``prepare_model`` wraps a forward; ``accelerate.utils.convert_outputs_to_fp32``)
    The micro-batch probe and the FLOPs table run a training step before ``train()``, which is where accelerate wraps
    the model's forward in the run's autocast and converts its outputs to float32; nothing public runs a step so
    wrapped without preparing the model for good. Unguarded, the probe measures a step training does not run (full
    fine-tuning: a float32 step, 1.8 times the activations). Checked: the attribute and method are there.
``probe_leaves_no_trace`` (trl ``_metrics``, ``_total_train_tokens``; accelerate ``Accelerator.gather`` and
    ``gather_for_metrics`` replaced on the trainer's accelerator)
    The automatic micro-batch runs the trainer's own training step, which logs TRL's metrics and gathers them over
    the processes; nothing public runs a step without logging. Unguarded, the probe's metrics and token count land in
    the first logged step, and with several processes one process's metric is gathered with another's out-of-memory
    flag. Checked: the attributes are there, and a probe that logged metrics gathered them through the accelerator.
``dataset_fingerprint`` (datasets ``Dataset._fingerprint``)
    The content key datasets names its own cache files by; the stage names the cache of rows it derives in its
    scratch folder by it, so that a resumed attempt reuses it. Nothing public exposes it. Checked: a non-empty string.
``qwen_rope_index`` (transformers ``get_rope_index`` of Qwen2VLModel, Qwen2_5_VLModel and Qwen3VLModel, called on
    an object holding only the config)
    The Qwen VL families' multimodal rotary positions for padding-free batches, computed in the collator, which must not hold
    the model (data loader workers copy it). Unguarded, a get_rope_index that reads more of the model fails on the
    first batch, and one that reads it differently gives positions TRL's padded rows do not have. Checked: the
    positions of a row with one image are the documented ones.
``cpu_attention_flop_formulas`` (torch ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward)
    torch's FlopCounterMode lists formulas for the CUDA attention kernels only; sdpa on a CPU dispatches this one, so
    `make bench`'s counted FLOPs (jobs.flops) register the same formula for it. Unguarded, a renamed kernel would leave
    every attention out of the count. Checked: both operators are there.
``operator_writes`` (torch ``OpOverload._schema``)
    Which arguments an operator writes into and whether it returns a view, read from its schema (nothing public says
    it), so that jobs.flops' hollow run hands an in-place operation's argument back and runs views as they are.
    Unguarded, a schema read another way would make the count fail or give in-place results to fresh tensors.
    Checked: the schema lists arguments and returns.
``torch_dispatch`` (torch ``torch.utils._python_dispatch.TorchDispatchMode``, ``torch.utils._pytree``)
    The mode jobs.flops' hollow run is built on: it sees every operator below autograd and answers with shapes only.
    torch documents dispatch modes in its tutorials but exports the base class from a private module only. Unguarded,
    a move of the module fails `make bench` at import with a bare ImportError. Checked: both import.
``mllama_mask_functions`` (transformers ``processing_mllama.get_cross_attention_token_mask`` and
    ``convert_sparse_cross_attention_mask_to_dense``)
    The functions MllamaProcessor builds Llama 3.2 Vision's cross_attention_mask with, from the token ids; module
    functions the package does not export. jobs.cross_attention rebuilds the mask over TRL's joined rows (prompt and
    answer) with them, so that it is what the processor gives the whole conversation. Unguarded, functions that count
    spans otherwise give answers a mask the processor would not: answers that see no image, or the padding's. Checked:
    both are there, and one image's span runs to the end of the text.
``smolvlm_video_template`` (transformers ``processing_smolvlm.DEFAULT_CHAT_TEMPLATE``)
    SmolVLMProcessor.apply_chat_template renders a conversation holding a video with this template, not the
    checkpoint's (SmolVLM2's has no video branch); a module constant, not exported. The stages' rendering processor
    renders video conversations with it, so that they are tokenized as the card's call tokenizes them. Unguarded, a
    renamed or changed constant renders videos as nothing (the checkpoint's template skips the part) or differently
    from the card. Checked: it is there and renders a video part as <video>.
``cache_layer_windows`` (transformers ``cache_utils.DynamicSlidingWindowLayer``, the layers of
    ``DynamicCache(config=...)``)
    Which layers of the key-value cache ``generate`` builds for a model keep a sliding window, and how long: vlmjobs
    memory counts GRPO's generation cache from them (a Gemma 3 local layer keeps its last 1,023 tokens, not the
    sequence). The cache is public; the class of its sliding layers is not exported at transformers' top level, and
    nothing public says a layer's window. Unguarded, a moved class fails `vlmjobs memory` with a bare ImportError, and
    sliding layers built of another class are counted as keeping every token. Checked: a config of one sliding layer
    of 4 tokens and one full layer gives a cache of those two layers.
``seeded_length_grouping`` (transformers ``Trainer._get_train_sampler``)
    ``train_sampling_strategy: group_by_length``'s LengthGroupedSampler shuffles from the global RNG's state when it
    is iterated (the default shuffle is seeded per epoch by accelerate; this one is not), so a resumed run draws
    another order than the run it resumes, in a later epoch always, and skips that order's first batches: some rows
    train twice in the epoch and others never; and no dataloader built before ``train()`` can foresee its rows. The
    stages give it a generator seeded by the run's seed and the epoch (``set_epoch``, which transformers calls on every
    sampler that has it), through the method a Trainer subclass overrides to choose its sampler: nothing public
    chooses it (``SeededLengthGrouping``; ``length_grouping_is_seeded`` tells the reference pass that a dataloader
    built before ``train()`` draws its rows). Unguarded, a renamed method leaves the order to the RNG again, silently.
    Checked: the method is there, takes the dataset, and gives a LengthGroupedSampler for group_by_length.
``run_exit_handlers`` (CPython ``atexit._run_exitfuncs``)
    A finished stage ends with ``os._exit`` to skip the interpreter's teardown; the atexit handlers (a tracker's last
    upload, logging's flush) are run first by the interpreter's own function, which nothing public calls. Checked: the
    function is there.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from importlib import metadata

from jobs.contract import Failure

# The versions the functions below were written for (and tested with).
WRITTEN_FOR = {"trl": "1.16", "transformers": "5.23", "accelerate": "1.15", "datasets": "5.2", "torch": "2.14",
               "python": "3.11"}
# FusedCausalLMOutput's fields in TRL 1.16: shared prefix lays each per-token one back out as TRL's rows.
FUSED_OUTPUT_FIELDS = ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask",
                       "aux_loss")


class UpstreamChanged(Failure):
    """A library's internal that vlmjobs relies on is gone or behaves differently: one line, exit 1."""


def changed(library: str, relies_on: str, how: str) -> UpstreamChanged:
    """The one line: what vlmjobs relies on, the version it was written for, and what the installed one does."""
    if library == "python":
        import platform

        installed = platform.python_version()
    else:
        try:
            installed = metadata.version(library)
        except metadata.PackageNotFoundError:
            installed = "(not installed)"
    return UpstreamChanged(f"vlmjobs relies on {relies_on} (written for {library} {WRITTEN_FOR[library]}); "
                           f"{library} {installed} {how}")


def _takes_argument(function, name: str) -> bool:
    """Whether ``function``, or one it wraps (accelerate wraps a prepared model's forward to cast its outputs), takes
    ``name`` itself: read from each one's code, since functools.wraps gives a wrapper the signature of what it wraps."""
    for _ in range(8):
        code = getattr(getattr(function, "__func__", function), "__code__", None)
        if code is not None and name in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]:
            return True
        function = getattr(function, "__wrapped__", None)
        if function is None:
            return False
    return False


# --- trl ---------------------------------------------------------------------------------------------------------

def building_dpo_without_reference_copy(build):
    """``build()`` (a DPOTrainer's constructor call) with TRL's reference loading turned off; the trainer built.
    See the module docstring."""
    from trl.trainer import dpo_trainer

    relies_on = "trl.trainer.dpo_trainer.create_model_from_path"
    loader = getattr(dpo_trainer, "create_model_from_path", None)
    if loader is None:
        raise changed("trl", relies_on, "no longer has it")
    dpo_trainer.create_model_from_path = lambda *args, **kwargs: None
    try:
        trainer = build()
    finally:
        dpo_trainer.create_model_from_path = loader
    if trainer.ref_model is not None:
        raise changed("trl", relies_on, "loaded a reference model by another way (DPOTrainer.ref_model is set)")
    return trainer


def read_reference_logps_from_batches(trainer, read: bool = True) -> bool:
    """Make TRL's loss read the reference log-probs from the batches (``precompute_ref_logps``), or not; returns
    whether it did before."""
    before = vars(trainer).get("precompute_ref_logps")
    if not isinstance(before, bool):
        raise changed("trl", "DPOTrainer.precompute_ref_logps, the flag by which its loss reads the reference "
                      "log-probs from the batch", "does not set it")
    trainer.precompute_ref_logps = read
    return before


def trl_fused_forward(model):
    """TRL's fused-LM-head forward of ``model`` (``add_fused_lm_head`` puts it on the instance), or what accelerate
    wrapped it in (a prepared reference); checked as the module docstring says, before vlmjobs wraps it."""
    from trl.trainer.utils import FusedCausalLMOutput

    relies_on = "trl.trainer.utils.add_fused_lm_head's forward on the model instance"
    fused = vars(model).get("forward")
    if fused is None:
        raise changed("trl", relies_on, f"left no forward on the {type(model).__name__} instance")
    if not _takes_argument(fused, "fused_lm_head"):
        raise changed("trl", relies_on, "put a forward there that takes no fused_lm_head")
    fields = tuple(FusedCausalLMOutput.__dataclass_fields__)
    if fields != FUSED_OUTPUT_FIELDS:
        raise changed("trl", f"{relies_on} and FusedCausalLMOutput's fields {', '.join(FUSED_OUTPUT_FIELDS)}",
                      f"returns {', '.join(fields)}")
    return fused


@contextlib.contextmanager
def forward_as_training_runs(trainer):
    """The model's forward as ``train()`` will run it, for a step run before it (the micro-batch probe, the FLOPs
    table's count of activations). ``train()`` has accelerate prepare the model, which, under mixed precision, wraps its
    forward in the autocast of the run's dtype and converts its outputs to float32 (Accelerator.prepare_model with
    native_amp). Unwrapped, a probe measures another step: float32 activations where full fine-tuning trains its
    float32 weights under bf16 autocast (1.8 times what training keeps on the tiny Qwen2-VL), or a bf16 model's step
    without the float32 casts of CUDA's autocast (less than training keeps). Wrapped here the same way, for the
    duration, by the same accelerate functions (Accelerator.autocast, accelerate.utils.convert_outputs_to_fp32)."""
    from accelerate.utils import convert_outputs_to_fp32

    accelerator, model = trainer.accelerator, trainer.model
    native_amp, autocast = getattr(accelerator, "native_amp", None), getattr(accelerator, "autocast", None)
    if not (isinstance(native_amp, bool) and callable(autocast)):
        raise changed("accelerate", "Accelerator.native_amp and Accelerator.autocast, by which prepare_model wraps a "
                      "model's forward in mixed precision", "lacks one")
    if not native_amp:
        yield
        return
    own = vars(model).get("forward")  # TRL's fused LM head puts its forward on the instance (trl_fused_forward)
    model.forward = convert_outputs_to_fp32(accelerator.autocast()(model.forward))
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


@contextlib.contextmanager
def probe_leaves_no_trace(trainer):
    """A context for the automatic micro-batch's probe: TRL's metrics and token count as before it, the random state
    (dropout) too, and the metrics' gathers run local: another process may have run out of memory before reaching its
    own, and a gather of one process's metric with another's out-of-memory flag would mismatch them silently."""
    import copy

    import torch

    saved = {}
    for name in ("_metrics", "_total_train_tokens"):
        if name not in vars(trainer):
            raise changed("trl", f"{type(trainer).__name__}.{name}, the metrics a training step logs", "no longer has it")
        saved[name] = copy.deepcopy(vars(trainer)[name])
    accelerator = trainer.accelerator
    for name in ("gather", "gather_for_metrics"):
        if not callable(getattr(type(accelerator), name, None)) or name in vars(accelerator):
            raise changed("accelerate", f"Accelerator.{name}, through which TRL gathers its metrics", "has no such method")
    gathered = []

    def local(data, *args, **kwargs):
        gathered.append(1)
        return data

    had_accumulation = hasattr(trainer, "current_gradient_accumulation_steps")
    trainer.current_gradient_accumulation_steps = getattr(trainer, "current_gradient_accumulation_steps", 1)
    accelerator.gather = accelerator.gather_for_metrics = local
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
        logged = any(any(values) for values in vars(trainer)["_metrics"].values())
        if logged and not gathered:
            raise changed("trl", "a training step gathering its metrics through accelerator.gather or "
                          "gather_for_metrics", "logged metrics without either")
    finally:
        del accelerator.gather, accelerator.gather_for_metrics  # the class's own again
        for name, value in saved.items():
            setattr(trainer, name, value)
        if not had_accumulation:
            del trainer.current_gradient_accumulation_steps


# --- transformers ------------------------------------------------------------------------------------------------

def attention_implementation(config) -> str:
    """The attention implementation a loaded model's ``config`` (or its text config) runs."""
    value = getattr(config, "_attn_implementation", None)
    if not isinstance(value, str):
        raise changed("transformers", "PretrainedConfig._attn_implementation, the attention a loaded model runs",
                      f"gives {value!r} for a loaded {type(config).__name__}")
    return value


def no_split_modules(model) -> list[str]:
    """The names of the model's layer classes FSDP wraps one by one, those the model has."""
    named = getattr(model, "_no_split_modules", None)
    present = {type(module).__name__ for module in model.modules()}
    layers = [name for name in named or () if name in present]
    if not layers:
        raise changed("transformers", "PreTrainedModel._no_split_modules, the layers FSDP wraps one by one",
                      f"names none of {type(model).__name__}'s modules ({named!r})")
    return layers


def set_train_batch_size(trainer, before: int) -> None:
    """Hand the micro-batch now in ``trainer.args`` to the trainer's own copy, which held ``before``."""
    copied = vars(trainer).get("_train_batch_size")
    if copied != before:
        raise changed("transformers", "Trainer._train_batch_size, its copy of the batch size that train() reads",
                      f"holds {copied!r} where the args said {before}")
    trainer._train_batch_size = trainer.args.train_batch_size


def seeded_length_grouping(trainer) -> None:
    """Make the trainer's ``group_by_length`` sampler shuffle from ``args.data_seed`` (else ``seed``) plus the epoch,
    not from the global RNG's state (see the module docstring)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    if length_grouping_is_seeded(trainer):
        return
    relies_on = "Trainer._get_train_sampler(train_dataset), which builds group_by_length's LengthGroupedSampler"
    build = getattr(trainer, "_get_train_sampler", None)
    if build is None or not _takes_argument(build, "train_dataset"):
        raise changed("transformers", relies_on, "has no such method")
    args = trainer.args
    seed = args.data_seed if args.data_seed is not None else args.seed

    def seeded(train_dataset=None):
        sampler = build(train_dataset)
        if args.train_sampling_strategy != "group_by_length":
            return sampler
        if not isinstance(sampler, LengthGroupedSampler):
            raise changed("transformers", relies_on, f"gives a {type(sampler).__name__} for group_by_length")
        return SeededLengthGrouping(sampler, seed)

    seeded.seeded_length_grouping = True
    trainer._get_train_sampler = seeded


def length_grouping_is_seeded(trainer) -> bool:
    """Whether ``seeded_length_grouping`` seeded the trainer's group_by_length sampler."""
    return getattr(getattr(trainer, "_get_train_sampler", None), "seeded_length_grouping", False)


class SeededLengthGrouping:
    """transformers' LengthGroupedSampler drawing each epoch's order from ``seed + epoch``: the same order for every
    dataloader of the same epoch, a resumed attempt's included."""

    def __init__(self, grouped, seed: int):
        self.grouped, self.seed, self.epoch = grouped, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.grouped)

    def __iter__(self):
        import torch

        self.grouped.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(self.grouped)


class QwenRopeIndex:
    """A Qwen VL model class's ``get_rope_index`` (Qwen2-VL's, Qwen2.5-VL's, Qwen3-VL's) on the config alone:
    (3, batch, length) positions of a padded batch."""

    def __init__(self, config, model_class):
        self.config, self.model_class = config, model_class
        expected, got = self._documented_example()
        if got is None or not got.equal(expected):
            raise changed("transformers", f"{model_class.__name__}.get_rope_index called with only the model's config",
                          f"gives {None if got is None else got.tolist()} for a row of 1 text, 4 image and 2 text tokens "
                          f"(documented: {expected.tolist()})")

    def get_vision_position_ids(self, *args, **kwargs):
        return self.model_class.get_vision_position_ids(self, *args, **kwargs)

    def __call__(self, batch: dict):
        # Qwen2.5-VL spaces a video's frames by second_per_grid_ts; the others take no such input
        timing = {"second_per_grid_ts": batch["second_per_grid_ts"]} if batch.get("second_per_grid_ts") is not None else {}
        positions, _ = self.model_class.get_rope_index(
            self, batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
            video_grid_thw=batch.get("video_grid_thw"), attention_mask=batch["attention_mask"], **timing,
        )
        return positions

    def _documented_example(self):
        """A row of one text token, a 2 x 2 image (after merging) and two text tokens, left-padded by one: its
        positions as get_rope_index's docstring gives them (text counts on from the image's largest side), and as this
        object computes them (None where it fails)."""
        import torch

        merge = self.config.vision_config.spatial_merge_size
        types = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0]])
        batch = {"input_ids": torch.zeros_like(types), "mm_token_type_ids": types,
                 "attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]]),
                 "image_grid_thw": torch.tensor([[1, 2 * merge, 2 * merge]])}
        expected = torch.tensor([[0, 0, 1, 1, 1, 1, 3, 4], [0, 0, 1, 1, 2, 2, 3, 4], [0, 0, 1, 2, 1, 2, 3, 4]])[:, None]
        try:
            return expected, self(batch)
        except (AttributeError, TypeError):
            return expected, None


def qwen_rope_index(config, model_class) -> QwenRopeIndex:
    """A Qwen VL model's rotary positions computed from its config by ``model_class.get_rope_index``, checked on the
    documented example."""
    return QwenRopeIndex(config, model_class)


def mllama_mask_functions():
    """transformers' two functions that build MllamaProcessor's cross_attention_mask, checked on one image's span."""
    from transformers.models.mllama import processing_mllama

    relies_on = "transformers.models.mllama.processing_mllama.get_cross_attention_token_mask"
    spans = getattr(processing_mllama, "get_cross_attention_token_mask", None)
    dense = getattr(processing_mllama, "convert_sparse_cross_attention_mask_to_dense", None)
    if spans is None or dense is None:
        raise changed("transformers", relies_on, "has no such function (or no convert_sparse_cross_attention_mask_to_dense)")
    found = spans([7, 9, 9], 7)
    if found != [[0, -1]]:
        raise changed("transformers", relies_on, f"gives {found} for an image token followed by text (written for: [[0, -1]])")
    return spans, dense


def smolvlm_video_template() -> str:
    """The template SmolVLMProcessor renders a conversation holding a video with, checked to render a video part."""
    from jinja2 import Template
    from transformers.models.smolvlm import processing_smolvlm

    relies_on = "transformers.models.smolvlm.processing_smolvlm.DEFAULT_CHAT_TEMPLATE"
    template = getattr(processing_smolvlm, "DEFAULT_CHAT_TEMPLATE", None)
    if not isinstance(template, str):
        raise changed("transformers", relies_on, "is not there")
    rendered = Template(template).render(messages=[{"role": "user", "content": [{"type": "video"}]}])
    if "<video>" not in rendered:
        raise changed("transformers", relies_on, f"renders a video part as {rendered!r} (written for: one with <video>)")
    return template


def cache_layer_windows(config) -> list[int | None]:
    """The key-value cache layers transformers' ``generate`` builds for ``config`` (``DynamicCache(config=...)``), in
    order: a sliding layer's window (it keeps the last window - 1 tokens), None for a layer that keeps every token;
    checked on a config of one sliding layer of 4 tokens and one full layer."""
    from transformers import DynamicCache, PretrainedConfig

    relies_on = "transformers.cache_utils.DynamicSlidingWindowLayer, the sliding layers of DynamicCache(config=...)"
    try:
        from transformers.cache_utils import DynamicSlidingWindowLayer
    except ImportError:
        raise changed("transformers", relies_on, "no longer has it") from None

    def windows(of) -> list[int | None]:
        layers = getattr(DynamicCache(config=of), "layers", None)
        if not isinstance(layers, list):
            raise changed("transformers", relies_on, f"builds a cache whose layers are {layers!r}, not a list")
        return [layer.sliding_window if isinstance(layer, DynamicSlidingWindowLayer) else None for layer in layers]

    example = PretrainedConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    if (got := windows(example)) != [4, None]:
        raise changed("transformers", relies_on, f"gives windows {got} for a sliding layer of 4 tokens and a full one "
                      "(written for: [4, None])")
    return windows(config)


# --- accelerate --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def fsdp_on_cpu_processes():
    """Around building a sharded run's trainer: CPU processes pass for GPU ones while its accelerator is made, so
    that accelerate keeps the FSDP plugin (see the module docstring); on GPUs nothing changes."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    relies_on = "accelerate.state.PartialState._shared_state['distributed_type']"
    partial = getattr(PartialState, "_shared_state", None)
    if not isinstance(partial, dict) or "distributed_type" not in partial:
        raise changed("accelerate", relies_on, "keeps no such shared state once the processes are set up")
    on_cpu = partial["distributed_type"] == DistributedType.MULTI_CPU
    if on_cpu:
        partial["distributed_type"] = DistributedType.MULTI_GPU
    try:
        yield
    finally:
        if on_cpu and partial["distributed_type"] == DistributedType.MULTI_GPU:  # no accelerator was made
            partial["distributed_type"] = DistributedType.MULTI_CPU
    if on_cpu and AcceleratorState().distributed_type != DistributedType.FSDP:
        raise changed("accelerate", relies_on, "did not turn FSDP on for CPU processes passing for GPU ones")


# --- torch -------------------------------------------------------------------------------------------------------

def averaging_lm_head_gradient(model) -> None:
    """Make the sharded lm_head's gradient, gathered by TRL's fused head, averaged over the processes as FSDP
    averages every other weight's: ``DTensor.full_tensor`` gathers it as a partial gradient to average while TRL's
    fused forward runs. Call it once the trainer is built (its fused forward in place)."""
    from torch.distributed.tensor import DTensor, Partial

    fused = trl_fused_forward(model)
    full_tensor = DTensor.full_tensor
    if "grad_placements" not in inspect.signature(full_tensor).parameters:
        raise changed("torch", "DTensor.full_tensor(grad_placements=...)", "takes no grad_placements")
    gathered = [False]

    def averaging_gradients(self, *, grad_placements=None):
        gathered[0] = True
        return full_tensor(self, grad_placements=grad_placements or [Partial("avg")] * self.device_mesh.ndim)

    @functools.wraps(fused)
    def forward(*args, **kwargs):
        # Sharded when the forward starts, lm_head's weight is a DTensor when TRL's head reads it: the backbone's
        # units gather their own layers, never lm_head
        sharded = isinstance(model.get_output_embeddings().weight, DTensor)
        gathered[0] = False
        DTensor.full_tensor = averaging_gradients
        try:
            out = fused(*args, **kwargs)
        finally:
            DTensor.full_tensor = full_tensor
        if kwargs.get("fused_lm_head") and sharded and not gathered[0]:
            raise changed("trl", "its fused LM head gathering the sharded lm_head with DTensor.full_tensor",
                          "gathered it otherwise, and lm_head's gradient would not be averaged over the processes")
        return out

    model.forward = forward


# --- datasets ----------------------------------------------------------------------------------------------------

def dataset_fingerprint(dataset) -> str:
    """The key datasets gives these rows' content and history (what names its own cache files)."""
    value = vars(dataset).get("_fingerprint")
    if not isinstance(value, str) or not value:
        raise changed("datasets", "Dataset._fingerprint, the rows' content key", f"gives {value!r}")
    return value


# --- python ------------------------------------------------------------------------------------------------------

def run_exit_handlers() -> None:
    """Run the atexit handlers now, as the interpreter does at exit."""
    import atexit

    run = getattr(atexit, "_run_exitfuncs", None)
    if run is None:
        raise changed("python", "atexit._run_exitfuncs, the interpreter's own run of the exit handlers", "has none")
    run()


CPU_ATTENTION = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")


def cpu_attention_flop_formulas() -> None:
    """Register, for torch's CPU sdpa kernel and its backward, the FLOP formulas torch's counter has for the CUDA ones."""
    import torch
    from torch.utils import flop_counter

    missing = [name for name in CPU_ATTENTION if not hasattr(torch.ops.aten, name)]
    if missing:
        raise changed("torch", "aten." + CPU_ATTENTION[0], f"has no {', '.join(missing)}")
    forward, backward = (getattr(torch.ops.aten, name) for name in CPU_ATTENTION)
    flop_counter.register_flop_formula(forward, get_raw=True)(
        lambda query, key, value, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(
            query.shape, key.shape, value.shape))
    flop_counter.register_flop_formula(backward, get_raw=True)(
        lambda grad_out, query, key, value, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(
            grad_out.shape, query.shape, key.shape, value.shape))


def torch_dispatch():
    """(TorchDispatchMode, tree_leaves, tree_map): the base class of a mode that sees every operator call below
    autograd, and the helpers that walk an operator's nested arguments."""
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves, tree_map
    except ImportError as e:
        raise changed("torch", "torch.utils._python_dispatch.TorchDispatchMode and torch.utils._pytree's tree_map",
                      f"cannot import them ({e})") from None
    return TorchDispatchMode, tree_leaves, tree_map


def operator_writes(func, args: tuple, kwargs: dict) -> tuple[bool, list]:
    """(whether ``func`` returns a view of an argument, the arguments it writes into) from its schema."""
    schema = getattr(func, "_schema", None)
    if schema is None or not hasattr(schema, "arguments") or not hasattr(schema, "returns"):
        raise changed("torch", "an operator's _schema (its arguments' and returns' alias_info)", f"gives {func} none")
    view = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
    written = []
    for i, argument in enumerate(schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(argument.name)
            if value is not None:
                written.append(value)
    return view, written
