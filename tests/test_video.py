"""Video rows (issue 20): prepare keeps the frames the video processor samples, and SFT feeds Qwen2.5-VL what its
processor gives for the video when used as its card says (``processor.apply_chat_template(..., tokenize=True,
return_dict=True)`` with the video and the card's fps, the processor sampling the frames itself).

The oracle decodes each file with transformers' own loader (all frames) and lets the checkpoint's processor sample
them; nothing of vlmjobs builds the expected tensors. Videos are written here with PyAV: frames of varied content
(a square moving over a tinted background), of varied lengths and sizes.
"""

from __future__ import annotations

import copy

import datasets
import numpy as np
import pytest
import torch
import transformers
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
from transformers.video_utils import load_video
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from jobs import data, video
from jobs.contract import UserError
from jobs.families import get_family
from jobs.recipe import Source
from tests.test_parity import card_answer

CARD_FPS = 2.0  # Qwen2.5-VL's card samples videos at 2 frames a second (qwen-vl-utils' FPS)
# How each card samples a video: Qwen2.5-VL's through qwen-vl-utils at 2 fps, Qwen3-VL's processor at its own 2 fps;
# SmolVLM2's apply_chat_template passes its video processor's num_frames (64) and fps (1) itself
CARD_SAMPLING = {"qwen2_5_vl": {"do_sample_frames": True, "fps": CARD_FPS},
                 "qwen3_vl": {"do_sample_frames": True, "fps": CARD_FPS}, "smolvlm2": {}}
# Frames kept of the test videos of 3, 2 and 6 seconds: 2 a second; SmolVLM2's 1 a second
FRAMES = {"qwen2_5_vl": [6, 4, 12], "qwen3_vl": [6, 4, 12], "smolvlm2": [3, 2, 6]}
VIDEO_FAMILIES = list(FRAMES)
VIDEO_COLUMNS = datasets.Features({
    "messages": datasets.List({"role": datasets.Value("string"),
                               "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")})}),
    "videos": datasets.List(datasets.Value("string")),
})


def write_video(path, frames: int, fps: int, height: int, width: int) -> str:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.zeros((height, width, 3), np.uint8)
            image[:, :, i % 3] = (15 * i) % 256
            image[2 + i % (height - 10):10 + i % (height - 10), 4:20] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def turn(role: str, *parts) -> dict:
    return {"role": role, "content": [{"type": p, "text": None} if p == "video" else {"type": "text", "text": p} for p in parts]}


def load(tiny_model, name: str):
    folder = tiny_model(name)
    return folder, AutoProcessor.from_pretrained(folder), get_family(name)


@pytest.fixture(scope="module")
def qwen(tiny_model):
    return load(tiny_model, "qwen2_5_vl")


def model_of(folder, family):
    return getattr(transformers, family.model_class).from_pretrained(folder)


@pytest.fixture
def source_rows(tmp_path):
    """Rows as users bring them: one video, two videos of other lengths and sizes, and none; short and long answers."""
    short = write_video(tmp_path / "short.mp4", frames=12, fps=4, height=40, width=56)  # 3 s: 6 frames at 2 fps
    tall = write_video(tmp_path / "tall.mp4", frames=20, fps=10, height=64, width=32)  # 2 s: 4 frames
    long = write_video(tmp_path / "long.mp4", frames=48, fps=8, height=24, width=48)  # 6 s: 12 frames
    return [
        {"messages": [turn("user", "video", "What moves?"), turn("assistant", "A white square.")], "videos": [short]},
        {"messages": [turn("user", "Compare", "video", "with", "video"),
                      turn("assistant", "The first is tall and short; the second is long and wide, with a square "
                           "sliding down over a background that changes colour every frame.")], "videos": [tall, long]},
        {"messages": [turn("user", "Say hello."), turn("assistant", "Hello.")], "videos": []},
    ]


def prepare(rows, processor, family, folder=None, format="video-messages"):
    ds = datasets.Dataset.from_list(rows, features=VIDEO_COLUMNS)
    decode = video.decoder(family, processor, fps=CARD_FPS, folder=folder)
    return data.convert(ds, Source(path="videos", format=format), lambda image: image, decode_video=decode)


