"""launcher.features' GA table against Kubernetes' own feature gates (issue 26): the versioned specs in
pkg/features/kube_features.go of the Kubernetes that scripts/cluster.py builds, read from the Go module
cache its build fills."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from launcher import features
from scripts import cluster as devcluster

GATE = re.compile(r"[A-Z][A-Za-z0-9]+")  # a feature gate's name; the table names its source where there is none


def kube_features_go() -> Path:
    """kube_features.go of k8s.io/kubernetes at the version the control plane builds, from the module
    cache only (GOPROXY=off: a test downloads nothing)."""
    if not shutil.which("go"):
        pytest.skip("needs the go command to find the Go module cache")
    module = f"k8s.io/kubernetes@{devcluster.K8S_VERSION}"
    found = subprocess.run(["go", "mod", "download", "-json", module], env={**devcluster.go_env(in_module=False),
                           "GOPROXY": "off", "GOFLAGS": ""}, capture_output=True, text=True, cwd="/")  # fmt: skip
    answer = json.loads(found.stdout or "{}")
    if "Dir" not in answer:
        pytest.fail(f"{module} is not in the Go module cache ({answer.get('Error') or found.stderr.strip()}): "
                    "python3 scripts/cluster.py build downloads it", pytrace=False)  # fmt: skip
    return Path(answer["Dir"]) / "pkg" / "features" / "kube_features.go"


def versioned_specs(go: str) -> dict[str, dict[str, tuple[int, int]]]:
    """gate -> {pre-release stage: first version}, from ``defaultVersionedKubernetesFeatureGates``:
        JobSuccessPolicy: {
            {Version: version.MustParse("1.30"), Default: false, PreRelease: featuregate.Alpha},
            {Version: version.MustParse("1.31"), Default: true, PreRelease: featuregate.Beta},
            ...
    Keys of this file are its constants (``JobSuccessPolicy featuregate.Feature = "JobSuccessPolicy"``);
    those of other components' files (``genericfeatures.X``) are named as their constant."""
    names = dict(re.findall(r"^\s*(\w+)\s+featuregate\.Feature\s*=\s*\"(\w+)\"", go, re.M))
    table = go[go.index("var defaultVersionedKubernetesFeatureGates"):]
    table = table[: table.index("\n}\n")]
    specs = {}
    for key, body in re.findall(r"^\t([\w.]+): \{\n(.*?)\n\t\},?$", table, re.M | re.S):
        stages = {}
        for spec in re.findall(r"\{([^{}]*)\}", body):
            version = re.search(r'Version:\s*version\.MustParse\("(\d+)\.(\d+)"\)', spec)
            stage = re.search(r"PreRelease:\s*featuregate\.(\w+)", spec)
            stages.setdefault(stage.group(1), (int(version.group(1)), int(version.group(2))))
        specs[names.get(key, key.rsplit(".", 1)[-1])] = stages
    return specs


@pytest.mark.cluster
def test_each_ga_version_in_the_table_is_the_one_kubernetes_declares():
    """A gate still in kube_features.go carries its GA version there; one removed from it graduated at
    least as many releases earlier as the file's own rule says gates are kept after graduation."""
    go = kube_features_go().read_text()
    specs = versioned_specs(go)
    assert specs["JobSuccessPolicy"] == {"Alpha": (1, 30), "Beta": (1, 31), "GA": (1, 33)}, "the parser reads the file"
    kept_after_ga = int(re.search(r"features may only be removed (\d+) releases after graduation", go).group(1))
    major, minor = features.parse_version(devcluster.K8S_VERSION)
    removed_by = (major, minor - kept_after_ga)

    declared, wrong, removed = [], [], []
    for name, feature in features.FEATURES.items():
        if not GATE.fullmatch(feature.gate):
            continue
        if feature.gate in specs:
            declared.append(name)
            if specs[feature.gate].get("GA") != feature.ga:
                wrong.append(f"{name}: GA {feature.ga} in the table, {specs[feature.gate].get('GA')} in kube_features.go")
        else:
            removed.append(name)
            if feature.ga > removed_by:
                wrong.append(f"{name}: GA {feature.ga} in the table, but {feature.gate} is gone from "
                             f"{devcluster.K8S_VERSION}, so GA by {removed_by} at the latest")  # fmt: skip
    # The versions a note states of another gate ("SizeMemoryBackedVolumes (beta, on since 1.22; GA 1.32)").
    for name, feature in features.FEATURES.items():
        for gate, beta, ga in re.findall(r"(\w+) \(beta, on since (\d+\.\d+); GA (\d+\.\d+)\)", feature.note):
            declared.append(f"{name} ({gate})")
            stated = {"Beta": features.parse_version(beta), "GA": features.parse_version(ga)}
            actual = {stage: specs.get(gate, {}).get(stage) for stage in stated}
            if actual != stated:
                wrong.append(f"{name}'s note: {gate} {stated}, kube_features.go {actual}")
    assert wrong == [], wrong
    assert declared and removed, (declared, removed)  # both kinds of check ran
