"""Each stage's pods ask for what the stage needs (issue 21), rendered from every shipped recipe.

The expected GPU counts are worked out here by hand from the checkpoints' published parameter counts and the GPUs'
sizes, not by the code under test: evaluate holds one model in bf16 (2 bytes a parameter), merge_push merges in
float32 (4 bytes, jobs/merge_push.py), and a fifth of each GPU is left for the CUDA context, activations and cache.
    L4 24 GiB = 25.8 GB, usable 20.6;  A100 40 GiB = 42.9 GB, usable 34.4;  H100 80 GiB = 85.9 GB, usable 68.7.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs import recipe as recipes
from launcher import render
from tests.launcher.conftest import IMAGE, SINGLE, make

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

# recipe: (evaluate's GPUs, merge_push's GPUs), with the weights' GB in bf16 and in float32 against the usable GB
INFERENCE_GPUS = {
    "gemma3-12b-llava-instruct-sft": (1, 1),  # 12.19B: 24.4 and 48.8 GB of H100's 68.7
    "idefics2-8b-rlaif-v-dpo-full-fsdp": (1, 1),  # 8.46B: 16.9 and 33.8 GB of H100's 68.7 (trained on 4)
    "idefics2-8b-rlaif-v-dpo": (1, 1),  # 8.46B on H100
    "internvl3-8b-mpo-dpo-full-fsdp": (1, 1),  # 7.94B: 15.9 and 31.8 GB of H100's 68.7 (trained on 8)
    "llama32-11b-vision-sft-fsdp": (1, 1),  # 10.67B: 21.3 and 42.7 GB of H100's 68.7 (trained on 8)
    "llava-1.5-7b-rlaif-v-dpo": (1, 1),  # 7.06B: 14.1 and 28.2 GB of A100's 34.4
    "paligemma-3b-rlaif-v-dpo": (1, 1),  # 2.92B: 5.8 and 11.7 GB of L4's 20.6
    "qwen25vl-3b-open-r1-grpo": (1, 1),  # 3.75B: 7.5 and 15 GB of H100's 68.7 (trained on 8)
    "qwen25vl-7b-llava-lora-sft": (1, 1),  # 8.29B: 16.6 and 33.2 GB of A100's 34.4
    "qwen2vl-7b-chartqa-qlora-sft": (1, 2),  # 8.29B: 16.6 of L4's 20.6, but float32's 33.2 needs two L4s
    "qwen3vl-8b-llava-qlora-sft": (1, 2),  # 8.77B: 17.5 of L4's 20.6, float32's 35.1 needs two L4s
    "smolvlm-chartqa-sft": (1, 1),  # 2.25B: 4.5 and 9 GB of L4's 20.6
    "smolvlm-rlaif-v-dpo": (1, 1),
    "smolvlm2-2b-llava-lora-sft": (1, 1),
    "tiny-demo": (1, 1),  # no parameter count: the recipe's one GPU per node
    "tiny-grpo": (1, 1),
}


def rendered(recipe, stage: str) -> dict:
    job = render.render_stage(recipe, stage, IMAGE)[0]
    return job["spec"]["template"]["spec"]


def gpus(pod: dict) -> int:
    return int(pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))


def products(pod: dict) -> set[str]:
    """The GPU products the pod may land on: inference takes the recipe's product whether time-sliced or not."""
    terms = pod.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", {})
    return {value for term in terms.get("nodeSelectorTerms", []) for expression in term["matchExpressions"]
            if expression["key"] == "nvidia.com/gpu.product" for value in expression["values"]}  # fmt: skip


def quantity_gib(text: str) -> float:
    number, unit = (text[:-2], text[-2:]) if text.endswith(("Gi", "Mi")) else (text, "")
    return float(number) * {"Gi": 1, "Mi": 1 / 1024, "": 2**-30}[unit]


def test_every_shipped_recipe_has_its_expected_sizes_written_here():
    assert sorted(INFERENCE_GPUS) == sorted(path.stem for path in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_prepare_asks_for_cpu_and_memory_only(path):
    pod = rendered(recipes.load(path), "prepare")
    resources = pod["containers"][0]["resources"]
    assert gpus(pod) == 0 and "nodeSelector" not in pod and "tolerations" not in pod
    # modest: a core per data worker (prepare.num_proc), a few GiB each (the 4-GPU recipe's prepare asked for 512Gi)
    workers = yaml.safe_load(path.read_text()).get("prepare", {}).get("num_proc", 1)
    cpus = int(resources["requests"]["cpu"])
    assert cpus <= max(4, workers) and quantity_gib(resources["requests"]["memory"]) <= 8 + 2 * cpus


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_evaluate_and_merge_push_ask_for_the_gpus_their_model_needs(path):
    recipe = recipes.load(path)
    expected = INFERENCE_GPUS[path.stem]
    assert (gpus(rendered(recipe, "evaluate")), gpus(rendered(recipe, "merge_push"))) == expected
    for stage in ("evaluate", "merge_push"):
        pod = rendered(recipe, stage)
        assert products(pod) == ({recipe.resources.gpu_product, recipe.resources.gpu_product + "-SHARED"}
                                 if recipe.resources.gpu_product else set()), "the GPU the recipe names, shared or not"
        assert "subdomain" not in pod, "one node"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_training_stages_keep_the_recipes_training_resources(path):
    recipe = recipes.load(path)
    written = yaml.safe_load(path.read_text()).get("resources", {})
    for stage in set(recipes.TRAINING_STAGES) & set(recipe.stages):
        pod = rendered(recipe, stage)
        requests = pod["containers"][0]["resources"]["requests"]
        assert gpus(pod) == written.get("gpus", 1)
        assert requests == {"cpu": str(written.get("cpu", "8")), "memory": written.get("memory", "64Gi")}


def test_a_stage_overrides_what_was_worked_out_for_it():
    recipe = make(SINGLE, **{"model.parameters": 7.06e9, "resources.gpu_memory_gib": 80,
                             "prepare.resources": {"cpu": "16", "memory": "96Gi"},
                             "merge_push.resources": {"gpus": 2}})
    prepare = rendered(recipe, "prepare")["containers"][0]["resources"]
    assert prepare["requests"] == {"cpu": "16", "memory": "96Gi"} and "nvidia.com/gpu" not in prepare["limits"]
    assert gpus(rendered(recipe, "merge_push")) == 2
    assert gpus(rendered(recipe, "evaluate")) == 1


def test_a_parameter_count_that_is_not_one_is_refused():
    with pytest.raises(recipes.UserError, match=r"model.parameters: 8.3 is not a model's parameter count"):
        make(SINGLE, **{"model.parameters": 8.3})
