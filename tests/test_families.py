"""The family table: one tiny model of each family's real class runs the whole chain with LoRA and with QLoRA
(TRL's test_train_vlm, parametrized over the table), and the quirks the table records hold: PaliGemma's prefix-LM
batches, Idefics' end of turn, Idefics3's tile size, and the one-line errors naming the supported families."""

from __future__ import annotations

import pytest
import torch
import transformers
from datasets import load_from_disk

from jobs import contract, modeling
from jobs.contract import UserError
from jobs.families import FAMILIES, IMAGE_BOUNDS, get_family
from jobs.recipe import Model
from tests.conftest import recipe_file, run_stages

# Every family of the table runs; one left out would carry its reason here, as pytest.param(..., marks=skip(reason)).
CHAIN_FAMILIES = list(FAMILIES)


def chain_sections(method: str) -> dict:
    """The whole chain, as small as it runs: one optimizer step per training stage, two evaluation samples."""
    train = {"method": method, "lora": {"r": 4, "lora_alpha": 8},
             "args": {"max_steps": 1, "per_device_train_batch_size": 2, "logging_steps": 1}}
    return {
        "stages": ["prepare", "sft", "dpo", "evaluate", "merge_push"],
        "prepare": {"max_rows": 12},
        "sft": train,
        "dpo": train,
        "evaluate": {"variants": ["base", "dpo"], "max_samples": 2, "max_new_tokens": 2, "batch_size": 2},
    }


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("family", CHAIN_FAMILIES)
def test_every_family_runs_the_whole_chain_and_its_merged_model_generates(
    family, method, tmp_path, tiny_model, synthetic_data, monkeypatch, capsys
):
    sources = {kind: synthetic_data(kind) for kind in ("chartqa", "rlaif-v")}
    path = recipe_file(tmp_path, tiny_model(family), sources, family=family, name=f"chain-{family.replace('_', '-')}",
                       **chain_sections(method))
    recipe = run_stages(path)
    run = recipe.run_dir
    for stage in recipe.stages:
        assert (run / stage / contract.SUCCESS_FILE).is_file(), stage
        assert not (run / stage / "scratch").exists(), stage
    # the stages that read prepare's rows leave its finished folder as prepare wrote it (no datasets cache files)
    assert not [path.name for path in (run / "prepare").rglob("cache-*.arrow")]
    for stage in ("sft", "dpo"):
        assert modeling.is_adapter(run / stage / "model"), stage
        assert contract.read_json(run / stage / contract.SUCCESS_FILE)["quantized"] is (method == "qlora"), stage

    merged = contract.read_json(run / "merge_push" / contract.SUCCESS_FILE)
    assert merged["logits_max_diff"] is not None and merged["logits_max_diff"] <= recipe.merge_push.logits_atol

    # What a user of the pushed model does: the family's class and AutoProcessor, nothing of vlmjobs.
    out = run / "merge_push" / "model"
    model = getattr(transformers, get_family(family).model_class).from_pretrained(out)
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert processor.chat_template, "the merged model carries the template it was trained with"
    if get_family(family).end_of_turn:
        assert processor.tokenizer.convert_tokens_to_ids(get_family(family).end_of_turn) in model.generation_config.eos_token_id
    # The model card's usage snippet, as a user copies it (issue 13): on this folder and a test image.
    card = (out / "README.md").read_text()
    snippet = card.split("## Usage\n\n```python\n")[1].split("```")[0]
    assert "model_id = 'path/to/this/folder'\n" in snippet  # nothing pushed: the reader points it at the folder
    snippet = snippet.replace("model_id = 'path/to/this/folder'", f"model_id = {str(out)!r}")
    load_from_disk(run / "prepare" / "dpo" / "test")[0]["images"][0].save(tmp_path / "image.png")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(snippet, "model card usage", "exec"), {})
    assert capsys.readouterr().out.endswith("\n"), "the snippet prints the generated answer"


