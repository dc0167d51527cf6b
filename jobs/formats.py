"""Source formats: how each data set's rows map to TRL's conversational format.

Every format turns one source row into either a prompt/completion row (kind "sft") or a
prompt/chosen/rejected row (kind "dpo"), with images kept in an ``images`` column and
``{"type": "image"}`` placeholders in the messages (TRL's collators pair them up). A row that
cannot be used raises ``Drop`` with a reason; prepare counts the reasons.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobs import metrics


# Why preference pairs take no video: TRL 1.16's DPOTrainer keeps only prompt, chosen, rejected and image columns of vision
# data (its _set_signature_columns_if_needed) and DataCollatorForVisionPreference hands its processor images alone
NO_VIDEO_DPO = ("DPO takes no videos: TRL 1.16's DPOTrainer keeps only the image columns of vision data and its "
                "collator gives the processor images alone")


class Drop(Exception):
    """This row cannot be used; the message is the reason, counted by prepare."""


class LeftOut(Drop):
    """This row is outside the format's subset of its source (a yes/no format's other questions): counted by prepare
    apart from the unusable rows, and never against prepare.max_drop_fraction."""


@dataclass(frozen=True)
class Format:
    kind: str  # "sft" (prompt/completion) or "dpo" (prompt/chosen/rejected)
    columns: tuple[str, ...]  # source columns it reads
    image_column: str | None  # holds one image, or a list of images when it is "images"; None: the rows have none
    convert: Callable[[dict, str | None], dict]  # (row, system_prompt) -> row without images
    description: str
    video_column: str | None = None  # a list of video files per row, each matching a {"type": "video"} placeholder
    # Its ``answers`` are gold answers a generated one can be checked against (GRPO's rewards need them); a
    # conversation's last answer is one way to reply, not the one right answer
    gold: bool = False
    relaxed_accuracy: bool = False  # accuracy is ChartQA's relaxed accuracy (its published metric), else exact match


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise Drop(f"missing {key}")
    if not isinstance(value, str):
        raise Drop(f"{key} is not text")
    if not value.strip():
        raise Drop(f"empty {key}")
    return value.strip()


def _user_turn(question: str, system_prompt: str | None, images: int = 1) -> list[dict]:
    turn = [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": question}]}]
    if system_prompt:
        turn.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    return turn


def _answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def chartqa(row: dict, system_prompt: str | None) -> dict:
    """HuggingFaceM4/ChartQA: image, query, label (a list of accepted answers; the first is trained on)."""
    query = _text(row, "query")
    labels = row.get("label")
    if labels is None:
        raise Drop("missing label")
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise Drop("label is not a list of text")
    labels = [label.strip() for label in labels if label.strip()]
    if not labels:
        raise Drop("empty label")
    return {"prompt": _user_turn(query, system_prompt), "completion": _answer(labels[0]), "answers": labels}


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)  # open-r1-multimodal's reader of its solutions


def open_r1(row: dict, system_prompt: str | None) -> dict:
    """lmms-lab/multimodal-open-r1-8k-verified: image, problem, solution (GPT-4o's reasoning, its final answer in
    <answer></answer> where it has one). The gold answer is that answer, else the whole solution, as
    open-r1-multimodal's accuracy reward reads it; the solution itself is the completion SFT would train on."""
    problem, solution = _text(row, "problem"), _text(row, "solution")
    tagged = _ANSWER_TAG.search(solution)
    gold = tagged.group(1).strip() if tagged and tagged.group(1).strip() else solution
    return {"prompt": _user_turn(problem, system_prompt), "completion": _answer(solution), "answers": [gold]}


def rlaif_v(row: dict, system_prompt: str | None) -> dict:
    """openbmb/RLAIF-V-Dataset: image, question, chosen, rejected."""
    question, chosen, rejected = _text(row, "question"), _text(row, "chosen"), _text(row, "rejected")
    if chosen == rejected:
        raise Drop("chosen equals rejected")
    return {"prompt": _user_turn(question, system_prompt), "chosen": _answer(chosen), "rejected": _answer(rejected)}


def rlaif_v_yes_no(row: dict, system_prompt: str | None) -> dict:
    """openbmb/RLAIF-V-Dataset's questions that a yes or a no answers, as prompts with a gold answer (GRPO). RLAIF-V has
    no gold answers: each pair is a model's two answers, ranked by another model. Where the chosen answer says yes or no
    (metrics.yes_no, evaluate's own reading) and the rejected one does not say the same, the ranking is that verdict,
    and it is the gold answer ("yes" or "no", scored by the yes_no reward and evaluate's yes_no_accuracy). Every
    other row is left out, counted; the chosen answer is the completion SFT would train on."""
    question, chosen, rejected = _text(row, "question"), _text(row, "chosen"), _text(row, "rejected")
    verdict = metrics.yes_no(chosen)
    if verdict is None:
        raise LeftOut("the chosen answer says neither yes nor no")
    if metrics.yes_no(rejected) == verdict:
        raise LeftOut(f"the chosen and rejected answers both say {verdict}: their ranking is not about it")
    return {"prompt": _user_turn(question, system_prompt), "completion": _answer(chosen), "answers": [verdict]}


