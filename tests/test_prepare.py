"""prepare: source formats to TRL's conversational rows, counted drops, shrunk images, splits."""

from __future__ import annotations

import io

import pytest
from datasets import load_from_disk
from PIL import Image

from jobs import contract, formats, prepare, synthetic
from jobs.contract import UserError
from jobs.formats import Drop


@pytest.mark.parametrize(
    "fmt, row, reason",
    [
        pytest.param("chartqa", {"query": "  ", "label": ["4"]}, "empty query", id="chartqa-empty-query"),
        pytest.param("chartqa", {"query": "How many?", "label": None}, "missing label", id="chartqa-missing-label"),
        pytest.param("chartqa", {"query": "How many?", "label": "4"}, "label is not a list of text", id="chartqa-label-type"),
        pytest.param("chartqa", {"query": "How many?", "label": [" "]}, "empty label", id="chartqa-empty-label"),
        pytest.param("chartqa", {"query": 7, "label": ["4"]}, "query is not text", id="chartqa-query-type"),
        pytest.param("rlaif-v", {"question": "Q?", "chosen": "A", "rejected": "A"}, "chosen equals rejected", id="rlaif-v-same"),
        pytest.param("rlaif-v", {"question": "Q?", "chosen": "A"}, "missing rejected", id="rlaif-v-missing"),
        pytest.param("messages", {"messages": [{"role": "user", "content": "hi"}], "images": []}, "no assistant answer after a prompt", id="messages-no-answer"),
        pytest.param("messages", {"messages": [{"role": "robot", "content": "hi"}], "images": []}, "messages has a message without a system/user/assistant role", id="messages-role"),
        pytest.param(
            "messages",
            {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}, {"role": "assistant", "content": "a"}], "images": [1]},
            "image placeholders do not match the images", id="messages-image-count",
        ),
        pytest.param("messages", {"messages": [{"role": "user", "content": 5}], "images": []}, "messages has a message whose content is neither text nor a list of parts", id="messages-content-type"),
    ],
)
def test_unusable_rows_drop_with_a_reason(fmt, row, reason):
    with pytest.raises(Drop, match=f"^{reason}$"):
        formats.FORMATS[fmt].convert(row, None)


def test_chartqa_row_becomes_prompt_completion_with_system_prompt_and_all_answers():
    out = formats.chartqa({"query": "Value of A?", "label": ["12", "12.0"]}, "Answer briefly.")
    assert out["prompt"] == [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Value of A?"}]},
    ]
    assert out["completion"] == [{"role": "assistant", "content": [{"type": "text", "text": "12"}]}]
    assert out["answers"] == ["12", "12.0"]


def test_messages_train_on_the_last_answer_given_the_conversation_before_it():
    row = {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A chart."},
        {"role": "user", "content": "Its colour?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
    ], "images": ["one image"]}
    out = formats.messages(row, None)
    assert [m["role"] for m in out["prompt"]] == ["user", "assistant", "user"]
    assert out["completion"][0]["content"] == [{"type": "text", "text": "Red."}]


def _recipe(write_recipe, **prepare_args):
    return write_recipe(stages=["prepare"], prepare=prepare_args)


def test_prepare_writes_splits_in_trl_format_with_images_shrunk_to_the_processor(write_recipe, tiny_model, capsys):
    path = _recipe(write_recipe)
    prepare.main(recipe=str(path))
    out = capsys.readouterr().out
    assert "prepare: images shrunk to shortest side <= 32 px\n" in out, "only the side the processor bounds (issue 13)"
    progress = [line for line in out.splitlines() if " converted, " in line]  # issue 13 (8): lines, no carriage returns
    assert progress[0].startswith("prepare: data.sft (") and "/400 rows converted, " in progress[0] and "\r" not in out
    run = path.parent / "runs" / "t"
    record = contract.read_json(run / "prepare" / contract.SUCCESS_FILE)
    assert record["rows"]["sft"] == {"train": 400, "eval": 80, "test": 80}
    dpo = record["rows"]["dpo"]
    assert dpo["train"] + dpo["eval"] + dpo["test"] == 400 and dpo["test"] == dpo["eval"] == 20
    sft = load_from_disk(run / "prepare" / "sft")
    row = sft["train"][0]
    assert set(sft["train"].column_names) == {"images", "prompt", "completion", "answers"}
    # the tiny LLaVA's CLIP processor resizes the shortest side to 32: a 72x72 chart is stored at 32x32
    assert row["images"][0].size == (32, 32)
    assert row["prompt"][0]["content"][0]["type"] == "image"
    assert set(load_from_disk(run / "prepare" / "dpo")["test"].column_names) == {"images", "prompt", "chosen", "rejected"}


