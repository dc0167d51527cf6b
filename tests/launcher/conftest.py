"""Recipes built from dicts (no files, no models), and a Kubernetes API server on loopback."""

from __future__ import annotations

import copy

import pytest

from jobs import recipe as recipes

IMAGE = "ghcr.io/vlmjobs/vlmjobs:0.1.0-0123456789ab"

# One node, one GPU per stage: the Job retries by itself (target 1.31 has podFailurePolicy GA).
SINGLE = {
    "name": "llava-chartqa",
    "model": {"name_or_path": "llava-hf/llava-1.5-7b-hf", "family": "llava"},
    "data": {
        "sft": {"path": "HuggingFaceM4/ChartQA", "format": "chartqa", "eval_split": "val", "test_split": "test"},
        "dpo": {"path": "openbmb/RLAIF-V-Dataset", "format": "rlaif-v"},
    },
    "resources": {"gpus": 1, "gpu_product": "NVIDIA-H100-80GB-HBM3", "cpu": "8", "memory": "64Gi", "shm": "16Gi"},
    "kubernetes": {
        "image": IMAGE,
        "target_version": "1.31",
        "priority_class": "batch-high",
        "queue": "gpu-queue",
        "image_pull_secrets": ["ghcr-pull"],
    },
}

# Two nodes of eight GPUs for the training stages; prepare on CPU, evaluation on one GPU.
MULTI = {
    "name": "qwen2vl-chartqa",
    "model": {"name_or_path": "Qwen/Qwen2-VL-7B-Instruct", "family": "qwen2_vl"},
    "data": {
        "sft": {"path": "HuggingFaceM4/ChartQA", "format": "chartqa"},
        "dpo": {"path": "openbmb/RLAIF-V-Dataset", "format": "rlaif-v"},
    },
    "resources": {
        "gpus": 8,
        "nodes": 2,
        "gpu_product": "NVIDIA-H100-80GB-HBM3",
        "cpu": "64",
        "memory": "512Gi",
        "shm": "64Gi",
    },
    "evaluate": {"resources": {"gpus": 1, "nodes": 1}},
    "merge_push": {"resources": {"gpus": 1, "nodes": 1}},
    "kubernetes": {"image": IMAGE, "target_version": "1.31", "backoff_limit": 1, "max_disruption_restarts": 2},
}


def make(base: dict, **overrides) -> recipes.Recipe:
    """A recipe from ``base`` with dotted overrides: make(SINGLE, **{"kubernetes.target_version": "1.29"})."""
    return recipes.from_dict(copy.deepcopy(base), overrides, origin="test")


@pytest.fixture
def single() -> recipes.Recipe:
    return make(SINGLE)


@pytest.fixture
def multi() -> recipes.Recipe:
    return make(MULTI)


@pytest.fixture
def server():
    from tests.launcher.fake_kube import FakeKube

    fake = FakeKube().start()
    yield fake
    fake.stop()


@pytest.fixture
def api(server):
    from kubernetes import client

    return client.ApiClient(client.Configuration(host=server.url))


class Lines(list):
    def text(self) -> str:
        return "\n".join(self)


@pytest.fixture
def cluster(api):
    """A Cluster on the loopback server whose output lines are kept in ``cluster.lines``."""
    from launcher import kube as kube_module

    lines = Lines()
    c = kube_module.Cluster(
        api, "vlmjobs", out=lines.append, poll_s=0.01, watch_s=5, pods_gone_timeout_s=0.5, log_drain_s=5,
        retry_base_s=0.01, retry_cap_s=0.05, retry_give_up_s=0.5,
    )  # fmt: skip
    c.lines = lines
    return c


@pytest.fixture
def kubeconfig(server, tmp_path, monkeypatch):
    """$KUBECONFIG naming the loopback server, as `vlmjobs submit` on a laptop would find it."""
    from launcher import kube as kube_module

    path = tmp_path / "kubeconfig"
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: loopback
  cluster: {{server: "{server.url}"}}
users:
- name: tester
  user: {{token: test-token}}
contexts:
- name: loopback
  context: {{cluster: loopback, user: tester, namespace: vlmjobs}}
current-context: loopback
"""
    )
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_module, "POLL_S", 0.01)
    return path