def sft_batch(prepared, processor, family):
    """What SFT's collator makes of the rows: TRL's, wrapped as jobs.sft wraps it."""
    collator = video.WithVideos(DataCollatorForVisionLanguageModeling(family.rendering_processor(processor), completion_only_loss=True))
    return collator([dict(row) for row in prepared])


def card(processor, family, row: dict):
    """The card's encoding of one conversation: the video decoded whole by transformers' loader, the processor sampling
    it at the card's fps; and the ids the model must emit after the prompt."""
    videos = [load_video(path, backend="pyav") for path in row["videos"]]
    prompt, answer = copy.deepcopy(row["messages"][:-1]), row["messages"][-1:]
    filled = iter(videos)
    for message in prompt:
        message["content"] = [({"type": "video", "video": next(filled)[0]} if part["type"] == "video" else part)
                              for part in message["content"]]
    kwargs = {"video_metadata": [metadata for _, metadata in videos], **CARD_SAMPLING[family.name]} if videos else {}
    encoded = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt", processor_kwargs=kwargs)
    return encoded, card_answer(processor, family, row["messages"][:-1], answer)


def video_frames(encoded) -> list[torch.Tensor]:
    """Each video's pixels as the model reads them: Qwen's patches of all videos joined (split by their grids);
    SmolVLM2's frames, each video padded with empty frames to the batch's longest (pixel_attention_mask 0)."""
    if "pixel_values_videos" in encoded:
        return list(encoded["pixel_values_videos"].split(encoded["video_grid_thw"].prod(-1).tolist()))
    if "pixel_values" not in encoded:
        return []
    kept = encoded["pixel_attention_mask"].flatten(2).any(-1)
    return [frames[mask] for frames, mask in zip(encoded["pixel_values"], kept)]


def rope_index(model, encoded):
    """The 3-D rotary positions a Qwen model computes for these inputs; None for a model without them."""
    if not hasattr(model.model, "get_rope_index"):
        return None
    positions, _ = model.model.get_rope_index(encoded["input_ids"], encoded["mm_token_type_ids"],
                                              video_grid_thw=encoded.get("video_grid_thw"),
                                              second_per_grid_ts=encoded.get("second_per_grid_ts"),
                                              attention_mask=encoded.get("attention_mask"))
    return positions


def assert_card_parity(batch, rows, processor, family, model):
    """Each batch row is its card encoding followed by its answer, labelled on the answer alone; the batch's video
    tensors are the card's, row after row; and the 3-D rotary positions over the prompt are the card's."""
    videos, cards, seconds = video_frames(batch), [], []
    whole = rope_index(model, batch)  # the 3-D rotary positions the model computes from the whole batch
    for i, row in enumerate(rows):
        encoded, answer = card(processor, family, row)
        prompt = encoded["input_ids"][0].tolist()
        length = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :length].tolist() == prompt + answer, f"row {i}: ids"
        assert batch["labels"][i, :length].tolist() == [-100] * len(prompt) + answer, f"row {i}: labels"
        cards += video_frames(encoded)
        seconds += encoded.get("second_per_grid_ts", torch.tensor([])).tolist()
        if whole is not None:
            assert torch.equal(whole[:, i:i + 1, : len(prompt)], rope_index(model, encoded)), f"row {i}: rotary positions"
    assert len(videos) == len(cards) and all(torch.equal(a, b) for a, b in zip(videos, cards)), "video pixels"
    if "video_grid_thw" in batch:
        assert torch.equal(batch["video_grid_thw"], torch.cat([card(processor, family, row)[0]["video_grid_thw"]
                                                               for row in rows if row["videos"]])), "video_grid_thw"
    if seconds:  # Qwen2.5-VL's; Qwen3-VL's processor writes each frame's time into the text instead
        assert batch["second_per_grid_ts"].tolist() == seconds, "second_per_grid_ts"


