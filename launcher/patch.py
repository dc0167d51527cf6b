"""Kubernetes' strategic merge patch of a pod template, for ``kubernetes.pod_template`` (issue 22).

    strategic_merge(template, patch) -> the template with the patch applied, as `kubectl patch` and kustomize would

What a platform team adds to every pod (affinity, tolerations, NCCL/RDMA env, volumes) is written the
way they already write it for kustomize. The semantics are the API server's, from the struct tags of
k8s.io/api/core/v1 (types.go, ``patchStrategy:"merge" patchMergeKey:...``):
- maps merge key by key; a key set to null is removed;
- a list with a merge key (containers by name, env by name, volumes by name, volumeMounts by
  mountPath...) merges item by item, and an item carrying ``$patch: delete`` is removed; a new item
  goes where the server puts it (first, for an env var the pod did not have: ``_merge_list``);
- every other list is replaced whole. Notably ``tolerations`` (no patchStrategy in PodSpec): a patch
  that adds a toleration must list the GPU toleration too, exactly as with kubectl patch.
Pure: no client; the result is checked by the server's dry run (tests/launcher/test_nightly_on_cluster.py).
"""

from __future__ import annotations

import copy

# The lists of a pod template (PodTemplateSpec and what it holds) that merge by a key, from core/v1's struct tags.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
    "schedulingGates": "name",
    "resourceClaims": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
}
DIRECTIVE = "$patch"


def strategic_merge(original, patch):
    """``original`` (a pod template, or part of one) with ``patch`` applied; neither is changed."""
    return _merge(copy.deepcopy(original), copy.deepcopy(patch), key=None)


def _merge(original, patch, key: str | None):
    if isinstance(patch, dict) and isinstance(original, dict):
        if patch.get(DIRECTIVE) == "replace":
            return {k: v for k, v in patch.items() if k != DIRECTIVE}
        for name, value in patch.items():
            if value is None:
                original.pop(name, None)
            elif name in original:
                original[name] = _merge(original[name], value, name)
            else:
                original[name] = _without_directives(value)
        return original
    if isinstance(patch, list) and isinstance(original, list) and key in MERGE_KEYS:
        return _merge_list(original, patch, MERGE_KEYS[key])
    return _without_directives(patch)


def _merge_list(original: list, patch: list, merge_key: str) -> list:
    """Items merged by key, then ordered as the API server orders them (strategicpatch's normalizeElementOrder and
    mergeSortedSlice): the patch's items in its order, interleaved with the original's own items in theirs, an
    original item placed before a patch item only when both were in the original and it came first there."""
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise ValueError(f"an item of a list merged by {merge_key!r} has no {merge_key!r}: {item!r}")
    by_key = {old.get(merge_key): old for old in original if isinstance(old, dict)}
    server_order = [old.get(merge_key) if isinstance(old, dict) else None for old in original]
    patched = []
    for item in patch:
        if item.get(DIRECTIVE) == "delete":
            continue
        old = by_key.get(item[merge_key])
        patched.append(_merge(old, item, None) if old is not None else _without_directives(item))
    named = {item[merge_key] for item in patch}
    server_only = [old for old in original if not (isinstance(old, dict) and old.get(merge_key) in named)]

    def position(item) -> int:
        key = item.get(merge_key) if isinstance(item, dict) else None
        return server_order.index(key) if key in server_order else -1

    merged, i, j = [], 0, 0
    while i < len(server_only) or j < len(patched):
        if j >= len(patched):
            merged.append(server_only[i])
            i += 1
        elif i < len(server_only) and 0 <= position(server_only[i]) < position(patched[j]):
            merged.append(server_only[i])
            i += 1
        else:
            merged.append(patched[j])
            j += 1
    return merged


def _without_directives(value):
    if isinstance(value, dict):
        return {k: _without_directives(v) for k, v in value.items() if k != DIRECTIVE and v is not None}
    if isinstance(value, list):
        return [_without_directives(v) for v in value]
    return value