def _corrupt_chartqa(tmp_path, bad: dict[int, dict]):
    rows = synthetic.chartqa_rows(200, seed=5)
    for index, change in bad.items():
        rows[index].update(change)
    return synthetic.write_splits("chartqa", tmp_path / "corrupt", {"train": rows})


BAD_ROWS = {
    3: {"image": {"bytes": b"not a png", "path": None}},
    17: {"image": {"bytes": b"\x89PNG\r\n\x1a\n truncated", "path": None}},
    42: {"query": ""},
    99: {"label": []},
}


def test_bad_rows_are_dropped_and_counted_by_reason(write_recipe, tmp_path):
    source = _corrupt_chartqa(tmp_path, BAD_ROWS)
    path = write_recipe(stages=["prepare"], data={"sft": {"path": str(source), "format": "chartqa"}}, prepare={"max_drop_fraction": 0.05})
    prepare.main(recipe=str(path))
    record = contract.read_json(path.parent / "runs" / "t" / "prepare" / contract.SUCCESS_FILE)
    drops = record["drops"]["sft/train"]
    assert drops["rows"] == 200 and drops["dropped"] == 4
    assert drops["reasons"] == {"image does not decode": 2, "empty query": 1, "empty label": 1}
    assert drops["examples"]["image does not decode"] == [3, 17]
    assert sum(record["rows"]["sft"].values()) == 196


def test_too_many_bad_rows_fail_with_one_line_naming_source_reason_and_rows(write_recipe, tmp_path):
    source = _corrupt_chartqa(tmp_path, BAD_ROWS)
    path = write_recipe(stages=["prepare"], data={"sft": {"path": str(source), "format": "chartqa"}})
    with pytest.raises(UserError) as error:
        prepare.main(recipe=str(path))
    message = str(error.value)
    assert message.startswith(f"data.sft ({source}, split train): 4 of 200 rows unusable (2.0% > prepare.max_drop_fraction 1.0%): ")
    assert "image does not decode x2 (rows 3, 17)" in message and "empty query x1 (rows 42)" in message
    assert "\n" not in message
    run = path.parent / "runs" / "t"
    assert not (run / "prepare").exists(), "a failed stage leaves no output that looks complete"


def test_a_source_without_the_formats_columns_is_a_user_error(write_recipe, synthetic_data):
    path = write_recipe(stages=["prepare"], data={"sft": {"path": str(synthetic_data("rlaif-v")), "format": "chartqa"}})
    with pytest.raises(UserError, match=r"format chartqa needs columns image, query, label; missing query, label"):
        prepare.main(recipe=str(path))


def test_a_bad_split_slice_is_a_user_error(write_recipe, synthetic_data):
    path = write_recipe(stages=["prepare"], data={"sft": {"path": str(synthetic_data("chartqa")), "format": "chartqa", "train_split": "trian[:10%]"}})
    with pytest.raises(UserError, match=r"split 'trian\[:10%\]'"):
        prepare.main(recipe=str(path))


def test_split_slicing_reaches_load_dataset(write_recipe, synthetic_data):
    path = write_recipe(stages=["prepare"], data={"sft": {"path": str(synthetic_data("chartqa")), "format": "chartqa", "train_split": "train[:10%]"}})
    prepare.main(recipe=str(path))
    record = contract.read_json(path.parent / "runs" / "t" / "prepare" / contract.SUCCESS_FILE)
    assert sum(record["rows"]["sft"].values()) == 40


