"""Merge and push: fold the run's last adapter into the weights it was trained against, check the merge, save, push.

The model shipped is the model evaluated (issue 11). Evaluate scores each stage's adapter on the weights it
trained on: after QLoRA, the 4-bit NF4 base. So the adapter is merged, in float32, into those NF4 weights
dequantized, not into the original ones (``modeling.load_trained``); then the merged model's logits on a few
prepared samples must agree within ``merge_push.logits_atol`` with the logits of the model evaluate scored
(the adapter on its 4-bit or full-precision base, both computed in float32) before anything is written.
The model is then saved in ``merge_push.dtype`` with its processor, generation config and a model card whose
evaluation names the variant shipped, and pushed to the hub in one commit when ``merge_push.push`` is on.

Pushing is gated on evaluate (``gate``): a run without evaluate pushes only with ``merge_push.push_unevaluated``,
the run must not have regressed against the recipe's last good night (evaluate's verdict, jobs.history; exit 3),
and the pushed variant must not be worse than base on ``evaluate.primary_metric`` by more than one standard
error of the difference, unless ``merge_push.force``. Without a push nothing is gated.

    local:      python -m jobs.merge_push --recipe recipes/tiny-demo.yaml
    in cluster: python -m jobs.merge_push     (HF_TOKEN from the Job's Secret)

Output: <run>/merge_push/model/ (safetensors, processor, generation config, README.md), _SUCCESS.json.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from jobs import contract, entry
from jobs import recipe as recipes
from jobs.metrics import NOT_PROPORTIONS  # evaluate's metrics that are not fractions of samples: the gate allows no noise

CHECK_SAMPLES = 4


def main(recipe: str = "", force: bool = False, **overrides):
    cfg = recipes.load(recipe, overrides)
    source = cfg.shipped_stage  # the last trained stage
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

    report = json.loads((stage.input("evaluate") / "report.json").read_text()) if evaluated else None
    verdict = gate(report, source, cfg)
    license_ = model_license(cfg)  # before the merge: a push without a license fails in seconds, not after it

    processor = modeling.load_processor(cfg.model)  # saved with the model: the checkpoint's own template
    scoring = get_family(cfg.model.family).rendering_processor(processor)  # the check sees the tokens evaluate saw
    test = load_from_disk(stage.input("prepare") / recipes.DATA_KIND[source] / "test")  # the data the source stage trained on
    rows = list(test.select(range(min(CHECK_SAMPLES, len(test)))))  # a small run's test split can hold fewer
    # The model evaluate scored, in float32: the adapter on the 4-bit base after QLoRA (computing in float32
    # too, so that the check compares weights, not arithmetic), on full-precision weights after LoRA.
    quantize = modeling.quantization(getattr(cfg, source))
    quantize = None if quantize is None else {**quantize, "bnb_4bit_compute_dtype": torch.float32}
    model = modeling.load_trained(cfg, stage.run_dir, source, quantize=quantize, dtype=torch.float32, device_map="auto")
    max_diff = None
    if isinstance(model, PeftModel):
        before = sample_logits(model, scoring, rows)
        if quantize is not None:  # merged into the dequantized NF4 weights, on a fresh full-precision load
            del model
            model = modeling.load_trained(cfg, stage.run_dir, source, merge=True, dtype=torch.float32, device_map="auto")
        else:
            model = model.merge_and_unload()
        max_diff = (sample_logits(model, scoring, rows) - before).abs().max().item()
        print(f"merge_push: merged logits differ from the evaluated model's by at most {max_diff:.2e} (limit {cfg.merge_push.logits_atol})")
        if not max_diff <= cfg.merge_push.logits_atol:
            raise contract.Failure(
                f"merge_push: the merged model's logits differ from the evaluated model's by {max_diff:.3g} "
                f"(> merge_push.logits_atol {cfg.merge_push.logits_atol}): the merge is broken; nothing was written or pushed"
            )

    out = stage.work / "model"
    # generate() on the saved model stops where the chat template closes a turn, as evaluate's answers did
    model.generation_config.eos_token_id = get_family(cfg.model.family).stop_token_ids(processor, model.generation_config)
    model.to(modeling.resolve_dtype(cfg.merge_push.dtype)).save_pretrained(out)
    processor.save_pretrained(out)
    (out / "README.md").write_text(model_card(cfg, source, report, verdict, license_))
    _same_mode(out)
    pushed = push(out, cfg) if cfg.merge_push.push else None
    metrics = report["variants"].get(source, {}).get("metrics") if report else None
    stage.finish(source=source, logits_max_diff=max_diff, pushed_to=pushed, evaluation=verdict, metrics=metrics, license=license_)
    print(f"merge_push: {'pushed to ' + pushed if pushed else 'not pushed (merge_push.push is off)'}; model in {stage.out / 'model'}")


def sample_logits(model, processor, rows):
    """Logits of each sample's prompt and first answer, padded into one batch, tokenized as in training and evaluate
    (BOS included: prompt_inputs)."""
    import torch

    from jobs.inference import input_device, prompt_inputs

    answer = "completion" if "completion" in rows[0] else "chosen"
    texts = [processor.apply_chat_template(row["prompt"] + row[answer], tokenize=False) for row in rows]
    inputs = prompt_inputs(processor, texts, rows)
    with torch.no_grad():
        logits = model(**inputs.to(input_device(model))).logits.float()
    return logits * inputs["attention_mask"].unsqueeze(-1).to(logits.device)


def gate(report: dict | None, source: str, cfg) -> dict | None:
    """Whether the run may push, from evaluate's report; the comparison with base (or None) for the card.

    Nothing is gated unless ``merge_push.push``: a merge for a look, or for another evaluation, needs no base
    variant. A push needs evaluate's scores of the variant pushed and of base on the primary metric (the recipe
    makes sure evaluate runs both, unless ``merge_push.push_unevaluated``), and is refused when
    ``compare_with_base`` finds it worse beyond noise, unless ``merge_push.force``. A night that evaluate found
    regressed against the recipe's last good night (jobs.history) is refused first, with its own exit code (3).
    """
    spec, metric = cfg.merge_push, cfg.evaluate.primary_metric
    if report is None:  # the recipe allows a push without evaluate only with push_unevaluated
        return None
    regression = report.get("regression") or {}  # evaluate's verdict against the recipe's last good night
    if spec.push and regression.get("regressed") and not spec.force:
        raise contract.Regressed(f"merge_push: not pushing: {regression['summary']}; set merge_push.force=true to push anyway")
    scores = {v: report["variants"].get(v, {}).get("metrics", {}).get(metric) for v in ("base", source)}
    missing = [v for v, score in scores.items() if score is None]
    if missing and spec.push and not spec.push_unevaluated:
        raise contract.UserError(
            f"merge_push: not pushing: evaluate reported no {metric} for {', '.join(missing)}; "
            f"add {' and '.join(missing)} to evaluate.variants, or set evaluate.primary_metric to a metric it reports"
        )
    if missing:
        return None
    verdict = compare_with_base(report, source, metric)
    if spec.push and verdict["worse"] and not spec.force:
        raise contract.UserError(f"merge_push: not pushing: {verdict['summary']}; set merge_push.force=true to push anyway")
    return verdict


def compare_with_base(report: dict, source: str, metric: str) -> dict:
    """Whether the tuned variant is worse than base on ``metric`` by more than the noise of a finite test set.

    The rule: worse when ``base - tuned > standard error of the difference``, the two scores read as proportions
    of the metric's n test samples (report.json's ``counts``): ``sqrt((b(1 - b) + t(1 - t)) / n)``. It treats the two
    as independent samples, since the report keeps no per-sample pairs; on the same samples the paired error is
    usually smaller, so the rule leans towards pushing. F1, precision and recall are read the same way. A metric that
    is no proportion (mean_margin, or a value outside [0, 1]) gets no allowance: any drop is worse.
    """
    variants = report["variants"]
    base, tuned = variants["base"]["metrics"][metric], variants[source]["metrics"][metric]
    n = min(variants[v].get("counts", {}).get(metric, 0) for v in ("base", source))
    proportions = metric not in NOT_PROPORTIONS and n > 0 and all(0 <= score <= 1 for score in (base, tuned))
    error = math.sqrt((base * (1 - base) + tuned * (1 - tuned)) / n) if proportions else 0.0
    worse = base - tuned > error
    noise = f" over {n} samples, standard error of the difference {error:.3f}" if proportions else ""
    summary = f"{source} scores {tuned:.3f} {metric}, base {base:.3f}{noise}"
    return {"metric": metric, "scores": {"base": base, source: tuned}, "samples": n, "standard_error": error,
            "worse": worse, "summary": summary}


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


def model_license(cfg) -> str | None:
    """The license the card declares: ``merge_push.license``, else the base model card's (its README's YAML front
    matter, in the model folder or the hub repo). A push needs one; a local merge goes without, with a warning."""
    if cfg.merge_push.license:
        return cfg.merge_push.license
    found, why_not = base_model_card_license(cfg.model)
    if found:
        return found
    if cfg.merge_push.push:
        raise contract.UserError(f"merge_push.license: {why_not}; set merge_push.license to the base model's (e.g. apache-2.0)")
    print(f"merge_push: warning: the model card has no license: {why_not}; set merge_push.license")
    return None


def base_model_card_license(spec) -> tuple[str | None, str]:
    """(license, or None and why not) from the front matter of the base model's README.md."""
    from pathlib import Path

    from huggingface_hub import hf_hub_download
    from huggingface_hub.repocard import metadata_load

    if Path(spec.name_or_path).is_dir():
        readme = Path(spec.name_or_path) / "README.md"
        if not readme.is_file():
            return None, f"the base model has no card ({readme})"
    else:
        try:
            readme = hf_hub_download(spec.name_or_path, "README.md", revision=spec.revision)
        except Exception as e:  # no README, not on the hub, offline: the recipe key is the way out
            return None, f"the base model's card (README.md of {spec.name_or_path}) could not be read ({type(e).__name__})"
    try:
        license_ = (metadata_load(readme) or {}).get("license")
    except Exception:  # a front matter that is not YAML names nothing
        license_ = None
    return (str(license_), "") if license_ else (None, f"the base model's card ({readme}) names no license")