def test_each_family_has_a_tiny_model_of_its_class_with_its_processor_and_template(tiny_model):
    for name, family in FAMILIES.items():
        folder = tiny_model(name)
        config = transformers.AutoConfig.from_pretrained(folder)
        assert config.model_type in family.model_types, name
        assert config.architectures == [family.model_class], name
        assert family.image_bound in IMAGE_BOUNDS, name
        assert family.hub_ids, name
        processor = modeling.load_processor(Model(name_or_path=str(folder), family=name))
        assert processor.chat_template, name
        for key, value in family.processor_kwargs.items():
            assert getattr(processor.image_processor, key) == value, (name, key)


def test_the_tiny_idefics2_takes_idefics2_8bs_64_tokens_per_image_for_the_benchmark(tmp_path):
    """make bench's twin: each image becomes as many <image> tokens as the resampler has latents, and the model
    reads them (a count the processor and the model disagreed on would fail the forward)."""
    from PIL import Image

    from jobs import tiny

    folder = tiny.build("idefics2", tmp_path / "m", image_tokens=64)
    processor = modeling.load_processor(Model(name_or_path=str(folder), family="idefics2"))
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}])
    inputs = processor(text=[prompt], images=[[Image.new("RGB", (32, 32))]], return_tensors="pt")
    assert int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 64
    model = modeling.load_model(Model(name_or_path=str(folder), family="idefics2"))
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
    with pytest.raises(UserError, match="--image-tokens: only the tiny idefics2 takes it"):
        tiny.build("llava", tmp_path / "l", image_tokens=64)


def test_an_unsupported_family_is_one_line_naming_the_supported_ones():
    with pytest.raises(UserError, match=rf"^model family 'idefics' is not supported \(supported: {', '.join(FAMILIES)}\)$"):
        get_family("idefics")


def test_a_model_of_another_family_is_one_line_naming_its_family_and_the_supported_ones(tiny_model):
    spec = Model(name_or_path=str(tiny_model("idefics3")), family="idefics2")
    with pytest.raises(UserError) as error:
        modeling.load_model(spec)
    message = str(error.value)
    assert "is a idefics3 model, but the recipe says family idefics2 (Idefics2ForConditionalGeneration)" in message
    assert f"set model.family: idefics3 (supported: {', '.join(FAMILIES)})" in message
    assert "\n" not in message


def test_a_checkpoint_of_a_model_type_no_family_knows_is_one_line_naming_the_families_and_how_to_add_one(tmp_path):
    """Issue 20: e.g. a LLaVA-NeXT checkpoint (model type llava_next) under any family."""
    transformers.LlavaNextConfig().save_pretrained(tmp_path)
    with pytest.raises(UserError) as error:
        modeling.load_model(Model(name_or_path=str(tmp_path), family="llava"))
    message = str(error.value)
    assert "is a llava_next model, but the recipe says family llava (LlavaForConditionalGeneration)" in message
    assert "no supported family has llava_next models; adding one is a row of jobs/families.py and a tiny model" in message
    assert f"(supported: {', '.join(FAMILIES)})" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# PaliGemma: a pretrained prefix-LM with no chat template


def paligemma_rows(tiny_model, tmp_path, synthetic_data):
    """Prepared preference rows for the tiny PaliGemma, and its processor as the stages load it."""
    sources = {kind: synthetic_data(kind) for kind in ("chartqa", "rlaif-v")}
    path = recipe_file(tmp_path, tiny_model("paligemma"), sources, family="paligemma", stages=["prepare"],
                       prepare={"max_rows": 8})
    recipe = run_stages(path)
    rows = list(load_from_disk(recipe.run_dir / "prepare" / "dpo" / "train"))[:2]
    return rows, modeling.load_processor(recipe.model), recipe