def test_qwen2_vl_images_are_shrunk_to_its_pixel_budget(tiny_model):
    from jobs import modeling
    from jobs.families import FAMILIES
    from jobs.recipe import Model

    processor = modeling.load_processor(Model(name_or_path=str(tiny_model("qwen2_vl")), family="qwen2_vl"))
    image = Image.open(io.BytesIO(synthetic.chart([("red", 3)])))
    shrunk = FAMILIES["qwen2_vl"].shrink(image, processor, scale=0.5)
    assert max(shrunk.size) == 16  # sqrt(max_pixels 32*32) = 32 px, halved

    # the model card's min_pixels/max_pixels, given in the recipe's model.processor, set the budget instead
    processor = modeling.load_processor(
        Model(name_or_path=str(tiny_model("qwen2_vl")), family="qwen2_vl", processor={"min_pixels": 64, "max_pixels": 576})
    )
    assert max(FAMILIES["qwen2_vl"].shrink(image, processor).size) == 24
    assert processor(text=["<|image_pad|>"], images=[image])["image_grid_thw"].prod() <= 576 // 4**2


@pytest.mark.parametrize("size", [(300, 40), (40, 300), (100, 100), (97, 61)], ids=str)
def test_qwen2_vl_pixel_budget_is_an_area_spent_as_its_processors_smart_resize_spends_it(tiny_model, size):
    """Issue 11 (6): max_pixels bounds height x width. As a longest-side cap (sqrt(576) = 24 px), a 300 x 40 image
    kept 24 x 3 = 72 of its 576 pixels; smart_resize keeps 64 x 8."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    from jobs import modeling
    from jobs.families import FAMILIES
    from jobs.recipe import Model

    processor = modeling.load_processor(
        Model(name_or_path=str(tiny_model("qwen2_vl")), family="qwen2_vl", processor={"min_pixels": 64, "max_pixels": 576})
    )
    patch = processor.image_processor.patch_size
    factor = patch * processor.image_processor.merge_size
    shrunk = FAMILIES["qwen2_vl"].shrink(Image.new("RGB", size, "red"), processor)
    assert (shrunk.height, shrunk.width) == smart_resize(size[1], size[0], factor=factor, min_pixels=64, max_pixels=576)
    assert shrunk.width * shrunk.height <= 576
    grid = processor(text=["<|image_pad|>"], images=[shrunk])["image_grid_thw"][0].tolist()
    assert [grid[1] * patch, grid[2] * patch] == [shrunk.height, shrunk.width], "the processor resizes it no further"


def test_qwen2_vl_pixel_budget_with_the_real_processors_factor_and_the_blogs_half_scale():
    """The real image processor (patch 14 x merge 2 = 28) at the model card's max_pixels 1280 x 28 x 28; the blog's
    thumbnail at half the size is a quarter of the area. An image within the budget is left as it is."""
    from types import SimpleNamespace

    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    from jobs.families import FAMILIES

    max_pixels = 1280 * 28 * 28
    processor = SimpleNamespace(image_processor=Qwen2VLImageProcessor(min_pixels=256 * 28 * 28, max_pixels=max_pixels))
    family = FAMILIES["qwen2_vl"]
    shrunk = family.shrink(Image.new("RGB", (4000, 600)), processor, scale=0.5)
    assert (shrunk.height, shrunk.width) == smart_resize(600, 4000, factor=28, min_pixels=256 * 28 * 28, max_pixels=max_pixels // 4)
    # spent, bar the sides' rounding down to multiples of 28; a longest-side cap (sqrt: 500 px) kept 500 x 75 of it
    assert 0.8 * max_pixels // 4 < shrunk.width * shrunk.height <= max_pixels // 4
    small = Image.new("RGB", (300, 200))
    assert family.shrink(small, processor, scale=0.5) is small
