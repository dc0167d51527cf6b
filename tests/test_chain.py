"""dpo, evaluate and merge_push on a short chain of the tiny LLaVA: their outputs, the DPO starting
points, the merge check, and the push path against a local target and a failing hub."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from jobs import contract, evaluate, merge_push, modeling
from jobs import recipe as recipes
from tests.conftest import recipe_file, run_stages, subprocess_env

QUICK = {
    "stages": ["prepare", "sft", "dpo", "evaluate", "merge_push"],
    "sft": {"method": "lora", "lora": {"r": 4, "lora_alpha": 8}, "args": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1}},
    "dpo": {"method": "lora", "lora": {"r": 4, "lora_alpha": 8}, "args": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1}},
    "evaluate": {"max_samples": 4, "max_new_tokens": 4, "batch_size": 4},
}


@pytest.fixture(scope="module")
def lora_chain(tmp_path_factory, tiny_model, synthetic_data):
    """The whole chain once, LoRA SFT then LoRA DPO on SFT's merged adapter; tests copy its run folder."""
    folder = tmp_path_factory.mktemp("chain")
    sources = {kind: synthetic_data(kind) for kind in ("chartqa", "rlaif-v")}
    path = recipe_file(folder, tiny_model("llava"), sources, name="chain", **QUICK)
    return run_stages(path), path


def copy_run(chain, tmp_path, **sections) -> Path:
    """The chain's recipe pointed at a copy of its run folder (lineage paths are run-relative, so it moves)."""
    recipe, path = chain
    data = yaml.safe_load(path.read_text())
    data["run"]["root"] = str(tmp_path / "runs")
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    shutil.copytree(recipe.run_dir, tmp_path / "runs" / recipe.run_id)
    copy = tmp_path / "chain.yaml"
    copy.write_text(yaml.safe_dump(data))
    return copy


