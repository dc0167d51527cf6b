"""Shared-prefix DPO (issue 12): the packed forward gives TRL's concatenated forward's loss, rewards, metrics and
gradients on the same batch, for every family, in float32 on the CPU; and a wrong mask would show.

Tolerance: 1e-5 absolute on the loss; 1e-5 absolute plus 5e-5 relative on the logged metrics and the reference
log-probs (sums of 5 to 25 token log-probs near -6); 1e-5 absolute plus 1e-4 relative on gradients. The packed rows
compute the same terms as TRL's rows through other float32 kernels (an explicit mask rather than sdpa's causal path):
TRL's own sums differ by as much between sdpa and eager attention (5e-4 on -142 for the tiny LLaVA), and in float64
the two forwards agree to the last bit on the loss and to 1e-8 on gradients.
"""

from __future__ import annotations

import copy
import io
import json
import shutil

import pytest
import torch
from PIL import Image
from trl import DPOConfig, DPOTrainer

from jobs import contract, modeling, shared_prefix, synthetic
from jobs.contract import UserError
from jobs.families import FAMILIES, get_family
from jobs.recipe import Model

ATOL, RTOL, GRAD_RTOL = 1e-5, 5e-5, 1e-4
WORDS = "the chart has a red bar and a blue bar and the green bar is the tallest of the bars".split()


def pairs(images: tuple[int, ...] = (1, 1, 1)) -> list[dict]:
    """Preference rows whose prompts, images and answers all differ in length, as a padded batch has them; row i has
    images[i] images (the preference_messages format takes any number)."""
    rows = []
    for i, row in enumerate(synthetic.rlaif_v_rows(len(images), seed=3)):
        image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        sizes = [(40 + 16 * i + 24 * k, 72 - 8 * i - 16 * k) for k in range(images[i])]
        question = row["question"] + " " + " ".join(WORDS[: 3 * i])
        chosen = row["chosen"] + ", " + " ".join(WORDS[: 2 + 5 * i]) + "."
        rejected = row["rejected"] + ", " + " ".join(WORDS[: 9 - 4 * i]) + "."
        rows.append({
            "images": [image.resize(size) for size in sizes],
            "prompt": [{"role": "user",
                        "content": [{"type": "image"}] * images[i] + [{"type": "text", "text": question}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
        })
    return rows


def trainer(family: str, folder, tmp_path, *, full: bool = False, attn_implementation: str | None = None,
            images: tuple[int, ...] = (1, 1, 1)):
    """Our trainer on the tiny model: a random LoRA adapter (reference: adapter off), or full fine-tuning with the
    policy nudged off its reference copy, so that rewards are not all zero."""
    from datasets import Dataset
    from peft import LoraConfig

    spec = Model(name_or_path=str(folder), family=family, dtype="float32", attn_implementation=attn_implementation)
    fam, processor = get_family(family), modeling.load_processor(spec)
    torch.manual_seed(0)
    model = modeling.load_model(spec, dtype=torch.float32)
    ref_model = None
    if full:
        ref_model = copy.deepcopy(model).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    peft = None if full else LoraConfig(
        target_modules=modeling._listify(fam.lora_target_modules), task_type="CAUSAL_LM", init_lora_weights=False)
    data = fam.close_answers(Dataset.from_list(pairs(images)), processor)
    args = DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, report_to=[], use_cpu=True,
                     beta=0.5, max_length=None)
    dpo = shared_prefix.SharedPrefixDPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=fam.rendering_processor(processor),
        peft_config=peft,
    )
    dpo.data_collator = fam.collator(dpo.data_collator, processor)  # as the dpo stage: Llama 3.2 Vision's whole-row masks
    return dpo


def batch(trainer):
    return trainer._prepare_inputs(trainer.data_collator([dict(r) for r in trainer.train_dataset]))


def run(trainer, compute_loss, inputs):
    """(loss, the trainer's logged metrics, the gradient of every trainable parameter) of one loss function."""
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0  # a running count the metrics report
    loss = compute_loss(trainer, trainer.model, inputs, False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), metrics, grads


# Every family that packs pairs; one that cannot is left to TRL's rows, with its reason (Family.shared_prefix_unsupported)
SHARING = [pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: {family.shared_prefix_unsupported}"))
           if family.shared_prefix_unsupported else name for name, family in FAMILIES.items()]
TRL = DPOTrainer.compute_loss
SHARED = shared_prefix.SharedPrefixDPOTrainer.compute_loss


def assert_same(expected, actual):
    (loss, metrics, grads), (loss2, metrics2, grads2) = expected, actual
    torch.testing.assert_close(loss2, loss, atol=ATOL, rtol=0)
    assert metrics2.keys() == metrics.keys()
    for key in metrics:
        assert metrics2[key] == pytest.approx(metrics[key], abs=ATOL, rel=RTOL), key
    assert grads2.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], atol=ATOL, rtol=GRAD_RTOL, msg=lambda m: f"{name}: {m}")