@pytest.mark.parametrize("name", VIDEO_FAMILIES)
def test_sft_feeds_each_video_family_what_its_card_gives_for_videos(name, tiny_model, source_rows):
    folder, processor, family = load(tiny_model, name)
    prepared, drops = prepare(source_rows, processor, family)
    assert drops.dropped == 0, drops.summary()
    assert [len(frames) for row in prepared["videos"] for frames in row] == FRAMES[name]
    batch = sft_batch(prepared, processor, family)
    model = model_of(folder, family)
    assert_card_parity(batch, source_rows, processor, family, model)
    # and the model trains on it: a finite loss from the batch as the collator made it
    assert torch.isfinite(model(**batch).loss)


def test_the_parity_check_fails_when_prepare_drops_frames(qwen, source_rows):
    """A prepare that kept fewer frames (here the last two of the first video, with their indices) is caught."""
    _, processor, family = qwen
    prepared, _ = prepare(source_rows, processor, family)
    first = prepared[0]
    first["videos"][0] = first["videos"][0][:-2]
    first["video_metadata"][0]["frames_indices"] = first["video_metadata"][0]["frames_indices"][:-2]
    rows = [first, *prepared.select(range(1, len(prepared)))]
    batch = sft_batch(rows, processor, family)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen[0])
    with pytest.raises(AssertionError, match="row 0: ids"):
        assert_card_parity(batch, source_rows, processor, family, model)


def generation_inputs(model, processor, family, rows: list[dict], batch_size: int):
    """What evaluate's generation feeds the model for these prepared rows: the processor's inputs of each batch
    (jobs.inference.prompt_inputs) and the position ids the decoder got at the prefill (the 3-D rotary ones that
    generate computes from them)."""
    from jobs import inference

    encoded, positions, prompts = [], [], inference.prompt_inputs
    decoder = getattr(model.model, "language_model", None) or model.model.text_model  # Qwen's, SmolVLM2's
    forward = decoder.forward

    def record_inputs(*args, **kwargs):
        encoded.append(prompts(*args, **kwargs))
        return encoded[-1]

    def record_positions(*args, **kwargs):
        prefill = kwargs["past_key_values"] is None or kwargs["past_key_values"].get_seq_length() == 0
        if prefill and hasattr(model.model, "get_rope_index"):
            positions.append(kwargs["position_ids"][-3:])  # generate puts the text positions first: [4, batch, length]
        return forward(*args, **kwargs)

    decoder.forward = record_positions
    inference.prompt_inputs = record_inputs
    try:
        answers = inference.generate_answers(model, family.rendering_processor(processor), rows, max_new_tokens=2,
                                             batch_size=batch_size, stop_token_ids=[])
    finally:
        inference.prompt_inputs, decoder.forward = prompts, forward
    assert len(answers) == len(rows)
    return encoded, positions


def assert_generation_parity(encoded, positions, rows, processor, family, model):
    """Each left-padded prompt is the card's for its row, the batch's video tensors are the card's row after row, and
    the decoder's rotary positions over each prompt (Qwen's) are the ones the model computes for the card's encoding."""
    i = 0
    for k, batch in enumerate(encoded):
        cards, seconds = [], []
        for b in range(len(batch["input_ids"])):
            card_inputs, _ = card(processor, family, rows[i])
            prompt = card_inputs["input_ids"][0].tolist()
            length = int(batch["attention_mask"][b].sum())
            assert batch["input_ids"][b, -length:].tolist() == prompt, f"row {i}: ids"
            cards += video_frames(card_inputs)
            seconds += card_inputs.get("second_per_grid_ts", torch.tensor([])).tolist()
            if positions:
                assert torch.equal(positions[k][:, b, -length:], rope_index(model, card_inputs)[:, 0]), f"row {i}: rotary positions"
            i += 1
        videos = video_frames(batch)
        assert len(videos) == len(cards) and all(torch.equal(a, b) for a, b in zip(videos, cards)), "video pixels"
        if seconds:  # Qwen2.5-VL's; Qwen3-VL's processor writes each frame's time into the text instead
            assert batch["second_per_grid_ts"].tolist() == seconds, "second_per_grid_ts"
    assert i == len(rows)
    assert len(positions) == (len(encoded) if hasattr(model.model, "get_rope_index") else 0)


