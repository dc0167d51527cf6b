"""The recipe: one YAML file that describes a run, and the only place its schema lives.

Precedence is dataclass default < YAML < command-line override (``--sft.args.learning_rate=1e-4``).
Loading reports every problem at once, each naming its key; nothing here touches the disk
beyond reading the recipe, so the launcher can validate before any GPU is asked for.

The sections ``sft.args``/``dpo.args``/``grpo.args`` pass through to TRL's ``SFTConfig``/``DPOConfig``/``GRPOConfig``,
``*.lora`` to peft's ``LoraConfig`` and ``*.quantization`` to transformers' ``BitsAndBytesConfig``;
their keys and value types are checked against those classes (``check_passthrough``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jobs.contract import UserError

STAGES = ("prepare", "sft", "dpo", "grpo", "evaluate", "merge_push")
# A recipe without ``stages`` runs these: GRPO needs rewards and answers it can check, so a recipe names it
DEFAULT_STAGES = tuple(s for s in STAGES if s != "grpo")
TRAINING_STAGES = ("sft", "dpo", "grpo")  # the stages that run one process per GPU and may span nodes
# The prepared rows each training stage reads (<run>/prepare/<kind>/): GRPO's prompts and gold answers are answer rows
DATA_KIND = {"sft": "sft", "dpo": "dpo", "grpo": "sft"}
# What evaluate compares, in the pipeline's order: the base model, the base with a system prompt, each trained stage
VARIANTS = ("base", "prompted", *TRAINING_STAGES)
STAGE_SECTIONS = {  # what each stage's output depends on, besides its inputs' fingerprints
    "prepare": ("model", "data", "prepare", "seed"),
    "sft": ("model", "sft", "seed"),
    "dpo": ("model", "dpo", "seed"),
    "grpo": ("model", "grpo", "seed"),
    "evaluate": ("model", "evaluate", "seed"),
    "merge_push": ("model", "merge_push"),
}
SIZING_KEYS = ("resources", "parameters")  # keys of a stage's sections that size its pods, not its output
TRAINING_METHODS = ("lora", "qlora", "full")
DTYPES = ("auto", "bfloat16", "float16", "float32")
FLOAT_DTYPES = tuple(d for d in DTYPES if d != "auto")
# How a training stage spreads over its GPUs: none = every GPU holds everything (data parallel); fsdp = weights,
# gradients and optimizer states sharded over them (torch's fully_shard); auto = fsdp when the memory arithmetic
# (jobs.memory) says one GPU of resources.gpu_memory_gib cannot hold the stage.
SHARDING = ("none", "fsdp", "auto")
RECIPE_ENV = "VLMJOBS_RECIPE"  # the resolved recipe as JSON, as the launcher hands it to a stage

# Kubernetes object names are DNS-1123 labels: lower-case alphanumerics and '-', 63 at most.
DNS1123_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# A Job name is "<run>-<stage>"; the pods of an Indexed Job add "-<index>-<5 random>" and the
# pod hostname must stay a label: 63 - len("-merge-push") 11 - len("-99-xxxxx") 9 = 43.
MAX_RUN_ID = 43


@dataclass(frozen=True)
class Model:
    name_or_path: str  # hub id (org/name) or local folder written by save_pretrained
    family: str  # a key of jobs.families.FAMILIES
    revision: str | None = None  # hub branch, tag or commit
    dtype: str = "auto"  # auto: bfloat16 on a GPU that has it, float32 otherwise
    attn_implementation: str | None = None  # e.g. sdpa, flash_attention_2
    processor: dict = field(default_factory=dict)  # processor kwargs on top of the family's defaults
    # The checkpoint's parameter count as its card publishes it (8.29e9): sizes evaluate's and merge_push's GPUs
    # (jobs.stage_resources); changes no stage's output, so it is not part of a stage's config
    parameters: float | None = None


@dataclass(frozen=True)
class Source:
    path: str  # hub id, local folder or data file
    format: str  # a key of jobs.formats.FORMATS
    name: str | None = None  # hub config name
    revision: str | None = None
    train_split: str = "train"  # slicing works: train[:10%]
    eval_split: str | None = None  # None: carved from the train split (prepare.eval_fraction)
    test_split: str | None = None  # None: carved from the train split (prepare.test_fraction)
    system_prompt: str | None = None  # prepended to every prompt as a system message
    # Where a generated answer stands in the completion, as the system prompt asks for it: "</think>" (the text after
    # it), "<answer>" (the text inside <answer></answer>); None: the whole completion. evaluate's accuracy and GRPO's
    # rewards read it alike (metrics.read_answer)
    answer_after: str | None = None


@dataclass(frozen=True)
class Data:
    sft: Source | None = None  # prompt/answer rows, for sft and answer accuracy
    dpo: Source | None = None  # preference rows, for dpo and preference accuracy


@dataclass(frozen=True)
class Run:
    id: str = ""  # defaults to the recipe's name; names the run folder and the Jobs
    root: str = "runs"  # local folder holding run folders (the cluster uses kubernetes.mount_path)
    # Run folders of this recipe to keep (the nightly's pruning): when evaluate has added the run to the recipe's
    # history, it removes the folders of older runs beyond the newest `keep`, never the last good one nor one in use
    # (jobs.history.prune, as vlmjobs prune --keep). None keeps every run.
    keep: int | None = None


@dataclass(frozen=True)
class Prepare:
    image_scale: float = 1.0  # shrink images to this fraction of the processor's size (the blog: 0.5)
    max_drop_fraction: float = 0.01  # fail when more rows than this are unusable
    eval_fraction: float = 0.05  # carved from train when the source has no eval split
    test_fraction: float = 0.05  # carved from train when the source has no test split
    max_rows: int | None = None  # per split, after slicing; for quick looks at big sources
    num_proc: int = 1  # worker processes for decoding and resizing images
    resources: dict = field(default_factory=dict)  # Resources fields overriding prepare's CPU-only defaults
    # Frames per second kept of a video row where the family's video processor sets no fps or num_frames of its own
    # (Qwen2.5-VL's: its card samples at 2 through qwen-vl-utils); fewer frames, fewer tokens and less memory
    video_fps: float = 2.0


@dataclass(frozen=True)
class Train:
    method: str = "lora"  # lora | qlora (4-bit nf4 base) | full
    lora: dict = field(default_factory=dict)  # peft.LoraConfig fields; target_modules defaults per family
    quantization: dict = field(default_factory=dict)  # BitsAndBytesConfig fields for qlora
    args: dict = field(default_factory=dict)  # trl SFTConfig / DPOConfig fields
    resources: dict = field(default_factory=dict)  # Resources fields overriding the recipe's
    # Samples per optimizer step, all processes together, with args.per_device_train_batch_size: auto: the stage
    # finds the largest micro-batch that fits and sets gradient_accumulation_steps to keep this (jobs.auto_batch).
    effective_batch_size: int | None = None
    # Full fine-tuning keeps fp32 master weights (and fp32 gradients and AdamW states) under bf16 autocast where
    # model.dtype is bf16 (auto on a GPU that has it). true trains the bf16 weights themselves: half the memory of
    # weights, gradients and AdamW states, but updates below bf16's precision (about 1/256 of a weight) round away.
    pure_bf16: bool = False


@dataclass(frozen=True)
class SFT(Train):
    # Each batch's rows joined into one sequence, positions restarting per row, instead of padded to the longest
    # (jobs.packing): the same loss and gradients, fewer tokens. None: on with sdpa (each row attended alone by the
    # stage) and flash attention's varlen kernels, where each row attends only within itself
    # (families.PER_ROW_ATTENTION), wherever the family packs; true: also with eager and flex.
    padding_free: bool | None = None


@dataclass(frozen=True)
class DPO(Train):
    init: str = "sft"  # sft: start from the SFT stage's output when the run has one; base: from the base model
    sft_adapter: str = "merge"  # merge: fold SFT's adapter into the weights first; continue: train it further
    # cache: the reference's log-probs of every pair computed once before training and reused by every epoch, a resumed
    # attempt and a later DPO on the same reference and data (a beta sweep); full fine-tuning then holds no second
    # copy of the model. recompute: TRL's reference forward at every step.
    reference_logprobs: str = "cache"
    # Each pair's image and prompt encoded once, both answers continuing from it (jobs.shared_prefix), for the policy
    # and the reference: the same loss and gradients as TRL's two rows per pair. None: on where the model's attention
    # implementation takes a custom mask (eager, sdpa); true: refuse where not; false: TRL's rows.
    shared_prefix: bool | None = None


@dataclass(frozen=True)
class Reward:
    """One term of GRPO's reward: a name of jobs.rewards.REWARDS, or a user's function as a dotted path
    (``package.module.function``) with TRL's reward signature, ``f(prompts, completions, **kwargs) -> list[float]``."""

    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class VllmServer:
    """GRPO's vLLM server as its own pod beside the trainer (``grpo.args.use_vllm: true``, ``vllm_mode: server``): the
    launcher renders the stage as a JobSet of the trainer and this server, ``trl vllm-serve`` on its own GPUs."""

    # An image with vLLM (0.30 or 0.31: TRL 1.16's range, from 0.30 on for image prompts) and trl==1.16.0, whose
    # `trl vllm-serve` adds the flags its trainer relies on (the weight-transfer engine, vLLM's dev endpoints); the
    # project's image has no vLLM. Pinned, as kubernetes.image is.
    image: str | None = None
    gpus: int | None = None  # its tensor-parallel size; None: the fewest the memory arithmetic (jobs.memory) gives
    gpu_memory_utilization: float = 0.9  # the share of each of its GPUs vLLM takes (trl vllm-serve's default)