def assert_same_reference(t, inputs):
    """The reference pass, as a cache of reference log-probs calls it."""
    theirs = DPOTrainer.compute_ref_log_probs(t, t.model, inputs)
    for mine, expected in zip(t.compute_ref_log_probs(t.model, inputs), theirs):
        torch.testing.assert_close(mine, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", SHARING)
def test_shared_prefix_equals_trls_concatenated_forward(family, tiny_model, tmp_path):
    t = trainer(family, tiny_model(family), tmp_path)
    inputs = batch(t)
    lengths = inputs["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1, "the batch must be padded for the test to cover padding"
    expected = run(t, TRL, inputs)
    assert expected[1]["rewards/chosen"] != 0 and expected[1]["rewards/rejected"] != 0
    assert_same(expected, run(t, SHARED, inputs))

    assert_same_reference(t, inputs)


@pytest.mark.parametrize("family", SHARING)
def test_rows_with_two_one_or_no_images_give_trls_result(family, tiny_model, tmp_path):
    """Issue 23 (2): TRL's collator lists each pair's images twice, so the chosen rows' images are the first half of
    every image tensor whatever the count per row; 7 images for 4 pairs is neither one per pair nor one per row."""
    t = trainer(family, tiny_model(family), tmp_path, images=(2, 0, 1, 2))
    inputs = batch(t)
    assert_same(run(t, TRL, inputs), run(t, SHARED, inputs))  # rewards: the reference (adapter off) packed too


def with_text_config(family: str, folder, out, **changes):
    """A copy of the tiny model in ``folder`` whose text model's config has ``changes``, its weights drawn anew (a
    changed model_type has other weights)."""
    import transformers

    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    config["text_config"].update(changes)
    (out / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model_class = getattr(transformers, get_family(family).model_class)
    model_class(transformers.AutoConfig.from_pretrained(out)).save_pretrained(out)
    return out


WINDOW = 16  # tokens; the tiny models' rows are 30 to 60


def test_a_sliding_window_shorter_than_the_rows_is_in_the_packed_mask(tiny_model, tmp_path, capsys):
    """Issue 23 (3): Idefics2's Mistral attends within a sliding window in every layer (4096 tokens in idefics2-8b).
    The packed mask keeps each token's window over its own row's columns, as transformers' masks give TRL's rows."""
    folder = with_text_config("idefics2", tiny_model("idefics2"), tmp_path / "model", sliding_window=WINDOW)
    t = trainer("idefics2", folder, tmp_path)
    inputs = batch(t)
    assert inputs["attention_mask"].sum(1).min() > WINDOW, "every row must be longer than the window"
    assert_same(run(t, TRL, inputs), run(t, SHARED, inputs))
    assert_same_reference(t, inputs)
    assert "TRL's rows" not in capsys.readouterr().out, "packed, not left to TRL's rows"


@pytest.mark.parametrize("window", [WINDOW, 512])
def test_full_and_sliding_layers_give_trls_result_whatever_the_window(window, tiny_model, tmp_path, capsys):
    """Issue 23 (3): PaliGemma 2's Gemma 2 alternates sliding-window and full layers; transformers hands a 4D mask to
    both alike, so a batch whose rows outrun the window is scored as TRL's rows, saying so once; within it, packed."""
    folder = with_text_config("paligemma", tiny_model("paligemma"), tmp_path / "model", model_type="gemma2",
                              sliding_window=window)
    t = trainer("paligemma", folder, tmp_path)
    assert set(t.model.config.get_text_config().layer_types) == {"sliding_attention", "full_attention"}
    inputs = batch(t)
    assert_same(run(t, TRL, inputs), run(t, SHARED, inputs))
    assert_same_reference(t, inputs)
    out = capsys.readouterr().out  # two batches scored, one line
    if window < inputs["attention_mask"].sum(1).max():
        assert out.count("TRL's rows") == 1, out
    else:
        assert "TRL's rows" not in out


@pytest.mark.parametrize("family", ["qwen2_vl", "paligemma"])
def test_shared_prefix_equals_trl_for_full_fine_tuning_with_eager_attention(family, tiny_model, tmp_path):
    """A reference copy of the model (full fine-tuning) and eager attention's additive mask."""
    t = trainer(family, tiny_model(family), tmp_path, full=True, attn_implementation="eager")
    inputs = batch(t)
    assert_same(run(t, TRL, inputs), run(t, SHARED, inputs))


@pytest.mark.parametrize("family", SHARING)
def test_an_answer_that_sees_the_other_answer_changes_the_result(family, tiny_model, tmp_path, monkeypatch):
    """Negative control: the test above would catch a mask that lets the rejected answer attend to the chosen one."""
    t = trainer(family, tiny_model(family), tmp_path)
    inputs = batch(t)
    expected = run(t, TRL, inputs)
    right = shared_prefix.Packing.attention

    def leaky(self, prefix, dtype, window=None):
        mask = right(self, prefix, None, window)
        chosen_to_rejected = (self.segment[:, :, None] == 2) & (self.segment[:, None, :] == 1)
        mask = mask | chosen_to_rejected[:, None]
        return mask if dtype is None else torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)

    monkeypatch.setattr(shared_prefix.Packing, "attention", leaky)
    leaked = run(t, SHARED, inputs)
    assert leaked[1]["logps/chosen"] == pytest.approx(expected[1]["logps/chosen"], abs=ATOL)
    assert abs(leaked[1]["logps/rejected"] - expected[1]["logps/rejected"]) > 1e-3


def test_qwen2_vl_answers_continue_the_prompts_multimodal_positions(tiny_model, tmp_path, monkeypatch):
    """Negative control for positions: plain 1D positions (not get_rope_index's) in the packed rows show."""
    t = trainer("qwen2_vl", tiny_model("qwen2_vl"), tmp_path)
    inputs = batch(t)
    expected = run(t, TRL, inputs)
    monkeypatch.setattr(shared_prefix, "positions",
                        lambda model, family, ids, mask, kwargs: torch.arange(ids.size(1)).expand_as(ids))
    moved = run(t, SHARED, inputs)
    assert abs(moved[1]["logps/chosen"] - expected[1]["logps/chosen"]) > 1e-3


def test_attention_without_custom_masks_is_refused_in_one_line_or_left_to_trls_rows(tiny_model):
    model = modeling.load_model(Model(name_or_path=str(tiny_model("llava")), family="llava"))
    assert shared_prefix.wanted(None, model), "on by default where supported"
    model.config.get_text_config()._attn_implementation = "flash_attention_2"
    with pytest.raises(UserError) as error:
        shared_prefix.wanted(True, model)
    assert str(error.value) == (
        "dpo.shared_prefix: model.attn_implementation flash_attention_2 takes no custom attention mask, which each "
        "answer's view of the shared prompt needs; use eager or sdpa; or set dpo.shared_prefix: false")
    assert not shared_prefix.wanted(None, model), "the default falls back to TRL's rows"
    assert not shared_prefix.wanted(False, model)


def test_a_text_model_with_layers_of_another_kind_is_left_to_trls_rows(tiny_model):
    """Issue 23 (3): transformers would hand a chunked (or linear) attention layer the packed mask like any other."""
    model = modeling.load_model(Model(name_or_path=str(tiny_model("llava")), family="llava"))
    model.config.get_text_config().layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(UserError) as error:
        shared_prefix.wanted(True, model)
    assert str(error.value) == ("dpo.shared_prefix: the text model's chunked_attention layers take no packed mask; "
                                "or set dpo.shared_prefix: false")
    assert not shared_prefix.wanted(None, model)


def test_a_family_whose_masks_one_pair_mask_cannot_give_is_left_to_trls_rows_issue_20(tiny_model):
    """Gemma 3: shared-prefix DPO scored its pairs 0.67 where TRL's rows give 0.78 (its images' two-way attention and
    its sliding window lost under one custom mask); the default now runs TRL's rows, and asking for it is one line."""
    model = modeling.load_model(Model(name_or_path=str(tiny_model("gemma3")), family="gemma3"))
    assert not shared_prefix.wanted(None, model)
    with pytest.raises(UserError, match=r"^dpo.shared_prefix: gemma3: its images' two-way attention \(token_type_ids\) "
                                        r"and its sliding-window layers need masks of their own, .*; or set "
                                        r"dpo.shared_prefix: false$"):
        shared_prefix.wanted(True, model)


def test_the_dpo_stage_encodes_each_prompt_once_by_default(write_recipe, capsys):
    from tests.conftest import run_stages

    train = {"method": "lora", "lora": {"r": 4, "lora_alpha": 8}, "args": {"max_steps": 1, "per_device_train_batch_size": 2}}
    recipe = run_stages(write_recipe(stages=["prepare", "dpo"], prepare={"max_rows": 8}, dpo=train))
    assert "prompt encoded once per pair (shared prefix)" in capsys.readouterr().out
    assert contract.read_json(recipe.run_dir / "dpo" / contract.SUCCESS_FILE)["shared_prefix"] is True


def test_the_benchs_sentence_answers_keep_the_charts_and_the_truth():
    """jobs.synthetic's sentences=True (the DPO bench's data): the same charts and questions, the chosen answer still
    the true one, answers of varying length."""
    words, sentences = synthetic.rlaif_v_rows(20, chart_share=0), synthetic.rlaif_v_rows(20, sentences=True, chart_share=0)
    assert [(r["image"], r["question"]) for r in words] == [(r["image"], r["question"]) for r in sentences]
    for word, sentence in zip(words, sentences):  # "Yes" or "Yes, there is a red bar." against a description
        assert sentence["chosen"].startswith(word["chosen"].split(",")[0].rstrip(".") + ", there is")
        assert sentence["rejected"].startswith(word["rejected"].split(",")[0].rstrip(".") + ", there is")
    assert len({len(r["chosen"]) for r in sentences}) > 5
