"""Merge and push: fold the run's last adapter into the base weights, check the merge, save, push.

The merge happens in float32 on one copy of the model: its logits on a few prepared samples are
taken with the adapter on top, then again after merging, and must agree within
``merge_push.logits_atol`` before anything is written. A QLoRA run is merged into the base loaded
unquantised. The model is then saved in ``merge_push.dtype`` with its processor, generation config
and a model card, and pushed to the hub in a single commit when ``merge_push.push`` is on; it is
not pushed when evaluate shows it worse than the base model on the primary metric, unless forced.

    local:      python -m jobs.merge_push --recipe recipes/tiny-demo.yaml
    in cluster: python -m jobs.merge_push     (HF_TOKEN from the Job's Secret)

Output: <run>/merge_push/model/ (safetensors, processor, generation config, README.md), _SUCCESS.json.
"""

from __future__ import annotations

import json
import os

from jobs import contract
from jobs import recipe as recipes

CHECK_SAMPLES = 4


def main(recipe: str = "", force: bool = False, **overrides):
    cfg = recipes.load(recipe, overrides)
    source = "dpo" if "dpo" in cfg.stages else "sft"
    evaluated = "evaluate" in cfg.stages
    stage = contract.begin(
        "merge_push", cfg.run_dir, cfg.stage_config("merge_push"),
        needs=cfg.needs("merge_push"), force=force,
    )
    if stage.skipped:
        return

    import torch
    from datasets import load_from_disk
    from peft import PeftModel

    from jobs import modeling
    from jobs.families import get_family

    verdict = compare_with_base(stage.input("evaluate") / "report.json", source, cfg) if evaluated else None
    if cfg.merge_push.push and verdict and verdict["worse"] and not cfg.merge_push.force:
        raise contract.UserError(f"merge_push: not pushing: {verdict['summary']}; set merge_push.force=true to push anyway")

    processor = modeling.load_processor(cfg.model)
    test = load_from_disk(stage.input("prepare") / source / "test")  # the data the source stage trained on
    rows = list(test.select(range(min(CHECK_SAMPLES, len(test)))))  # a small run's test split can hold fewer
    model = modeling.load_trained(cfg, stage.run_dir, source, dtype=torch.float32, device_map="auto")
    max_diff = None
    if isinstance(model, PeftModel):
        before = sample_logits(model, processor, rows)
        model = model.merge_and_unload()
        max_diff = (sample_logits(model, processor, rows) - before).abs().max().item()
        print(f"merge_push: merged logits differ from the adapter's by at most {max_diff:.2e} (limit {cfg.merge_push.logits_atol})")
        if not max_diff <= cfg.merge_push.logits_atol:
            raise contract.Failure(
                f"merge_push: the merged model's logits differ from the adapter model's by {max_diff:.3g} "
                f"(> merge_push.logits_atol {cfg.merge_push.logits_atol}): the merge is broken; nothing was written or pushed"
            )

    out = stage.work / "model"
    # generate() on the saved model stops where the chat template closes a turn, as evaluate's answers did
    model.generation_config.eos_token_id = get_family(cfg.model.family).stop_token_ids(processor, model.generation_config)
    model.to(modeling.resolve_dtype(cfg.merge_push.dtype)).save_pretrained(out)
    processor.save_pretrained(out)
    (out / "README.md").write_text(model_card(cfg, stage, source, verdict))
    pushed = push(out, cfg) if cfg.merge_push.push else None
    stage.finish(source=source, logits_max_diff=max_diff, pushed_to=pushed, evaluation=verdict)
    print(f"merge_push: {'pushed to ' + pushed if pushed else 'not pushed (merge_push.push is off)'}; model in {stage.out / 'model'}")


def sample_logits(model, processor, rows):
    """Logits of each sample's prompt and first answer, padded into one batch."""
    import torch

    from jobs.inference import input_device

    answer = "completion" if "completion" in rows[0] else "chosen"
    texts = [processor.apply_chat_template(row["prompt"] + row[answer], tokenize=False) for row in rows]
    images = [row["images"] for row in rows]
    inputs = processor(text=texts, images=images if any(images) else None, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**inputs.to(input_device(model))).logits.float()
    return logits * inputs["attention_mask"].unsqueeze(-1).to(logits.device)


def compare_with_base(report_path, source: str, cfg) -> dict:
    """Whether evaluate shows the tuned variant worse than base on the primary metric."""
    report = json.loads(report_path.read_text())
    metric = cfg.evaluate.primary_metric
    scores = {v: report["variants"].get(v, {}).get("metrics", {}).get(metric) for v in ("base", source)}
    if None in scores.values():
        missing = [v for v, s in scores.items() if s is None]
        raise contract.UserError(f"merge_push: evaluate reported no {metric} for {', '.join(missing)}; set evaluate.primary_metric to one it reports")
    worse = scores[source] < scores["base"]
    summary = f"{source} scores {scores[source]:.3f} {metric}, base {scores['base']:.3f}"
    return {"metric": metric, "scores": scores, "worse": worse, "summary": summary}


def push(folder, cfg) -> str:
    """Upload the folder in one commit; the token comes from $HF_TOKEN and never reaches a message."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    spec = cfg.merge_push
    token = os.environ.get("HF_TOKEN")
    api = HfApi(token=token)
    try:
        api.create_repo(spec.repo_id, private=spec.private, exist_ok=True, repo_type="model")
        if spec.revision:
            api.create_branch(spec.repo_id, branch=spec.revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=spec.repo_id, folder_path=str(folder), revision=spec.revision,
            commit_message=f"vlmjobs: {cfg.name} (run {cfg.run_id})",
        )
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        message = _scrub(str(e).splitlines()[0], token)
        error = contract.UserError if status in (401, 403, 404) else contract.Failure
        raise error(f"merge_push: pushing to {spec.repo_id} failed ({status}): {message}") from None
    except OSError as e:  # connection refused, DNS, timeouts: worth a retry
        raise contract.Failure(f"merge_push: pushing to {spec.repo_id} failed: {_scrub(str(e).splitlines()[0], token)}") from None
    return commit.commit_url


def model_card(cfg, stage, source: str, verdict: dict | None) -> str:
    """The hub's README.md: what was tuned from what, on which data, how it scored, with which libraries."""
    import yaml

    from jobs.report import format_table

    datasets = [s.path for s in (cfg.data.sft, cfg.data.dpo) if s is not None]
    metadata = {"base_model": cfg.model.name_or_path, "datasets": datasets, "library_name": "transformers",
                "tags": ["vlmjobs", *(s for s in ("sft", "dpo") if s in cfg.stages)]}
    report_path = stage.input("evaluate") / "report.json"
    evaluation = format_table(json.loads(report_path.read_text())) if report_path.is_file() else "Not evaluated."
    versions = contract.library_versions()
    return (
        f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---\n\n"
        f"# {cfg.name}\n\n{cfg.model.name_or_path} fine-tuned with vlmjobs ({' -> '.join(cfg.stages)}), "
        f"merged from the {source} stage's output.\n\n"
        f"## Evaluation\n\n```\n{evaluation}\n```\n\n" + (f"{verdict['summary']}.\n\n" if verdict else "")
        + f"## Recipe\n\n```yaml\n{yaml.safe_dump(cfg.to_dict(), sort_keys=False)}```\n\n"
        + "## Library versions\n\n" + "".join(f"- {k} {v}\n" for k, v in versions.items())
    )


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


if __name__ == "__main__":
    contract.entrypoint(main)
