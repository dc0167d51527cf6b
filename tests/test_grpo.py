"""GRPO (issue 25): its rewards are evaluate's scoring rules, and a recipe that cannot work says so at validate.

The stage itself runs in the chain as the twins of recipes/tiny-grpo.yaml and recipes/qwen25vl-3b-open-r1-grpo.yaml
(tests/test_twins.py).
"""

from __future__ import annotations

import dataclasses
import sys
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
