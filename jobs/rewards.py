"""GRPO's rewards, named in the recipe (``grpo.rewards``), built on evaluate's own scoring rules (jobs.metrics), so that
what GRPO trains towards and what evaluate reports cannot drift apart.

Each is a function with TRL's reward signature, ``f(prompts, completions, answers, **kwargs) -> list[float | None]``
(``answers``: the prepared rows' gold answers, handed on by GRPOTrainer as a dataset column); None where a reward does
not apply to a row (TRL sums the others). A completion's answer is read where the recipe's data source says it stands
(``data.sft.answer_after``, ``metrics.read_answer``). A user's own reward is a dotted path to a function of the same
signature (``mypackage.rewards.length_penalty``), checked at validate (``user_reward_problem``).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable

from jobs import metrics

REWARDS = {  # name: what it gives a completion
    "accuracy": "1 when its answer is right as evaluate's accuracy judges it for the data's format (ChartQA's relaxed "
                "accuracy for chartqa, exact match otherwise), else 0",
    "chartqa_relaxed": "1 when its answer is within 5% of a gold number, or equals a gold word (ChartQA's relaxed "
                       "accuracy), else 0",
    "exact_match": "1 when its answer equals a gold answer, ignoring case and trailing punctuation, else 0",
    "yes_no": "1 when its answer says the gold yes or no (evaluate's yes_no_accuracy), 0 when not; none for rows whose "
              "gold answer is not yes or no",
    "format": "1 when it reasons in <think></think> first (TRL's think_format_reward), and where data.sft.answer_after "
              "is a tag (<answer>) gives its answer inside it, else 0",
}
# What TRL 1.16's GRPOTrainer._calculate_rewards passes a reward function, the prepared rows' columns included
TRL_REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids", "answers", "images", "trainer_state", "log_extra",
                        "log_metric")
DOTTED = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$")
# R1's format, as TRL's think_format_reward checks it: one <think> block at the start
THINK_FIRST = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL | re.MULTILINE)


def dotted_path(name: str) -> bool:
    return bool(DOTTED.match(name))


def _texts(completions: list) -> list[str]:
    """A completion's text: conversational completions are one assistant message (TRL's format), plain ones text."""
    return [c if isinstance(c, str) else " ".join(_content(m["content"]) for m in c) for c in completions]


def _content(content) -> str:
    return content if isinstance(content, str) else " ".join(p.get("text") or "" for p in content if p.get("type") == "text")


def build(name: str, *, relaxed: bool, answer_after: str | None) -> Callable:
    """The reward called ``name`` (a key of REWARDS or a dotted path), reading answers after ``answer_after``;
    ``relaxed``: the data's accuracy is ChartQA's relaxed accuracy (formats.Format.relaxed_accuracy)."""
    if name not in REWARDS:
        return load_user_reward(name)

    def correct(rule_relaxed: bool):
        def reward(completions, answers, **kwargs):
            return [float(metrics.answer_correct(text, gold, relaxed=rule_relaxed, answer_after=answer_after))
                    for text, gold in zip(_texts(completions), answers)]
        return reward

    def yes_no(completions, answers, **kwargs):
        said = [metrics.yes_no(metrics.read_answer(text, answer_after)) for text in _texts(completions)]
        gold = [metrics.yes_no(targets[0]) if targets else None for targets in answers]
        return [None if g is None else float(s == g) for s, g in zip(said, gold)]

    tagged = bool(answer_after) and answer_after.startswith("<") and not answer_after.startswith("</")

    def format_(completions, **kwargs):
        return [float(bool(THINK_FIRST.match(text)) and (not tagged or bool(metrics.read_answer(text, answer_after))))
                for text in _texts(completions)]

    made = {"accuracy": correct(relaxed), "chartqa_relaxed": correct(True), "exact_match": correct(False),
            "yes_no": yes_no, "format": format_}[name]
    made.__name__ = name  # TRL logs each reward under its function's name (rewards/<name>/mean)
    return made


def load_user_reward(path: str) -> Callable:
    module_name, _, attribute = path.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def user_reward_problem(path: str) -> str | None:
    """Why the dotted ``path`` is no reward GRPOTrainer can call, or None. TRL calls it with keyword arguments only
    (prompts, completions, completion_ids, each dataset column, trainer_state, log_extra, log_metric), so it must take
    completions and any other keyword (**kwargs)."""
    module_name, _, attribute = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        return f"cannot import {module_name} ({e})"
    function = getattr(module, attribute, None)
    if function is None:
        return f"{module_name} has no {attribute}"
    if not callable(function):
        return f"{path} is not a function"
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None  # a builtin or C function: nothing to read, TRL will tell
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        return f"{path} takes no **kwargs; TRL's reward signature is f(prompts, completions, **kwargs) -> list[float]"
    unknown = [p.name for p in parameters if p.default is p.empty and p.name not in TRL_REWARD_ARGUMENTS
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if unknown:
        return (f"{path} requires {', '.join(unknown)}, which GRPOTrainer does not pass (it passes "
                f"{', '.join(TRL_REWARD_ARGUMENTS)})")
    return None
