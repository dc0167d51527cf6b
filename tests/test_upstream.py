"""Couplings to libraries' internals (issue 23): nothing outside jobs/upstream.py reads a private attribute of a
third-party object or patches a third-party module, and each guard in jobs/upstream.py trips, in one line naming the
library and the version it was written for, when the internal it relies on is taken away or behaves differently.

The trainers are TRL's own on the tiny LLaVA (tests/test_shared_prefix.trainer); the internals are taken away with
monkeypatch, as an upgrade would."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from jobs import upstream

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jobs", "launcher")
GUARDED = ROOT / "jobs" / "upstream.py"
# Private-looking names of the standard library that its documentation gives as public API
PUBLIC_STDLIB = {("os", "_exit")}
WRITTEN_FOR = re.compile(r"^vlmjobs relies on .+ \(written for (trl|transformers|accelerate|datasets|torch|python) "
                         r"[\d.]+\); \1 \S+ .+$")


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class Couplings(ast.NodeVisitor):
    """Private attributes read or written on objects that are not the module's own, calls of a parent class's private
    method, and assignments to attributes of imported third-party modules and classes (monkeypatches)."""

    def __init__(self, path: Path, tree: ast.Module):
        self.path, self.found = path, []
        self.project, self.third_party = set(), set()  # names bound by imports
        self.module_names = set()  # the module's own top-level functions, classes and variables
        self.members = set()  # what its classes define: methods, class attributes, self./cls. attributes
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    (self.project if alias.name.split(".")[0] in PACKAGES else self.third_party).add(
                        alias.asname or alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                ours = node.level > 0 or (node.module or "").split(".")[0] in PACKAGES
                for alias in node.names:
                    (self.project if ours else self.third_party).add(alias.asname or alias.name)
            elif isinstance(node, ast.ClassDef):
                for statement in node.body:
                    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        self.members.add(statement.name)
                    self.members.update(names_assigned(statement))
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    self.members.add(node.attr)
            elif isinstance(node, ast.Call) and ast.unparse(node.func) == "object.__setattr__" and len(node.args) > 1:
                if isinstance(node.args[1], ast.Constant):  # a frozen dataclass's own extra attribute
                    self.members.add(node.args[1].value)
        for statement in tree.body:
            if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.module_names.add(statement.name)
            self.module_names.update(names_assigned(statement))

    def report(self, node: ast.AST, what: str) -> None:
        where = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        self.found.append(f"{where}:{node.lineno}: {what}")

    def allowed(self, base: ast.expr, attr: str) -> bool:
        if isinstance(base, ast.Name):
            if base.id in ("self", "cls"):
                return attr in self.members
            if base.id in self.project or base.id in self.module_names or attr in self.members:
                return True
            return (base.id, attr) in PUBLIC_STDLIB
        return False

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level == 0 and module.split(".")[0] not in PACKAGES and any(map(private, module.split("."))):
            self.report(node, f"from {module} import ...: a library's private module")
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] not in PACKAGES and any(map(private, alias.name.split("."))):
                self.report(node, f"import {alias.name}: a library's private module")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if private(node.attr):
            base = node.value
            if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                self.report(node, f"super().{node.attr}: a parent class's private method")
            elif not self.allowed(base, node.attr):
                self.report(node, f"{ast.unparse(node)}")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if (isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                and private(node.args[1].value) and not self.allowed(node.args[0], node.args[1].value)):
            self.report(node, ast.unparse(node))
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            for part in ast.walk(target):
                if (isinstance(part, ast.Attribute) and isinstance(part.ctx, ast.Store) and isinstance(part.value, ast.Name)
                        and part.value.id in self.third_party):
                    self.report(node, f"{ast.unparse(part)} = ...: an imported module or class patched")
        self.generic_visit(node)


def names_assigned(statement: ast.stmt) -> set[str]:
    """The plain names a statement of a module or class body assigns."""
    if isinstance(statement, ast.Assign):
        targets = statement.targets
    elif isinstance(statement, (ast.AnnAssign, ast.AugAssign)):
        targets = [statement.target]
    else:
        return set()
    return {node.id for target in targets for node in ast.walk(target) if isinstance(node, ast.Name)}


def couplings(paths) -> list[str]:
    found = []
    for path in paths:
        visitor = Couplings(path, ast.parse(path.read_text(), str(path)))
        visitor.visit(ast.parse(path.read_text(), str(path)))
        found += visitor.found
    return found


def test_the_scan_sees_each_kind_of_coupling(tmp_path):
    """What the scan below must see, in a module written for it (the couplings issue 23 found, as they were)."""
    source = tmp_path / "stage.py"
    source.write_text(
        "from trl.trainer import dpo_trainer\n"
        "from torch.distributed.tensor import DTensor\n"
        "from jobs import contract\n"
        "from torch.utils._pytree import tree_map\n"
        "import torch._dynamo\n"
        "class Ours(DPOTrainer):\n"
        "    def __init__(self):\n"
        "        self._family = 1\n"
        "    def _compute_loss(self, model, inputs):\n"
        "        return super()._compute_loss(model, inputs) + self._family + self._metrics\n"
        "def f(rows, trainer, config):\n"
        "    rows = rows.flatten_indices() if rows._indices else rows\n"
        "    dpo_trainer.create_model_from_path = None\n"
        "    DTensor.full_tensor = None\n"
        "    trainer._train_batch_size = 1\n"
        "    contract._fingerprint({})\n"
        "    os._exit(0)\n"
        "    return getattr(rows, '_indices', None), config._attn_implementation\n"
    )
    found = [line.split(": ", 1)[1] for line in couplings([source])]
    assert found == [
        "from torch.utils._pytree import ...: a library's private module",
        "import torch._dynamo: a library's private module",
        "super()._compute_loss: a parent class's private method",
        "self._metrics",
        "rows._indices",
        "dpo_trainer.create_model_from_path = ...: an imported module or class patched",
        "DTensor.full_tensor = ...: an imported module or class patched",
        "trainer._train_batch_size",
        "getattr(rows, '_indices', None)",
        "config._attn_implementation",
    ], found


def test_no_private_attribute_of_a_library_is_read_outside_the_guarded_functions():
    """Issue 23: every coupling to a library's internals lives in jobs/upstream.py."""
    paths = [path for package in PACKAGES for path in sorted((ROOT / package).glob("*.py")) if path != GUARDED]
    found = couplings(paths)
    assert not found, "couplings to libraries' internals outside jobs/upstream.py:\n" + "\n".join(found)


