"""GRPO (issue 25): its rewards are evaluate's scoring rules, and a recipe that cannot work says so at validate.

The stage itself runs in the chain as the twins of recipes/tiny-grpo.yaml and recipes/qwen25vl-3b-open-r1-grpo.yaml
(tests/test_twins.py).
"""

from __future__ import annotations

import dataclasses
import sys
import re
import textwrap
from unittest import mock

import pytest

from jobs import recipe as recipes
from jobs import rewards
from jobs.contract import UserError

CHART = {"path": "d", "format": "chartqa"}


def build(grpo: dict | None = None, **sections):
    data = {"name": "t", "model": {"name_or_path": "m", "family": "llava"}, "data": {"sft": CHART},
            "stages": ["prepare", "sft", "grpo", "evaluate"], "grpo": grpo or {}, **sections}
    return recipes.from_dict(data)


def refusal(**kwargs) -> str:
    with pytest.raises(UserError) as error:
        build(**kwargs)
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        pytest.param({"grpo": {"rewards": [{"name": "acuracy"}]}},
                     "grpo.rewards[0].name: 'acuracy' is neither a reward (accuracy, chartqa_relaxed, exact_match, yes_no, "
                     "format) nor a dotted path to a function (package.module.function); did you mean 'accuracy'?",
                     id="unknown-reward"),
        pytest.param({"data": {"sft": {"path": "d", "format": "messages"}}},
                     "data.sft.format: 'messages' rows have no gold answer for grpo's rewards to check; use one of "
                     "chartqa, open-r1", id="no-gold-answer"),
        pytest.param({"grpo": {"args": {"per_device_train_batch_size": 4, "num_generations": 3}}},
                     "grpo.args.num_generations: 3 completions per prompt do not divide the generation batch of 4", id="divide"),
        pytest.param({"grpo": {"args": {"gradient_accumulation_steps": 3, "per_device_train_batch_size": 1, "num_generations": 2}},
                      "resources": {"gpus": 1}},
                     "do not divide the generation batch of 3", id="divide-accumulated"),
        pytest.param({"grpo": {"args": {"per_device_train_batch_size": 2}}},  # TRL's default 8 completions
                     "grpo.args.num_generations: 8 completions per prompt do not divide the generation batch of 2", id="default-generations"),
        pytest.param({"grpo": {"method": "full", "args": {"beta": 0.04}}, "sft": {"method": "lora"}},
                     "grpo.args.beta: a KL term needs a reference, which TRL 1.16 reloads", id="kl-after-merged-adapter"),
        pytest.param({"grpo": {"args": {"reward_weights": [1.0]}}},
                     "grpo.args.reward_weights: set from grpo.rewards' weights", id="weights-twice"),
        pytest.param({"grpo": {"args": {"per_device_train_batch_size": "auto"}, "effective_batch_size": 8}},
                     "grpo.args.per_device_train_batch_size: auto is not for GRPO", id="auto-batch"),
    ],
)
def test_a_grpo_recipe_that_cannot_work_is_refused_in_one_line(kwargs, expected):
    assert expected in refusal(**kwargs)


def test_the_generation_batch_counts_every_process():
    """8 processes of 2 prompts' rows each generate 16 completions at once: 4 per prompt divide them, 3 do not."""
    assert build({"args": {"per_device_train_batch_size": 2, "num_generations": 4}}, resources={"gpus": 8})
    assert "generation batch of 16" in refusal(grpo={"args": {"per_device_train_batch_size": 2, "num_generations": 3}},
                                               resources={"gpus": 8})


