"""Multi-turn rows (issue 20): SFT's labels are every assistant turn's tokens and its end token, and nothing else (no
user turns, system prompts or images); a conversation the chat template refuses, or one that ends on a user's turn, is
a counted drop at prepare; DPO's pairs keep one answer each, with earlier turns as their prompt.

The oracle is each tiny checkpoint's own processor as saved (AutoProcessor, the family's real template), rendering the
conversation one turn at a time the model card's way (tests/test_parity.py's helpers): nothing of jobs.turns builds
the expected labels.
"""

from __future__ import annotations

import copy

import pytest
from datasets import Dataset
from PIL import Image

from jobs import contract, formats, modeling, synthetic, turns
from jobs.families import FAMILIES, get_family
from jobs.recipe import Model
from tests.conftest import recipe_file, run_stages
from tests.test_parity import CARD_NO_SPECIAL_TOKENS, CARD_TOKENIZES, card_answer, card_processor, card_prompt

IGNORE = -100

# Three turns, a system prompt, an image in the first user turn and one (of another size) in the third; long and short
# answers. "user" turns that quote an answer would let a labelled user turn pass for an answer: they do not.
CONVERSATION = [
    {"role": "system", "content": [{"type": "text", "text": "Answer with a single word or number, as short as possible."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the bar?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    {"role": "user", "content": [{"type": "text", "text": "How many bars are there?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "The chart has 3 bars: a red bar of height 7, a blue bar of height 2, a green bar of height 9."}]},
    {"role": "user", "content": [{"type": "text", "text": "Is there a yellow bar in the chart?"}, {"type": "image"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "No"}]},
]
IMAGES = [(40, 30), (24, 64)]  # width, height


def labelled_runs(labels: list[int], ids: list[int]) -> list[list[int]]:
    """The labelled stretches of a row, as token ids; each labelled token must be the input's own."""
    runs, previous = [], IGNORE
    for label, token in zip(labels, ids):
        if label != IGNORE:
            assert label == token, "a label differs from its input token"
            if previous == IGNORE:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def expected_answers(card, family, conversation: list[dict]) -> list[list[int]]:
    """Each assistant turn's ids as the card's template renders it after the turns before it, its end token included."""
    return [card_answer(card, family, conversation[:k], [message])
            for k, message in enumerate(conversation) if message["role"] == "assistant"]


def sft_batch(family_name: str, folder, rows: list[dict]):
    """What SFT's collator makes of prepared rows: TRL's vision collator as SFTTrainer builds it, wrapped as jobs.sft
    wraps it, after the stage's close_answers."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    family = get_family(family_name)
    processor = modeling.load_processor(Model(name_or_path=str(folder), family=family_name))
    rendering = family.rendering_processor(processor)
    closed = family.close_answers(Dataset.from_list(rows), processor)
    examples = [closed[i] for i in range(len(closed))]
    collator = turns.EveryAnswer(DataCollatorForVisionLanguageModeling(processor=rendering, completion_only_loss=True), rendering)
    return copy.deepcopy(examples), collator(examples)


@pytest.mark.parametrize("family_name", [name for name in FAMILIES if not FAMILIES[name].multi_turn_unsupported])
def test_every_assistant_turn_and_its_end_token_are_labelled_and_nothing_else(family_name, tiny_model):
    folder, family = tiny_model(family_name), get_family(family_name)
    conversation, sizes = CONVERSATION, IMAGES
    if family.max_images == 1:  # Llama 3.2 Vision: one image a conversation, and its template takes no system beside it
        conversation = CONVERSATION[1:5] + [{**CONVERSATION[5], "content": CONVERSATION[5]["content"][:1]}, CONVERSATION[6]]
        sizes = IMAGES[:1]
    images = [Image.new("RGB", size, (40 * i, 120, 200)) for i, size in enumerate(sizes)]
    chartless = {"messages": CONVERSATION[:1] + CONVERSATION[3:5], "images": []}  # a row with no image, one turn
    rows = [{**formats.messages({"messages": conversation, "images": images}, None), "images": images},
            {**formats.messages(chartless, None), "images": []}]
    examples, batch = sft_batch(family_name, folder, rows)

    card = card_processor(folder, family)
    for i, (row, source) in enumerate(zip(examples, (conversation, chartless["messages"]))):
        kept = batch["attention_mask"][i] == 1
        ids, labels = batch["input_ids"][i][kept].tolist(), batch["labels"][i][kept].tolist()
        prompt = card_prompt(card, row["prompt"], row["images"], tokenize=family_name in CARD_TOKENIZES,
                             special_tokens=family_name not in CARD_NO_SPECIAL_TOKENS)["input_ids"][0].tolist()
        assert ids == prompt + card_answer(card, family, row["prompt"], row["completion"]), "the card's ids"
        answers = expected_answers(card, family, source)
        assert labelled_runs(labels, ids) == answers, "labels: each assistant turn and its end token, nothing else"
    assert len(answers) == 1 and len(expected_answers(card, family, conversation)) == 3


def test_a_labelled_user_turn_or_an_unlabelled_answer_fails_the_check(tiny_model):
    """The check above catches both mistakes: labels of TRL's collator alone (the last answer only), and labels that
    also cover the user turn after the first answer."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    folder, family = tiny_model("qwen2_vl"), get_family("qwen2_vl")
    images = [Image.new("RGB", size) for size in IMAGES]
    row = {**formats.messages({"messages": CONVERSATION, "images": images}, None), "images": images}
    rendering = family.rendering_processor(modeling.load_processor(Model(name_or_path=str(folder), family="qwen2_vl")))
    last_only = DataCollatorForVisionLanguageModeling(processor=rendering, completion_only_loss=True)([copy.deepcopy(row)])
    every = turns.EveryAnswer(DataCollatorForVisionLanguageModeling(processor=rendering, completion_only_loss=True), rendering)([row])
    card = card_processor(folder, family)
    answers = expected_answers(card, family, CONVERSATION)
    ids = every["input_ids"][0].tolist()
    assert labelled_runs(every["labels"][0].tolist(), ids) == answers
    assert labelled_runs(last_only["labels"][0].tolist(), ids) == answers[-1:], "unlabelled answers are seen"
    leaky = every["labels"][0].clone()
    first_end = next(i for i in range(len(ids)) if leaky[i] != IGNORE and leaky[i + 1] == IGNORE)
    leaky[first_end + 1: first_end + 4] = every["input_ids"][0][first_end + 1: first_end + 4]  # the next user turn's start
    assert labelled_runs(leaky.tolist(), ids) != answers, "a labelled user turn is seen"


def test_gemma3s_template_refusing_two_user_turns_in_a_row_is_a_counted_drop_at_prepare(tiny_model, tmp_path):
    """A colleague's note: in the messages format Gemma 3's template raises when two user turns come in a row; such a
    row crashed inside SFT's collator. Now prepare counts it, with the other unusable conversations."""
    rows = synthetic.multi_turn_messages_rows(12, seed=3)
    twice, unanswered = [i for i, row in enumerate(rows) if len(row["messages"]) >= 4][:2]
    rows[twice]["messages"].insert(1, {"role": "user", "content": [{"type": "text", "text": "And?"}]})  # two user turns
    rows[unanswered]["messages"] = rows[unanswered]["messages"][:-1]  # earlier answers, but it ends on the user's turn
    data = synthetic.write_splits("messages", tmp_path / "data", {"train": rows})
    path = recipe_file(tmp_path, tiny_model("gemma3"), {"chartqa": data, "rlaif-v": data}, family="gemma3", stages=["prepare"], data={
        "sft": {"path": str(data), "format": "messages", "eval_split": None, "test_split": None}},
        prepare={"max_drop_fraction": 0.5, "eval_fraction": 0.1, "test_fraction": 0.1})
    recipe = run_stages(path)
    drops = contract.read_json(recipe.run_dir / "prepare" / contract.SUCCESS_FILE)["drops"]["sft/train"]
    assert drops["reasons"] == {
        "the chat template refuses the conversation: Conversation roles must alternate user/assistant/user/assistant/...": 1,
        "the last turn is the user's, not the assistant's": 1,
    }
    assert list(drops["examples"].values()) == [[twice], [unanswered]]


@pytest.mark.parametrize("family_name", [name for name in FAMILIES if FAMILIES[name].multi_turn_unsupported])
def test_a_family_that_cannot_train_on_earlier_answers_drops_their_rows_and_keeps_one_turn_ones(family_name, tiny_model):
    family = get_family(family_name)
    rendering = family.rendering_processor(modeling.load_processor(Model(name_or_path=str(tiny_model(family_name)), family=family_name)))
    several = formats.messages({"messages": CONVERSATION, "images": [1, 2]}, None)
    with pytest.raises(formats.Drop, match=f"^earlier answers in the conversation, which {family_name} cannot train on: "):
        turns.check(rendering, several, family)
    turns.check(rendering, formats.messages({"messages": CONVERSATION[:3], "images": [1]}, None), family)


def test_multi_turn_rows_train_on_every_answer_through_prepare_and_sft(tmp_path, tiny_model, monkeypatch):
    """llava-instruct-mix-vsft-shaped conversations of one to three turns through the stages: every row SFT trains on
    has its answers labelled, however many turns it holds. The labels are read where the trainer hands the batch to
    the model: padding-free (the default under sdpa), one sequence whose positions restart at each row."""
    from trl import SFTTrainer

    seen = []
    original = SFTTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append({key: inputs[key].clone() for key in ("input_ids", "labels", "position_ids")})
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "compute_loss", spy)
    rows = synthetic.multi_turn_messages_rows(16, seed=1)
    data = synthetic.write_splits("messages", tmp_path / "data", {"train": rows, "test": rows[:4]})
    folder = tiny_model("qwen2_vl")
    path = recipe_file(tmp_path, folder, {"chartqa": data, "rlaif-v": data}, family="qwen2_vl", data={
        "sft": {"path": str(data), "format": "messages", "eval_split": None, "test_split": "test"}},
        sft={"method": "full", "args": {"max_steps": 1, "per_device_train_batch_size": 4, "eval_strategy": "no"}})
    run_stages(path)

    family = get_family("qwen2_vl")
    card = card_processor(folder, family)
    # Each source row's answers as the card renders them, one list of ids per assistant turn
    candidates = [expected_answers(card, family, row["messages"]) for row in rows]
    turn_counts = []
    for batch in seen:
        assert batch["input_ids"].shape[0] == 1, "padding-free: the batch's rows joined"
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        for start, end in zip(starts, starts[1:]):
            runs = labelled_runs(batch["labels"][0, start:end].tolist(), batch["input_ids"][0, start:end].tolist())
            assert runs in candidates, f"labels of a row: {len(runs)} labelled stretches, not one source row's answers"
            turn_counts.append(len(runs))
    assert len(seen) == 1 and len(turn_counts) == 4 and max(turn_counts) > 1, f"labelled turns per row: {turn_counts}"


def test_dpo_pairs_keep_one_answer_with_earlier_turns_as_their_prompt():
    prompt = CONVERSATION[:6]
    chosen = [{"role": "assistant", "content": "No"}]
    row = {"prompt": prompt, "chosen": chosen, "rejected": [{"role": "assistant", "content": "Yes"}], "images": [1, 2]}
    out = formats.preference_messages(row, None)
    assert [m["role"] for m in out["prompt"]] == ["system", "user", "assistant", "user", "assistant", "user"]
    with pytest.raises(formats.Drop, match="^the prompt's last turn is the assistant's, not the user's$"):
        formats.preference_messages({**row, "prompt": prompt[:3], "images": [1]}, None)
    with pytest.raises(formats.Drop, match="^chosen is not one assistant turn$"):
        formats.preference_messages({**row, "chosen": chosen + [{"role": "user", "content": "Sure?"}] + chosen}, None)


def test_dpo_scores_one_answer_after_a_multi_turn_prompt_as_the_card_renders_it(tmp_path, tiny_model, monkeypatch):
    """Pairs whose prompt holds earlier turns (images in the first and some later user turns) through prepare and
    dpo: what the model reads is the card's rendering of the whole conversation, and only the pair's last answers
    are scored (completion_mask), never an earlier one."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from tests.test_parity import record

    batches = []
    record(monkeypatch, DataCollatorForVisionPreference, "torch_call", batches)
    pairs = []
    for row in synthetic.multi_turn_messages_rows(12, seed=2):
        *prompt, answer = row["messages"]
        wrong = "no" if answer["content"][0]["text"] != "no" else "yes"
        pairs.append({"prompt": prompt, "chosen": [answer], "images": row["images"],
                      "rejected": [{"role": "assistant", "content": [{"type": "text", "text": wrong}]}]})
    data = synthetic.write_splits("preference-messages", tmp_path / "data", {"train": pairs})
    folder = tiny_model("qwen2_vl")
    train = {"method": "lora", "lora": {"r": 4, "lora_alpha": 8}, "args": {"max_steps": 1, "per_device_train_batch_size": 2}}
    path = recipe_file(tmp_path, folder, {"chartqa": data, "rlaif-v": data}, family="qwen2_vl", stages=["prepare", "dpo"],
                       data={"dpo": {"path": str(data), "format": "preference-messages"}}, dpo=train,
                       prepare={"eval_fraction": 0.1, "test_fraction": 0.1})
    run_stages(path)

    family = get_family("qwen2_vl")
    card = card_processor(folder, family)
    turns_seen = []
    for examples, batch in batches:
        for j, row in enumerate(examples):
            prompt = card_prompt(card, row["prompt"], row["images"])["input_ids"][0].tolist()
            for i, key in ((j, "chosen"), (len(examples) + j, "rejected")):
                kept = batch["attention_mask"][i] == 1
                answer = card_answer(card, family, row["prompt"], row[key])
                assert batch["input_ids"][i][kept].tolist() == prompt + answer, key
                assert batch["completion_mask"][i][kept].tolist() == [0] * len(prompt) + [1] * len(answer), key
            turns_seen.append(sum(message["role"] == "user" for message in row["prompt"]))
    assert max(turns_seen) > 1, f"user turns per prompt: {turns_seen}"
