"""Hub trouble in the stages and in `vlmjobs memory` (issue 13, item 5), without network: a loopback server as
HF_ENDPOINT answers as the hub does (status and X-Error-Code, which huggingface_hub reads into its exception
classes), and HF_HUB_OFFLINE=1 with an id the cache lacks. Each ends in one line naming the model or data set."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading

import pytest

from jobs import contract
from tests.conftest import subprocess_env


@pytest.fixture
def hub(tmp_path):
    """hub(status, error_code) -> the endpoint of a server answering every request so."""
    servers = []

    def start(status: int, error_code: str | None = None) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self):
                body = b'{"error": "see X-Error-Code"}'
                self.send_response(status)
                if error_code:
                    self.send_header("X-Error-Code", error_code)
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


def run(argv, tmp_path, endpoint=None, offline=False, **env):
    extra = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1" if offline else "0", "HF_DATASETS_OFFLINE": "1" if offline else "0", **env}
    if endpoint:
        extra["HF_ENDPOINT"] = endpoint
    environment = subprocess_env(**extra)
    environment.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, *argv], env=environment, capture_output=True, text=True, timeout=600)


def memory_of(model: str, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\nmodel: {{name_or_path: {model}, family: llava}}\nstages: [prepare, sft]\n"
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
    assert last_line(done) == (
        f"error: model org/model: the hub ({endpoint}) is unreachable (HTTP 503, after huggingface_hub's retries) and the local "
        "cache lacks it: check the network, proxy or HF_ENDPOINT and run again, or run with HF_HUB_OFFLINE=1 where the cache holds it"
    )


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
