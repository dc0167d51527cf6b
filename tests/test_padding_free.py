"""Padding-free SFT batches (issue 12): the same loss and gradients as TRL's padded batches, per family.

The oracle is TRL's own padded SFT: one SFTTrainer per family builds its vision collator; its padded batch and the same
batch through jobs.packing.PaddingFree go through the trainer's compute_loss with the trainer's own token count
(num_items_in_batch), in float32 on CPU. The negative control packs the rows with positions that do not restart: one
causal sequence where each row attends to the rows before it, which must change the loss.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from jobs import modeling, packing
from jobs import recipe as recipes
from jobs.contract import UserError
from jobs.families import get_family

# float32 on CPU: a packed row and the same row padded differ only in summation order inside the kernels
LOSS_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
GRAD_TOLERANCE = dict(rtol=1e-4, atol=1e-6)
# gemma3 is left out: packed, its loss is not padded SFT's (Family.packing_unsupported says so and the stage refuses it)
PACKED_FAMILIES = ["llava", "qwen2_vl", "idefics2", "idefics3", "internvl", "qwen2_5_vl", "qwen3_vl", "smolvlm2", "mllama"]


def rows(n: int = 3) -> list[dict]:
    """Prompt/completion rows as prepare writes them: images of different sizes, questions and answers of different
    lengths, so that the padded batch has real padding on both sides of the prompt."""
    sizes = [(64, 48), (112, 84), (40, 90), (96, 96)]
    out = []
    for i in range(n):
        image = Image.new("RGB", sizes[i % len(sizes)], (40 * i, 255 - 30 * i, 90))
        question = "What is the value of the " + "highest " * (3 * i) + f"bar number {i}?"
        answer = " ".join(["twelve"] * (1 + 4 * i))
        out.append({
            "images": [image],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
        })
    return out


def trainer_for(family_name: str, model_dir, tmp_path, attn: str):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    spec = recipes.Model(name_or_path=str(model_dir), family=family_name, attn_implementation=attn)
    family = get_family(family_name)
    processor = modeling.load_processor(spec)
    model = modeling.load_model(spec, dtype=torch.float32)
    model.eval()  # no dropout: the two batches must see the same function
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_length=None, bf16=False,
                     dataloader_pin_memory=False, remove_unused_columns=False)  # as the stage sets it (training.trl_config)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows(4)),
                         processing_class=family.rendering_processor(processor))
    trainer.data_collator = family.collator(trainer.data_collator, processor)  # as the sft stage
    return trainer, model


def loss_and_grads(trainer, model, batch):
    model.zero_grad(set_to_none=True)
    count = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=count)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    # None where the model takes no num_items_in_batch (Qwen2.5-VL's and Qwen3-VL's accepts_loss_kwargs = False): each
    # batch's loss is then its own mean over labelled tokens, which packing must keep too
    return loss.detach(), grads, None if count is None else int(count)


class AttentionCalls:
    """The query length of every maskless causal call to torch's sdpa (how ROW_SDPA attends a packed row's text), and
    the query and key lengths of every other call."""

    def __init__(self, monkeypatch):
        self.causal, self.other = [], []
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
            if is_causal and attn_mask is None:
                self.causal.append(query.shape[-2])
            else:
                self.other.append((query.shape[-2], key.shape[-2]))
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)


# sdpa_by_row: sdpa as the sft stage runs it on padding-free batches (packing.attend_by_row), each row attended alone
@pytest.mark.parametrize("attn", ["sdpa", "eager", "sdpa_by_row"])
@pytest.mark.parametrize("family", PACKED_FAMILIES)
def test_padding_free_loss_and_gradients_equal_padded_sft(family, attn, tiny_model, tmp_path, monkeypatch):
    trainer, model = trainer_for(family, tiny_model(family), tmp_path, "sdpa" if attn == "sdpa_by_row" else attn)
    examples = rows(3)
    padded = trainer.data_collator([dict(e) for e in examples])
    assert (padded["attention_mask"] == 0).any(), "the rows must differ in length, or there is nothing to unpad"
    packed = packing.PaddingFree(trainer.data_collator, model)([dict(e) for e in examples])
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, int(padded["attention_mask"].sum()))

    padded_loss, padded_grads, padded_count = loss_and_grads(trainer, model, padded)
    if attn == "sdpa_by_row":
        assert packing.attend_by_row(model) == packing.ROW_SDPA
        calls = AttentionCalls(monkeypatch)
    packed_loss, packed_grads, packed_count = loss_and_grads(trainer, model, packed)
    if attn == "sdpa_by_row":  # the text layers attended each row alone, as often as each other, and none the batch
        row_lengths = padded["attention_mask"].sum(dim=1).tolist()
        layers = len(calls.causal) // len(row_lengths)  # mllama's cross-attention layers are not among them
        assert layers >= 1 and sorted(calls.causal) == sorted(row_lengths * layers), calls.causal
        joined = packed["input_ids"].shape[1]
        assert (joined, joined) not in calls.other, calls.other  # mllama's cross-attention: (joined, image tokens)
    assert packed_count == padded_count, "num_items_in_batch (the loss's normaliser) must count the same tokens"
    torch.testing.assert_close(packed_loss, padded_loss, **LOSS_TOLERANCE)
    assert packed_grads.keys() == padded_grads.keys()
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], **GRAD_TOLERANCE, msg=lambda m: f"{name}: {m}")

    # Negative control: the same packed row with positions running on across rows is one causal sequence in which
    # each row attends to those before it (Qwen2-VL's rotary positions, beside them, stay each row's own)
    crossing = dict(packed)
    crossing["position_ids"] = torch.arange(packed["input_ids"].shape[1])[None]
    crossing_loss, _, _ = loss_and_grads(trainer, model, crossing)
    gap, allowed = abs(crossing_loss - padded_loss), LOSS_TOLERANCE["atol"] + LOSS_TOLERANCE["rtol"] * abs(padded_loss)
    assert gap > 10 * allowed, f"the control must fail the equivalence by far (gap {gap:.2e}, tolerance {allowed:.2e})"


def test_qwen2_vl_rotary_positions_are_each_rows_own(tiny_model, tmp_path):
    """Each row's multimodal positions start at 0 and are what get_rope_index gives that row alone."""
    trainer, model = trainer_for("qwen2_vl", tiny_model("qwen2_vl"), tmp_path, "sdpa")
    examples = rows(3)
    packed = packing.PaddingFree(trainer.data_collator, model)([dict(e) for e in examples])
    start = 0
    for example in examples:
        alone = trainer.data_collator([dict(example)])
        n = alone["input_ids"].shape[1]
        own, _ = model.model.get_rope_index(alone["input_ids"], alone["mm_token_type_ids"], alone["image_grid_thw"])
        torch.testing.assert_close(packed[packing.MROPE_KEY][:, 0, start:start + n], own[:, 0])
        assert packed["position_ids"][0, start:start + n].tolist() == list(range(n))
        start += n
    assert start == packed["input_ids"].shape[1]


