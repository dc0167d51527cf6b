"""Batched generation and completion log-likelihoods, tokenized exactly as TRL's collators do in training.

``processor`` is the family's rendering processor (``Family.rendering_processor``): its template writes the BOS that
add_special_tokens would add, so the ids are the ones the checkpoint's own usage gives."""

from __future__ import annotations

from collections.abc import Iterable


PER_TOKEN = ("token_type_ids", "mm_token_type_ids")  # inputs a processor gives per token beside the ids


def _batches(rows: list, size: int) -> Iterable[list]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def input_device(model):
    """The device of the model's first weights, where its inputs go (with device_map="auto" accelerate's hooks
    move activations on from there)."""
    return next(model.parameters()).device


def _images(rows: list[dict]):
    images = [row["images"] for row in rows]
    return images if any(images) else None


def prompt_inputs(processor, texts: list[str], rows: list[dict]):
    """Rendered prompts with their rows' images and videos' stored frames, left-padded: ids, image and video inputs as
    SFT's collator builds them (add_special_tokens=False; the rendering processor's template wrote the BOS)."""
    from jobs import video

    kwargs = dict(text=texts, images=_images(rows), padding=True, padding_side="left", return_tensors="pt",
                  add_special_tokens=False)
    videos = [video.row_videos(row) for row in rows]
    if any(frames for frames, _ in videos):
        return video.encode(processor, videos, **kwargs)
    return processor(**kwargs)


def generate_answers(
    model, processor, rows: list[dict], *, max_new_tokens: int = 32, batch_size: int = 8, progress=None,
    stop_token_ids: list[int] | None = None,
) -> list[str]:
    """Greedy answers to each row's ``prompt`` (messages) about its ``images``, ending at any of ``stop_token_ids``
    (default: the model's generation config)."""
    import torch

    model.eval()
    tokenizer = processor.tokenizer
    answers = []
    for batch in _batches(rows, batch_size):
        texts = [processor.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False) for row in batch]
        inputs = prompt_inputs(processor, texts, batch).to(input_device(model))
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_token_ids,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers += [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
        if progress:
            progress(len(answers), len(rows))
    return answers


def completion_logprobs(model, processor, rows: list[dict], key: str, *, batch_size: int = 8) -> list[float]:
    """Sum of log-probabilities of each row's ``key`` answer (e.g. chosen) given its prompt and images."""
    import torch
    from trl.data_utils import apply_chat_template

    model.eval()
    scores = []
    for batch in _batches(rows, batch_size):
        rendered = [apply_chat_template({"prompt": row["prompt"], "completion": row[key]}, processor) for row in batch]
        prompts = prompt_inputs(processor, [r["prompt"] for r in rendered], batch)
        # The answers through the processor, as TRL's collators tokenize them: its per-token types are the family's own
        # for text (PaliGemma's suffix 1, Gemma 3's and Qwen2-VL's 0: there 1 marks an image's tokens)
        completions = processor(
            text=[r["completion"] for r in rendered], padding=True, padding_side="right", return_tensors="pt",
            add_special_tokens=False,
        )
        input_ids = torch.cat([prompts["input_ids"], completions["input_ids"]], dim=1)
        attention = torch.cat([prompts["attention_mask"], completions["attention_mask"]], dim=1)
        inputs = {k: v for k, v in prompts.items() if k not in ("input_ids", "attention_mask")}
        for name in PER_TOKEN:  # not ``key``: that names the answer column, read again for the next batch
            if name in inputs:
                inputs[name] = torch.cat([inputs[name], completions[name]], dim=1)
        if "cross_attention_mask" in inputs:  # Llama 3.2 Vision: which tokens see the image, over prompt and answer
            from jobs.cross_attention import complete_masks

            inputs = complete_masks({**inputs, "input_ids": input_ids}, processor.image_token_id)
            inputs.pop("input_ids")
        device = input_device(model)
        with torch.no_grad():
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), **{k: v.to(device) for k, v in inputs.items()}
            ).logits.float()
        start = prompts["input_ids"].shape[1]
        logprobs = torch.log_softmax(logits[:, start - 1 : -1], dim=-1)
        targets = completions["input_ids"].to(device)
        token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        scores += (token_logprobs * completions["attention_mask"].to(device)).sum(dim=1).tolist()
    return scores