def test_a_generation_batch_that_does_not_split_over_the_processes_is_refused_at_validate():
    """generation_batch_size counts the rows of all processes, and GRPOConfig refuses one that is not a whole number of
    their micro-batches (per_device_train_batch_size x processes): right on 1 GPU, wrong on 4, which TRL said only
    once the stage had started on the cluster."""
    grpo = {"args": {"per_device_train_batch_size": 8, "num_generations": 4, "generation_batch_size": 16}}
    assert build(grpo)
    assert build(grpo, resources={"gpus": 2})
    assert refusal(grpo=grpo, resources={"gpus": 4}).endswith(
        "grpo.args.generation_batch_size: 16 is not a multiple of the 32 rows one micro-step takes (per_device_train_"
        "batch_size 8 x 4 process(es)); make it one, or leave it out (then per_device_train_batch_size x processes x "
        "steps_per_generation)")
    both = {"args": {"per_device_train_batch_size": 8, "generation_batch_size": 16, "steps_per_generation": 2}}
    assert "grpo.args.steps_per_generation: set with generation_batch_size" in refusal(grpo=both)


def test_the_generation_batch_rules_validate_applies_are_grpoconfigs():
    """validate's refusals and GRPOConfig's own errors (its __post_init__) on the same batch arguments."""
    from trl import GRPOConfig

    cases = [({"per_device_train_batch_size": 8, "num_generations": 4, "generation_batch_size": 16}, 4),
             ({"per_device_train_batch_size": 8, "num_generations": 4, "generation_batch_size": 16}, 2),
             ({"per_device_train_batch_size": 4, "num_generations": 4, "generation_batch_size": 24}, 2),
             ({"per_device_train_batch_size": 8, "generation_batch_size": 16, "steps_per_generation": 2}, 1),
             ({"per_device_train_batch_size": 2, "num_generations": 4, "steps_per_generation": 3}, 1)]
    for args, processes in cases:
        try:
            refused = not build({"args": args}, resources={"gpus": processes})
        except UserError as e:
            refused = "grpo.args." in str(e)
        with mock.patch.object(GRPOConfig, "world_size", processes):
            try:
                GRPOConfig(output_dir="unused", use_cpu=True, report_to="none", **args)
                trl_refused = False
            except ValueError:
                trl_refused = True
        assert refused == trl_refused, (args, processes)


def test_the_batch_defaults_validate_assumes_are_trls():
    from trl import GRPOConfig

    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    assert recipes.GRPO_BATCH_DEFAULTS == {key: defaults[key] for key in recipes.GRPO_BATCH_DEFAULTS}
    assert defaults["generation_batch_size"] is None and defaults["steps_per_generation"] is None


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def brevity(completions, **kwargs):
            return [1.0 / (1 + len(c[0]["content"])) for c in completions]

        def no_kwargs(prompts, completions):
            return [0.0 for _ in completions]

        def needs_a_judge(completions, judge, **kwargs):
            return [0.0 for _ in completions]

        not_a_function = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("my_rewards.brevity", None),
        ("my_rewards.no_kwargs", "grpo.rewards[0].name: my_rewards.no_kwargs takes no **kwargs; TRL's reward signature is"),
        ("my_rewards.needs_a_judge", "grpo.rewards[0].name: my_rewards.needs_a_judge requires judge, which GRPOTrainer does not pass"),
        ("my_rewards.missing", "grpo.rewards[0].name: my_rewards has no missing"),
        ("my_rewards.not_a_function", "grpo.rewards[0].name: my_rewards.not_a_function is not a function"),
        ("nowhere.brevity", "grpo.rewards[0].name: cannot import nowhere (No module named 'nowhere')"),
    ],
)
def test_a_users_reward_is_checked_at_validate(user_rewards, name, expected):
    errors = [e for e in recipes.passthrough_errors(build({"rewards": [{"name": name}]})) if e.startswith("grpo.rewards")]
    if expected:
        assert len(errors) == 1 and errors[0].startswith(expected), errors
    else:
        assert errors == []
        reward = rewards.build(name, relaxed=True, answer_after=None)
        assert reward(prompts=[[]], completions=[[{"role": "assistant", "content": "abc"}]], answers=[["x"]]) == [0.25]


