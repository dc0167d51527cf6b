"""jobs.inference's completion log-probabilities, which evaluate's preference accuracy and margin are made of, against
TRL's own: DPOTrainer's reference pass on the same model and rows (issue 26, item 3)."""

from __future__ import annotations

import pytest
import torch
from trl import DPOConfig, DPOTrainer

from jobs import modeling
from jobs.families import get_family
from jobs.inference import completion_logprobs
from jobs.recipe import Model
from tests.test_shared_prefix import pairs

# Sums of 5 to 25 token log-probs near -6 (-30 to -145). TRL scores them with its chunked fused LM head
# (trl.trainer.utils.add_fused_lm_head), which agrees with a plain log_softmax to 3e-5 relative (3e-3 on -142), in
# float64 as in float32; one padding token counted would move a sum by about 6.
ATOL, RTOL = 1e-4, 1e-4


# Not Llama 3.2 Vision: TRL 1.16's reference pass fails on the tiny one with these rows (sdpa: "The size of tensor a (103)
# must match the size of tensor b (86)"), so TRL is no oracle for its cross-attention mask here
@pytest.mark.parametrize("family, pads", [("llava", "left"), ("qwen2_vl", "right")])
def test_completion_logprobs_are_trls_dpo_log_probs_on_answers_of_unequal_length(family, pads, tiny_model, tmp_path):
    """Rows with two images, none, one, scored whole, in pairs and one by one (the row without images alone: a batch
    with no image inputs), by a processor whose tokenizer pads on the left unless told otherwise (as checkpoints saved
    for batched generation do) or on the right: TRL's collators name the side for prompts and answers, and so must we."""
    from datasets import Dataset

    spec = Model(name_or_path=str(tiny_model(family)), family=family, dtype="float32")
    fam = get_family(family)
    processor = fam.rendering_processor(modeling.load_processor(spec))  # as evaluate scores (scoring_processor)
    processor.tokenizer.padding_side = pads
    model = modeling.load_model(spec, dtype=torch.float32)
    rows = fam.close_answers(Dataset.from_list(pairs((2, 0, 1, 2))), processor)  # answers closed as training closes them
    args = DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=len(rows), report_to=[], use_cpu=True,
                     max_length=None)
    trainer = DPOTrainer(model=model, args=args, train_dataset=rows, processing_class=processor)
    inputs = trainer._prepare_inputs(trainer.data_collator([dict(row) for row in trainer.train_dataset]))
    chosen_lengths, rejected_lengths = inputs["completion_mask"].sum(1).chunk(2)
    assert (chosen_lengths != rejected_lengths).all() and len(set(chosen_lengths.tolist())) == len(rows), \
        "answers of unequal length, padded within each batch"
    theirs = DPOTrainer.compute_ref_log_probs(trainer, trainer.model, inputs)

    scored = [dict(row) for row in rows]
    for key, expected in zip(("chosen", "rejected"), theirs):
        ours = torch.tensor(completion_logprobs(trainer.model, processor, scored, key, batch_size=len(rows)))
        torch.testing.assert_close(ours, expected.cpu().float(), atol=ATOL, rtol=RTOL, msg=lambda m: f"{key}: {m}")

    # In batches smaller than the rows, as evaluate scores them (evaluate.batch_size): the same sums, batch after batch
    for key, expected in zip(("chosen", "rejected"), theirs):
        for size in (2, 1):
            ours = torch.tensor(completion_logprobs(trainer.model, processor, scored, key, batch_size=size))
            torch.testing.assert_close(ours, expected.cpu().float(), atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"{key}, {size} a batch: {m}")
