"""Train / infer parity (issue 11): what SFT, DPO and evaluate feed a model for a conversation is what the checkpoint's
own processor builds for it, used as its model card uses it (``processor.apply_chat_template`` to text, then
``processor(text=..., images=...)`` with its default special tokens), BOS and end of turn included; and an SFT row's
labelled span is exactly its answer and the end-of-turn token the model must learn to emit.

TRL's vision collators tokenize with add_special_tokens=False, so before the fix LLaVA-1.5 and Idefics2 (whose Llama
tokenizers add BOS and whose templates write none) were trained and scored without BOS; and every family with a turn
separator after the end token (LLaVA's " ", Qwen2-VL's and Idefics' "\\n") was also trained to emit that separator.

The oracle is the tiny checkpoint's processor as saved (the family's real template and BOS behaviour, jobs.tiny), read
back with AutoProcessor: nothing of vlmjobs builds the expected ids.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import AutoProcessor

from jobs import inference
from jobs.families import FAMILIES, get_family
from tests.conftest import run_stages

# Whether the tokenizer of each family's checkpoint in the source documents puts BOS in front of a text encoded with
# special tokens (its tokenizer.json post-processor, add_bos_token in its tokenizer_config.json; None: it has no BOS).
# PaliGemma's processor switches its tokenizer's off and writes <bos> itself.
REAL_ADD_BOS = {"llava": True, "idefics2": True, "idefics3": False, "qwen2_vl": None, "gemma3": True, "internvl": None,
                # Qwen2.5-VL's and Qwen3-VL's Qwen2 tokenizers have no BOS; SmolVLM2's SmolLM2 tokenizer names <|im_start|>
                # BOS and prepends nothing (its template writes it)
                "qwen2_5_vl": None, "qwen3_vl": None, "smolvlm2": False,
                "mllama": True}  # Llama 3's tokenizer.json post-processor: "<|begin_of_text|> $A"
TOKEN_TYPES = ("token_type_ids", "mm_token_type_ids")  # per token, not per image: checked position by position
# The families whose model card has apply_chat_template tokenize, the images in the messages (gemma-3-12b-it's:
# tokenize=True, return_dict=True), rather than render text and call the processor on it. Tokenizing, transformers adds
# no special tokens to a text the template already starts with BOS (ProcessorMixin.apply_chat_template): calling the
# processor on Gemma 3's rendered text would put a second <bos> in front.
CARD_TOKENIZES = {"gemma3", "internvl"}  # and InternVL3-8B-hf's card
# Llama-3.2-11B-Vision-Instruct's card calls ``processor(image, input_text, add_special_tokens=False)``: its template
# writes <|begin_of_text|>, which the tokenizer would put in front a second time
CARD_NO_SPECIAL_TOKENS = {"mllama"}


def card_processor(folder, family):
    processor = AutoProcessor.from_pretrained(folder, **family.processor_kwargs)
    if processor.chat_template is None:  # a pretrained PaliGemma ships none; the stages give it the family's
        processor.chat_template = family.chat_template
    return processor


def card_prompt(card, prompt: list[dict], images: list, *, tokenize: bool = False, special_tokens: bool = True):
    """The model card's way: the template's text, then the processor with its default special tokens (or none,
    CARD_NO_SPECIAL_TOKENS); or, ``tokenize``, the template tokenizing with the images in the messages (CARD_TOKENIZES)."""
    if tokenize:
        pictures = iter(images)
        messages = [{**message, "content": [{**part, "image": next(pictures)} if part["type"] == "image" else part
                                            for part in message["content"]]} for message in prompt]
        return card.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    text = card.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return card(text=[text], images=[images] if images else None, return_tensors="pt", add_special_tokens=special_tokens)


def card_conversation(card, conversation: list[dict], images: list):
    """The card's processor on a whole conversation, answer included (Llama 3.2 Vision's cross_attention_mask covers
    every token after the image, so the prompt's alone is not what training must feed)."""
    text = card.apply_chat_template(conversation, tokenize=False)
    return card(text=[text], images=[images] if images else None, return_tensors="pt", add_special_tokens=False)


def card_answer(card, family, prompt: list[dict], answer: list[dict]) -> list[int]:
    """The ids the model must emit after the card's prompt: the answer as the template renders it, then the end token."""
    end = family.end_of_turn or card.tokenizer.eos_token
    prompt_text = card.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    whole = card.apply_chat_template(prompt + answer, tokenize=False)
    assert whole.startswith(prompt_text)
    text = whole[len(prompt_text):].split(end)[0].rstrip(" ")  # LLaVA's template puts a space after every text
    return card.tokenizer(text, add_special_tokens=False)["input_ids"] + [card.tokenizer.convert_tokens_to_ids(end)]