# Completions as a model writes them: numbers near and far from the gold one, words in other cases, trailing
# punctuation, an answer after R1's reasoning, none at all, yes and no in sentences.
CASES = [  # (completion, gold answers)
    ("12", ["12"]), ("12.5", ["12"]), ("13", ["12"]), ("12.", ["12"]), (" 12\n", ["12"]), ("1,200", ["1200"]),
    ("Blue", ["blue"]), ("blue.", ["blue"]), ("blue bar", ["blue"]), ("5%", ["0.05"]), ("50%", ["50"]), ("", ["3"]),
    ("<think>two bars</think>\n2", ["2"]), ("<think>two bars</think> 2.", ["2"]), ("<think>two bars", ["2"]),
    ("<think>a</think><think>b</think>3", ["3"]), ("2 <think>x</think>", ["2"]),
    ("Yes.", ["yes"]), ("No, there is none.", ["no"]), ("yes", ["no"]), ("maybe", ["yes"]), ("<think>red</think>No", ["no"]),
]


@pytest.mark.parametrize("answer_after", [None, "</think>", "<answer>"])
@pytest.mark.parametrize("data_format", ["chartqa", "open-r1"])
def test_the_reward_grpo_trains_on_is_the_metric_evaluate_reports(tiny_model, data_format, answer_after, monkeypatch):
    """The same completions scored by evaluate (its per-answer verdicts and yes/no accuracy, the model's answers scripted)
    and by the rewards GRPOTrainer is given: accuracy agrees answer for answer, the yes/no reward's mean is
    evaluate's yes_no_accuracy on the yes/no rows."""
    from transformers import GenerationConfig

    from jobs import evaluate, modeling

    cfg = recipes.from_dict({"name": "t", "model": {"name_or_path": str(tiny_model("llava")), "family": "llava"},
                             "data": {"sft": {"path": "d", "format": data_format, "answer_after": answer_after}},
                             "stages": ["prepare", "grpo", "evaluate"]})
    processor = evaluate.scoring_processor(cfg)
    model = type("Scripted", (), {"generation_config": GenerationConfig(eos_token_id=processor.tokenizer.eos_token_id)})()
    # Asked for <answer></answer>: every other completion gives its answer so, the rest forget the tags
    cases = [(f"<think>r</think><answer>{c}</answer>" if answer_after == "<answer>" and i % 2 == 0 else c, g)
             for i, (c, g) in enumerate(CASES)]
    by_question = {f"q{i}": completion for i, (completion, _) in enumerate(cases)}
    monkeypatch.setattr("jobs.inference.generate_answers",
                        lambda model, processor, rows, **kwargs: [by_question[evaluate._question(r)] for r in rows])

    def rows(selected):
        return [{"prompt": [{"role": "user", "content": [{"type": "text", "text": f"q{i}"}]}], "answers": gold, "images": []}
                for i, (_, gold) in selected]

    everything = list(enumerate(cases))
    _, _, predictions = evaluate.evaluate_variant(evaluate.TRAINED_VARIANTS[-1], model, processor, {"sft": rows(everything)}, cfg)
    completions = [[{"role": "assistant", "content": completion}] for completion, _ in cases]
    accuracy = rewards.build("accuracy", relaxed=data_format == "chartqa", answer_after=answer_after)
    rewarded = accuracy(prompts=[[]] * len(cases), completions=completions, answers=[gold for _, gold in cases])
    assert [float(p["correct"]) for p in predictions] == rewarded
    assert 0 < sum(rewarded) < len(cases)  # the cases tell right from wrong

    yes_no = [(i, case) for i, case in everything if case[1][0] in ("yes", "no")]
    scores, _, _ = evaluate.evaluate_variant("grpo", model, processor, {"sft": rows(yes_no)}, cfg)
    said = rewards.build("yes_no", relaxed=False, answer_after=answer_after)(
        completions=[completions[i] for i, _ in yes_no], answers=[gold for _, (_, gold) in yes_no])
    assert scores["yes_no_accuracy"] == pytest.approx(sum(said) / len(said))