def test_no_class_overrides_a_librarys_private_method():
    """A subclass of a library's class (a trainer, a callback, a processor) overrides only public methods: the scan
    above cannot tell an override from a helper of the subclass's own, the classes themselves can."""
    import importlib

    overrides = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            module = importlib.import_module(package if path.stem == "__init__" else f"{package}.{path.stem}")
            for cls in [v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__]:
                for base in cls.__mro__[1:]:
                    if base.__module__.split(".")[0] in PACKAGES or base is object:
                        continue
                    overrides += [f"{cls.__module__}.{cls.__qualname__}.{name} overrides {base.__module__}.{base.__qualname__}'s"
                                  for name in vars(cls) if private(name) and name in vars(base)]
    assert not overrides, overrides


def test_every_guard_is_listed_in_the_modules_docstring():
    guards = [name for name, value in vars(upstream).items()
              if callable(value) and getattr(value, "__module__", None) == upstream.__name__ and not name.startswith("_")
              and name not in ("changed", "UpstreamChanged", "QwenRopeIndex")]
    assert len(guards) >= 12
    assert not [name for name in guards if f"``{name}``" not in upstream.__doc__], guards


def assert_trips(excinfo, library: str, relies_on: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and WRITTEN_FOR.match(message), message
    assert f"relies on {relies_on}" in message and f"(written for {library} {upstream.WRITTEN_FOR[library]})" in message


# --- trl -------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dpo(tiny_model, tmp_path_factory):
    """TRL's DPOTrainer (the shared-prefix one) on the tiny LLaVA with a LoRA adapter."""
    from tests.test_shared_prefix import trainer

    return trainer("llava", tiny_model("llava"), tmp_path_factory.mktemp("upstream"))


def test_building_without_a_reference_copy_trips_when_trl_loads_it_by_another_name(monkeypatch):
    from trl.trainer import dpo_trainer

    monkeypatch.delattr(dpo_trainer, "create_model_from_path")
    with pytest.raises(upstream.UpstreamChanged) as e:
        upstream.building_dpo_without_reference_copy(lambda: SimpleNamespace(ref_model=None))
    assert_trips(e, "trl", "trl.trainer.dpo_trainer.create_model_from_path")
    assert str(e.value).endswith("no longer has it")


def test_building_without_a_reference_copy_trips_when_trl_loads_one_anyway():
    """A TRL that loads the reference some other way leaves a ref_model: the cache would hold its log-probs."""
    from trl.trainer import dpo_trainer

    loader = dpo_trainer.create_model_from_path
    with pytest.raises(upstream.UpstreamChanged) as e:
        upstream.building_dpo_without_reference_copy(lambda: SimpleNamespace(ref_model=object()))
    assert_trips(e, "trl", "trl.trainer.dpo_trainer.create_model_from_path")
    assert "ref_model is set" in str(e.value)
    assert dpo_trainer.create_model_from_path is loader, "TRL's loader is back whatever happened"


def test_reading_reference_logps_from_batches_trips_without_trls_flag(dpo, monkeypatch):
    assert upstream.read_reference_logps_from_batches(dpo) is False  # TRL's own value, for vision data
    assert upstream.read_reference_logps_from_batches(dpo, False) is True
    monkeypatch.delattr(dpo, "precompute_ref_logps")
    with pytest.raises(upstream.UpstreamChanged) as e:
        upstream.read_reference_logps_from_batches(dpo)
    assert_trips(e, "trl", "DPOTrainer.precompute_ref_logps")


def test_trls_fused_forward_trips_when_it_is_not_on_the_instance(dpo, monkeypatch):
    model = dpo.model.get_base_model()
    assert upstream.trl_fused_forward(model) is vars(model)["forward"]
    monkeypatch.delitem(vars(model), "forward")
    with pytest.raises(upstream.UpstreamChanged) as e:
        upstream.trl_fused_forward(model)
    assert_trips(e, "trl", "trl.trainer.utils.add_fused_lm_head's forward on the model instance")
    assert str(e.value).endswith("left no forward on the LlavaForConditionalGeneration instance")


def test_trls_fused_forward_trips_when_its_output_has_another_field(dpo, monkeypatch):
    """shared_prefix lays each of the output's fields back out as TRL's rows: a new one would be dropped."""
    from trl.trainer.utils import FusedCausalLMOutput

    fields = {**FusedCausalLMOutput.__dataclass_fields__, "log_odds": None}
    monkeypatch.setattr(FusedCausalLMOutput, "__dataclass_fields__", fields)
    with pytest.raises(upstream.UpstreamChanged, match=r"returns loss, .*, aux_loss, log_odds$") as e:
        upstream.trl_fused_forward(dpo.model.get_base_model())
    assert_trips(e, "trl", "trl.trainer.utils.add_fused_lm_head's forward on the model instance and FusedCausalLMOutput")


def test_the_probe_trips_without_trls_metrics(dpo, monkeypatch):
    monkeypatch.delattr(dpo, "_metrics")
    with pytest.raises(upstream.UpstreamChanged) as e, upstream.probe_leaves_no_trace(dpo):
        pass
    assert_trips(e, "trl", "SharedPrefixDPOTrainer._metrics")


def test_the_probe_trips_when_trl_logs_metrics_it_did_not_gather_through_the_accelerator(dpo):
    """A step that logs a metric without the accelerator's gathers: with several processes, the probe's local gathers
    would not be the ones TRL runs."""
    with upstream.probe_leaves_no_trace(dpo):  # a step that gathers what it logs
        dpo._metrics["train"]["loss"].append(float(dpo.accelerator.gather_for_metrics(1.0)))
    assert not dpo._metrics["train"], "the probe's metrics are gone"
    with pytest.raises(upstream.UpstreamChanged) as e, upstream.probe_leaves_no_trace(dpo):
        dpo._metrics["train"]["loss"].append(1.0)
    assert_trips(e, "trl", "a training step gathering its metrics through accelerator.gather or gather_for_metrics")
    assert "gather" not in vars(dpo.accelerator), "the accelerator's own gathers are back"


# --- transformers ----------------------------------------------------------------------------------------------------

def test_the_train_batch_size_trips_when_the_trainer_keeps_no_copy(dpo, monkeypatch):
    before = dpo.args.train_batch_size
    monkeypatch.setattr(dpo.args, "per_device_train_batch_size", 1)
    monkeypatch.setattr(dpo, "_train_batch_size", before)
    upstream.set_train_batch_size(dpo, before)
    assert dpo._train_batch_size == 1
    monkeypatch.delattr(dpo, "_train_batch_size")
    with pytest.raises(upstream.UpstreamChanged) as e:
        upstream.set_train_batch_size(dpo, before)
    assert_trips(e, "transformers", "Trainer._train_batch_size")


def test_the_attention_implementation_trips_without_transformers_attribute(dpo, monkeypatch):
    from transformers import PretrainedConfig

    config = dpo.model.get_base_model().config
    assert upstream.attention_implementation(config) in ("eager", "sdpa")
    monkeypatch.delattr(PretrainedConfig, "_attn_implementation")
    with pytest.raises(upstream.UpstreamChanged) as e:
        upstream.attention_implementation(config)
    assert_trips(e, "transformers", "PretrainedConfig._attn_implementation")


def test_no_split_modules_trips_when_the_model_names_none(dpo, monkeypatch):
    model = dpo.model.get_base_model()
    assert "LlamaDecoderLayer" in upstream.no_split_modules(model)
    monkeypatch.setattr(model, "_no_split_modules", None)  # transformers copies it onto the instance
    with pytest.raises(upstream.UpstreamChanged) as e:
        upstream.no_split_modules(model)
    assert_trips(e, "transformers", "PreTrainedModel._no_split_modules")


def test_seeded_length_grouping_trips_when_the_trainer_chooses_its_sampler_otherwise():
    from torch.utils.data import RandomSampler

    args = SimpleNamespace(seed=0, data_seed=None, train_sampling_strategy="group_by_length")
    with pytest.raises(upstream.UpstreamChanged) as e:
        upstream.seeded_length_grouping(SimpleNamespace(args=args))
    assert_trips(e, "transformers", "Trainer._get_train_sampler(train_dataset)")
    trainer = SimpleNamespace(args=args, _get_train_sampler=lambda train_dataset=None: RandomSampler(range(4)))
    upstream.seeded_length_grouping(trainer)
    assert upstream.length_grouping_is_seeded(trainer)
    with pytest.raises(upstream.UpstreamChanged) as e:
        trainer._get_train_sampler()
    assert_trips(e, "transformers", "Trainer._get_train_sampler(train_dataset)")
    assert str(e.value).endswith("gives a RandomSampler for group_by_length")


QWEN_MODELS = [("Qwen2VLConfig", "qwen2_vl", "Qwen2VLModel"), ("Qwen2_5_VLConfig", "qwen2_5_vl", "Qwen2_5_VLModel"),
               ("Qwen3VLConfig", "qwen3_vl", "Qwen3VLModel")]


def qwen(config_name, module, model_name):
    import importlib

    import transformers

    model_class = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), model_name)
    return getattr(transformers, config_name)(), model_class