def test_paligemma_batches_mark_the_prompt_as_prefix_and_the_answers_as_suffix(tiny_model, tmp_path, synthetic_data):
    """PaliGemma attends both ways where token_type_ids is 0; an answer marked 0 would see its own next token."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    rows, processor, _ = paligemma_rows(tiny_model, tmp_path, synthetic_data)
    dpo_batch = DataCollatorForVisionPreference(processor=processor)([dict(r) for r in rows])
    assert "labels" not in dpo_batch, "a prompt's labels would reach the model beside DPO's own"
    types, answers, mask = dpo_batch["token_type_ids"], dpo_batch["completion_mask"], dpo_batch["attention_mask"]
    assert torch.equal(types[answers == 1], torch.ones_like(types[answers == 1]))
    assert torch.equal(types[(answers == 0) & (mask == 1)], torch.zeros_like(types[(answers == 0) & (mask == 1)]))

    sft_rows = [{"images": r["images"], "prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    sft_batch = DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)(sft_rows)
    trained = sft_batch["labels"] != -100
    assert trained.any()
    assert torch.equal(sft_batch["token_type_ids"][trained], torch.ones_like(sft_batch["token_type_ids"][trained]))


def test_paligemma_answers_are_causal_in_training_batches(tiny_model, tmp_path, synthetic_data):
    """Changing an answer's last token leaves the logits before it unchanged: the answer cannot see ahead."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    rows, processor, recipe = paligemma_rows(tiny_model, tmp_path, synthetic_data)
    batch = DataCollatorForVisionPreference(processor=processor)([dict(rows[0])])
    model = modeling.load_model(recipe.model).eval()
    last = int(batch["attention_mask"][0].nonzero().max())
    changed = {k: v.clone() for k, v in batch.items() if k != "completion_mask"}
    changed["input_ids"][0, last] = (changed["input_ids"][0, last] + 1) % model.config.text_config.vocab_size
    with torch.no_grad():
        before = model(**{k: v for k, v in batch.items() if k != "completion_mask"}).logits[0, :last]
        after = model(**changed).logits[0, :last]
    assert torch.allclose(before, after, atol=1e-5)


def test_paligemma_gets_its_prefix_suffix_template_and_saves_as_its_own_processor(tiny_model, tmp_path):
    from transformers import AutoProcessor, PaliGemmaProcessor

    folder = tiny_model("paligemma")
    assert AutoProcessor.from_pretrained(folder).chat_template is None, "a pretrained PaliGemma ships no template"
    processor = modeling.load_processor(Model(name_or_path=str(folder), family="paligemma"))
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a red bar?"}]}]
    answer = [{"role": "assistant", "content": [{"type": "text", "text": "Yes"}]}]
    assert processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False) == "<image>Is there a red bar?"
    assert processor.apply_chat_template(prompt + answer, tokenize=False) == "<image>Is there a red bar?Yes<eos>"
    processor.save_pretrained(tmp_path / "saved")
    assert type(AutoProcessor.from_pretrained(tmp_path / "saved")) is PaliGemmaProcessor


# ---------------------------------------------------------------------------------------------
# Idefics: turns end with <end_of_utterance>; Idefics3's tiles


@pytest.mark.parametrize("family", ["idefics2", "idefics3"]
                         + ["smolvlm2"])  # families-a (issue 20)
def test_generation_stops_at_the_templates_end_of_turn(family, tiny_model):
    folder = tiny_model(family)
    processor = modeling.load_processor(Model(name_or_path=str(folder), family=family))
    generation = transformers.GenerationConfig.from_pretrained(folder)
    stop = get_family(family).stop_token_ids(processor, generation)
    assert processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>") in stop
    assert processor.tokenizer.eos_token_id in stop