def test_the_format_reward_is_trls_think_format_and_asks_for_the_answer_tag_where_the_recipe_does():
    from trl.rewards import think_format_reward

    texts = [c for c, _ in CASES] + ["<think>\nreasoning\n</think>\nanswer", "<think>x</think>",
                                     "<think>x</think><answer>4</answer>", "<think>x</think><answer></answer>"]
    completions = [[{"role": "assistant", "content": text}] for text in texts]
    trls = think_format_reward(completions)
    assert rewards.build("format", relaxed=False, answer_after="</think>")(completions=completions) == trls
    assert rewards.build("format", relaxed=False, answer_after=None)(completions=completions) == trls
    tagged = rewards.build("format", relaxed=False, answer_after="<answer>")(completions=completions)
    assert [t for t, r in zip(texts, tagged) if r] == ["<think>x</think><answer>4</answer>"]
    assert sum(trls) >= 5


def test_the_memory_arithmetic_counts_grpos_reference_copy_only_with_a_kl_term(tiny_model):
    """GRPOTrainer holds a frozen copy of a fully trained model only where beta > 0 (TRL 1.16: none at its default 0,
    none for an adapter, whose reference is the adapter switched off)."""
    from jobs import memory

    def reference(method, beta):
        recipe = recipes.from_dict({"name": "t", "model": {"name_or_path": str(tiny_model("llava")), "family": "llava"},
                                    "data": {"sft": CHART}, "stages": ["prepare", "grpo"],
                                    "grpo": {"method": method, "args": {"beta": beta}}})
        estimate, _ = memory.for_stage(recipe, "grpo")
        return estimate.reference, estimate.model

    copy, weights = reference("full", 0.04)
    assert copy == weights > 0
    assert reference("full", 0.0)[0] == 0
    assert reference("lora", 0.04)[0] == 0


# Rows as users' come: prompts of different lengths padded to the longest, a row without an image, rows of one and of
# two images of different sizes, and (Gemma 3) a prompt longer than the sliding window of its local layers
KV_FAMILIES = ["llava", "qwen2_5_vl", "gemma3", "mllama", "idefics2"]
IMAGE_SIZES = [(64, 48), (96, 128), (80, 80)]
# Images in each row of a batch. Llama 3.2 Vision's processor takes no row without an image beside rows with one
# (MllamaProcessor: "The number of <|image|> tokens in each prompt should be the same as the number of images passed"),
# so its rows without an image are a batch of their own
KV_BATCHES = {"mllama": [(1, 2), (0, 0)]}


@pytest.mark.parametrize("family", KV_FAMILIES)
def test_the_key_value_cache_counted_is_what_generate_holds(family, tiny_model):
    """memory.kv_cache_gb against the cache transformers' generate really keeps, tensor by tensor: full layers hold every
    token fed but the last generated, Gemma 3's sliding layers their window less one, Llama 3.2 Vision's cross-attention
    layers the images' tile states (as many images a row as the row with the most), nothing without an image."""
    import torch
    import transformers
    from PIL import Image

    from jobs import memory
    from jobs.families import get_family

    path = tiny_model(family)
    processor = transformers.AutoProcessor.from_pretrained(path)
    model = getattr(transformers, get_family(family).model_class).from_pretrained(path).eval()
    processor.tokenizer.padding_side = "left"
    for images_per_row in KV_BATCHES.get(family, [(0, 1, 2)]):
        conversations = [[{"role": "user", "content": [{"type": "image"}] * images
                           + [{"type": "text", "text": "What is shown? " * words}]}]
                         for images, words in zip(images_per_row, (5, 1, 9))]
        texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        images = [[Image.new("RGB", IMAGE_SIZES[(row + i) % len(IMAGE_SIZES)]) for i in range(n)]
                  for row, n in enumerate(images_per_row)]
        inputs = processor(text=texts, images=images if any(images_per_row) else None, return_tensors="pt",
                           padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=True,
                                 return_dict_in_generate=True)
        tensors = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        # None: a cross-attention layer of a batch without images holds nothing
        held = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        fed = out.sequences.shape[1] - 1
        counted = memory.kv_cache_gb(model.config, rows=len(images_per_row), tokens=fed, bytes_per_value=4,
                                     images=max(images_per_row))
        assert counted * memory.GB == pytest.approx(held, rel=1e-12), images_per_row
        if family == "gemma3":
            assert fed > model.config.get_text_config().sliding_window  # the window was reached