@pytest.mark.parametrize("name", VIDEO_FAMILIES)
def test_evaluate_generates_from_what_each_video_familys_card_gives_for_videos(name, tiny_model, source_rows):
    """Evaluate's generation on video rows, in batches that mix one video, two and none: the prompt ids, video tensors
    and the decoder's 3-D rotary positions are the card's for each row."""
    folder, processor, family = load(tiny_model, name)
    prepared, _ = prepare(source_rows, processor, family)
    model = model_of(folder, family)
    rows = [dict(row) for row in prepared]
    encoded, positions = generation_inputs(model, processor, family, rows, batch_size=2)
    assert len(encoded) == 2
    assert_generation_parity(encoded, positions, source_rows, processor, family, model)


def test_the_generation_parity_check_fails_when_prepare_drops_frames(qwen, source_rows):
    """Evaluate given a video with two frames fewer (as a prepare that dropped them would store it) is caught."""
    folder, processor, family = qwen
    prepared, _ = prepare(source_rows, processor, family)
    rows = [dict(row) for row in prepared]
    rows[1]["videos"] = [rows[1]["videos"][0], rows[1]["videos"][1][:-2]]
    rows[1]["video_metadata"][1]["frames_indices"] = rows[1]["video_metadata"][1]["frames_indices"][:-2]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)
    encoded, positions = generation_inputs(model, processor, family, rows, batch_size=3)
    with pytest.raises(AssertionError, match="row 1: ids"):
        assert_generation_parity(encoded, positions, source_rows, processor, family, model)


def test_bad_video_rows_are_counted_drops_with_their_reason(qwen, source_rows, tmp_path):
    _, processor, family = qwen
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    rows = [
        source_rows[0],
        {**source_rows[0], "videos": []},  # a placeholder without its video
        {**source_rows[0], "videos": [str(tmp_path / "missing.mp4")]},
        {**source_rows[0], "videos": [str(broken)]},
        {**source_rows[0], "videos": [write_video(tmp_path / "one.mp4", frames=1, fps=4, height=16, width=16)]},
        {**source_rows[0], "videos": ["short.mp4"]},  # relative to the source's folder
    ]
    prepared, drops = prepare(rows, processor, family, folder=tmp_path)
    assert len(prepared) == 2
    assert dict(drops.reasons) == {"video placeholders do not match the videos": 1, "video file not found": 1,
                                   "video does not decode or is too short to sample": 2}
    # a family without video: every row with a video is a drop naming the family, the row without one is kept
    llava = get_family("llava")
    prepared, drops = prepare(source_rows, processor, llava)
    assert dict(drops.reasons) == {"video row: the llava family takes no video": 2} and len(prepared) == 1


def test_frames_over_the_video_budget_are_shrunk_at_prepare_to_the_grid_the_card_gets(qwen, tmp_path):
    """A frame larger than the video processor's pixel budget is stored at the size its smart_resize gives it, so the
    processor resizes it no further and the model sees the card's grid of tokens."""
    _, processor, family = qwen
    big = write_video(tmp_path / "big.mp4", frames=8, fps=4, height=96, width=160)  # 15,360 pixels a frame
    rows = [{"messages": [turn("user", "video", "What moves?"), turn("assistant", "A square.")], "videos": [big]}]
    prepared, _ = prepare(rows, processor, family)
    budget = processor.video_processor.size["longest_edge"]
    assert all(frame.width * frame.height <= budget < 96 * 160 for frame in prepared[0]["videos"][0])
    batch = sft_batch(prepared, processor, family)
    encoded, _ = card(processor, family, rows[0])
    assert torch.equal(batch["video_grid_thw"], encoded["video_grid_thw"])
    assert batch["input_ids"][0, : encoded["input_ids"].shape[1]].tolist() == encoded["input_ids"][0].tolist()