def test_every_stage_commits_and_dpo_logs_its_metrics_at_each_step(lora_chain):
    recipe, _ = lora_chain
    for stage in recipe.stages:
        assert (recipe.run_dir / stage / contract.SUCCESS_FILE).is_file(), stage
    logged = [json.loads(line) for line in (recipe.run_dir / "dpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert all(key in r for r in steps), key


def event_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every scalar in a folder's TensorBoard event files, read as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_each_training_stage_writes_tensorboard_events_into_its_own_folder(lora_chain):
    """Issue 13 (9): curves to watch live, by default, in <run>/<stage>/tensorboard; SFT's with its eval loss."""
    recipe, _ = lora_chain
    scalars = {}
    for stage in ("sft", "dpo"):
        folder = recipe.run_dir / stage / "tensorboard"
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1, f"{stage}: one event file, from the main process"
        scalars[stage] = event_scalars(folder)
        assert [step for step, _ in scalars[stage]["train/loss"]] == [1, 2], stage  # logging_steps 1, max_steps 2
        assert not (recipe.run_dir / stage / "checkpoints" / "runs").exists(), "not transformers' default folder"
    assert "train/rewards/margins" in scalars["dpo"] and "train/rewards/accuracies" in scalars["dpo"]

    # SFT evaluates on the eval split (at the last step here: its default interval is save_steps' 100), and
    # metrics.jsonl, which report.md plots, holds the same number as the event file.
    logged = [json.loads(line) for line in (recipe.run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [(r["step"], r["eval_loss"]) for r in logged if "eval_loss" in r]
    assert len(evaluated) == 1 and evaluated[0][0] == 2 and evaluated[0][1] > 0
    assert scalars["sft"]["eval/loss"] == [(2, pytest.approx(evaluated[0][1]))]


def test_lora_dpo_on_merged_sft_uses_the_adapter_switched_off_as_reference(lora_chain):
    recipe, _ = lora_chain
    record = contract.read_json(recipe.run_dir / "dpo" / contract.SUCCESS_FILE)
    assert record["reference"] == "the model with its adapter switched off"
    assert record["starting_from"] == "sft adapter merged"
    assert modeling.read_lineage(recipe.run_dir, "dpo") == {"base": "base", "merged": ["sft/model"], "adapter": "dpo/model"}


def test_evaluate_reports_every_variant_with_the_same_samples(lora_chain):
    recipe, _ = lora_chain
    out = recipe.run_dir / "evaluate"
    report = json.loads((out / "report.json").read_text())
    assert list(report["variants"]) == ["base", "prompted", "sft", "dpo"]
    for variant in report["variants"].values():
        assert variant["samples"] == 8  # 4 answer rows and 4 preference rows
        metrics = variant["metrics"]
        assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["preference_accuracy"] <= 1
        assert "mean_margin" in metrics and "no_f1" in metrics and "yes_f1" in metrics
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 * 8
    assert {p["split"] for p in predictions} == {"sft/test", "dpo/test"}
    assert all({"question", "answer", "gold", "correct"} <= set(p) for p in predictions)


def test_the_report_tells_the_run_s_story(lora_chain):
    """Issue 13 (10): the run, the comparison in one figure, each metric's samples and definition, answers side by side."""
    recipe, _ = lora_chain
    out = recipe.run_dir / "evaluate"
    report = json.loads((out / "report.json").read_text())
    for variant in report["variants"].values():
        assert set(variant["counts"]) == set(variant["metrics"])
        assert variant["counts"]["accuracy"] == 4 and variant["counts"]["preference_accuracy"] == 4
    reported = {metric for variant in report["variants"].values() for metric in variant["metrics"]}
    assert set(report["definitions"]) == reported, "every metric evaluate reports has its definition"
    assert report["family"] == "llava"

    markdown = (out / "report.md").read_text()
    assert "![every metric of every variant](comparison.png)" in markdown and (out / "comparison.png").stat().st_size > 5000
    assert not list(out.glob("metric_*.png"))
    assert f"- `accuracy` (4 samples): {report['definitions']['accuracy']}" in markdown
    run = markdown.split("## The run\n\n")[1].split("\n## ")[0]
    assert run.startswith(f"- model: `{recipe.model.name_or_path}` (family `llava`)")
    assert re.search(r"^\| sft \| lora \| 2 \| [0-9.]+ \| 400 \| [0-9.]+ \| (\d+m )?\d+s \|$", run, re.M), run
    assert re.search(r"^\| dpo \| lora, from sft adapter merged \| 2 \| ", run, re.M), run
    examples = markdown.split("## Example answers\n\n")[1].split("\n## ")[0]
    for split in ("sft/test", "dpo/test"):
        table = examples.split(f"### {split}\n\n")[1].split("\n\n")[0].splitlines()
        assert table[0] == "| question | reference | `base` | `prompted` | `sft` | `dpo` |"
        assert len(table) == 2 + 3, "the first three questions"


def test_prompted_variant_gets_a_system_prompt_and_base_none():
    recipe = recipes.from_dict({"name": "r", "stages": ["prepare"], "model": {"name_or_path": "m", "family": "llava"},
                                "data": {"sft": {"path": "d", "format": "chartqa"}}})
    user = {"role": "user", "content": [{"type": "text", "text": "Q"}]}
    trained_system = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    row = {"prompt": [trained_system, user]}
    assert evaluate.with_prompt(row, "base", recipe)["prompt"] == [user]
    assert evaluate.with_prompt(row, "prompted", recipe)["prompt"] == [trained_system, user]
    assert evaluate.with_prompt(row, "sft", recipe)["prompt"] == [trained_system, user]
    prompted = evaluate.with_prompt({"prompt": [user]}, "prompted", recipe)["prompt"]
    assert prompted[0]["content"][0]["text"] == recipe.evaluate.system_prompt and prompted[1] == user


def test_merged_model_loads_as_its_base_class_with_a_card_and_the_check_recorded(lora_chain):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    recipe, _ = lora_chain
    out = recipe.run_dir / "merge_push"
    record = contract.read_json(out / contract.SUCCESS_FILE)
    assert record["source"] == "dpo" and record["pushed_to"] is None
    assert 0 <= record["logits_max_diff"] <= recipe.merge_push.logits_atol
    model_dir = out / "model"
    assert not modeling.is_adapter(model_dir), "merged weights, not an adapter"
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    assert str(model.dtype) == "torch.bfloat16"
    AutoProcessor.from_pretrained(model_dir)
    card = (model_dir / "README.md").read_text()
    assert "## Evaluation" in card and "preference_accuracy" in card and "## Usage" in card
    assert "transformers" in card and "trl" in card
    # issue 13: a local base model is no hub id for the card's metadata; the recipe without where it ran
    assert "base_model:" not in card.split("---")[1] and f"a local model (`{recipe.model.name_or_path}`)" in card
    assert "\nkubernetes:" not in card and "gpu_memory_gib" not in card
    assert "- cuda none (CPU)\n" in card, "the CUDA of a run, not of torch's build"
    modes = {path.name: path.stat().st_mode & 0o777 for path in model_dir.iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_the_card_warns_when_an_earlier_stage_scored_higher_on_the_primary_metric():
    report = {"primary_metric": "accuracy", "variants": {
        "base": {"metrics": {"accuracy": 0.9}}, "sft": {"metrics": {"accuracy": 1.0}}, "dpo": {"metrics": {"accuracy": 0.013}}}}
    assert merge_push._better_before(report, "dpo") == (
        "\n\n**Warning:** the `sft` model scored higher on accuracy (1.000) than this one (0.013).")
    assert merge_push._better_before(report, "sft") == "", "base is no earlier stage; the gate compares with it"


def test_dpo_can_train_the_sft_adapter_further_against_a_frozen_copy_of_it(lora_chain, tmp_path):
    path = copy_run(lora_chain, tmp_path, dpo={"sft_adapter": "continue"})
    recipe = run_stages(path, "dpo", force=True)
    record = contract.read_json(recipe.run_dir / "dpo" / contract.SUCCESS_FILE)
    assert record["reference"] == "frozen copy of the adapter"
    assert modeling.read_lineage(recipe.run_dir, "dpo") == {"base": "base", "merged": [], "adapter": "dpo/model"}
    assert modeling.load_trained(recipe, recipe.run_dir, "dpo") is not None


def test_continuing_an_adapter_with_full_dpo_is_a_user_error(lora_chain, tmp_path):
    path = copy_run(lora_chain, tmp_path, dpo={"sft_adapter": "continue", "method": "full"})
    with pytest.raises(contract.UserError, match="dpo.sft_adapter: continue trains SFT's adapter further; it needs dpo.method lora or qlora"):
        run_stages(path, "dpo", force=True)


def test_a_broken_merge_is_caught_before_anything_is_written(lora_chain, tmp_path, monkeypatch):
    """Simulate a merge bug: merge_and_unload returns weights that are off by a little."""
    import torch
    from peft.tuners.lora import LoraModel

    path = copy_run(lora_chain, tmp_path)
    recipe = recipes.load(path)
    shutil.rmtree(recipe.run_dir / "merge_push")
    merge = LoraModel.merge_and_unload

    def broken(self, *args, **kwargs):
        model = merge(self, *args, **kwargs)
        with torch.no_grad():
            model.get_output_embeddings().weight.add_(0.05)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", broken)
    with pytest.raises(contract.Failure, match=r"the merged model's logits differ from the evaluated model's by .* the merge is broken; nothing was written or pushed"):
        merge_push.main(recipe=str(path))
    assert not (recipe.run_dir / "merge_push").exists()


class FailingHub(BaseHTTPRequestHandler):
    """A hub on loopback that refuses every call with the status in its server's ``status``."""

    def _refuse(self):
        self.server.requests.append((self.command, self.path, self.headers.get("authorization")))
        body = json.dumps({"error": "refused by the test hub"}).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _refuse

    def log_message(self, *args):
        pass


@pytest.fixture
def failing_hub():
    def start(status: int):
        server = ThreadingHTTPServer(("127.0.0.1", 0), FailingHub)
        server.status, server.requests = status, []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    servers = []
    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.parametrize("status, exit_code", [(401, 2), (403, 2), (500, 1)])
def test_a_failing_hub_gives_one_line_no_output_and_never_shows_the_token(lora_chain, tmp_path, failing_hub, status, exit_code):
    hub = failing_hub(status)
    path = copy_run(lora_chain, tmp_path, merge_push={"push": True, "repo_id": "org/tiny-llava-dpo", "license": "apache-2.0"})
    recipe = recipes.load(path)
    shutil.rmtree(recipe.run_dir / "merge_push")
    token = "hf_testsecret0123456789"
    env = subprocess_env(HF_TOKEN=token, HF_ENDPOINT=f"http://127.0.0.1:{hub.server_port}", HF_HUB_OFFLINE="0",
                         HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    done = subprocess.run([sys.executable, "-m", "jobs.merge_push", f"--recipe={path}"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == exit_code, done.stderr
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert error_lines == [done.stderr.strip().splitlines()[-1]]
    assert error_lines[0].startswith(f"error: merge_push: pushing to org/tiny-llava-dpo failed ({status}): ")
    assert "Traceback" not in done.stderr
    assert token not in done.stdout + done.stderr
    assert ("POST", "/api/repos/create", f"Bearer {token}") in hub.requests, "the token went to the hub, and only there"
    assert not (recipe.run_dir / "merge_push").exists(), "no partial result that looks complete"


class AcceptingHub(BaseHTTPRequestHandler):
    """A hub on loopback that takes a push as huggingface_hub sends it: create the repo, a branch, validate the card's
    metadata (accepted), ask how each file is to be uploaded (inline here, where the hub would send the weights to
    its storage), commit. Requests and commits are kept."""

    def do_POST(self):
        from urllib.parse import unquote

        path = unquote(self.path.split("?")[0])
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append((self.command, path))
        endpoint = f"http://127.0.0.1:{self.server.server_port}"
        repo = re.fullmatch(r"/api/models/(\w+/[\w.-]+)/(branch|preupload|commit)/(.+)", path)
        if path == "/api/repos/create":
            answer = {"url": f"{endpoint}/{json.loads(body)['organization']}/{json.loads(body)['name']}"}
        elif (repo and repo.group(2) == "branch") or path == "/api/validate-yaml":
            answer = {}
        elif repo and repo.group(2) == "preupload":
            answer = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                for f in json.loads(body)["files"]]}  # fmt: skip
        elif repo and repo.group(2) == "commit":
            lines = [json.loads(line) for line in body.splitlines()]
            self.server.commits.append((repo.group(3), {line["value"]["path"]: line["value"]["content"]
                                                        for line in lines if line["key"] == "file"}))  # fmt: skip
            answer = {"commitUrl": f"{endpoint}/{repo.group(1)}/commit/{'0' * 40}", "commitOid": "0" * 40}
        else:
            return self._answer(404, {"error": f"not served here: {self.command} {path}"})
        self._answer(200, answer)

    do_GET = do_HEAD = do_PUT = do_POST

    def _answer(self, status: int, answer: dict):
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_a_push_to_a_branch_commits_there_and_its_card_loads_from_it(lora_chain, tmp_path):
    """merge_push.revision: the branch is created, the one commit goes to it, and the card's snippet loads that branch
    (from main, its reader would get another model, or none)."""
    import base64

    server = ThreadingHTTPServer(("127.0.0.1", 0), AcceptingHub)
    server.requests, server.commits = [], []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    branch = "runs/exp-7"
    path = copy_run(lora_chain, tmp_path, merge_push={"push": True, "repo_id": "org/tiny-llava-dpo", "license": "apache-2.0",
                                                      "revision": branch})  # fmt: skip
    recipe = recipes.load(path)
    shutil.rmtree(recipe.run_dir / "merge_push")
    env = subprocess_env(HF_TOKEN="hf_test0123456789", HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HUB_OFFLINE="0")
    try:
        done = subprocess.run([sys.executable, "-m", "jobs.merge_push", f"--recipe={path}"], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    assert ("POST", f"/api/models/org/tiny-llava-dpo/branch/{branch}") in server.requests
    ((committed_to, files),) = server.commits
    assert committed_to == branch
    shipped = recipe.run_dir / "merge_push" / "model"
    assert sorted(files) == sorted(str(f.relative_to(shipped)) for f in shipped.rglob("*") if f.is_file())
    card = base64.b64decode(files["README.md"]).decode()
    snippet = card.split("## Usage\n\n```python\n")[1].split("```")[0]
    assert f"model = LlavaForConditionalGeneration.from_pretrained(model_id, revision={branch!r})\n" in snippet
    assert f"processor = AutoProcessor.from_pretrained(model_id, revision={branch!r})\n" in snippet
    record = contract.read_json(recipe.run_dir / "merge_push" / contract.SUCCESS_FILE)
    assert record["pushed_to"] == f"http://127.0.0.1:{server.server_port}/org/tiny-llava-dpo/commit/{'0' * 40}"


def gate_report(base: float, tuned: float, n: int, metric: str = "accuracy") -> dict:
    return {"variants": {v: {"metrics": {metric: score}, "counts": {metric: n}} for v, score in (("base", base), ("dpo", tuned))}}


@pytest.mark.parametrize("name, base, tuned, n, worse, summary", [
    ("within one standard error", 0.5, 0.45, 100, False,
     "dpo scores 0.450 accuracy, base 0.500 over 100 samples, standard error of the difference 0.071"),
    ("beyond one standard error", 0.5, 0.4, 100, True,
     "dpo scores 0.400 accuracy, base 0.500 over 100 samples, standard error of the difference 0.070"),
    ("the same drop on 1000 samples", 0.5, 0.45, 1000, True,
     "dpo scores 0.450 accuracy, base 0.500 over 1000 samples, standard error of the difference 0.022"),
    ("better", 0.5, 0.6, 10, False,
     "dpo scores 0.600 accuracy, base 0.500 over 10 samples, standard error of the difference 0.221"),
])
def test_the_gate_tolerates_one_standard_error_of_the_difference(name, base, tuned, n, worse, summary):
    """Issue 11: a strict < on a few hundred samples refused models that were only unlucky."""
    verdict = merge_push.compare_with_base(gate_report(base, tuned, n), "dpo", "accuracy")
    assert verdict["worse"] is worse and verdict["summary"] == summary


def test_a_metric_that_is_no_proportion_gets_no_allowance():
    verdict = merge_push.compare_with_base(gate_report(1.0, 0.9, 100, "mean_margin"), "dpo", "mean_margin")
    assert verdict["worse"] and verdict["summary"] == "dpo scores 0.900 mean_margin, base 1.000"


def quick_recipe(**sections):
    return recipes.from_dict({"name": "r", "stages": ["prepare", "sft", "dpo", "evaluate", "merge_push"],
                              "model": {"name_or_path": "m", "family": "llava"},
                              "data": {"sft": {"path": "d", "format": "chartqa"}, "dpo": {"path": "d", "format": "rlaif-v"}},
                              **sections})


def test_the_gate_compares_only_when_pushing():
    """Issue 11: merging for a look needs no base variant and refuses nothing; pushing does."""
    no_base = {"variants": {"dpo": {"metrics": {"accuracy": 0.1}, "counts": {"accuracy": 4}}}}
    assert merge_push.gate(no_base, "dpo", quick_recipe()) is None
    assert merge_push.gate(gate_report(0.9, 0.1, 100), "dpo", quick_recipe())["worse"]  # reported, not refused
    pushing = quick_recipe(merge_push={"push": True, "repo_id": "org/x"})
    with pytest.raises(contract.UserError, match=r"^merge_push: not pushing: dpo scores 0.100 accuracy, base 0.900 over 100 samples, "
                       r"standard error of the difference 0.042; set merge_push.force=true to push anyway$"):
        merge_push.gate(gate_report(0.9, 0.1, 100), "dpo", pushing)
    forced = quick_recipe(merge_push={"push": True, "repo_id": "org/x", "force": True})
    assert merge_push.gate(gate_report(0.9, 0.1, 100), "dpo", forced)["worse"]
    with pytest.raises(contract.UserError, match=r"^merge_push: not pushing: evaluate reported no accuracy for base; add base to "
                       r"evaluate.variants, or set evaluate.primary_metric to a metric it reports$"):
        merge_push.gate(no_base, "dpo", pushing)


def test_a_push_needs_evaluate_of_base_and_the_pushed_variant_unless_named_unevaluated():
    """Issue 11: a run without evaluate pushed unevaluated; now the recipe says so by name, or is refused."""
    push = {"push": True, "repo_id": "org/x"}
    with pytest.raises(contract.UserError, match=r"merge_push.push: a push needs the evaluate stage, which the run lacks; add evaluate "
                       r"to stages, or set merge_push.push_unevaluated=true to push an unevaluated model"):
        quick_recipe(stages=["prepare", "sft", "merge_push"], merge_push=push)
    with pytest.raises(contract.UserError, match=r"merge_push.push: the push is gated on evaluate comparing dpo with base; add base "
                       r"to evaluate.variants, or set merge_push.push_unevaluated=true"):
        quick_recipe(merge_push=push, evaluate={"variants": ["dpo"]})
    quick_recipe(stages=["prepare", "sft", "merge_push"], merge_push={**push, "push_unevaluated": True})
    quick_recipe(stages=["prepare", "sft", "merge_push"])  # nothing pushed: nothing to gate


def test_merge_push_merges_without_a_base_variant_when_not_pushing(lora_chain, tmp_path):
    path = copy_run(lora_chain, tmp_path, evaluate={"variants": ["dpo"]})
    recipe = recipes.load(path)
    report = recipe.run_dir / "evaluate" / "report.json"
    data = json.loads(report.read_text())
    report.write_text(json.dumps({**data, "variants": {"dpo": data["variants"]["dpo"]}}))
    merge_push.main(recipe=str(path), force=True)
    record = contract.read_json(recipe.run_dir / "merge_push" / contract.SUCCESS_FILE)
    assert record["evaluation"] is None and record["metrics"] == data["variants"]["dpo"]["metrics"]


def test_merge_push_refuses_to_push_a_worse_model(lora_chain, tmp_path):
    path = copy_run(lora_chain, tmp_path, merge_push={"push": True, "repo_id": "org/x"}, evaluate={"primary_metric": "accuracy"})
    recipe = recipes.load(path)
    report = recipe.run_dir / "evaluate" / "report.json"
    data = json.loads(report.read_text())
    data["variants"]["base"]["metrics"]["accuracy"] = data["variants"]["dpo"]["metrics"]["accuracy"] + 0.5
    report.write_text(json.dumps(data))
    with pytest.raises(contract.UserError, match=r"merge_push: not pushing: dpo scores .* accuracy, base .*; set merge_push.force=true to push anyway"):
        merge_push.main(recipe=str(path), force=True)


def model_folder(tmp_path, card: str | None) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    if card is not None:
        (folder / "README.md").write_text(card)
    return str(folder)


@pytest.mark.parametrize("name, card, merge_push_section, license_", [
    ("from the base model's card", "---\nlicense: apache-2.0\ntags: [vision]\n---\n# M\n", {}, "apache-2.0"),
    ("the recipe's wins", "---\nlicense: apache-2.0\n---\n", {"license": "mit"}, "mit"),
    ("the recipe's when the base has no card", None, {"license": "mit"}, "mit"),
])
def test_the_card_declares_the_license_of_the_base_card_or_the_recipe(name, card, merge_push_section, license_, tmp_path):
    recipe = quick_recipe(model={"name_or_path": model_folder(tmp_path, card), "family": "llava"}, merge_push=merge_push_section)
    found = merge_push.model_license(recipe)
    assert found == license_
    text = merge_push.model_card(recipe, "dpo", None, None, found)
    assert f"\nlicense: {license_}\n" in text.split("---")[1]


@pytest.mark.parametrize("name, card, why", [
    ("no card", None, "the base model has no card ({folder}/README.md)"),
    ("a card without one", "---\ntags: [vision]\n---\n", "the base model's card ({folder}/README.md) names no license"),
    ("a card without front matter", "# M\n", "the base model's card ({folder}/README.md) names no license"),
])
def test_a_push_without_a_license_is_refused_and_a_local_merge_warned(name, card, why, tmp_path, capsys):
    folder = model_folder(tmp_path, card)
    why = why.format(folder=folder)
    local = quick_recipe(model={"name_or_path": folder, "family": "llava"})
    assert merge_push.model_license(local) is None
    assert capsys.readouterr().out == f"merge_push: warning: the model card has no license: {why}; set merge_push.license\n"
    assert "\nlicense:" not in merge_push.model_card(local, "dpo", None, None, None).split("---")[1]
    pushing = quick_recipe(model={"name_or_path": folder, "family": "llava"}, merge_push={"push": True, "repo_id": "org/x"})
    with pytest.raises(contract.UserError, match=re.escape(f"merge_push.license: {why}; set merge_push.license to the base model's (e.g. apache-2.0)")):
        merge_push.model_license(pushing)


def test_a_hub_base_model_whose_card_cannot_be_read_needs_the_recipe_key():
    """The suite runs offline (conftest), as a cluster without hub access would: the card is unreadable."""
    pushing = quick_recipe(model={"name_or_path": "org/model", "family": "llava"}, merge_push={"push": True, "repo_id": "org/x"})
    with pytest.raises(contract.UserError, match=r"^merge_push.license: the base model's card \(README.md of org/model\) could not be "
                       r"read \(\w+\); set merge_push.license to the base model's \(e.g. apache-2.0\)$"):
        merge_push.model_license(pushing)
    named = quick_recipe(model={"name_or_path": "org/model", "family": "llava"}, merge_push={"push": True, "repo_id": "org/x", "license": "other"})
    assert merge_push.model_license(named) == "other"