@pytest.mark.parametrize("names", QWEN_MODELS, ids=[m for _, m, _ in QWEN_MODELS])
def test_qwen_positions_trip_when_get_rope_index_reads_more_of_the_model(names, monkeypatch):
    config, model_class = qwen(*names)
    upstream.qwen_rope_index(config, model_class)  # today's transformers passes the check
    get_rope_index = model_class.get_rope_index

    def reads_the_vision_tower(self, *args, **kwargs):
        self.visual  # noqa: B018  (a get_rope_index that needs the model's vision tower)
        return get_rope_index(self, *args, **kwargs)

    monkeypatch.setattr(model_class, "get_rope_index", reads_the_vision_tower)
    with pytest.raises(upstream.UpstreamChanged) as e:
        upstream.qwen_rope_index(config, model_class)
    assert_trips(e, "transformers", f"{model_class.__name__}.get_rope_index called with only the model's config")


@pytest.mark.parametrize("names", QWEN_MODELS, ids=[m for _, m, _ in QWEN_MODELS])
def test_qwen_positions_trip_when_get_rope_index_counts_otherwise(names, monkeypatch):
    config, model_class = qwen(*names)
    get_vision_position_ids = model_class.get_vision_position_ids
    monkeypatch.setattr(model_class, "get_vision_position_ids",
                        lambda self, start, *args, **kwargs: get_vision_position_ids(self, start + 1, *args, **kwargs))
    with pytest.raises(upstream.UpstreamChanged, match=r"gives \[\[\[0, 0, 2, 2, 2, 2, 3, 4\]\], ") as e:
        upstream.qwen_rope_index(config, model_class)
    assert_trips(e, "transformers", f"{model_class.__name__}.get_rope_index called with only the model's config")