def test_smolvlm2_frames_over_its_longest_side_are_shrunk_at_prepare_as_its_processor_resizes_them(tiny_model, tmp_path):
    """SmolVLM2's video processor scales a frame's longest side to size["longest_edge"] (aspect ratio kept, the other
    side rounded up to even) before squashing it to one tile: prepare stores a larger frame at that size, and the
    prompt the model gets (one tile a frame) is the card's."""
    _, processor, family = load(tiny_model, "smolvlm2")
    bound = processor.video_processor.size["longest_edge"]
    big = write_video(tmp_path / "big.mp4", frames=8, fps=4, height=96, width=2 * bound)
    rows = [{"messages": [turn("user", "video", "What moves?"), turn("assistant", "A square.")], "videos": [big]}]
    prepared, _ = prepare(rows, processor, family)
    assert [frame.size for frame in prepared[0]["videos"][0]] == [(bound, 48)] * 2  # 2 s at 1 a second; 96 * bound / (2 bound)
    batch = sft_batch(prepared, processor, family)
    encoded, answer = card(processor, family, rows[0])
    assert batch["input_ids"][0].tolist() == encoded["input_ids"][0].tolist() + answer


@pytest.mark.slow
def test_prepare_sft_and_evaluate_stages_train_and_score_qwen2_5_vl_on_video_rows(qwen, source_rows, tmp_path, monkeypatch):
    """The stages as a recipe runs them: a local source of video rows (paths relative to its folder), one SFT step, then
    evaluate generating answers to held-out video rows and scoring them."""
    import json

    from tests.conftest import recipe_file, run_stages

    folder = tmp_path / "videos"
    folder.mkdir()

    def write_rows(split: str, picks: list[int]):
        lines = []
        for i, k in enumerate(picks):
            row = copy.deepcopy(source_rows[k])
            names = [f"{split[:2]}{i}-{j}.mp4" for j in range(len(row["videos"]))]  # no split name: datasets would read it
            for name, path in zip(names, row["videos"]):
                (folder / name).write_bytes(open(path, "rb").read())
            row["videos"] = names
            lines.append(json.dumps(row))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")

    write_rows("train", [i % 3 for i in range(8)])
    write_rows("test", [1, 2, 0])  # two videos, none, one: evaluate's batches of 2 mix them
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    seen = []  # the video grids the model encoded (TRL's fused LM head replaces the outer class's forward)
    encode = Qwen2_5_VLModel.get_video_features

    def spy(self, pixel_values_videos, video_grid_thw=None, **kwargs):
        seen.append(video_grid_thw.tolist())
        return encode(self, pixel_values_videos, video_grid_thw, **kwargs)

    monkeypatch.setattr(Qwen2_5_VLModel, "get_video_features", spy)
    path = recipe_file(tmp_path, qwen[0], {"chartqa": folder, "rlaif-v": folder}, family="qwen2_5_vl",
                       data={"sft": {"path": str(folder), "format": "video-messages", "test_split": "test"}},
                       stages=["prepare", "sft", "evaluate"],
                       sft={"method": "full", "args": {"max_steps": 1, "per_device_train_batch_size": 7, "logging_steps": 1,
                                                        "report_to": "none", "save_strategy": "no", "eval_strategy": "no"}},
                       evaluate={"variants": ["sft"], "max_new_tokens": 2, "batch_size": 2})
    recipe = run_stages(path, "prepare", "sft")
    done = json.loads((recipe.run_dir / "sft" / "_SUCCESS.json").read_text())
    assert done["rows"]["train"] == 7
    # the training step's batch held the videos of its seven rows, at the grids the card gives each
    from datasets import load_from_disk

    answers = [row["messages"][-1]["content"][0]["text"] for row in source_rows]
    trained = [answers.index(row[0]["content"][0]["text"]) for row in load_from_disk(recipe.run_dir / "prepare" / "sft" / "train")["completion"]]
    grids = [[grid for grid in card(qwen[1], qwen[2], source_rows[k])[0]["video_grid_thw"].tolist()] if source_rows[k]["videos"] else []
             for k in range(3)]
    assert sorted(seen[0]) == sorted(grid for k in trained for grid in grids[k])
    # evaluate answers the three test rows in two batches, each with its videos at the card's grids, and scores them
    seen.clear()
    run_stages(path, "evaluate")
    assert seen[:2] == [grids[1] + grids[2], grids[0]]  # the prefill of each batch (generate encodes videos once)
    report = json.loads((recipe.run_dir / "evaluate" / "report.json").read_text())
    assert report["variants"]["sft"]["counts"]["accuracy"] == 3
    predictions = [json.loads(line) for line in (recipe.run_dir / "evaluate" / "predictions.jsonl").read_text().splitlines()]
    assert [p["gold"] for p in predictions] == [[answers[k]] for k in (1, 2, 0)]


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_padding_free_sft_on_video_rows_has_padded_sfts_loss(name, tiny_model, source_rows, tmp_path):
    """Joined into one row, video rows keep their rotary positions (each row's own, from its video grids and times):
    the loss is padded SFT's, through the collator jobs.sft builds (TRL's, the video wrapper, the padding-free one)."""
    from trl import SFTConfig, SFTTrainer

    from jobs import modeling, packing
    from jobs.recipe import Model
    from tests.test_padding_free import LOSS_TOLERANCE, loss_and_grads

    folder, processor, family = load(tiny_model, name)
    prepared, _ = prepare(source_rows, processor, family)
    model = modeling.load_model(Model(name_or_path=str(folder), family=name, attn_implementation="sdpa"), dtype=torch.float32)
    model.eval()
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_length=None, bf16=False,
                     dataloader_pin_memory=False, remove_unused_columns=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=prepared, processing_class=family.rendering_processor(processor))
    collator = video.WithVideos(trainer.data_collator)
    padded = collator([dict(row) for row in prepared])
    packed = packing.PaddingFree(collator, model)([dict(row) for row in prepared])
    assert torch.equal(packed["pixel_values_videos"], padded["pixel_values_videos"])
    padded_loss, _, _ = loss_and_grads(trainer, model, padded)
    packing.attend_by_row(model)  # as jobs.sft runs padding-free batches
    packed_loss, _, _ = loss_and_grads(trainer, model, packed)
    torch.testing.assert_close(packed_loss, padded_loss, **LOSS_TOLERANCE)
    if name != "qwen2_5_vl":  # the tiny Qwen3-VL's loss moves with its positions by less than the tolerance (3.7e-5)
        return
    # Control: packed with plain positions (no rotary ones from the video grids) the loss is another; a tiny random
    # model's loss moves little with positions (3e-4 of 6.1 for Qwen2.5-VL's), still several times the tolerance
    plain_loss, _, _ = loss_and_grads(trainer, model, packing.pack(collator([dict(row) for row in prepared])))
    gap, allowed = abs(plain_loss - padded_loss), LOSS_TOLERANCE["atol"] + LOSS_TOLERANCE["rtol"] * abs(padded_loss)
    assert gap > 3 * allowed, f"the control must fail the equivalence (gap {gap:.2e}, tolerance {allowed:.2e})"