def test_qwen25_vl_3b_holds_36_kib_of_cache_a_token_in_bf16():
    """The published geometry of Qwen/Qwen2.5-VL-3B-Instruct's config.json (36 layers, 16 heads of 128 over a hidden size
    of 2048, 2 key-value heads): 2 x 2 x 128 x 36 x 2 bytes = 36,864 bytes a token."""
    from transformers import Qwen2_5_VLConfig

    from jobs import memory

    config = Qwen2_5_VLConfig(text_config={"hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16,
                                           "num_key_value_heads": 2, "intermediate_size": 11008})
    assert memory.kv_cache_gb(config, rows=16, tokens=1024 + 512 - 1, bytes_per_value=2) == pytest.approx(16 * 1535 * 36864 / 1e9)


def test_grpos_estimate_holds_each_processs_share_of_the_generation_batch(tiny_model):
    """The tiny LLaVA's decoder: 2 layers x 2 key-value heads x 16 x (key and value) x 2 bytes (bf16, as on a GPU) =
    256 bytes a token. A prompt of 100 tokens and 16 completion tokens feed 115."""
    from jobs import memory

    def recipe_of(gpus=1, **args):
        return recipes.from_dict({"name": "t", "model": {"name_or_path": str(tiny_model("llava")), "family": "llava"},
                                  "data": {"sft": CHART}, "stages": ["prepare", "grpo"],
                                  "resources": {"gpus": gpus, "gpu_memory_gib": 80, "sharding": "fsdp"},
                                  "grpo": {"args": {"max_completion_length": 16, **args}}})

    def generation(prompt_tokens=100, gpus=1, **args):
        return memory.for_stage(recipe_of(gpus, **args), "grpo", prompt_tokens)[0]

    one = generation()  # TRL's default 8 rows a device
    assert one.generation * memory.GB == pytest.approx(8 * 115 * 256)
    assert one.total == pytest.approx(one.model + one.gradients + one.optimizer + one.generation)
    assert generation(gpus=2, generation_batch_size=32).generation * memory.GB == pytest.approx(16 * 115 * 256)
    # the whole batch, as a vLLM server pod generates it for every process, in the weights' precision (bf16 on a GPU)
    _, counts = memory.for_stage(recipe_of(2, generation_batch_size=32), "grpo", 100)
    assert counts["batch_cache_gb"] * memory.GB == pytest.approx(32 * 115 * 256)
    # the numbers it was made from, which vlmjobs memory prints: 32 completions, 16 on each of the 2 processes
    generated = {k: counts[k] for k in ("generation_batch", "generation_rows", "prompt_tokens", "completion_tokens")}
    assert generated == {"generation_batch": 32, "generation_rows": 16, "prompt_tokens": 100, "completion_tokens": 16}
    _, counts = memory.for_stage(recipe_of(3), "grpo")  # TRL's 8 rows a device on 3 processes, prompts assumed
    assert (counts["generation_batch"], counts["generation_rows"], counts["prompt_tokens"]) == (24, 8, 1024)
    assert generation(prompt_tokens=200).generation * memory.GB == pytest.approx(8 * 215 * 256)
    # sharded over 2 GPUs, each still generates its own rows: the generation part is not divided
    sharded = generation(gpus=2).sharded(2)
    assert sharded.generation == generation(gpus=2).generation and sharded.model < generation(gpus=2).model
    assert generation(use_vllm=True, vllm_mode="colocate").generation == pytest.approx(0.3 * 80 * 2**30 / 1e9)
    # server mode, which validate allows only with a server pod on a hub id: the arithmetic needs neither
    colocated = recipe_of(use_vllm=True)
    served = dataclasses.replace(colocated, grpo=dataclasses.replace(colocated.grpo, args={**colocated.grpo.args, "vllm_mode": "server"}))
    assert memory.for_stage(served, "grpo")[0].generation == 0