def test_mllamas_mask_functions_trip_when_they_count_spans_otherwise(monkeypatch):
    from transformers.models.mllama import processing_mllama

    assert upstream.mllama_mask_functions()
    monkeypatch.setattr(processing_mllama, "get_cross_attention_token_mask", lambda ids, image: [[0, len(ids)]])
    with pytest.raises(upstream.UpstreamChanged) as e:
        upstream.mllama_mask_functions()
    assert_trips(e, "transformers", "transformers.models.mllama.processing_mllama.get_cross_attention_token_mask")
    monkeypatch.delattr(processing_mllama, "convert_sparse_cross_attention_mask_to_dense")
    with pytest.raises(upstream.UpstreamChanged, match="has no such function"):
        upstream.mllama_mask_functions()


def test_smolvlms_video_template_trips_when_it_renders_no_video(monkeypatch):
    from transformers.models.smolvlm import processing_smolvlm

    assert "<video>" in upstream.smolvlm_video_template()
    monkeypatch.setattr(processing_smolvlm, "DEFAULT_CHAT_TEMPLATE", "{% for m in messages %}{{ m.role }}{% endfor %}")
    with pytest.raises(upstream.UpstreamChanged) as e:
        upstream.smolvlm_video_template()
    assert_trips(e, "transformers", "transformers.models.smolvlm.processing_smolvlm.DEFAULT_CHAT_TEMPLATE")
    monkeypatch.delattr(processing_smolvlm, "DEFAULT_CHAT_TEMPLATE")
    with pytest.raises(upstream.UpstreamChanged, match="is not there"):
        upstream.smolvlm_video_template()