def _messages(value: Any, key: str, parts_allowed: tuple[str, ...] = ("text", "image")) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise Drop(f"{key} is not a list of messages" if value else f"empty {key}")
    messages = []
    for message in value:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise Drop(f"{key} has a message without a system/user/assistant role")
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise Drop(f"{key} has a message whose content is neither text nor a list of parts")
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in parts_allowed:
                raise Drop(f"{key} has a content part that is not {' or '.join(parts_allowed)}")
            parts.append({"type": "text", "text": part.get("text") or ""} if part["type"] == "text" else {"type": part["type"]})
        messages.append({"role": message["role"], "content": parts})
    return messages


def count_parts(messages: list[dict], kind: str) -> int:
    return sum(part["type"] == kind for message in messages for part in message["content"])


def count_images(messages: list[dict]) -> int:
    return count_parts(messages, "image")


def _check_images(row: dict, messages: list[dict]) -> None:
    images = row.get("images") or []
    if count_images(messages) != len(images):
        raise Drop("image placeholders do not match the images")


def messages(row: dict, system_prompt: str | None) -> dict:
    """Conversations (messages, images), one or several user/assistant turns with images in any user turn: trained on
    every assistant turn (jobs.turns labels the earlier ones in the prompt), the last one the completion."""
    return _conversation(_messages(row.get("messages"), "messages"), row, system_prompt)


def video_messages(row: dict, system_prompt: str | None) -> dict:
    """Conversations with videos (messages, videos: video files; images optional), as ``messages``."""
    conversation = _messages(row.get("messages"), "messages", ("text", "image", "video"))
    if count_parts(conversation, "video") != len(row.get("videos") or []):
        raise Drop("video placeholders do not match the videos")
    return _conversation(conversation, row, system_prompt)


def _conversation(conversation: list[dict], row: dict, system_prompt: str | None) -> dict:
    _check_images(row, conversation)
    roles = [m["role"] for m in conversation]
    first_user = roles.index("user") if "user" in roles else None
    if first_user is None or "assistant" not in roles[first_user:]:
        raise Drop("no assistant answer after a prompt")
    if roles[-1] != "assistant":  # it ends waiting for an answer it does not give: not a conversation to learn from
        raise Drop(f"the last turn is the {roles[-1]}'s, not the assistant's")
    if "assistant" in roles[:first_user]:
        raise Drop("an assistant turn before any user turn")
    for message in conversation:
        if message["role"] == "assistant":
            if any(part["type"] == "image" for part in message["content"]):  # would be labelled as the answer
                raise Drop("an image in an assistant turn")
            if not " ".join(p["text"] for p in message["content"]).strip():
                raise Drop("empty answer")
    answer = " ".join(p["text"] for p in conversation[-1]["content"]).strip()
    prompt = conversation[:-1]
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] + prompt
    return {"prompt": prompt, "completion": _answer(answer), "answers": [answer]}


def preference_messages(row: dict, system_prompt: str | None) -> dict:
    """TRL's conversational preference format (HuggingFaceH4/rlaif-v_formatted): images, prompt, chosen, rejected."""
    if any(isinstance(part, dict) and part.get("type") == "video" for message in row.get("prompt") or []
           if isinstance(message, dict) and isinstance(message.get("content"), list) for part in message["content"]):
        raise Drop(f"a video in the prompt: {NO_VIDEO_DPO}")
    prompt = _messages(row.get("prompt"), "prompt")
    chosen, rejected = _messages(row.get("chosen"), "chosen"), _messages(row.get("rejected"), "rejected")
    _check_images(row, prompt)
    if prompt[-1]["role"] != "user":  # the answers continue a conversation at its user's turn; earlier turns are context
        raise Drop(f"the prompt's last turn is the {prompt[-1]['role']}'s, not the user's")
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if [m["role"] for m in answer] != ["assistant"]:
            raise Drop(f"{key} is not one assistant turn")
    if chosen == rejected:
        raise Drop("chosen equals rejected")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] + prompt
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


FORMATS: dict[str, Format] = {
    "chartqa": Format("sft", ("image", "query", "label"), "image", chartqa, "HuggingFaceM4/ChartQA", gold=True,
                      relaxed_accuracy=True),
    "open-r1": Format("sft", ("image", "problem", "solution"), "image", open_r1, "lmms-lab/multimodal-open-r1-8k-verified",
                      gold=True),
    "messages": Format("sft", ("messages", "images"), "images", messages, "conversations with an images column"),
    "video-messages": Format(
        "sft", ("messages", "videos"), None, video_messages, "conversations with a videos column (video files)", video_column="videos"
    ),
    "rlaif-v": Format("dpo", ("image", "question", "chosen", "rejected"), "image", rlaif_v, "openbmb/RLAIF-V-Dataset"),
    "rlaif-v-yes-no": Format("sft", ("image", "question", "chosen", "rejected"), "image", rlaif_v_yes_no,
                             "openbmb/RLAIF-V-Dataset's yes/no questions, the chosen answer's verdict as gold", gold=True),
    "preference-messages": Format(
        "dpo", ("images", "prompt", "chosen", "rejected"), "images", preference_messages, "HuggingFaceH4/rlaif-v_formatted"
    ),
}