@dataclass(frozen=True)
class GRPO(Train):
    init: str = "sft"  # sft: start from the SFT stage's output when the run has one; base: from the base model
    sft_adapter: str = "merge"  # merge: fold SFT's adapter into the weights first; continue: train it further
    # Summed with their weights into each completion's reward (GRPOConfig.reward_weights). accuracy is evaluate's own
    # accuracy rule for the data's format (ChartQA's relaxed accuracy for chartqa, exact match otherwise).
    rewards: tuple[Reward, ...] = (Reward("accuracy"),)
    vllm_server: VllmServer | None = None  # in a cluster, the server of vllm_mode server as its own pod

    @property
    def vllm_server_mode(self) -> bool:
        """TRL generates through a vLLM server (GRPOConfig's use_vllm and vllm_mode server)."""
        return bool(self.args.get("use_vllm")) and self.args.get("vllm_mode", "colocate") == "server"

    @property
    def server_pod(self) -> bool:
        """The launcher renders the vLLM server as a pod beside the trainer (else the user's own server, or none)."""
        return self.vllm_server_mode and self.vllm_server is not None


@dataclass(frozen=True)
class Benchmark:
    """A published benchmark in its released files (jobs.benchmarks), scored as its official script does."""

    format: str  # amber (the discriminative task) | pope
    path: str  # AMBER: query_discriminative.json; POPE: a question file, e.g. coco_pope_adversarial.json
    images: str  # folder holding the images the questions name (AMBER's image/, COCO's val2014/)
    annotations: str | None = None  # AMBER: its annotations.json
    name: str = ""  # prefix of its metrics in the report (amber_f1); "" is the format's name
    prompt_suffix: str = ""  # appended to every question, e.g. "Answer with Yes or No."
    max_samples: int | None = None  # the first questions only; None: all

    @property
    def key(self) -> str:
        return self.name or self.format


@dataclass(frozen=True)
class Evaluate:
    variants: tuple[str, ...] = VARIANTS  # those the run has are evaluated
    system_prompt: str = "Answer with a single word or number, as short as possible."  # for "prompted"
    max_new_tokens: int = 32
    batch_size: int = 8
    max_samples: int | None = None  # per split; None evaluates the whole test split
    primary_metric: str = "accuracy"  # what merge_push compares between base and tuned
    benchmarks: tuple[Benchmark, ...] = ()  # published benchmarks every variant is scored on, besides the test splits
    resources: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MergePush:
    push: bool = False  # False writes the merged model to the run folder only
    repo_id: str | None = None  # hub repo to push to, org/name
    private: bool = True
    revision: str | None = None  # hub branch to push to; None is main
    dtype: str = "bfloat16"  # dtype of the merged weights
    logits_atol: float = 1e-2  # merged vs adapter logits must agree within this
    force: bool = False  # push even when evaluate shows the tuned model worse than base
    push_unevaluated: bool = False  # push from a run without the evaluate stage (nothing gates it then)
    license: str | None = None  # the card's license (e.g. apache-2.0); None: the base model card's
    resources: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Resources:
    gpus: int = 1  # per node
    nodes: int = 1
    gpu_product: str | None = None  # nodeSelector nvidia.com/gpu.product, e.g. NVIDIA-H100-80GB-HBM3
    gpu_memory_gib: float | None = None  # for the memory check before training
    sharding: str | None = "none"  # none | fsdp | auto (see SHARDING); a command line's none arrives as None, the same
    cpu: str = "8"
    memory: str = "64Gi"
    shm: str = "16Gi"  # /dev/shm for DataLoader workers and NCCL; counts against memory
    # Added for nightly operations (issue 22): the extended resource a GPU is asked as, e.g. nvidia.com/mig-1g.10gb for
    # one MIG slice (the GPU operator's mixed strategy); and whether a training stage may land on a GPU shared by
    # time-slicing or MPS (GPU feature discovery's nvidia.com/gpu.replicas > 1): off, since 4 replicas of one GPU train
    # 4 times slower and share its memory. Stages that do not train may always share.
    gpu_resource: str = "nvidia.com/gpu"
    shared_gpu: bool = False