def test_the_generation_defaults_assumed_are_trls():
    from trl import GRPOConfig

    from jobs import memory

    fields = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    assert fields["max_completion_length"] == memory.TRL_MAX_COMPLETION_LENGTH
    assert fields["vllm_gpu_memory_utilization"] == memory.TRL_VLLM_GPU_MEMORY_UTILIZATION
    assert fields["vllm_mode"] == "colocate"


def test_vlmjobs_memory_shows_grpos_generation_and_what_to_change_when_it_alone_fills_the_gpu(tiny_model, tmp_path, capsys):
    import yaml

    from jobs import memory
    from launcher import cli

    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "model": {"name_or_path": str(tiny_model("llava")), "family": "llava"},
                                    "data": {"sft": CHART}, "stages": ["prepare", "grpo"],
                                    "resources": {"gpu_memory_gib": 80}}))
    cli.memory(str(path), prompt_tokens=300)
    out = capsys.readouterr().out
    cache = 8 * (300 + 512 - 1) * 256 / memory.GB
    assert (f"generation: the key-value cache of 8 completion(s) at once per GPU, prompts of 300 tokens and up to 512 "
            f"completion tokens: {cache:.3g} GB") in out
    assert f"+ generation {cache:.3g} GB" in out and "fits in one GPU of 80 GiB" in out
    cli.memory(str(path))
    assert "prompts of 1,024 tokens assumed (--prompt_tokens=N for yours" in capsys.readouterr().out
    # a GPU smaller than the cache of 64 rows of 200,000 tokens (3.3 GB): no number of FSDP shards helps
    with pytest.raises(UserError, match="^memory: grpo needs"):
        cli.memory(str(path), prompt_tokens=200_000, **{"grpo.args.per_device_train_batch_size": 64, "resources.gpu_memory_gib": 2})
    assert f"generation alone needs {64 * (200_000 + 511) * 256 / memory.GB:.3g} GB per GPU: fewer completions at once" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"^memory: --prompt_tokens=0: give a whole number of tokens, 1 or more$"):
        cli.memory(str(path), prompt_tokens=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [42, 7, 1234])