def model_card(cfg, source: str, report: dict | None, verdict: dict | None, license_: str | None) -> str:
    """The hub's README.md: what was tuned from what, on which data, how the shipped model scored, how to use it, with
    which libraries."""
    import yaml

    from jobs.hub import looks_like_path
    from jobs.report import format_table

    base = cfg.model.name_or_path
    local = looks_like_path(base) or Path(base).expanduser().exists()
    datasets = [s.path for s in (cfg.data.sft, cfg.data.dpo) if s is not None and not looks_like_path(s.path)]
    metadata = {**({} if local else {"base_model": base}), **({"license": license_} if license_ else {}),
                **({"datasets": datasets} if datasets else {}), "library_name": "transformers",
                "tags": ["vlmjobs", *(s for s in recipes.TRAINING_STAGES if s in cfg.stages)]}
    if report is None:
        evaluation = "Not evaluated.\n\n"
    else:
        shipped = (f"This model is the `{source}` row, merged as evaluated." if source in report["variants"]
                   else f"The `{source}` stage's model was not among the variants evaluated.")
        evaluation = f"```\n{format_table(report)}\n```\n\n{shipped}{_better_before(report, source)}\n\n"
        if report.get("regression"):  # against the recipe's last good night
            evaluation += f"Against the last good night: {report['regression']['summary']}.\n\n"
    # The recipe as it trained, without where it ran (cluster, GPUs, namespaces): a reader reruns it elsewhere.
    recipe = {key: ({k: v for k, v in value.items() if k != "resources"} if isinstance(value, dict) else value)
              for key, value in cfg.to_dict().items() if key not in ("kubernetes", "resources")}
    versions = contract.library_versions()
    described = f"a local model (`{base}`)" if local else f"[{base}](https://huggingface.co/{base})"
    return (
        f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---\n\n"
        f"# {cfg.name}\n\n{described} fine-tuned with vlmjobs ({' -> '.join(cfg.stages)}), "
        f"merged from the {source} stage's output.\n\n"
        f"## Evaluation\n\n{evaluation}" + (f"{verdict['summary']}.\n\n" if verdict else "")
        + f"## Usage\n\n```python\n{usage(cfg)}```\n\n"
        + f"## Recipe\n\n```yaml\n{yaml.safe_dump(recipe, sort_keys=False)}```\n\n"
        + "## Library versions\n\n" + "".join(f"- {k} {v}\n" for k, v in versions.items())
    )


