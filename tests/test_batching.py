"""Batching by image size (issue 24): Idefics2's processor pads a batch's images to the largest height and width, and
its vision tower computes over every patch of the padding. With ``train_sampling_strategy: group_by_length`` the
stages give transformers' length-grouped sampler each row's place by image size, then tokens
(``jobs.packing.with_lengths``), and the DPO reference pass batches its rows in the same order. The oracle for
padding is the processor's own ``pixel_attention_mask``; for the log-probs, each row scored alone."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from trl import DPOConfig

from jobs import contract, flops, modeling, packing, reference_logprobs, shared_prefix, synthetic
from jobs.families import get_family
from jobs.recipe import Model
from tests.conftest import run_stages

WORDS = "the chart has a red bar and a blue bar and the green bar is the tallest of the bars".split()
# (width, height): the tiny Idefics2 processor (longest edge 32) makes 32x20, 20x32 and 32x32 of them
SIZES = [(64, 40), (40, 64), (48, 48)]


def preference_rows(n: int, images: tuple[int, ...] = (1,)) -> list[dict]:
    """Preference rows, row i with images[i % len(images)] images, the three sizes in turn, prompts and answers of
    varied length."""
    rows = []
    for i, row in enumerate(synthetic.rlaif_v_rows(n, seed=5)):
        image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        count = images[i % len(images)]
        question = " ".join([row["question"]] + WORDS[: i % 7])
        chosen, rejected = " ".join(WORDS[: 2 + (3 * i) % 11]), " ".join(WORDS[: 1 + (5 * i) % 9])
        rows.append({
            "images": [image.resize(SIZES[(i + k) % len(SIZES)]) for k in range(count)],
            "prompt": [{"role": "user", "content": [{"type": "image"}] * count + [{"type": "text", "text": question}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
        })
    return rows


def idefics2_trainer(tiny_model, tmp_path, rows: list[dict], **args):
    from datasets import Dataset
    from peft import LoraConfig

    family = get_family("idefics2")
    spec = Model(name_or_path=str(tiny_model("idefics2")), family="idefics2", dtype="float32")
    processor = modeling.load_processor(spec)
    torch.manual_seed(0)
    model = modeling.load_model(spec, dtype=torch.float32)
    # remove_unused_columns as the stage sets it (jobs.training)
    config = DPOConfig(**{"output_dir": str(tmp_path), "max_steps": 1, "report_to": [], "use_cpu": True,
                          "max_length": None, "save_strategy": "no", "disable_tqdm": True,
                          "train_sampling_strategy": "group_by_length", "remove_unused_columns": False, **args})
    trainer = shared_prefix.SharedPrefixDPOTrainer(
        model=model, ref_model=None, args=config,
        train_dataset=family.close_answers(Dataset.from_list(rows), processor),
        processing_class=family.rendering_processor(processor),
        peft_config=LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.data_collator = family.collator(trainer.data_collator, processor)
    return trainer


def padded_pixels(batches) -> int:
    """Pixels of padding the vision tower computes over, as the processor's own pixel_attention_mask says."""
    return sum(int((~batch["pixel_attention_mask"].bool()).sum()) for batch in batches)


def test_image_sizes_are_read_from_the_files_headers_for_rows_of_none_one_and_several_images(monkeypatch):
    from datasets import Dataset
    from PIL import ImageFile

    def png(size) -> Image.Image:
        return Image.new("RGB", size, (200, 30, 30))

    rows = Dataset.from_list([
        {"images": [png((64, 40))], "text": "one"},
        {"images": [], "text": "none"},
        {"images": [png((7, 300)), png((300, 7))], "text": "two, in order"},
    ])
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("an image was decoded"))
    assert packing.image_sizes(rows) == [((64, 40),), (), ((7, 300), (300, 7))]
    assert packing.image_sizes(rows.select([2, 0])) == [((7, 300), (300, 7)), ((64, 40),)], "through the indices"
    assert packing.image_sizes(rows.remove_columns("images")) == [(), (), ()]


def test_a_rows_place_orders_by_its_images_count_and_largest_size_then_tokens():
    sizes = [((64, 40),), ((40, 64),), ((64, 40),), (), ((40, 64),), ((40, 64), (64, 40)), ((64, 40), (40, 64))]
    tokens = [30, 10, 20, 50, 5, 9, 1]
    # no image first; one image of 40 x 64, then of 64 x 40; two images, padded to 64 x 64 whichever comes first;
    # within each, fewer tokens first
    assert packing.batching_keys(tokens, sizes) == [4, 2, 3, 0, 1, 6, 5]