def test_tiny_grpo_raises_the_held_out_accuracy_of_a_weak_sft_model(seed, tmp_path, tiny_model, synthetic_data):
    """recipes/tiny-grpo.yaml as `vlmjobs run` runs it, only the tiny model and data folders pointed elsewhere and the
    seed changed: GRPO, rewarded by evaluate's own ChartQA relaxed accuracy, lifts the held-out accuracy of the short
    SFT's model by at least 0.1, and merge_push ships GRPO's model (issue 25)."""
    import json
    import subprocess

    from tests.conftest import ROOT, subprocess_env

    overrides = [f"--model.name_or_path={tiny_model('llava')}", f"--data.sft.path={synthetic_data('chartqa')}",
                 f"--run.root={tmp_path}", f"--seed={seed}"]
    done = subprocess.run([sys.executable, "-m", "launcher.cli", "run", str(ROOT / "recipes" / "tiny-grpo.yaml"), *overrides],
                          env=subprocess_env(), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "tiny-grpo"
    scores = {v: entry["metrics"] for v, entry in json.loads((run / "evaluate" / "report.json").read_text())["variants"].items()}
    print(seed, json.dumps(scores))
    assert scores["grpo"]["accuracy"] >= scores["sft"]["accuracy"] + 0.1, scores
    assert json.loads((run / "merge_push" / "_SUCCESS.json").read_text())["source"] == "grpo"


# ---------------------------------------------------------------------------------------------
# RLAIF-V's checkable questions as GRPO prompts


@pytest.mark.parametrize("chosen, rejected, expected", [
    ("Yes, there is a dog on the sofa.", "No.", "yes"),
    ("No.", "There is a red bar and a blue one.", "no"),  # the rejected one says neither: the ranking still says no
    ("The image shows a kitchen with a table.", "Yes.", "left out: the chosen answer says neither yes nor no"),
    ("Yes, a red car.", "Yes, a blue car.", "left out: the chosen and rejected answers both say yes: their ranking is not about it"),
    ("Yes and no.", "No.", "left out: the chosen answer says neither yes nor no"),  # evaluate reads no verdict there
])  # fmt: skip
def test_rlaif_vs_yes_no_rows_take_the_chosen_answers_verdict_as_gold(chosen, rejected, expected):
    from jobs.formats import FORMATS, LeftOut

    fmt = FORMATS["rlaif-v-yes-no"]
    row = {"image": None, "question": "Is there a dog?", "chosen": chosen, "rejected": rejected}
    if expected.startswith("left out: "):
        with pytest.raises(LeftOut, match=f"^{re.escape(expected.removeprefix('left out: '))}$"):
            fmt.convert(row, None)
        return
    converted = fmt.convert(row, None)
    assert converted["answers"] == [expected] and fmt.gold and fmt.kind == "sft"
    assert converted["completion"][0]["content"][0]["text"] == chosen
    assert rewards.build("yes_no", relaxed=False, answer_after=None)(
        completions=[expected.capitalize() + ".", "Maybe."], answers=[converted["answers"]] * 2) == [1.0, 0.0]


def test_prepare_keeps_rlaif_vs_yes_no_questions_counting_the_rest_apart_from_unusable_rows(tmp_path, tiny_model, synthetic_data,
                                                                                          capsys):  # fmt: skip
    """The synthetic RLAIF-V mixes ChartQA questions into its yes/no ones, as RLAIF-V mixes tasks: those are left out,
    counted, and not against prepare.max_drop_fraction (1%: they would have failed prepare as unusable)."""
    from datasets import load_from_disk

    from jobs import contract, metrics, synthetic
    from tests.conftest import recipe_file, run_stages

    source = synthetic_data("rlaif-v-yes-no", rows=60)
    raw = synthetic.rlaif_v_rows(60)
    checkable = [r for r in raw if metrics.yes_no(r["chosen"]) and metrics.yes_no(r["rejected"]) != metrics.yes_no(r["chosen"])]
    assert 0 < len(checkable) < len(raw)
    path = recipe_file(tmp_path, tiny_model("llava"), {"chartqa": source, "rlaif-v": source}, stages=["prepare"],
                       data={"sft": {"path": str(source), "format": "rlaif-v-yes-no"}})
    recipe = run_stages(path)
    out = capsys.readouterr().out
    left_out = len(raw) - len(checkable)
    assert f"kept {len(checkable)} of {len(raw)} rows; left out the chosen answer says neither yes nor no x{left_out}" in out
    prepared = load_from_disk(recipe.run_dir / "prepare" / "sft")
    gold = sorted(a[0] for split in prepared.values() for a in split["answers"])
    assert gold == sorted(metrics.yes_no(r["chosen"]) for r in checkable)
    done = contract.read_json(recipe.run_dir / "prepare" / contract.SUCCESS_FILE)
    assert done["drops"]["sft/train"]["left_out"] == {"the chosen answer says neither yes nor no": left_out}
    assert done["drops"]["sft/train"]["dropped"] == 0


def test_a_source_without_one_yes_no_question_fails_prepare_in_one_line(tmp_path, tiny_model, synthetic_data):
    from jobs import synthetic
    from tests.conftest import recipe_file, run_stages

    rows = [r for r in synthetic.rlaif_v_rows(40) if not r["question"].startswith("Is there")]  # ChartQA's questions only
    source = synthetic.write_splits("rlaif-v", tmp_path / "charts", {"train": rows})
    path = recipe_file(tmp_path, tiny_model("llava"), {"chartqa": source, "rlaif-v": source}, stages=["prepare"],
                       data={"sft": {"path": str(source), "format": "rlaif-v-yes-no"}})
    with pytest.raises(UserError, match=rf"^data\.sft \({re.escape(str(source))}, split train\): the format takes none of the "
                                        rf"{len(rows)} rows: the chosen answer says neither yes nor no x{len(rows)}$"):
        run_stages(path)