def usage(cfg) -> str:
    """How a user runs the pushed model: its class and AutoProcessor, the chat template it was trained with (BOS
    included, as processor(text=...) adds it), generation stopping where a turn ends."""
    from jobs.families import get_family

    pushed = cfg.merge_push.push and cfg.merge_push.repo_id
    model_id = cfg.merge_push.repo_id if pushed else "path/to/this/folder"
    # Pushed to a branch, the model is there and not on main (which may hold another model, or none).
    source = f"model_id, revision={cfg.merge_push.revision!r}" if pushed and cfg.merge_push.revision else "model_id"
    family = get_family(cfg.model.family)
    model_class = family.model_class
    special = "" if family.card_special_tokens else ", add_special_tokens=False"  # the template wrote BOS
    return (
        "from PIL import Image\n"
        f"from transformers import AutoProcessor, {model_class}\n\n"
        f"model_id = {model_id!r}\n"
        f"model = {model_class}.from_pretrained({source})\n"
        f"processor = AutoProcessor.from_pretrained({source})\n"
        'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What does the chart show?"}]}]\n'
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)\n"
        f'inputs = processor(text=prompt, images=[Image.open("image.png")], return_tensors="pt"{special}).to(model.device)\n'
        "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)\n"
        'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
    )


def _better_before(report: dict, source: str) -> str:
    """A warning when another trained variant scored higher on the primary metric than the one shipped."""
    metric = report["primary_metric"]
    ours = report["variants"].get(source, {}).get("metrics", {}).get(metric)
    if ours is None:
        return ""
    scores = {v: s.get("metrics", {}).get(metric) for v, s in report["variants"].items() if v in recipes.TRAINING_STAGES}
    better = [(v, score) for v, score in scores.items() if v != source and score is not None and score > ours]
    return "".join(f"\n\n**Warning:** the `{v}` model scored higher on {metric} ({score:.3f}) than this one ({ours:.3f})."
                   for v, score in better)


def _same_mode(folder: Path) -> None:
    """Every file as readable as the card (safetensors writes its files through a private temporary file, mode 600)."""
    mode = (folder / "README.md").stat().st_mode & 0o777
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


if __name__ == "__main__":
    entry.entrypoint(main, imports=("datasets", "peft:PeftModel", "jobs.modeling"))
