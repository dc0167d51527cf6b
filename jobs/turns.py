"""Multi-turn conversations: SFT's loss on every assistant turn, not only the last (issue 20).

A prepared SFT row is TRL's prompt/completion pair; a conversation's earlier answers sit in its prompt, where TRL's
collator labels nothing. ``EveryAnswer`` wraps that collator and labels each earlier assistant turn where the
conversation's own rendering puts it: a turn starts where the family's chat template, given the conversation before
it and asked for a reply, stops, and ends where its rendering of the conversation through that turn stops (the
rendering processor's, which ends an answer at its end token: ``Family.rendering_processor``). Both are tokenized by
the processor with the images they hold, so image tokens count as the model sees them. User turns, system prompts
and images stay unlabelled. TRL's ``assistant_only_loss`` would do this from ``{% generation %}`` markers, which
none of the families' checkpoint templates has.

``check`` runs at prepare, so that a conversation the template refuses (Gemma 3's two user turns in a row), or
renders so that an earlier turn changes once the conversation goes on, is a counted drop rather than a crash or a
mislabelled row in the middle of training.
"""

from __future__ import annotations

from jobs.formats import Drop, count_images


def _render(rendering, messages: list[dict], *, reply: bool) -> str:
    return rendering.apply_chat_template(messages, tokenize=False, add_generation_prompt=reply)


def check(rendering, row: dict, family) -> None:
    """Raise Drop for a row whose conversations (prompt + completion, or prompt + chosen and + rejected) the chat
    template refuses, or renders so that a shorter conversation is not the start of a longer one: then an earlier
    answer's tokens would not be where its own rendering puts them. Earlier answers at all, where the family cannot
    train on them (Family.multi_turn_unsupported), drop the row too."""
    from jinja2 import TemplateError

    if family.multi_turn_unsupported and any(message["role"] == "assistant" for message in row["prompt"]):
        raise Drop(f"earlier answers in the conversation, which {family.name} cannot train on: {family.multi_turn_unsupported}")

    answers = [row[key] for key in ("completion", "chosen", "rejected") if row.get(key)]
    for answer in answers:
        conversation = row["prompt"] + answer
        try:
            whole = _render(rendering, conversation, reply=False)
            for k, message in enumerate(conversation):
                if message["role"] != "assistant":
                    continue
                before, through = _render(rendering, conversation[:k], reply=True), _render(rendering, conversation[: k + 1], reply=False)
                if not (through.startswith(before) and whole.startswith(through)):
                    raise Drop("the chat template renders an earlier turn differently once the conversation goes on")
        except TemplateError as e:
            raise Drop(f"the chat template refuses the conversation: {e}") from None


class EveryAnswer:
    """TRL's vision collator for prompt/completion rows, with every assistant turn in a row's prompt labelled as well
    as its completion. Rows whose prompt holds no assistant turn come out exactly as TRL's collator makes them."""

    def __init__(self, collator, rendering):
        self.collator, self.rendering = collator, rendering

    def __call__(self, examples: list[dict]) -> dict:
        # Before the collator: it rewrites each row's prompt into text in place
        spans = [self._earlier_answers(example) for example in examples]
        batch = self.collator(examples)
        ids, labels = batch["input_ids"], batch["labels"]
        for row, row_spans in enumerate(spans):
            for start, end, expected in row_spans:
                end = min(end, ids.shape[1])  # max_length truncated the row
                # TRL's collator flushes each row left, so a row's prompt starts at column 0
                if ids[row, :end].tolist() != expected[:end]:
                    raise ValueError(
                        "sft: an earlier answer's tokens are not where the chat template's own rendering of the "
                        "conversation puts them; this family's template or processor cannot label multi-turn rows"
                    )
                labels[row, start:end] = ids[row, start:end]
        return batch

    def _earlier_answers(self, example: dict) -> list[tuple[int, int, list[int]]]:
        """(start, end, the conversation's ids up to end) of each assistant turn in the row's prompt."""
        prompt, images = example["prompt"], example.get("images") or []
        spans = []
        for k, message in enumerate(prompt):
            if message["role"] == "assistant":
                start = len(self._ids(prompt[:k], images, reply=True))
                through = self._ids(prompt[: k + 1], images, reply=False)
                spans.append((start, len(through), through))
        return spans

    def _ids(self, messages: list[dict], images: list, *, reply: bool) -> list[int]:
        from trl.data_utils import prepare_multimodal_messages

        shown = images[: count_images(messages)]
        text = _render(self.rendering, prepare_multimodal_messages(messages, images=shown), reply=reply)
        # As TRL's collator calls the processor: the template writes BOS where the checkpoint has one
        encoded = self.rendering(text=[text], images=[shown] if shown else None, add_special_tokens=False)
        return list(encoded["input_ids"][0])