def test_length_grouping_batches_idefics2_rows_of_one_image_size_and_the_reference_pass_too(tiny_model, tmp_path):
    """DPO batches of 2 pairs from 48 rows of three image sizes in turn: by tokens alone (what the stage gave before)
    the grouped sampler pairs rows of other sizes and pads their images; by image size, then tokens, a megabatch's
    rows of one size are batched together, so that at most one batch at each change of size pads. The reference pass
    batches its rows in that order, and computes fewer FLOPs than in shortest text first."""
    trainer = idefics2_trainer(tiny_model, tmp_path, preference_rows(48), per_device_train_batch_size=2,
                               precompute_ref_batch_size=4)
    plain, collator = trainer.train_dataset, trainer.data_collator
    padded = {}
    for by_image_size in (False, True):
        trainer.train_dataset, trainer.data_collator = plain, collator
        assert packing.with_lengths(trainer, "dpo", by_image_size=by_image_size)
        padded[by_image_size] = padded_pixels(trainer.get_train_dataloader())
    alone = [int(collator([row])["attention_mask"].sum()) for row in plain]
    assert trainer.train_dataset[packing.TOKENS] == alone, "the tokens, kept for auto_batch's longest rows"
    # The sampler sorts megabatches of 12 rows (48 // (2 * 4)): by image size, only a batch at one of a megabatch's
    # two changes of size mixes sizes (and one more where the sampler moves the longest row to the front), each of
    # its two images padded by at most 32x32 - 32x20 pixels (one image a pair: the prompt is shared)
    mixed_batches = 48 // 12 * (len(SIZES) - 1) + 1
    assert padded[True] <= mixed_batches * 2 * (32 * 32 - 32 * 20) < padded[False], padded  # seen: 3072, 16896

    rows = trainer.train_dataset
    grouped = flops.count(lambda: reference_logprobs.compute(trainer, rows, "train"))
    chosen, rejected = reference_logprobs.compute(trainer, rows, "train")
    trainer.args.train_sampling_strategy = "random"  # no lengths to go by: shortest text first, as before
    assert grouped < flops.count(lambda: reference_logprobs.compute(trainer, rows, "train"))
    alone = [reference_logprobs.compute(trainer, rows.select([i]), "train") for i in range(0, 48, 5)]
    # test_shared_prefix's tolerance for reference log-probs: batched or alone, float32 sums of other kernels
    assert torch.allclose(chosen[::5], torch.cat([c for c, _ in alone]), atol=1e-5, rtol=5e-5)
    assert torch.allclose(rejected[::5], torch.cat([r for _, r in alone]), atol=1e-5, rtol=5e-5)


def test_the_reference_pass_in_that_order_gives_rows_of_none_one_and_two_images_their_own_logprobs(tiny_model,
                                                                                                     tmp_path):
    """Rows of none, one and two images of three sizes, batched by the reference pass in length grouping's order:
    every row gets the log-probs it has scored alone, in its place."""
    trainer = idefics2_trainer(tiny_model, tmp_path, preference_rows(24, images=(1, 2, 0, 1)),
                               per_device_train_batch_size=2, precompute_ref_batch_size=4)
    assert packing.with_lengths(trainer, "dpo", by_image_size=True)
    rows = trainer.train_dataset
    assert reference_logprobs.batching_order(trainer.args, rows) != list(range(len(rows))), "batched out of order"
    chosen, rejected = reference_logprobs.compute(trainer, rows, "train")
    alone = [reference_logprobs.compute(trainer, rows.select([i]), "train") for i in range(len(rows))]
    # Batched with rows of other image counts, a row's float32 sums move by up to 8e-5 relative (seen after this
    # file's other tests; 4.5e-5 run alone, in shortest text first's batches as in these): twice test_shared_prefix's
    # 5e-5 for rows of one image. A row scored in another's place, or with another's images, is off by whole units.
    assert torch.allclose(chosen, torch.cat([c for c, _ in alone]), atol=1e-5, rtol=1e-4)
    assert torch.allclose(rejected, torch.cat([r for _, r in alone]), atol=1e-5, rtol=1e-4)


