"""Sampling that does not depend on how GRPO's generation batch is split over processes, for the test that compares a
sharded GRPO with one process (tests/test_fsdp.py).

transformers' ``generate`` draws every completion of a process from that process's random state in one batched draw,
so the completion a row gets depends on which process holds it and on where in that process's batch it stands: one
process holding rows 0-11 and two holding 0-5 and 6-11 (each with the same seed) sample different completions for
rows 6-11. Here each row's next token is still drawn from the distribution generate samples from (the model's, after
the generation config's processors: suppressed and biased tokens), but by the inverse of its cumulative probabilities
at a uniform number keyed by (the generate call, the row's place in the generation batch of all processes, the
token's position): the same completions whatever the split.

``install()`` puts it in this process; SITECUSTOMIZE, written on a stage run's PYTHONPATH, in the processes
``accelerate launch`` starts (they alone have LOCAL_RANK), since the sharded stage runs in processes of its own.
"""

from __future__ import annotations

import functools
import itertools
import os
import random

SITECUSTOMIZE = """
import os
if "LOCAL_RANK" in os.environ:  # a stage process accelerate launched, not the launcher's own
    from tests import grpo_sampling
    grpo_sampling.install()
"""


def uniform(call: int, row: int, position: int) -> float:
    """The uniform number in [0, 1) that picks a token: Python's str seed is hashed with SHA-512, the same in every
    process."""
    return random.Random(f"{call}/{row}/{position}").random()


def keyed_by_row(call: int):
    """A logits processor for one generate call: keeps only the token each row draws (all other scores -inf), so that
    generate's own multinomial draw can only take it."""
    import torch
    from transformers import LogitsProcessor

    class KeyedByRow(LogitsProcessor):
        position = 0

        def __call__(self, input_ids, scores):
            # Each process holds as many rows (accelerate's even batches): the rows before this process's are the
            # rows of the processes before it
            first = int(os.environ.get("RANK", "0")) * scores.shape[0]
            cumulative = scores.float().softmax(-1).cumsum(-1)
            draws = torch.tensor([[uniform(call, first + i, self.position)] for i in range(scores.shape[0])])
            picked = torch.searchsorted(cumulative, draws * cumulative[:, -1:]).clamp(max=scores.shape[1] - 1)
            self.position += 1
            return torch.full_like(scores, -float("inf")).scatter(1, picked, 0.0)

    return KeyedByRow()


def install():
    """Every ``generate`` of this process samples with ``keyed_by_row``; returns the function that undoes it. Only
    sampling at temperature 1 without top-k, top-p or min-p (GRPOConfig's defaults): generate applies those after a
    caller's processors, so the draw here would leave them out."""
    from transformers import LogitsProcessorList
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin.generate
    calls = itertools.count()

    @functools.wraps(original)
    def generate(self, *args, generation_config=None, logits_processor=None, **kwargs):
        config = generation_config or self.generation_config
        warped = {key: getattr(config, key) for key in ("temperature", "top_k", "top_p", "min_p")}
        if not config.do_sample or logits_processor or warped != {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None}:
            raise AssertionError(f"grpo_sampling replaces plain sampling only: do_sample {config.do_sample}, {warped}, "
                                 f"logits_processor {logits_processor}")
        return original(self, *args, generation_config=generation_config,
                        logits_processor=LogitsProcessorList([keyed_by_row(next(calls))]), **kwargs)

    GenerationMixin.generate = generate
    return functools.partial(setattr, GenerationMixin, "generate", original)


def brevity(completions, **kwargs):
    """A reward that tells a tiny random model's completions apart (evaluate's accuracy gives them all 0, and so every
    advantage 0): shorter text scores higher."""
    return [1.0 / (1 + len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]