@dataclass(frozen=True)
class Kubernetes:
    namespace: str = "vlmjobs"
    image: str | None = None  # pinned tag or digest; None: the project's image at this version
    pvc: str = "vlmjobs-runs"  # shared volume holding the run folders
    mount_path: str = "/runs"
    # Secret holding HF_TOKEN; None: no token. Optional in the pods: a run on public models needs none
    hf_token_secret: str | None = "hf-token"
    hf_token_key: str = "token"
    # The Secret (same key) whose write token merge_push pushes with, required when it pushes; None: hf_token_secret's
    hf_write_token_secret: str | None = None
    service_account: str | None = None
    priority_class: str | None = None
    queue: str | None = None  # Kueue LocalQueue name: every Job (stages, driver, nightly) joins it
    priority: str | None = None  # Kueue WorkloadPriorityClass name: its place in the queue and what it may preempt
    admission_timeout: int = 24 * 3600  # seconds a Job may wait suspended (queued by Kueue) before follow gives up
    image_pull_secrets: tuple[str, ...] = ()
    backoff_limit: int = 3
    active_deadline_seconds: int = 7 * 24 * 3600
    ttl_seconds_after_finished: int = 3 * 24 * 3600
    termination_grace_period_seconds: int = 300  # time to write a checkpoint after SIGTERM
    target_version: str = "1.31"  # oldest Kubernetes the manifests must work on; podFailurePolicy is GA from 1.31
    # Added for the launcher (issue 4):
    nightly_schedule: str = "0 2 * * *"  # cron schedule of the nightly pipeline's CronJob (vlmjobs cronjob)
    nightly_time_zone: str = "Etc/UTC"  # the CronJob's timeZone; without it the schedule follows the controller's clock
    # restarts after preemption or a lost node, on top of backoff_limit, where the launcher retries (a one-node stage on
    # a target before 1.31): ends a preemption loop. A JobSet restarts on disruptions without a bound of its own
    max_disruption_restarts: int = 10
    # Added for the simulated cluster (issue 10), useful anywhere: annotations on every stage pod, e.g.
    # cluster-autoscaler.kubernetes.io/safe-to-evict: "false", or sim.vlmjobs.io/exit-code (scripts/cluster.py).
    pod_annotations: dict = field(default_factory=dict)
    # Added for nightly operations (issue 22): the nightly driver's deadline (the next night is due after 24 h, and under
    # concurrencyPolicy Forbid a run still going would keep it from starting), and a strategic-merge patch of every pod
    # the recipe renders, applied last (affinity, tolerations, NCCL/RDMA env, volumes: what the platform team knows).
    nightly_deadline_hours: float = 22.0
    pod_template: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    name: str
    model: Model
    data: Data = field(default_factory=Data)
    stages: tuple[str, ...] = DEFAULT_STAGES
    seed: int = 42
    run: Run = field(default_factory=Run)
    prepare: Prepare = field(default_factory=Prepare)
    sft: SFT = field(default_factory=SFT)
    dpo: DPO = field(default_factory=DPO)
    grpo: GRPO = field(default_factory=GRPO)
    evaluate: Evaluate = field(default_factory=Evaluate)
    merge_push: MergePush = field(default_factory=MergePush)
    resources: Resources = field(default_factory=Resources)
    kubernetes: Kubernetes = field(default_factory=Kubernetes)

    @property
    def run_id(self) -> str:
        return self.run.id or self.name

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run_id

    @property
    def shipped_stage(self) -> str:
        """The trained stage whose model merge_push ships (and the history follows): the last one the run has."""
        return "dpo" if "dpo" in self.stages else "sft"

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def fingerprint(self, *sections: str) -> str:
        """A short hash of the whole recipe, or of the named sections only."""
        data = self.to_dict()
        if sections:
            data = {name: data[name] for name in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def stage_config(self, stage: str) -> dict:
        """The recipe sections a stage's output depends on (what sizes its pods excluded): its fingerprint's input."""
        data = self.to_dict()
        return {
            key: {k: v for k, v in data[key].items() if k not in SIZING_KEYS} if isinstance(data[key], dict) else data[key]
            for key in STAGE_SECTIONS[stage]
        }

    def needs(self, stage: str) -> tuple[str, ...]:
        """The stages whose output ``stage`` reads from the run folder (the stage contract's inputs)."""
        if stage == "prepare":
            return ()
        if stage in ("dpo", "grpo") and getattr(self, stage).init == "sft" and "sft" in self.stages:
            return ("prepare", "sft")
        if stage == "evaluate":  # the trained variants it compares, of those the run has
            return ("prepare", *(s for s in TRAINING_STAGES if s in self.evaluate.variants and s in self.stages))
        if stage == "merge_push":  # the last trained stage, and evaluate's verdict when the run evaluates
            return ("prepare", self.shipped_stage, *(("evaluate",) if "evaluate" in self.stages else ()))
        return ("prepare",)

    @property
    def shipped_stage(self) -> str:
        """The last training stage of the run: what merge_push merges and ships (sft when the run trains none)."""
        return next((s for s in reversed(TRAINING_STAGES) if s in self.stages), "sft")

    def chosen_stages(self, stages: tuple[str, ...] = ()) -> tuple[str, ...]:
        """``stages`` (all of the recipe's when none are named) in the pipeline's order; one the recipe lacks
        is a user error (``--stages`` of vlmjobs run and pipeline)."""
        unknown = [s for s in stages if s not in self.stages]
        if unknown:
            raise UserError(f"--stages: {', '.join(unknown)} not in the recipe's stages ({', '.join(self.stages)})")
        return tuple(sorted(stages or self.stages, key=STAGES.index))

    def resources_for(self, stage: str) -> Resources:
        """A training stage's resources: the recipe's with the stage's overrides. What every stage's pods ask for,
        prepare, evaluate and merge_push included, is jobs.stage_resources.resolve."""
        if stage not in TRAINING_STAGES:
            raise ValueError(f"resources_for({stage!r}): not a training stage; use jobs.stage_resources.resolve")
        return dataclasses.replace(self.resources, **getattr(self, stage).resources)


# ---------------------------------------------------------------------------------------------
# Loading


def load(recipe: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a recipe file (or the resolved recipe in $VLMJOBS_RECIPE), apply overrides, validate."""
    if recipe:
        path = Path(recipe)
        if not path.is_file():
            raise UserError(f"recipe {path}: no such file{_did_you_mean_file(path)}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"recipe {path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        origin = str(path)
    elif os.environ.get(RECIPE_ENV):
        data, origin = json.loads(os.environ[RECIPE_ENV]), f"${RECIPE_ENV}"
    else:
        raise UserError(f"no recipe: pass --recipe=recipes/<name>.yaml or set ${RECIPE_ENV}")
    if not isinstance(data, dict):
        raise UserError(f"recipe {origin}: expected a mapping of sections, got {type(data).__name__}")
    return from_dict(data, overrides, origin=origin)


def _did_you_mean_file(path: Path) -> str:
    """"; did you mean recipes/tiny-demo.yaml?" for tiny-demo, tiny-demo.yaml or recipes/tiny-dmeo.yaml."""
    known = {p.stem: p for folder in {path.parent, Path("recipes")} if folder.is_dir() for p in sorted(folder.glob("*.yaml"))}
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    match = known.get(name) or next((known[m] for m in difflib.get_close_matches(name, list(known), n=1)), None)
    return f"; did you mean {match}?" if match else ""


def from_dict(data: dict, overrides: dict[str, Any] | None = None, *, origin: str | None = None) -> Recipe:
    data = json.loads(json.dumps(data))  # a deep copy that overrides may change
    errors: list[str] = []
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, _cli_literal(value), errors)
    recipe = _build(Recipe, data, "", errors)
    if not errors:
        errors.extend(_semantic_errors(recipe))
    if errors:
        raise UserError(f"{_recipe_named(origin)}: " + "; ".join(errors))
    object.__setattr__(recipe, "_origin", origin)  # for later messages; not a field, so not in the fingerprint
    return recipe


def recipe_origin(recipe: Recipe) -> str:
    """The recipe's name in messages: "recipe recipes/x.yaml" (or "recipe $VLMJOBS_RECIPE")."""
    return _recipe_named(getattr(recipe, "_origin", None))


def _recipe_named(origin: str | None) -> str:
    return f"recipe {origin}" if origin else "recipe"


def _cli_literal(value: Any) -> Any:
    """Fire reads True/False/None but leaves YAML's lower-case spellings as text; take those too."""
    if isinstance(value, str) and value.lower() in ("true", "false", "null", "none"):
        return {"true": True, "false": False}.get(value.lower())
    return value


def _set_dotted(data: dict, key: str, value: Any, errors: list[str]) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            errors.append(f"{key}: cannot override inside {part}, which is not a mapping")
            return
        node = child
    node[leaf] = value


def _build(cls, data: Any, where: str, errors: list[str]):
    if not isinstance(data, dict):
        errors.append(f"{where or 'recipe'}: expected a mapping, got {_kind(data)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    errors_before = len(errors)
    for key in data:
        if key not in fields:
            errors.append(_unknown_key(f"{where}{key}", key, fields))
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{where}{name}: required")
            continue
        values[name] = _coerce(data[name], hints[name], f"{where}{name}", errors)
    if len(errors) > errors_before:
        return None
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str, errors: list[str]) -> Any:
    """Check one value against a type hint; returns it in the dataclass's own type (tuples for lists)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where, errors)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{where}.", errors)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            errors.append(f"{where}: expected a list, got {_kind(value)}")
            return None
        return tuple(_coerce(v, args[0], f"{where}[{i}]", errors) for i, v in enumerate(value))
    if hint is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {_kind(value)}")
        return value
    if hint is str:
        # Fire and YAML read 1234 or 1e5 as numbers; a str field takes an int back as its text,
        # but a float may have lost digits (python-fire#507), so it must be quoted.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            errors.append(f"{where}: expected text, got {_kind(value)} (quote it)")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            errors.append(f"{where}: expected true or false, got {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{where}: expected an integer, got {_kind(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            errors.append(f"{where}: expected a number, got {_kind(value)}")
            return value
        return float(value)
    raise TypeError(f"recipe schema: unsupported type {hint} at {where}")  # a bug in this module


def _semantic_errors(recipe: Recipe) -> list[str]:
    from jobs.auto_batch import recipe_errors as recipe_batch_errors
    from jobs.families import FAMILIES
    from jobs.formats import FORMATS, NO_VIDEO_DPO

    errors = []
    if recipe.model.family not in FAMILIES:
        errors.append(f"model.family: {recipe.model.family!r} is not supported (supported: {', '.join(FAMILIES)})")
    if recipe.model.dtype not in DTYPES:
        errors.append(f"model.dtype: {recipe.model.dtype!r} is not one of {', '.join(DTYPES)}")
    if recipe.merge_push.dtype not in DTYPES[1:]:
        errors.append(f"merge_push.dtype: {recipe.merge_push.dtype!r} is not one of {', '.join(DTYPES[1:])}")
    for stage in recipe.stages:
        if stage not in STAGES:
            errors.append(f"stages: {stage!r} is not a stage (stages: {', '.join(STAGES)})")
    if list(recipe.stages) != sorted(set(recipe.stages), key=lambda s: STAGES.index(s) if s in STAGES else 99):
        errors.append(f"stages: list each stage once, in the order {', '.join(STAGES)}")
    if recipe.stages and recipe.stages[0] != "prepare" and "prepare" not in recipe.stages:
        errors.append("stages: every run starts with prepare")
    if not DNS1123_LABEL.match(recipe.run_id) or len(recipe.run_id) > MAX_RUN_ID:
        errors.append(
            f"run.id: {recipe.run_id!r} must be a DNS-1123 label of at most {MAX_RUN_ID} characters "
            "(lower-case letters, digits and '-', starting with a letter), since it names the Kubernetes Jobs"
        )
    if recipe.run.keep is not None and recipe.run.keep < 1:
        errors.append(f"run.keep: {recipe.run.keep} keeps no run; at least 1 (the run itself), or leave it out to keep every run")
    for name in ("sft", "dpo"):
        source = getattr(recipe.data, name)
        if source and source.format not in FORMATS:
            errors.append(f"data.{name}.format: {source.format!r} is not supported (supported: {', '.join(FORMATS)})")
        if source and name == "dpo" and source.format in FORMATS and FORMATS[source.format].video_column:
            errors.append(f"data.dpo.format: {source.format!r} holds video rows; {NO_VIDEO_DPO}")
        elif source and source.format in FORMATS and FORMATS[source.format].kind != name:
            kinds = [k for k, f in FORMATS.items() if f.kind == name]
            errors.append(f"data.{name}.format: {source.format!r} holds {FORMATS[source.format].kind} rows; use one of {', '.join(kinds)}")
    for stage in TRAINING_STAGES:
        kind = DATA_KIND[stage]
        if stage in recipe.stages and getattr(recipe.data, kind) is None:
            errors.append(f"data.{kind}: the {stage} stage needs a data source (or remove {stage} from stages)")
        train = getattr(recipe, stage)
        if train.method not in TRAINING_METHODS:
            errors.append(f"{stage}.method: {train.method!r} is not one of {', '.join(TRAINING_METHODS)}")
        if train.pure_bf16 and train.method != "full":
            errors.append(f"{stage}.pure_bf16: only full fine-tuning has master weights to keep in bf16; "
                          f"{train.method}'s adapter stays {'bf16' if train.method == 'qlora' else 'fp32'} (remove the key)")
        if stage in recipe.stages and set(train.resources) <= {f.name for f in dataclasses.fields(Resources)}:  # else reported below
            resources = recipe.resources_for(stage)
            errors += recipe_batch_errors(stage, train.effective_batch_size, train.args, max(resources.gpus, 1) * resources.nodes)
        if train.pure_bf16 and recipe.model.dtype not in ("auto", "bfloat16"):
            errors.append(f"{stage}.pure_bf16: trains bf16 weights, but model.dtype is {recipe.model.dtype}; set auto or bfloat16")
    if recipe.sft.padding_free and recipe.model.family in FAMILIES:
        why_not = FAMILIES[recipe.model.family].why_not_packed(recipe.model.attn_implementation)
        if why_not:
            errors.append(f"sft.padding_free: {why_not}; set it false (or remove the key)")
    if "prepare" in recipe.stages and recipe.data.sft is None and recipe.data.dpo is None:
        errors.append("data: give data.sft or data.dpo")
    for stage in ("dpo", "grpo"):
        if getattr(recipe, stage).init not in ("sft", "base"):
            errors.append(f"{stage}.init: {getattr(recipe, stage).init!r} is not one of sft, base")
        if getattr(recipe, stage).sft_adapter not in ("merge", "continue"):
            errors.append(f"{stage}.sft_adapter: {getattr(recipe, stage).sft_adapter!r} is not one of merge, continue")
    if "grpo" in recipe.stages:
        errors += _grpo_errors(recipe)
    if recipe.dpo.reference_logprobs not in ("cache", "recompute"):
        errors.append(f"dpo.reference_logprobs: {recipe.dpo.reference_logprobs!r} is not one of cache, recompute")
    if recipe.dpo.args.get("precompute_ref_log_probs"):
        errors.append("dpo.args.precompute_ref_log_probs: TRL refuses it for image data; dpo.reference_logprobs: cache "
                      "(the default) precomputes them; remove the key")
    if recipe.dpo.args.get("sync_ref_model") and recipe.dpo.reference_logprobs == "cache":
        errors.append("dpo.args.sync_ref_model: updates the reference during training, which cached log-probs cannot "
                      "follow; set dpo.reference_logprobs: recompute")
    for variant in recipe.evaluate.variants:
        if variant not in VARIANTS:
            errors.append(f"evaluate.variants: {variant!r} is not one of {', '.join(VARIANTS)}")
    errors += _benchmark_errors(recipe.evaluate.benchmarks)
    if recipe.merge_push.push and not recipe.merge_push.repo_id:
        errors.append("merge_push.repo_id: required when merge_push.push is true")
    if recipe.merge_push.push and "merge_push" in recipe.stages and not recipe.merge_push.push_unevaluated:
        errors += _push_gate_errors(recipe)
    for fraction in ("max_drop_fraction", "eval_fraction", "test_fraction"):
        if not 0 <= getattr(recipe.prepare, fraction) < 1:
            errors.append(f"prepare.{fraction}: must be in [0, 1)")
    if not 0 < recipe.prepare.image_scale <= 1:
        errors.append("prepare.image_scale: must be in (0, 1]")
    if not recipe.prepare.video_fps > 0:
        errors.append("prepare.video_fps: must be above 0 (frames per second kept of a video)")
    if recipe.model.parameters is not None and not recipe.model.parameters >= 1e6:
        errors.append(f"model.parameters: {recipe.model.parameters:g} is not a model's parameter count (e.g. 8290000000, "
                      "as the checkpoint's card gives it)")
    if (recipe.resources.sharding or "none") not in SHARDING:
        errors.append(f"resources.sharding: {recipe.resources.sharding!r} is not one of {', '.join(SHARDING)}")
    for stage in STAGES:
        overrides = getattr(getattr(recipe, stage), "resources", {})
        if (overrides.get("sharding") or "none") not in SHARDING:
            errors.append(f"{stage}.resources.sharding: {overrides['sharding']!r} is not one of {', '.join(SHARDING)}")
        if stage in TRAINING_STAGES and stage in recipe.stages and set(overrides) <= {f.name for f in dataclasses.fields(Resources)}:
            res = recipe.resources_for(stage)
            train = getattr(recipe, stage)
            storage = str(train.quantization.get("bnb_4bit_quant_storage", "")).removeprefix("torch.")
            if res.sharding in ("fsdp", "auto") and train.method == "qlora" and storage not in ("", *FLOAT_DTYPES):
                errors.append(f"{stage}.quantization.bnb_4bit_quant_storage: {storage} packs the 4-bit weights into "
                              "bytes, which FSDP cannot shard (accelerate would keep them whole on every GPU); remove it, "
                              "and the stage packs them into the weights' dtype when it shards")
            if res.sharding == "auto" and not res.gpu_memory_gib:
                errors.append(f"resources.sharding: auto shards {stage} when one GPU cannot hold it, which needs "
                              "resources.gpu_memory_gib; set it, or sharding fsdp or none")
        if stage not in TRAINING_STAGES and overrides.get("nodes", 1) != 1:
            errors.append(f"{stage}.resources.nodes: only the training stages ({', '.join(TRAINING_STAGES)}) span nodes; set 1")
        for key in overrides:
            if key not in {f.name for f in dataclasses.fields(Resources)}:
                errors.append(_unknown_key(f"{stage}.resources.{key}", key, {f.name: f for f in dataclasses.fields(Resources)}))
    return errors


# TRL 1.16's GRPOConfig defaults that decide the generation batch (tests/test_grpo.py compares them with the class's),
# so that validate checks the batch without importing TRL
GRPO_BATCH_DEFAULTS = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "num_generations": 8}


def grpo_generation_batch(args: dict, processes: int) -> int:
    """Completions generated at once, all processes together, as GRPOConfig derives it: generation_batch_size, else
    the per-device batch x processes x steps_per_generation (by default the accumulation steps)."""
    if args.get("generation_batch_size"):
        return args["generation_batch_size"]
    steps = args.get("steps_per_generation") or args.get("gradient_accumulation_steps", GRPO_BATCH_DEFAULTS["gradient_accumulation_steps"])
    return args.get("per_device_train_batch_size", GRPO_BATCH_DEFAULTS["per_device_train_batch_size"]) * processes * steps


def _grpo_errors(recipe: Recipe) -> list[str]:
    from jobs.formats import FORMATS
    from jobs.rewards import REWARDS, dotted_path

    errors = []
    source = recipe.data.sft
    if source and source.format in FORMATS and not FORMATS[source.format].gold:
        checkable = [name for name, f in FORMATS.items() if f.gold]
        errors.append(f"data.sft.format: {source.format!r} rows have no gold answer for grpo's rewards to check; "
                      f"use one of {', '.join(checkable)}")
    if not recipe.grpo.rewards:
        errors.append("grpo.rewards: empty; name at least one (e.g. [{name: accuracy}])")
    for i, reward in enumerate(recipe.grpo.rewards):
        if reward.name not in REWARDS and not dotted_path(reward.name):
            close = difflib.get_close_matches(reward.name, list(REWARDS), n=1)
            errors.append(f"grpo.rewards[{i}].name: {reward.name!r} is neither a reward ({', '.join(REWARDS)}) nor a "
                          "dotted path to a function (package.module.function)" + (f"; did you mean {close[0]!r}?" if close else ""))
    merged_sft = recipe.grpo.init == "sft" and "sft" in recipe.stages and recipe.sft.method != "full"
    if recipe.grpo.method == "full" and recipe.grpo.args.get("beta", 0.0) and merged_sft and recipe.grpo.sft_adapter == "merge":
        errors.append("grpo.args.beta: a KL term needs a reference, which TRL 1.16 reloads for full fine-tuning from the "
                      "model's hub id, the base model, not SFT's adapter merged into it; set grpo.method lora (the "
                      "reference is the adapter switched off) or beta 0")
    if "reward_weights" in recipe.grpo.args:
        errors.append("grpo.args.reward_weights: set from grpo.rewards' weights; give each reward its weight there")
    errors += _vllm_server_errors(recipe)
    args = recipe.grpo.args
    if args.get("per_device_train_batch_size") == "auto":  # TRL refuses auto_find_batch_size for GRPO, for this reason
        errors.append("grpo.args.per_device_train_batch_size: auto is not for GRPO (halving the batch on out-of-memory "
                      "would split the groups of num_generations completions); give a number")
    elif set(recipe.grpo.resources) <= {f.name for f in dataclasses.fields(Resources)}:
        resources = recipe.resources_for("grpo")
        processes = max(resources.gpus, 1) * resources.nodes
        batch = grpo_generation_batch(args, processes)
        generations = args.get("num_generations", GRPO_BATCH_DEFAULTS["num_generations"])
        per_device = args.get("per_device_train_batch_size", GRPO_BATCH_DEFAULTS["per_device_train_batch_size"])
        if args.get("generation_batch_size") and args.get("steps_per_generation"):
            errors.append("grpo.args.steps_per_generation: set with generation_batch_size, which decides it "
                          "(generation_batch_size / rows per micro-step); set one of them")
        # generation_batch_size counts all processes' rows: right on one GPU, it may not split over more
        elif args.get("generation_batch_size") and isinstance(batch, int) and isinstance(per_device, int) \
                and batch % (per_device * processes):
            errors.append(f"grpo.args.generation_batch_size: {batch} is not a multiple of the {per_device * processes} "
                          f"rows one micro-step takes (per_device_train_batch_size {per_device} x {processes} "
                          "process(es)); make it one, or leave it out (then per_device_train_batch_size x processes "
                          "x steps_per_generation)")
        if isinstance(batch, int) and isinstance(generations, int) and generations and batch % generations:
            errors.append(f"grpo.args.num_generations: {generations} completions per prompt do not divide the generation "
                          f"batch of {batch} (per_device_train_batch_size x {processes} process(es) x steps_per_generation, or "
                          "generation_batch_size); make the batch a multiple of num_generations")
    return errors


# GRPOConfig's fields that say where the vLLM server is: set for the trainer by the launcher where it renders the server
VLLM_SERVER_ADDRESS_ARGS = ("vllm_server_base_url", "vllm_server_host", "vllm_server_port")
VLLM_SERVER_URL_ENV = "VLMJOBS_VLLM_SERVER_URL"  # the server pod's URL, in the trainer's pods (launcher.render)


def _vllm_server_errors(recipe: Recipe) -> list[str]:
    """vllm_mode server needs a server: the launcher's pod (grpo.vllm_server, with its image) or the user's own
    (grpo.args.vllm_server_base_url or vllm_server_host), not both; grpo.vllm_server serves server mode alone."""
    from jobs.hub import looks_like_path

    grpo, server = recipe.grpo, recipe.grpo.vllm_server
    own_server = [key for key in VLLM_SERVER_ADDRESS_ARGS if key in grpo.args]
    if server is None:
        if grpo.vllm_server_mode and not {"vllm_server_base_url", "vllm_server_host"} & set(own_server):
            return ["grpo.args.vllm_mode: server needs a vLLM server: set grpo.vllm_server.image (an image with vLLM and "
                    "trl==1.16.0) for the launcher to run one beside the trainer, or grpo.args.vllm_server_base_url "
                    "to use your own"]
        return []
    if not grpo.vllm_server_mode:
        return ["grpo.vllm_server: a server pod serves grpo.args.use_vllm: true with vllm_mode: server only; set both, "
                "or remove grpo.vllm_server"]
    errors = []
    if not server.image:
        errors.append("grpo.vllm_server.image: required: an image with vLLM and trl==1.16.0 (the project's image has no "
                      "vLLM), pinned by tag or digest")
    if own_server:
        errors.append(f"grpo.args.{own_server[0]}: set by the launcher, which points the trainer at the server pod "
                      "(grpo.vllm_server); remove it, or remove grpo.vllm_server to use your own server")
    if server.gpus is not None and server.gpus < 1:
        errors.append(f"grpo.vllm_server.gpus: {server.gpus}; vLLM needs 1 or more (its tensor-parallel size)")
    if not 0 < server.gpu_memory_utilization <= 1:
        errors.append(f"grpo.vllm_server.gpu_memory_utilization: {server.gpu_memory_utilization:g} is not a share of a "
                      "GPU in (0, 1]")
    # The server starts from the base model's hub id even where GRPO starts from SFT's output on the volume: in server
    # mode TRL's trainer pushes every weight (a LoRA adapter merged in) to the server before its first generation and
    # after every step (GRPOTrainer._last_loaded_step starts at -1), so what the server loaded is overwritten before
    # it generates. It reads no volume (a ReadWriteOnce claim attaches to the trainer's node alone), so a model that
    # is a local path it cannot load.
    if looks_like_path(recipe.model.name_or_path):
        errors.append(f"grpo.vllm_server: the server pod loads model.name_or_path from the hub, and "
                      f"{recipe.model.name_or_path!r} is a path; give the model's hub id (and model.revision)")
    return errors


BENCHMARK_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # a metric name prefix


def _benchmark_errors(benchmarks: tuple[Benchmark, ...]) -> list[str]:
    from jobs.benchmarks import KINDS

    errors, seen = [], set()
    for i, bench in enumerate(benchmarks):
        where = f"evaluate.benchmarks[{i}]"
        if bench.format not in KINDS:
            errors.append(f"{where}.format: {bench.format!r} is not one of {', '.join(KINDS)}")
        if not BENCHMARK_NAME.match(bench.key):
            errors.append(f"{where}.name: {bench.key!r} must be lower-case letters, digits and _, starting with a letter")
        elif bench.key in seen:
            errors.append(f"{where}.name: {bench.key!r} names another benchmark too; give each its own name (e.g. pope_random)")
        seen.add(bench.key)
        if bench.format == "amber" and not bench.annotations:
            errors.append(f"{where}.annotations: required for amber (data/annotations.json of the AMBER repository)")
    return errors


def _push_gate_errors(recipe: Recipe) -> list[str]:
    """A push is gated on evaluate's comparison of the variant pushed with base (jobs.merge_push.gate): the run
    must produce both, or say by name that it pushes unevaluated."""
    if "evaluate" not in recipe.stages:
        return ["merge_push.push: a push needs the evaluate stage, which the run lacks; add evaluate to stages, "
                "or set merge_push.push_unevaluated=true to push an unevaluated model"]
    pushed = recipe.shipped_stage
    missing = [v for v in ("base", pushed) if v not in recipe.evaluate.variants]
    if missing:
        return [f"merge_push.push: the push is gated on evaluate comparing {pushed} with base; add {' and '.join(missing)} "
                "to evaluate.variants, or set merge_push.push_unevaluated=true"]
    return []


# ---------------------------------------------------------------------------------------------
# Pass-through sections, checked against the library classes they are handed to

STAGE_OWNED_ARGS = {  # set by the stage from the run folder; a recipe value would be silently ignored
    "output_dir": "the stage writes into the run folder",
    "resume_from_checkpoint": "the stage resumes from the newest complete checkpoint by itself",
    "push_to_hub": "merge_push pushes once evaluation has passed",
    "fsdp": "resources.sharding decides; fsdp_config tunes it",
    "remove_unused_columns": "the stage's columns for its sampler and collator must reach them; TRL's collators read only theirs",
}


# The classes the pass-through sections are handed to; BitsAndBytesConfig is a plain class whose __init__ is the schema.
PASSTHROUGH_CLASSES = {"SFTConfig": "trl", "DPOConfig": "trl", "GRPOConfig": "trl", "LoraConfig": "peft", "BitsAndBytesConfig": "transformers"}
SCHEMA_CACHE_FORMAT = 2  # bump when _describe changes what it writes


def check_passthrough(recipe: Recipe) -> None:
    """Check sft/dpo args, lora and quantization keys and value types against TRL, peft and transformers."""
    errors = passthrough_errors(recipe)
    if errors:
        raise UserError(f"{recipe_origin(recipe)}: " + "; ".join(errors))


def passthrough_errors(recipe: Recipe) -> list[str]:
    from jobs import auto_batch

    schemas = passthrough_schemas()
    errors: list[str] = []
    for stage, config_cls in (("sft", "SFTConfig"), ("dpo", "DPOConfig"), ("grpo", "GRPOConfig")):
        if stage not in recipe.stages:
            continue
        train = getattr(recipe, stage)
        for key in train.args:
            if key in STAGE_OWNED_ARGS:
                errors.append(f"{stage}.args.{key}: set by the stage ({STAGE_OWNED_ARGS[key]}); remove it")
        # auto: the stage finds the micro-batch and whether to recompute activations (jobs.auto_batch); TRL sees values
        args = auto_batch.without_auto(train.args)
        errors += _check_fields(config_cls, schemas[config_cls], args, f"{stage}.args")
        errors += _check_fields("LoraConfig", schemas["LoraConfig"], train.lora, f"{stage}.lora")
        errors += _check_fields("BitsAndBytesConfig", schemas["BitsAndBytesConfig"], train.quantization, f"{stage}.quantization")
    if "grpo" in recipe.stages:  # a user's own reward, imported as the stage will import it
        from jobs.rewards import REWARDS, user_reward_problem

        for i, reward in enumerate(recipe.grpo.rewards):
            problem = None if reward.name in REWARDS else user_reward_problem(reward.name)
            if problem:
                errors.append(f"grpo.rewards[{i}].name: {problem}")
    return errors


def before_gpu_errors(recipe: Recipe) -> list[str]:
    """What else can fail before a GPU is asked for (``vlmjobs validate``): local model and data paths that do
    not exist, hub ids that are not well-formed, a primary metric evaluate does not report for this data.
    Paths under kubernetes.mount_path are on the cluster's volume and not looked for here."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from jobs.benchmarks import benchmark_metrics
    from jobs.hub import looks_like_path
    from jobs.metrics import METRICS

    errors = []
    places = [("model.name_or_path", recipe.model.name_or_path, "model")]
    places += [(f"data.{kind}.path", getattr(recipe.data, kind).path, "data set") for kind in ("sft", "dpo") if getattr(recipe.data, kind)]
    if recipe.merge_push.push and recipe.merge_push.repo_id:
        places.append(("merge_push.repo_id", recipe.merge_push.repo_id, "hub repo"))
    on_cluster = recipe.kubernetes.mount_path.rstrip("/") + "/"
    for key, value, what in places:
        local = key != "merge_push.repo_id"
        if local and (Path(value).expanduser().exists() or value.startswith(on_cluster)):
            continue  # here, or on the cluster's volume
        if local and looks_like_path(value):
            built = "; make demo builds it" if value.startswith(".cache/") else ""
            kind = "folder" if what == "model" else "file or folder"
            errors.append(f"{key}: {value}: no such {kind} on this machine (a hub id is org/name){built}")
            continue
        try:
            validate_repo_id(value)
        except HFValidationError as e:
            errors.append(f"{key}: {value!r} is neither a local path nor a hub id ({str(e).split('. ')[0]})")
    if "evaluate" in recipe.stages:
        reported = [m for kind, names in METRICS.items() if kind == "yes/no" or getattr(recipe.data, kind) for m in names]
        reported += benchmark_metrics(recipe.evaluate.benchmarks)
        metric = recipe.evaluate.primary_metric
        needs = next((kind for kind, names in METRICS.items() if metric in names), None)
        if metric not in reported and needs:
            errors.append(f"evaluate.primary_metric: {metric!r} is reported only with data.{needs}; this recipe's evaluate "
                          f"reports {', '.join(reported)}")
        elif metric not in reported:
            close = difflib.get_close_matches(metric, reported, n=1)
            errors.append(f"evaluate.primary_metric: evaluate reports no {metric!r} for this recipe's data"
                          + (f"; did you mean {close[0]!r}?" if close else f" (it reports {', '.join(reported)})"))
    return errors


def passthrough_schemas() -> dict[str, dict[str, dict]]:
    """{class: {field: {"type": description, "shown": type as the message names it}}} for the pass-through classes.

    Importing TRL takes ~10 s; the field names and types only change with the installed versions, so they are
    read from the classes once per set of versions and kept in a cache file outside the tree
    ($VLMJOBS_CACHE, else ~/.cache/vlmjobs). A cache that cannot be written is only slower."""
    from importlib import metadata

    versions = {package: metadata.version(package) for package in sorted(set(PASSTHROUGH_CLASSES.values()))}
    key = hashlib.sha256(json.dumps([SCHEMA_CACHE_FORMAT, versions], sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"passthrough-{key}.json"
    try:
        return json.loads(path.read_text())["schemas"]
    except (OSError, ValueError, KeyError):
        pass
    schemas = describe_passthrough_classes()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"versions": versions, "schemas": schemas}, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass
    return schemas


def cache_dir() -> Path:
    if os.environ.get("VLMJOBS_CACHE"):
        return Path(os.environ["VLMJOBS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlmjobs"


def describe_passthrough_classes() -> dict[str, dict[str, dict]]:
    """The pass-through classes' fields read off the classes themselves (imports TRL, peft, transformers)."""
    import importlib
    import inspect

    schemas = {}
    for name, package in PASSTHROUGH_CLASSES.items():
        cls = getattr(importlib.import_module(package), name)
        if dataclasses.is_dataclass(cls):
            known = [f.name for f in dataclasses.fields(cls)]
            hints = typing.get_type_hints(cls)
        else:
            params = inspect.signature(cls.__init__).parameters
            known = [k for k in params if k not in ("self", "kwargs")]
            hints = {k: params[k].annotation for k in known if params[k].annotation is not inspect.Parameter.empty}
        schemas[name] = {
            key: {"type": _describe(hints[key]), "shown": _hint_name(hints[key])} if key in hints else {"type": "any", "shown": "any"}
            for key in known
        }
    return schemas


def _check_fields(owner: str, known: dict[str, dict], values: dict, where: str) -> list[str]:
    errors = []
    for key, value in values.items():
        if key not in known:
            errors.append(_unknown_key(f"{where}.{key}", key, known, owner=owner))
        elif not _fits(value, known[key]["type"]):
            errors.append(f"{where}.{key}: {_kind(value)} does not fit {owner}.{key} ({known[key]['shown']})")
    return errors


def _describe(hint: Any) -> Any:
    """A type hint as JSON, for the loose check of ``_fits``: "any" where unsure."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return {"any_of": [_describe(a) for a in args]}
    if origin is typing.Literal:
        return {"one_of": list(args)}
    for kind, cls in (("none", type(None)), ("bool", bool), ("int", int), ("float", float), ("str", str)):
        if hint is cls:
            return kind
    if origin in (list, tuple) or hint in (list, tuple):
        return "list"
    if origin is dict or hint is dict:
        return "dict"
    if isinstance(hint, type) and issubclass(hint, __import__("enum").Enum):
        return {"one_of": [m.value for m in hint] + [m.name for m in hint]}
    return "any"


def _fits(value: Any, kind: Any) -> bool:
    """Loose type check for library config fields: True when unsure."""
    if isinstance(kind, dict):
        return any(_fits(value, k) for k in kind["any_of"]) if "any_of" in kind else value in kind["one_of"]
    checks = {
        "none": lambda: value is None,
        "bool": lambda: isinstance(value, bool),
        "int": lambda: isinstance(value, int) and not isinstance(value, bool),
        "float": lambda: isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": lambda: isinstance(value, str),
        "list": lambda: isinstance(value, (list, tuple)),
        "dict": lambda: isinstance(value, dict),
    }
    return checks[kind]() if kind in checks else True


def _unknown_key(where: str, key: str, known, owner: str | None = None) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    of = f" ({owner} has no field {key!r})" if owner else ""
    return f"{where}: unknown key{of}{hint}"


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 40 else text[:37] + '...'}"


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
