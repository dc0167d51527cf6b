"""Hub trouble in the stages and in `vlmjobs memory` (issue 13, item 5), without network: a loopback server as
HF_ENDPOINT answers as the hub does (status and X-Error-Code, which huggingface_hub reads into its exception
classes), and HF_HUB_OFFLINE=1 with an id the cache lacks. Each ends in one line naming the model or data set."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading

import pytest

from jobs import contract
from tests.conftest import subprocess_env


@pytest.fixture
def hub(tmp_path):
    """hub(status, error_code, error_message) -> the endpoint of a server answering every request so."""
    servers = []

    def start(status: int, error_code: str | None = None, error_message: str | None = None) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self):
                body = json.dumps({"error": error_message or "see X-Error-Code"}).encode()
                self.send_response(status)
                if error_code:
                    self.send_header("X-Error-Code", error_code)
                if error_message:
                    self.send_header("X-Error-Message", error_message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = answer

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()


# huggingface_hub's own backoff (1, 2, 4, 8, 8 s) runs in the subprocess as it is, its waits written to
# $VLMJOBS_HUB_WAITS instead of slept: its retries are what a test shows, not 23 s of waiting.
WITHOUT_WAITS = """
import atexit, json, os, runpy, sys, time
from huggingface_hub.utils import _http
assert _http.time is time and callable(_http._http_backoff_base), "huggingface_hub no longer backs off in utils._http"
waits = []

class Clock:
    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds):
        waits.append(seconds)

_http.time = Clock()
atexit.register(lambda: open(os.environ["VLMJOBS_HUB_WAITS"], "w").write(json.dumps(waits)))
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run(argv, tmp_path, endpoint=None, offline=False, **env):
    """``python -m module args`` as its own process; with the hub's backoff waits recorded (``waits(tmp_path)``)."""
    extra = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1" if offline else "0", "HF_DATASETS_OFFLINE": "1" if offline else "0",
             "VLMJOBS_HUB_WAITS": str(tmp_path / "hub-waits.json"), **env}  # fmt: skip
    if endpoint:
        extra["HF_ENDPOINT"] = endpoint
    environment = subprocess_env(**extra)
    if "HF_TOKEN" not in env:
        environment.pop("HF_TOKEN", None)
    assert argv[0] == "-m", argv
    command = [sys.executable, "-c", WITHOUT_WAITS, *argv[1:]]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


def waits(tmp_path) -> list[float]:
    """The waits huggingface_hub's backoff made in the last ``run``."""
    return json.loads((tmp_path / "hub-waits.json").read_text())


def memory_of(model: str, tmp_path, revision: str | None = None):
    path = tmp_path / "r.yaml"
    model_section = {"name_or_path": model, "family": "llava", **({"revision": revision} if revision else {})}
    path.write_text(f"name: r\nmodel: {json.dumps(model_section)}\nstages: [prepare, sft]\n"
                    "data: {sft: {path: org/data, format: chartqa}}\n")
    return ["-m", "launcher.cli", "memory", str(path)]


def last_line(done) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip().splitlines()[-1]


def test_a_model_the_hub_does_not_have_is_one_line_with_the_fix(hub, tmp_path):
    endpoint = hub(401, "RepoNotFound")  # what the hub answers for a missing repo, and for a private one without a token
    done = run(memory_of("org/no-such-model", tmp_path), tmp_path, endpoint)
    assert done.returncode == contract.EXIT_USER_ERROR
    assert done.stderr.strip().splitlines() == [
        f"error: model org/no-such-model: not found on the hub ({endpoint}): check the id (org/name) or, if it is private "
        "or gated, set HF_TOKEN"
    ]


def test_a_gated_model_without_a_token_says_to_set_hf_token(hub, tmp_path):
    endpoint = hub(401, "GatedRepo")
    done = run(memory_of("org/gated", tmp_path), tmp_path, endpoint)
    assert done.returncode == contract.EXIT_USER_ERROR
    assert done.stderr.strip().splitlines() == [
        f"error: model org/gated is gated on the hub and HF_TOKEN is not set: accept its conditions at {endpoint}/org/gated "
        "and set HF_TOKEN to a token of that account"
    ]


def test_offline_without_the_model_in_the_cache_says_so(tmp_path):
    done = run(memory_of("org/not-cached", tmp_path), tmp_path, offline=True)
    assert done.returncode == contract.EXIT_USER_ERROR
    assert last_line(done).startswith("error: model org/not-cached: not in the local cache (")
    assert last_line(done).endswith("and HF_HUB_OFFLINE is set: unset it, or download it once where the hub is reachable (hf download org/not-cached)")


def test_a_data_set_the_hub_does_not_have_fails_prepare_in_one_line(hub, tmp_path, write_recipe):
    endpoint = hub(404, "RepoNotFound")
    path = write_recipe(data={"sft": {"path": "org/no-such-data", "format": "chartqa"}})
    done = run(["-m", "jobs.prepare", f"--recipe={path}"], tmp_path, endpoint)
    assert done.returncode == contract.EXIT_USER_ERROR, done.stderr
    assert last_line(done) == (f"error: data set org/no-such-data: not found on the hub ({endpoint}): check the id (org/name) "
                               "or, if it is private or gated, set HF_TOKEN")