def assert_same_image_inputs(batch, card, rows: int = 1):
    for key, value in card.items():
        if key in ("input_ids", "attention_mask", "labels", "cross_attention_mask", *TOKEN_TYPES) or not torch.is_tensor(value):
            continue
        assert torch.equal(batch[key], torch.cat([value] * rows)), key


def record(monkeypatch, cls, name: str, log: list):
    """Wrap ``cls.name`` so that every call's arguments (copied before the call mutates them) and result are logged."""
    original = getattr(cls, name)

    def spy(*args):
        copied = copy.deepcopy(args[1:])
        result = original(*args)
        log.append((*copied, result))
        return result

    monkeypatch.setattr(cls, name, spy)


@pytest.mark.slow
@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_sft_dpo_and_evaluate_build_what_the_checkpoints_own_processor_builds(family_name, write_recipe, tiny_model, monkeypatch):
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    family = get_family(family_name)
    card = card_processor(tiny_model(family_name), family)
    bos = card.tokenizer.bos_token_id
    sft_batches, dpo_batches, prompts = [], [], []
    tokenize = family_name in CARD_TOKENIZES
    how = {"tokenize": tokenize, "special_tokens": family_name not in CARD_NO_SPECIAL_TOKENS}
    record(monkeypatch, DataCollatorForVisionLanguageModeling, "torch_call", sft_batches)
    record(monkeypatch, DataCollatorForVisionPreference, "torch_call", dpo_batches)
    monkeypatch.setattr(inference, "prompt_inputs", _recording(inference.prompt_inputs, prompts))
    train = {"method": "lora", "lora": {"r": 4, "lora_alpha": 8},
             "args": {"max_steps": 1, "per_device_train_batch_size": 1, "per_device_eval_batch_size": 1, "logging_steps": 1}}
    path = write_recipe(
        family=family_name, stages=["prepare", "sft", "dpo", "evaluate"], prepare={"max_rows": 8}, sft=train, dpo=train,
        evaluate={"variants": ["sft"], "max_samples": 1, "max_new_tokens": 1, "batch_size": 1},
    )
    recipe = run_stages(path)

    assert sft_batches and dpo_batches and prompts
    for examples, batch in sft_batches:
        (row,) = examples
        prompt = card_prompt(card, row["prompt"], row["images"], **how)
        prompt_ids = prompt["input_ids"][0].tolist()
        answer = card_answer(card, family, row["prompt"], row["completion"])
        assert batch["input_ids"][0].tolist() == prompt_ids + answer
        assert batch["labels"][0].tolist() == [-100] * len(prompt_ids) + answer, "labels: the answer and its end token"
        assert_same_image_inputs(batch, prompt)
        if "cross_attention_mask" in prompt:
            whole = card_conversation(card, row["prompt"] + row["completion"], row["images"])
            assert batch["cross_attention_mask"][0].tolist() == whole["cross_attention_mask"][0].tolist(), "cross_attention_mask"
        for key in TOKEN_TYPES:
            if key in prompt:
                assert batch[key][0, : len(prompt_ids)].tolist() == prompt[key][0].tolist(), key
        if REAL_ADD_BOS.get(family_name):
            assert prompt_ids[0] == bos, "the card's prompt starts with BOS, so training's must"

    for examples, batch in dpo_batches:
        (row,) = examples
        prompt = card_prompt(card, row["prompt"], row["images"], **how)
        prompt_ids = prompt["input_ids"][0].tolist()
        for i, key in enumerate(("chosen", "rejected")):
            kept = batch["attention_mask"][i] == 1
            answer = card_answer(card, family, row["prompt"], row[key])
            assert batch["input_ids"][i][kept].tolist() == prompt_ids + answer, key
            assert batch["completion_mask"][i][kept].tolist() == [0] * len(prompt_ids) + [1] * len(answer), key
            if "cross_attention_mask" in prompt:
                whole = card_conversation(card, row["prompt"] + row[key], row["images"])
                assert batch["cross_attention_mask"][i][kept].tolist() == whole["cross_attention_mask"][0].tolist(), key
        assert_same_image_inputs(batch, prompt, rows=2)

    for (texts, rows), inputs in prompts:  # evaluate: generated answers and answer log-likelihoods
        (row,) = rows
        prompt = card_prompt(card, row["prompt"], row["images"], **how)
        assert inputs["input_ids"].tolist() == prompt["input_ids"].tolist()
        assert_same_image_inputs(inputs, prompt)
        if "cross_attention_mask" in prompt:  # generation's mask grows from the prompt's, as the card's does
            assert inputs["cross_attention_mask"].tolist() == prompt["cross_attention_mask"].tolist()

    saved = AutoProcessor.from_pretrained(recipe.run_dir / "sft" / "model")
    assert saved.chat_template == card.chat_template, "the saved model keeps its checkpoint's template: users add BOS"


