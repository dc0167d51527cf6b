"""Which Kubernetes features the rendered manifests use, and the release each became GA (stable).

A recipe names the oldest cluster it must run on (``kubernetes.target_version``). The renderer only
uses a feature that is GA there; where a feature has a safe fallback (the pod failure policy) it
falls back, and where it has none it refuses the recipe with one line. ``used_by`` reads the
features off a rendered manifest, so the check covers what was rendered, not what was meant.

GA versions are the ``stable`` stage in the feature-gate pages of kubernetes/website
(content/en/docs/reference/command-line-tools-reference/feature-gates/<Gate>.md) unless noted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jobs.contract import UserError


@dataclass(frozen=True)
class Feature:
    what: str  # as the error message names it
    ga: tuple[int, int]
    gate: str  # the feature gate, or the source when there is none
    note: str = ""


FEATURES: dict[str, Feature] = {
    "ttlSecondsAfterFinished": Feature("ttlSecondsAfterFinished", (1, 23), "TTLAfterFinished"),
    "fsGroupChangePolicy": Feature("securityContext.fsGroupChangePolicy", (1, 23), "ConfigurableFSGroupPolicy"),
    # The Indexed completion mode brings the pod hostname <job>-<index> and the completion-index annotation.
    "indexedJob": Feature("completionMode: Indexed", (1, 24), "IndexedJob"),
    "emptyDirSizeLimit": Feature(
        "emptyDir.sizeLimit",
        (1, 25),
        "LocalStorageCapacityIsolation",
        "the tmpfs itself is sized by it from SizeMemoryBackedVolumes (beta, on since 1.22; GA 1.32); "
        "before that, going past the limit evicts the pod",
    ),
    "cronJobTimeZone": Feature("CronJob timeZone", (1, 27), "CronJobTimeZone"),
    # The launcher (not a manifest) finds a Job's pods by this label; the unprefixed job-name is deprecated.
    "jobNameLabel": Feature("the pod label batch.kubernetes.io/job-name", (1, 27), "well-known labels page: 1.27"),
    "podFailurePolicy": Feature("podFailurePolicy", (1, 31), "JobPodFailurePolicy"),
    "disruptionTarget": Feature("the DisruptionTarget pod condition", (1, 31), "PodDisruptionConditions"),
    # Not used, kept here so that a manifest that starts using them is checked (see render.py for why not):
    "backoffLimitPerIndex": Feature("backoffLimitPerIndex", (1, 33), "JobBackoffLimitPerIndex"),
    "successPolicy": Feature("successPolicy", (1, 33), "JobSuccessPolicy"),
    "podReplacementPolicy": Feature("podReplacementPolicy", (1, 34), "JobPodReplacementPolicy"),
    "podIndexLabel": Feature("the pod label batch.kubernetes.io/job-completion-index", (1, 32), "PodIndexLabel"),
}

LAUNCHER_FEATURES = ("jobNameLabel",)  # what submit/follow need of the cluster, whatever the manifest


def parse_version(text: str, *, key: str = "kubernetes.target_version") -> tuple[int, int]:
    match = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.\d+)?", str(text).strip())
    if not match:
        raise UserError(f'{key}: {text!r} is not a Kubernetes version (write it as "1.31")')
    return int(match.group(1)), int(match.group(2))


def is_ga(feature: str, target: str | tuple[int, int]) -> bool:
    version = parse_version(target) if isinstance(target, str) else target
    return version >= FEATURES[feature].ga


def used_by(manifest: dict) -> set[str]:
    """The FEATURES a manifest (Job, CronJob, JobSet or Pod-bearing object) uses."""
    used: set[str] = set()
    spec = manifest.get("spec", {})
    if manifest.get("kind") == "JobSet":  # what its Jobs use (a JobSet of v0.11 needs Kubernetes 1.27 or newer itself)
        for replicated in spec.get("replicatedJobs", []):
            used |= used_by({"kind": "Job", "spec": replicated["template"]["spec"]})
        return used
    if manifest.get("kind") == "CronJob":
        if "timeZone" in spec:
            used.add("cronJobTimeZone")
        spec = spec.get("jobTemplate", {}).get("spec", {})
    if manifest.get("kind") in ("Job", "CronJob"):
        for key in ("ttlSecondsAfterFinished", "backoffLimitPerIndex", "successPolicy", "podReplacementPolicy"):
            if key in spec:
                used.add(key)
        if spec.get("completionMode") == "Indexed":
            used.add("indexedJob")
        if "podFailurePolicy" in spec:
            used.add("podFailurePolicy")
            for rule in spec["podFailurePolicy"].get("rules", []):
                if any(c.get("type") == "DisruptionTarget" for c in rule.get("onPodConditions", [])):
                    used.add("disruptionTarget")
        pod = spec.get("template", {}).get("spec", {})
    else:
        pod = spec
    if "fsGroupChangePolicy" in pod.get("securityContext", {}):
        used.add("fsGroupChangePolicy")
    if any("sizeLimit" in v.get("emptyDir", {}) for v in pod.get("volumes", [])):
        used.add("emptyDirSizeLimit")
    return used


def check(manifests: list[dict], target: str, *, launcher: bool = True) -> None:
    """Refuse, in one line, manifests that use a feature not GA in ``target``."""
    version = parse_version(target)
    needed: dict[str, str] = {}
    for manifest in manifests:
        for name in used_by(manifest):
            needed.setdefault(name, f"{manifest['kind']} {manifest['metadata'].get('name', '')}".strip())
    if launcher:
        for name in LAUNCHER_FEATURES:
            needed.setdefault(name, "the launcher")
    too_new = sorted((FEATURES[n].ga, n) for n in needed if FEATURES[n].ga > version)
    if too_new:
        ga, name = too_new[-1]
        feature = FEATURES[name]
        others = ", ".join(FEATURES[n].what for _, n in too_new[:-1])
        raise UserError(
            f"kubernetes.target_version {target}: {needed[name]} uses {feature.what}, GA in Kubernetes "
            f"{ga[0]}.{ga[1]} ({feature.gate})"
            + (f", and {others}" if others else "")
            + f'; set kubernetes.target_version to "{ga[0]}.{ga[1]}" or newer'
        )