def test_paligemma_is_refused_with_a_one_line_error_and_off_by_default():
    family = get_family("paligemma")
    assert packing.enabled(None, family, None) is False
    with pytest.raises(UserError, match=r"^sft.padding_free: paligemma cannot train packed rows: .*prefix-LM") as caught:
        packing.enabled(True, family, "sdpa")
    assert "\n" not in str(caught.value)


def test_gemma3_trains_padded_even_with_flash_attention_issue_20():
    """Where packed rows are the default (flash attention's varlen kernels), Gemma 3 stays padded: packed, its loss
    was not padded SFT's (test_padding_free_loss_and_gradients_equal_padded_sft, run on it, gave 6.15764 against
    6.15745)."""
    family = get_family("gemma3")
    assert packing.enabled(None, family, "flash_attention_2") is False
    with pytest.raises(UserError, match=r"^sft.padding_free: gemma3 cannot train packed rows: its packed loss differs"):
        packing.enabled(True, family, "sdpa")


def test_recipe_refuses_padding_free_where_it_cannot_work():
    base = {"name": "t", "stages": ["prepare", "sft"], "data": {"sft": {"path": "x", "format": "chartqa"}}}
    with pytest.raises(UserError, match="sft.padding_free: paligemma cannot train packed rows"):
        recipes.from_dict({**base, "model": {"name_or_path": "x", "family": "paligemma"}, "sft": {"padding_free": True}})
    with pytest.raises(UserError, match="sft.padding_free: attention implementation 'kernels-community/x'"):
        recipes.from_dict({**base, "model": {"name_or_path": "x", "family": "llava", "attn_implementation": "kernels-community/x"},
                           "sft": {"padding_free": True}})
    default = recipes.from_dict({**base, "model": {"name_or_path": "x", "family": "llava"}})
    assert default.sft.padding_free is None
    assert packing.enabled(default.sft.padding_free, get_family("llava"), "sdpa") is True, "attended by row (issue 24)"
    assert packing.enabled(default.sft.padding_free, get_family("llava"), "flash_attention_2") is True
    for joined in ("eager", "flex_attention"):  # a mask over the whole joined batch: opt-in
        assert packing.enabled(default.sft.padding_free, get_family("llava"), joined) is False, joined
    assert packing.enabled(True, get_family("llava"), "sdpa") is True
    assert packing.enabled(False, get_family("llava"), "sdpa") is False