def test_length_grouping_draws_each_epochs_order_from_the_seed_not_from_the_rngs_state(tiny_model, tmp_path):
    """transformers' length-grouped sampler shuffled from the global RNG's state: a resumed attempt, whose RNG stands
    elsewhere when its dataloader starts, drew another order and skipped that order's first batches (some rows
    trained twice in the epoch, others never), and the reference pass could not foresee the rows of a short run. The
    stages seed it by the run's seed and the epoch, which transformers hands the sampler (set_epoch)."""
    trainer = idefics2_trainer(tiny_model, tmp_path, preference_rows(48), per_device_train_batch_size=2)
    assert packing.with_lengths(trainer, "dpo", by_image_size=True)

    def order(epoch: int) -> list[int]:
        loader = trainer.get_train_dataloader()  # a new dataloader, as a resumed attempt's train() builds
        loader.set_epoch(epoch)
        return [row for batch in loader.batch_sampler for row in batch]

    first = order(0)
    torch.rand(1000)  # what runs between: a step's dropout, another attempt's start-up
    assert order(0) == first
    second = order(1)
    assert sorted(second) == sorted(first) == list(range(48)) and second != first, "each epoch its own order"
    torch.rand(1000)
    assert order(1) == second


class RowsTrained:
    """A collator that notes the ``row`` of every pair it batches, in order, and hands the rest on."""

    def __init__(self, collator, seen: list[int]):
        self.collator, self.seen = collator, seen

    def __call__(self, examples):
        self.seen.extend(example["row"] for example in examples)
        return self.collator([{k: v for k, v in example.items() if k != "row"} for example in examples])


def test_a_grouped_run_resumed_in_its_second_epoch_trains_the_batches_the_whole_run_trains(tiny_model, tmp_path):
    """transformers' own training loop (train(), its checkpoint, resume_from_checkpoint and skipping the batches
    done): 2 epochs of 12 pairs in batches of 2, stopped after step 9 (epoch 2) and resumed by a new trainer, train
    the same pairs in the same batches as the run never stopped. Unseeded, the resumed epoch drew its order from the
    RNG's state at the resume and skipped that order's first batches."""
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 9

    def run(folder, *, stop: bool = False, resume: bool = False) -> list[int]:
        rows = [{**row, "row": i} for i, row in enumerate(preference_rows(12))]
        trainer = idefics2_trainer(tiny_model, folder, rows, per_device_train_batch_size=2, num_train_epochs=2,
                                   max_steps=-1, save_strategy="steps", save_steps=9, learning_rate=1e-3)
        assert packing.with_lengths(trainer, "dpo", by_image_size=True)
        seen: list[int] = []
        trainer.data_collator = RowsTrained(trainer.data_collator, seen)
        if stop:
            trainer.add_callback(StopAfter())
        torch.rand(97 if resume else 1)  # attempts start with the RNG elsewhere
        trainer.train(resume_from_checkpoint=str(folder / "checkpoint-9") if resume else None)
        return seen

    whole = run(tmp_path / "whole")
    stopped = run(tmp_path / "stopped", stop=True)
    resumed = run(tmp_path / "stopped", resume=True)
    assert len(whole) == 24 and sorted(whole[:12]) == sorted(whole[12:]) == list(range(12))
    assert stopped[:18] == whole[:18], "the same run, up to its stop (accelerate fetches a batch ahead)"
    assert resumed == whole[18:], (resumed, whole[18:])


def test_a_grouped_dpo_run_shorter_than_an_epoch_scores_only_the_rows_it_draws(write_recipe):
    """The order foreseen, the reference pass scores the train rows of the run's steps, not all of them; a row the
    prediction missed would stop the step that draws it (reference_logprobs.refusing_unscored_rows)."""
    args = {"max_steps": 2, "per_device_train_batch_size": 2, "train_sampling_strategy": "group_by_length"}
    recipe = run_stages(write_recipe(family="idefics2", stages=["prepare", "dpo"], prepare={"max_rows": 16},
                                     dpo={"method": "lora", "args": args}))
    record = contract.read_json(recipe.run_dir / "dpo" / contract.SUCCESS_FILE)
    scored = record["reference_logprobs"]["splits"]["train"]
    assert record["steps"] == 2 and scored["computed"] <= 4 < record["rows"]["train"], (scored, record["rows"])


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_the_stages_batch_idefics2_rows_by_image_size_when_the_recipe_asks_for_length_grouping(stage, write_recipe,
                                                                                                capsys):
    """transformers' group_by_length reads a row's length from its input_ids, which DPO's vision rows do not have: the
    dpo stage failed on it with transformers' traceback. Both stages now give each row its place by image size for
    Idefics2, and train."""
    args = {"max_steps": 2, "per_device_train_batch_size": 2, "train_sampling_strategy": "group_by_length"}
    recipe = run_stages(write_recipe(family="idefics2", stages=["prepare", stage], prepare={"max_rows": 12},
                                     **{stage: {"method": "lora", "args": args}}))
    record = contract.read_json(recipe.run_dir / stage / contract.SUCCESS_FILE)
    assert record["steps"] == 2 and record["grouped_by_length"] is True
    assert f"{stage}: rows batched by image size, then length (group_by_length)" in capsys.readouterr().out