def test_the_cache_layer_windows_trip_when_transformers_moves_or_stops_building_its_sliding_layer(monkeypatch):
    from transformers import Gemma3TextConfig, cache_utils

    # Gemma 3's documented pattern: five local (sliding-window) layers, then a global one
    assert upstream.cache_layer_windows(Gemma3TextConfig(num_hidden_layers=6, sliding_window=512)) == [512] * 5 + [None]
    # sliding layers built of another class: counted as keeping every token, were it not checked
    monkeypatch.setitem(cache_utils.DYNAMIC_LAYER_TYPE_MAPPING, "sliding_attention", cache_utils.DynamicLayer)
    with pytest.raises(upstream.UpstreamChanged, match=r"gives windows \[None, None\] for a sliding layer") as e:
        upstream.cache_layer_windows(Gemma3TextConfig(num_hidden_layers=6, sliding_window=512))
    relies_on = "transformers.cache_utils.DynamicSlidingWindowLayer, the sliding layers of DynamicCache(config=...)"
    assert_trips(e, "transformers", relies_on)
    monkeypatch.delattr(cache_utils, "DynamicSlidingWindowLayer")  # moved out of cache_utils
    with pytest.raises(upstream.UpstreamChanged, match="no longer has it$") as e:
        upstream.cache_layer_windows(Gemma3TextConfig(num_hidden_layers=6, sliding_window=512))
    assert_trips(e, "transformers", relies_on)


# --- accelerate ------------------------------------------------------------------------------------------------------

def test_fsdp_on_cpu_processes_trips_without_accelerates_shared_state(monkeypatch):
    from accelerate.state import PartialState

    monkeypatch.setattr(PartialState, "_shared_state", {})
    with pytest.raises(upstream.UpstreamChanged) as e, upstream.fsdp_on_cpu_processes():
        pass
    assert_trips(e, "accelerate", "accelerate.state.PartialState._shared_state['distributed_type']")


# --- torch -----------------------------------------------------------------------------------------------------------

def test_averaging_the_lm_heads_gradient_trips_when_full_tensor_takes_no_grad_placements(dpo, monkeypatch):
    from torch.distributed.tensor import DTensor

    model = dpo.model.get_base_model()
    monkeypatch.setattr(DTensor, "full_tensor", lambda self: self)
    with pytest.raises(upstream.UpstreamChanged) as e:
        upstream.averaging_lm_head_gradient(model)
    assert_trips(e, "torch", "DTensor.full_tensor(grad_placements=...)")
    assert "forward" in vars(model) and vars(model)["forward"] is upstream.trl_fused_forward(model), "left as it was"