def test_an_unreachable_hub_is_retried_by_huggingface_hub_then_one_line_worth_a_retry(hub, tmp_path):
    endpoint = hub(503)
    done = run(memory_of("org/model", tmp_path), tmp_path, endpoint)
    assert done.returncode == contract.EXIT_FAILURE
    assert "Retry 5/5" in done.stderr, "huggingface_hub's bounded backoff says what it does"
    assert waits(tmp_path) == [1, 2, 4, 8, 8], "its own backoff ran, five retries, without the 23 s"
    assert last_line(done) == (
        f"error: model org/model: the hub ({endpoint}) is unreachable (HTTP 503, after huggingface_hub's retries) and the local "
        "cache lacks it: check the network, proxy or HF_ENDPOINT and run again, or run with HF_HUB_OFFLINE=1 where the cache holds it"
    )


def test_a_token_the_hub_refuses_is_one_line_that_says_so_without_the_token(hub, tmp_path):
    """The hub answers a revoked or mistyped token with 401 and this X-Error-Message, which huggingface_hub tells
    apart from the 401 of a missing or private repo."""
    endpoint = hub(401, error_message="Invalid credentials in Authorization header")
    token = "hf_revoked0123456789abcdef"
    done = run(memory_of("org/model", tmp_path), tmp_path, endpoint, HF_TOKEN=token)
    assert done.returncode == contract.EXIT_USER_ERROR
    assert done.stderr.strip().splitlines() == [
        "error: model org/model: the hub refused HF_TOKEN (401 invalid credentials): set HF_TOKEN to a valid token"
    ]
    assert token not in done.stdout + done.stderr


def test_a_revision_the_hub_does_not_have_names_it(hub, tmp_path):
    endpoint = hub(404, "RevisionNotFound")
    done = run(memory_of("org/model", tmp_path, revision="v9"), tmp_path, endpoint)
    assert done.returncode == contract.EXIT_USER_ERROR
    assert done.stderr.strip().splitlines() == [
        "error: model org/model: the hub has no revision 'v9' of it: check the recipe's revision"
    ]


def test_a_data_set_revision_the_hub_does_not_have_fails_prepare_in_one_line(hub, tmp_path, write_recipe):
    endpoint = hub(404, "RevisionNotFound")
    path = write_recipe(data={"sft": {"path": "org/data", "format": "chartqa", "revision": "v9"}})
    done = run(["-m", "jobs.prepare", f"--recipe={path}"], tmp_path, endpoint)
    assert done.returncode == contract.EXIT_USER_ERROR, done.stderr
    assert last_line(done) == "error: data set org/data: the hub has no revision 'v9' of it: check the recipe's revision"


def test_a_malformed_model_id_is_one_line_before_any_request(hub, tmp_path):
    """huggingface_hub refuses such an id (HFValidationError: also '--', '..', a leading '-') before asking the hub;
    the hub here would answer 500, and be asked again and again."""
    name = "org/has space"
    endpoint = hub(500)
    done = run(memory_of(name, tmp_path), tmp_path, endpoint)
    assert done.returncode == contract.EXIT_USER_ERROR
    assert done.stderr.strip().splitlines() == [f"error: model {name}: neither a local path nor a hub id (org/name)"]
    assert waits(tmp_path) == [], "nothing was sent, so nothing was retried"


@pytest.mark.parametrize("wrapped", [False, True], ids=["as huggingface_hub raises it", "as transformers wraps it"])
def test_the_hubs_429_after_huggingface_hubs_retries_is_the_hub_unreachable(wrapped):
    """Issue 26 (9): the hub rate-limits with 429 (huggingface_hub retries it, honouring Retry-After, then raises);
    what is left is the network's trouble, worth a retry later (exit 1), not an unknown error. The exception is
    huggingface_hub's own, from a 429 answer as the hub sends it; transformers' cached_file wraps it in an OSError
    ("There was a specific connection error ...") from it."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import hf_raise_for_status

    from jobs import hub

    url = f"{constants.ENDPOINT}/org/model/resolve/main/config.json"
    response = httpx2.Response(429, headers={"Retry-After": "60"}, request=httpx2.Request("HEAD", url))
    with pytest.raises(Exception) as raised:  # whatever huggingface_hub makes of a 429
        hf_raise_for_status(response)
    error = raised.value
    if wrapped:
        try:
            raise OSError(f"There was a specific connection error when trying to load org/model:\n{error}") from error
        except OSError as raised:
            error = raised
    found = hub.problem(error, "model", "org/model")
    assert isinstance(found, contract.Failure) and found.exit_code == contract.EXIT_FAILURE
    assert str(found) == (
        f"model org/model: the hub ({constants.ENDPOINT}) is unreachable (HTTP 429, after huggingface_hub's retries) and the "
        "local cache lacks it: check the network, proxy or HF_ENDPOINT and run again, or run with HF_HUB_OFFLINE=1 where "
        "the cache holds it")


@pytest.mark.parametrize("load", ["config", "model"])
def test_a_folder_that_is_not_a_saved_model_is_one_line(load, tmp_path, write_recipe):
    """A folder of something else (the tiny-model cache's root, a run folder) given as model.name_or_path: transformers
    raised 'ValueError: Unrecognized model in ...' with its traceback, from vlmjobs memory and from every stage."""
    from jobs import memory, modeling
    from jobs import recipe as recipes
    from jobs.contract import UserError

    folder = tmp_path / "not-a-model"
    (folder / "llava").mkdir(parents=True)
    recipe = recipes.load(write_recipe(), {"model.name_or_path": str(folder)})
    with pytest.raises(UserError) as error:
        memory.for_stage(recipe, "sft") if load == "config" else modeling.load_model(recipe.model)
    assert str(error.value) == (f"model {folder}: the folder holds no config.json, so it is not a saved model "
                                "(save_pretrained writes one beside the weights)")