def test_idefics3_images_are_stored_at_one_tile_when_the_processor_does_not_split_them(tiny_model):
    from PIL import Image

    folder = tiny_model("idefics3")
    family = get_family("idefics3")
    splitting = modeling.load_processor(Model(name_or_path=str(folder), family="idefics3"))
    whole = modeling.load_processor(Model(name_or_path=str(folder), family="idefics3", processor={"do_image_splitting": False}))
    tile = whole.image_processor.max_image_size["longest_edge"]
    assert family.max_image_edge(splitting) == (splitting.image_processor.size["longest_edge"], 0)
    assert family.max_image_edge(whole) == (tile, 0)
    assert family.shrink(Image.new("RGB", (4 * tile, 2 * tile)), whole).size == (tile, tile // 2)


# families-a (issue 20): the checkpoints' own templates as TRL quotes them byte for byte (trl/chat_templates/, "Original
# Qwen2.5-VL chat template", "Original Qwen3-VL chat template", "Original SmolVLM chat template. Also matches SmolVLM2,
# which ships a byte-identical template"); a template written from memory would pass the parity test unnoticed.
PUBLISHED_TEMPLATES = {"qwen2_5_vl": "qwen2_5_vl_chat_template", "qwen3_vl": "qwen3_vl_chat_template",
                       "smolvlm2": "smolvlm_chat_template"}


@pytest.mark.parametrize("family", sorted(PUBLISHED_TEMPLATES))
def test_a_tiny_twin_saves_its_checkpoints_own_chat_template(family, tiny_model):
    from trl import chat_template_utils

    processor = transformers.AutoProcessor.from_pretrained(tiny_model(family))
    assert processor.chat_template == getattr(chat_template_utils, PUBLISHED_TEMPLATES[family])


def test_internvl_images_are_stored_within_the_widest_canvas_of_its_tiles_and_keep_their_tiling(tiny_model):
    """InternVL cuts an image into at most max_patches tiles on the grid nearest its aspect ratio (and a thumbnail):
    prepare bounds the longest side by max_patches tiles in a row, and the shrunk image gets the tiles the original
    would have."""
    from PIL import Image

    family = get_family("internvl")
    processor = modeling.load_processor(Model(name_or_path=str(tiny_model("internvl")), family="internvl"))
    tile, most = processor.image_processor.size["height"], processor.image_processor.max_patches
    assert family.max_image_edge(processor) == (most * tile, 0)
    for size in [(10 * most * tile, 2 * tile), (3 * tile, 5 * most * tile), (tile // 2, tile // 3)]:
        image = Image.new("RGB", size, (120, 30, 200))
        stored = family.shrink(image, processor)
        assert max(stored.size) <= most * tile
        tiles = [processor.image_processor(picture, crop_to_patches=True)["num_patches"] for picture in (image, stored)]
        assert tiles[0] == tiles[1], size


# ---------------------------------------------------------------------------------------------
# Llama 3.2 Vision (mllama): one image per conversation, no system message beside images (issue 20)


def two_image_conversations(folder, rows: int = 12, every: int = 3):
    """A messages source like llava-instruct-mix-vsft's, every ``every``-th conversation asking about two images."""
    from datasets import Dataset

    from jobs import synthetic

    out = synthetic.messages_rows(rows)
    for row in out[::every]:
        row["messages"][0]["content"].insert(0, {"type": "image", "text": None})
        row["images"] = row["images"] * 2
    (folder / "data").mkdir(parents=True)
    Dataset.from_list(out, features=synthetic.features("messages")).to_parquet(folder / "data" / "train-00000-of-00001.parquet")
    return folder, len(out[::every])


def test_mllama_drops_a_conversation_with_more_than_one_image_counted(tmp_path, tiny_model, synthetic_data):
    """"You can't query about two different images at the same time" (Hugging Face's Llama 3.2 post): the model reads
    one image per conversation, so prepare drops the others with their count, as it drops any unusable row."""
    source, two = two_image_conversations(tmp_path / "conversations")
    sources = {kind: synthetic_data(kind) for kind in ("chartqa", "rlaif-v")}
    path = recipe_file(tmp_path, tiny_model("mllama"), sources, family="mllama", stages=["prepare"],
                       data={"sft": {"path": str(source), "format": "messages"}}, prepare={"max_drop_fraction": 0.5})
    recipe = run_stages(path)
    drops = contract.read_json(recipe.run_dir / "prepare" / contract.SUCCESS_FILE)["drops"]["sft/train"]
    assert drops["reasons"] == {"more than 1 image (the model family reads at most that many)": two}
    kept = load_from_disk(recipe.run_dir / "prepare" / "sft")
    assert {len(row["images"]) for split in kept.values() for row in split} == {1}


def test_mllama_renders_a_system_message_beside_an_image_into_the_first_user_turn(tiny_model):
    """Its template raises "Prompting with images is incompatible with system messages."; the stages (and evaluate's
    prompted variant) render the system text at the head of the user's turn instead, as the template itself renders
    that conversation written so."""
    import jinja2

    processor = modeling.load_processor(Model(name_or_path=str(tiny_model("mllama")), family="mllama"))
    system = {"role": "system", "content": [{"type": "text", "text": "Answer with one word."}]}
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which bar is the tallest?"}]}
    with pytest.raises(jinja2.TemplateError, match="Prompting with images is incompatible with system messages"):
        processor.apply_chat_template([system, user], add_generation_prompt=True, tokenize=False)
    folded = {"role": "user", "content": [{"type": "text", "text": "Answer with one word.\n\n"}, *user["content"]]}
    expected = processor.apply_chat_template([folded], add_generation_prompt=True, tokenize=False)
    rendering = get_family("mllama").rendering_processor(processor)
    assert rendering.apply_chat_template([system, user], add_generation_prompt=True, tokenize=False) == expected
    # without an image the template takes a system message itself: left to it
    text_only = [system, {"role": "user", "content": [{"type": "text", "text": "Hi?"}]}]
    assert (rendering.apply_chat_template(text_only, add_generation_prompt=True, tokenize=False)
            == processor.apply_chat_template(text_only, add_generation_prompt=True, tokenize=False))


def test_mllama_model_card_snippet_gives_the_model_one_bos_as_its_card_does(tiny_model, tmp_path, monkeypatch):
    """The pushed model's usage snippet, run up to generation: its ids are the card's (processor(image, input_text,
    add_special_tokens=False)), with the one <|begin_of_text|> the template writes, not a second one from the tokenizer."""
    from types import SimpleNamespace

    from PIL import Image

    from jobs import merge_push

    folder = tiny_model("mllama")
    cfg = SimpleNamespace(model=SimpleNamespace(family="mllama"), merge_push=SimpleNamespace(push=False, repo_id=None))
    snippet = merge_push.usage(cfg).replace("'path/to/this/folder'", repr(str(folder))).split("output = ")[0]
    Image.new("RGB", (40, 24), (200, 30, 30)).save(tmp_path / "image.png")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(snippet, "model card usage", "exec"), scope)
    card = transformers.AutoProcessor.from_pretrained(folder)
    text = card.apply_chat_template(scope["messages"], add_generation_prompt=True)
    expected = card(Image.open(tmp_path / "image.png"), text, add_special_tokens=False, return_tensors="pt")
    assert scope["inputs"]["input_ids"].tolist() == expected["input_ids"].tolist()
    assert scope["inputs"]["input_ids"][0, 1] != card.tokenizer.bos_token_id


def test_mllama_images_are_stored_within_four_tiles_in_a_row_and_keep_their_canvas(tiny_model):
    """MllamaImageProcessor resizes an image onto the canvas of at most max_image_tiles tiles nearest its aspect ratio:
    prepare bounds the longest side by that many tiles in a row, and the shrunk image gets the canvas (aspect_ratio_ids)
    the original would have."""
    from PIL import Image

    family = get_family("mllama")
    processor = modeling.load_processor(Model(name_or_path=str(tiny_model("mllama")), family="mllama"))
    tile, most = processor.image_processor.size["height"], processor.image_processor.max_image_tiles
    assert family.max_image_edge(processor) == (most * tile, 0)
    for size in [(10 * most * tile, 2 * tile), (3 * tile, 5 * most * tile), (9 * tile, 8 * tile), (tile // 2, tile // 3)]:
        image = Image.new("RGB", size, (120, 30, 200))
        stored = family.shrink(image, processor)
        assert max(stored.size) <= most * tile
        canvases = [processor.image_processor([[picture]])["aspect_ratio_ids"].tolist() for picture in (image, stored)]
        assert canvases[0] == canvases[1], size


def test_the_tiny_mllama_template_renders_images_as_transformers_tests_of_the_checkpoint_expect(tiny_model):
    """transformers' tests/models/mllama/test_processing_mllama.py (test_apply_chat_template) renders a conversation with
    images through the 11B checkpoint's processor and expects exactly this text; the twin's template must agree."""
    processor = transformers.AutoProcessor.from_pretrained(tiny_model("mllama"))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What do these images show?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The first image shows the statue of Liberty in New York."}]},
        {"role": "user", "content": [{"type": "text", "text": "And who is that?"}]},
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<|begin_of_text|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "<|image|><|image|>What do these images show?"
        "<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "The first image shows the statue of Liberty in New York."
        "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "And who is that?"
        "<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_mllama_trains_a_batch_mixing_rows_with_and_without_an_image(tiny_model):
    """transformers 5.23's MllamaImageProcessor cannot batch a row without an image beside rows with one (IndexError when
    the first row has none, aspect_ratio_ids a row short otherwise). SFT's batch gives each row what the card's
    processor gives that conversation alone, and the model trains on it."""
    from PIL import Image
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    folder, family = tiny_model("mllama"), get_family("mllama")
    spec = Model(name_or_path=str(folder), family="mllama")
    processor, card = modeling.load_processor(spec), transformers.AutoProcessor.from_pretrained(folder)
    collate = family.collator(DataCollatorForVisionLanguageModeling(
        processor=family.rendering_processor(processor), completion_only_loss=True), processor)

    def row(question, answer, images):
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
        return {"images": images, "prompt": [{"role": "user", "content": content}],
                "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]}

    rows = [row("Hello, which colour do bars come in?", "Red, green and blue.", []),
            row("Which bar is the tallest?", "The red one.", [Image.new("RGB", (90, 24), (200, 10, 10))]),
            row("Is there a bar?", "No.", []),
            row("How many bars?", "Two", [Image.new("RGB", (20, 64), (0, 100, 10))])]
    batch = collate([dict(r) for r in rows])
    for i, r in enumerate(rows):
        text = card.apply_chat_template(r["prompt"] + r["completion"], tokenize=False)
        alone = card(text=[text], images=[r["images"]] if r["images"] else None, add_special_tokens=False, return_tensors="pt")
        n = alone["input_ids"].shape[1]
        assert batch["input_ids"][i, :n].tolist() == alone["input_ids"][0].tolist(), i
        if r["images"]:
            for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
                assert torch.equal(batch[key][i], alone[key][0]), (i, key)
            assert batch["cross_attention_mask"][i, :n].tolist() == alone["cross_attention_mask"][0].tolist(), i
        else:
            assert not batch["cross_attention_mask"][i].any(), i
    loss = modeling.load_model(spec)(**batch).loss
    assert torch.isfinite(loss)


# PaliGemma's pretrained checkpoints ship no template (vlmjobs gives the merged model one: the chain test runs its snippet)
@pytest.mark.parametrize("family", [name for name, family in FAMILIES.items() if family.chat_template is None])
def test_the_model_card_snippet_gives_the_model_at_most_one_bos(family, tiny_model, tmp_path, monkeypatch):
    """The pushed model's usage snippet, run up to generation, for every family: a template that writes BOS and a
    tokenizer that adds one would give the model two, which no checkpoint was trained on (Gemma 3's and Llama 3.2
    Vision's cards pass add_special_tokens=False, or tokenize inside apply_chat_template, for that reason)."""
    from types import SimpleNamespace

    from PIL import Image

    from jobs import merge_push

    folder = tiny_model(family)
    cfg = SimpleNamespace(model=SimpleNamespace(family=family), merge_push=SimpleNamespace(push=False, repo_id=None))
    snippet = merge_push.usage(cfg).replace("'path/to/this/folder'", repr(str(folder))).split("output = ")[0]
    Image.new("RGB", (40, 24), (200, 30, 30)).save(tmp_path / "image.png")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(snippet, "model card usage", "exec"), scope)
    bos = transformers.AutoProcessor.from_pretrained(folder).tokenizer.bos_token_id
    ids = scope["inputs"]["input_ids"][0].tolist()
    assert bos is None or ids.count(bos) <= 1, f"{ids.count(bos)} BOS tokens in {ids[:12]}..."