def test_a_video_fps_of_zero_is_refused_by_the_recipe(tmp_path):
    from jobs import recipe as recipes
    from tests.conftest import recipe_file

    path = recipe_file(tmp_path, tmp_path, {"chartqa": tmp_path, "rlaif-v": tmp_path}, prepare={"video_fps": 0})
    with pytest.raises(UserError, match=r"prepare.video_fps: must be above 0"):
        recipes.load(path)


def test_dpo_on_video_rows_is_refused_in_one_line_with_the_reason(tmp_path):
    """TRL 1.16's DPOTrainer cannot carry videos (it keeps the image columns of vision data and its collator hands the
    processor images alone): a recipe asking for it is refused by validation, a preference row holding a video is a
    counted drop naming why."""
    from jobs import formats
    from jobs import recipe as recipes
    from tests.conftest import recipe_file

    path = recipe_file(tmp_path, tmp_path, {"chartqa": tmp_path, "rlaif-v": tmp_path},
                       data={"dpo": {"path": str(tmp_path), "format": "video-messages"}})
    with pytest.raises(UserError, match=r"data.dpo.format: 'video-messages' holds video rows; DPO takes no videos: TRL 1.16's "
                                        r"DPOTrainer keeps only the image columns of vision data"):
        recipes.load(path)
    row = {"images": [], "prompt": [turn("user", "video", "What moves?")], "chosen": [turn("assistant", "A square.")],
           "rejected": [turn("assistant", "Nothing.")]}
    with pytest.raises(formats.Drop, match=r"^a video in the prompt: DPO takes no videos"):
        formats.preference_messages(row, None)