def test_synthetic_charts_vary_in_size_on_request_and_keep_their_answers():
    """The bench's data (issue 12): image sizes drawn from a range; the default data set's are squares of varying
    side (issue 26), which center-cropping processors keep whole."""
    import io

    from jobs import synthetic

    varied = synthetic.chartqa_rows(40, seed=3, image_sides=(16, 160))
    plain = synthetic.chartqa_rows(40, seed=3)
    sizes = {Image.open(io.BytesIO(row["image"]["bytes"])).size for row in varied}
    assert len(sizes) > 30 and all(16 <= side <= 160 for size in sizes for side in size)
    squares = {Image.open(io.BytesIO(row["image"]["bytes"])).size for row in plain}
    assert len(squares) > 10 and all(w == h and synthetic.SIDES[0] <= w <= synthetic.SIDES[1] for w, h in squares)
    assert [(r["query"], r["label"]) for r in varied] == [(r["query"], r["label"]) for r in plain]
    with pytest.raises(UserError, match="only chartqa images vary in size"):
        synthetic.write("rlaif-v", "/nonexistent", image_sides=(16, 160))


def test_group_by_length_batches_vision_rows_of_like_length_counting_their_image_tokens(tiny_model, tmp_path):
    """transformers' train_sampling_strategy group_by_length needs each row's length, which vision rows lack: the
    stage gives it the number of tokens the collator makes of the row, Qwen2-VL's image tokens included (the row
    collated alone is the oracle), and the batches then pad far less than the random ones on the same rows."""
    from datasets import Dataset

    from jobs import packing

    trainer, model = trainer_for("qwen2_vl", tiny_model("qwen2_vl"), tmp_path, "sdpa")
    trainer.args.train_sampling_strategy, trainer.args.per_device_train_batch_size = "group_by_length", 2
    trainer._train_batch_size = 2  # the Trainer's copy, taken when it was built
    trainer.train_dataset = Dataset.from_list(rows(40))
    held_out = {"charts": Dataset.from_list(rows(3)), "more charts": Dataset.from_list(rows(5))}  # evaluate()'s names
    trainer.eval_dataset = held_out

    def collated_alone(split) -> list[int]:
        return [int(trainer.data_collator([row])["input_ids"].shape[-1]) for row in split]

    alone = collated_alone(trainer.train_dataset)
    assert packing.with_lengths(trainer, "sft")
    assert trainer.train_dataset["length"] == alone and len(set(alone)) > 20
    for name, split in held_out.items():  # several evaluation sets, each measured (failed before: a dict has no columns)
        assert trainer.eval_dataset[name]["length"] == collated_alone(split)

    def padding() -> int:
        return sum(int((1 - batch["attention_mask"]).sum()) for batch in trainer.get_train_dataloader())

    grouped = padding()
    trainer.args.train_sampling_strategy = "random"
    shuffled = padding()
    assert grouped < shuffled / 2, (grouped, shuffled)  # seen: 3606 against 9160 (megabatches of 10 rows here)
    trainer.args.train_sampling_strategy = "group_by_length"
    assert float(trainer.compute_loss(model, dict(next(iter(trainer.get_train_dataloader()))))) > 0


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava"])
def test_padding_free_logs_the_number_of_tokens_trained_on(family, tiny_model, tmp_path):
    """Issue 23: TRL counts a padding-free batch's tokens as position_ids.size(1); Qwen2-VL's packed positions were
    (4, 1, length), so it logged 1 token a batch. The oracle is the same rows padded: their attention mask's sum
    (what TRL counts of a padded batch), over one optimizer step of the trainer's own loop."""
    trainer, model = trainer_for(family, tiny_model(family), tmp_path, "sdpa")
    padded = trainer.data_collator([dict(row) for row in trainer.train_dataset])  # the step's one batch: all 4 rows
    trainer.data_collator = packing.PaddingFree(trainer.data_collator, model)
    trainer.args.max_steps = trainer.args.logging_steps = 1
    model.train()
    trainer.train()
    logged = [entry["num_tokens"] for entry in trainer.state.log_history if "num_tokens" in entry]
    assert logged == [int(padded["attention_mask"].sum())]


def test_row_lengths_split_where_transformers_sees_a_new_packed_row():
    """ROW_SDPA splits a packed batch where transformers' own packed-sequence mask starts a new row (a position that
    does not follow the one before), the oracle here; read once per position tensor (one device sync a forward)."""
    from transformers.masking_utils import find_packed_sequence_indices

    for positions in ([0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3], [0, 0, 0], [0, 1, 2, 5, 6, 0, 1], [3, 4, 0, 1, 2]):
        position_ids = torch.tensor([positions])
        rows = find_packed_sequence_indices(position_ids)
        expected = [len(positions)] if rows is None else torch.bincount(rows[0]).tolist()
        assert packing._LastRowLengths()(position_ids) == expected, positions
    lengths = packing._LastRowLengths()
    first = torch.tensor([[0, 1, 0, 1, 2]])
    assert lengths(first) == [2, 3] and lengths(first) is lengths(first), "one read for the layers of a forward"
    assert lengths(torch.tensor([[0, 1, 2, 0, 1]])) == [3, 2], "a new tensor is read again"