def test_averaging_the_lm_heads_gradient_trips_when_the_fused_head_reads_the_shard_otherwise():
    """A fused head that reads the sharded lm_head without DTensor.full_tensor: its gradient would not be averaged.
    One CPU process (gloo) with lm_head's weight as a DTensor, as FSDP leaves it; TRL's way (full_tensor) passes."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(4, 6, bias=False)

        def get_output_embeddings(self):
            return self.lm_head

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = Model()
        mesh = init_device_mesh("cpu", (1,))
        model.lm_head.weight = torch.nn.Parameter(distribute_tensor(model.lm_head.weight.detach(), mesh, [Shard(0)]))

        def trls(*, fused_lm_head=False):
            return model.lm_head.weight.full_tensor().sum()

        def reading_the_shard(*, fused_lm_head=False):
            return model.lm_head.weight.to_local().sum()

        model.forward = trls
        upstream.averaging_lm_head_gradient(model)
        model(fused_lm_head=True).backward()
        assert model.lm_head.weight.grad is not None
        model.forward = reading_the_shard
        upstream.averaging_lm_head_gradient(model)
        model(fused_lm_head=False)  # not the fused head: nothing to check
        with pytest.raises(upstream.UpstreamChanged) as e:
            model(fused_lm_head=True)
        assert_trips(e, "trl", "its fused LM head gathering the sharded lm_head with DTensor.full_tensor")
    finally:
        dist.destroy_process_group()


# --- datasets --------------------------------------------------------------------------------------------------------

def test_the_datasets_fingerprint_trips_without_it():
    from datasets import Dataset

    rows = Dataset.from_dict({"prompt": ["a", "b"]})
    assert upstream.dataset_fingerprint(rows) == upstream.dataset_fingerprint(Dataset.from_dict({"prompt": ["a", "b"]}))
    assert upstream.dataset_fingerprint(rows) != upstream.dataset_fingerprint(rows.select([1, 0]))
    del vars(rows)["_fingerprint"]
    with pytest.raises(upstream.UpstreamChanged) as e:
        upstream.dataset_fingerprint(rows)
    assert_trips(e, "datasets", "Dataset._fingerprint")


# --- python ----------------------------------------------------------------------------------------------------------

def test_running_the_exit_handlers_trips_without_the_interpreters_function(monkeypatch):
    import atexit

    monkeypatch.delattr(atexit, "_run_exitfuncs")
    with pytest.raises(upstream.UpstreamChanged) as e:
        upstream.run_exit_handlers()
    assert_trips(e, "python", "atexit._run_exitfuncs")


# --- torch -----------------------------------------------------------------------------------------------------------

def test_the_cpu_attention_flop_formulas_trip_when_torch_renames_the_kernel(monkeypatch):
    import torch

    monkeypatch.setattr(upstream, "CPU_ATTENTION", ("_no_such_attention_kernel", upstream.CPU_ATTENTION[1]))
    with pytest.raises(upstream.UpstreamChanged) as excinfo:
        upstream.cpu_attention_flop_formulas()
    assert_trips(excinfo, "torch", "aten._no_such_attention_kernel")
    assert hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def test_torch_dispatch_trips_when_torch_moves_its_dispatch_mode(monkeypatch):
    import sys

    assert upstream.torch_dispatch()[0].__name__ == "TorchDispatchMode"
    monkeypatch.setitem(sys.modules, "torch.utils._python_dispatch", None)  # an import of it raises ImportError
    with pytest.raises(upstream.UpstreamChanged) as excinfo:
        upstream.torch_dispatch()
    assert_trips(excinfo, "torch", "torch.utils._python_dispatch.TorchDispatchMode")


def test_operator_writes_trips_without_a_schema():
    import torch

    assert upstream.operator_writes(torch.ops.aten.add_.Tensor, (1, 2), {}) == (False, [1])
    assert upstream.operator_writes(torch.ops.aten.view.default, (1, [2]), {})[0]
    with pytest.raises(upstream.UpstreamChanged) as excinfo:
        upstream.operator_writes(lambda: None, (), {})
    assert_trips(excinfo, "torch", "an operator's _schema")