def _recording(function, log: list):
    def spy(processor, texts, rows):
        result = function(processor, texts, rows)
        log.append(((list(texts), copy.deepcopy(rows)), result))
        return result

    return spy


@pytest.mark.parametrize("family_name", sorted(REAL_ADD_BOS))
def test_each_tiny_tokenizer_adds_bos_as_its_real_checkpoints_does(family_name, tiny_model):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model(family_name))
    real = REAL_ADD_BOS[family_name]
    assert (tokenizer.bos_token is None) is (real is None)
    ids = tokenizer("Is there a bar?")["input_ids"]
    assert (ids[0] == tokenizer.bos_token_id) is bool(real)
    assert tokenizer("Is there a bar?", add_special_tokens=False)["input_ids"][0] != tokenizer.bos_token_id


def test_the_tiny_llavas_training_prompt_starts_with_bos_as_its_card_prompt_does(tiny_model):
    """The issue's example: the card's way gave [1, 356, 30], TRL's way [356, 30, 225]."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from jobs import modeling
    from jobs.recipe import Model

    folder, family = tiny_model("llava"), get_family("llava")
    processor = modeling.load_processor(Model(name_or_path=str(folder), family="llava"))
    card = card_processor(folder, family)
    prompt = [{"role": "user", "content": [{"type": "text", "text": "Is there a red bar?"}]}]
    answer = [{"role": "assistant", "content": [{"type": "text", "text": "Yes</s>"}]}]
    expected = card_prompt(card, prompt, [])["input_ids"][0].tolist()
    collate = DataCollatorForVisionLanguageModeling(processor=family.rendering_processor(processor), completion_only_loss=True)
    trained = collate([{"images": [], "prompt": prompt, "completion": answer}])["input_ids"][0].tolist()
    assert expected[0] == card.tokenizer.bos_token_id
    assert trained[: len(expected)] == expected


@pytest.mark.parametrize("family_name", [name for name in FAMILIES if not FAMILIES[name].prefix_lm])
def test_evaluates_answer_log_likelihoods_are_the_cards_forward_of_the_whole_conversation(family_name, tiny_model):
    """evaluate's completion_logprobs scores an answer as the model reads the whole conversation the card's way: the
    answer's tokens typed as text. Gemma 3 attends both ways among tokens typed 1 (an image's soft tokens); typed so, an
    answer would see its own next tokens. (PaliGemma, a prefix-LM whose answer is its suffix, types them 1 by design:
    jobs.prefix_lm, tests/test_families.py.)"""
    from PIL import Image

    from jobs import modeling
    from jobs.recipe import Model

    folder, family = tiny_model(family_name), get_family(family_name)
    card = card_processor(folder, family)
    spec = Model(name_or_path=str(folder), family=family_name)
    model = modeling.load_model(spec).eval()
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which bar is the tallest?"}]}]
    answer = [{"role": "assistant", "content": [{"type": "text", "text": "The red bar, at 7 units."}]}]
    closed = [{**answer[0], "content": [{"type": "text", "text": "The red bar, at 7 units." + card.tokenizer.eos_token}]}]
    row = {"prompt": prompt, "images": [image], "chosen": closed if family.answer_needs_eos else answer}  # as evaluate
    (scored,) = inference.completion_logprobs(model, family.rendering_processor(modeling.load_processor(spec)), [row], "chosen")

    how = {"tokenize": family_name in CARD_TOKENIZES, "special_tokens": family_name not in CARD_NO_SPECIAL_TOKENS}
    prompt_ids = card_prompt(card, prompt, [image], **how)["input_ids"][0].tolist()
    answer_ids = card_answer(card, family, prompt, row["chosen"])
    whole = card_prompt(card, prompt, [image], **how)  # the card's prompt, the answer's ids after it
    ids = torch.tensor([prompt_ids + answer_ids])
    inputs = {k: v for k, v in whole.items() if k not in ("input_ids", "attention_mask", *TOKEN_TYPES)}
    if "cross_attention_mask" in whole:  # over the whole conversation, as the card's processor builds it for its text
        conversation = card_conversation(card, prompt + answer, [image])
        assert conversation["input_ids"].tolist() == ids.tolist()
        inputs["cross_attention_mask"] = conversation["cross_attention_mask"]
    for key in TOKEN_TYPES:  # the answer is text: type 0, as the card's processor types every text token
        if key in whole:
            inputs[key] = torch.cat([whole[key], torch.zeros(1, len(answer_ids), dtype=whole[key].dtype)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits.float()
    logprobs = torch.log_softmax(logits[0, len(prompt_ids) - 1 : -1], dim=-1)
    expected = logprobs.gather(-1, torch.tensor(answer_ids)[:, None]).sum().item()
    assert scored == pytest.approx(expected, abs=1e-4)
