"""A real Kubernetes control plane on loopback, for trying the launcher and testing it (issue 10).

    python3 scripts/cluster.py build   # etcd, kube-apiserver, -controller-manager, -scheduler, kubectl, kwok,
                                       # and the Kueue and JobSet managers
    python3 scripts/cluster.py up      # start them (idempotent); writes .cache/cluster/kubeconfig
    python3 scripts/cluster.py down    # stop every process and remove the state

Real: etcd, kube-apiserver (RBAC, ServiceAccount tokens, the default admission plugins and PodSecurity,
an audit log), kube-controller-manager (Job, CronJob, TTL, garbage collector, ...) and kube-scheduler,
each at a pinned upstream version. Simulated: kwok plays the kubelet of a few fake GPU and CPU nodes, so
no container runs; a pod's exit code and run time come from its annotations (SIM_* below). Real too: the
cluster's engines, Kueue (quota, priority, preemption, admission of a whole group) and JobSet (multi-node
groups and their failure policy), their webhooks served on loopback under the cluster's CA, and Kueue
configured as a platform team configures it (platform_objects, kueue_configuration).

The binaries are built from their Go modules through the Go module proxy into a cache outside the work
tree, keyed by version, so a second build is free; binaries a user already has ($KUBEBUILDER_ASSETS, as
envtest lays them out, or $PATH) are used when their versions fit; kwok, which carries one patch
(KWOK_PATCHES), is always built. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# The Kubernetes version is the one knob; its staging modules (k8s.io/api, ...) are published as v0.<minor>.<patch>.
K8S_VERSION = os.environ.get("VLMJOBS_K8S_VERSION", "v1.34.4")
# The etcd that Kubernetes 1.34's own go.mod (and its release images) use.
ETCD_VERSION = os.environ.get("VLMJOBS_ETCD_VERSION", "v3.6.4")
KWOK_VERSION = os.environ.get("VLMJOBS_KWOK_VERSION", "v0.8.0")
# The cluster's own engines: Kueue admits every Job (quota, priority, preemption), JobSet runs multi-node
# groups. Each is a controller manager with its own client libraries (k8s.io/* v0.35), which talk to this
# apiserver across the one minor of skew client-go supports; the proxy serves only these exact versions.
KUEUE_VERSION = os.environ.get("VLMJOBS_KUEUE_VERSION", "v0.17.0")
JOBSET_VERSION = os.environ.get("VLMJOBS_JOBSET_VERSION", "v0.11.1")

K8S_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
ENGINES = ("kueue", "jobset")
BINARIES = ("etcd", *K8S_BINARIES, "kwok", *ENGINES)

# One change to kwok, so that it plays the kubelet's part in log streaming too: its log server asks a stub
# container runtime whether a container still runs, the stub always says yes, and so a followed log never
# ends. The kubelet ends it once the container has exited; patched, kwok asks its pod cache. Applied to a copy
# of the pinned release (a replace line in the wrapper module); kwok is therefore always built, never found.
KWOK_PATCHES = {
    "pkg/kwok/server/debugging_logs.go": (
        (
            "\treturn readLogs(ctx, logsFile, opts, stdout, stderr)\n}\n",
            """\trunning := func() bool {
\t\tif s.podCacheGetter == nil {
\t\t\treturn true
\t\t}
\t\tpod, ok := s.podCacheGetter.GetWithNamespace(podName, podNamespace)
\t\tif !ok { // not yet in the cache, which fills after its first use
\t\t\treturn true
\t\t}
\t\tfor _, status := range pod.Status.ContainerStatuses {
\t\t\tif status.Name == container {
\t\t\t\treturn status.State.Terminated == nil
\t\t\t}
\t\t}
\t\treturn true
\t}
\treturn crilogs.ReadLogs(ctx, logsFile, "", opts, podRuntime{running: running}, stdout, stderr)
}

// podRuntime answers the log reader as the kubelet's runtime would: running until the pod says otherwise.
type podRuntime struct {
\tcriapi.RuntimeService
\trunning func() bool
}

func (r podRuntime) ContainerStatus(ctx context.Context, containerID string, verbose bool) (*runtimeapi.ContainerStatusResponse, error) {
\tstate := runtimeapi.ContainerState_CONTAINER_RUNNING
\tif !r.running() {
\t\tstate = runtimeapi.ContainerState_CONTAINER_EXITED
\t}
\treturn &runtimeapi.ContainerStatusResponse{Status: &runtimeapi.ContainerStatus{State: state}}, nil
}
""",
        ),
    ),
    # the pod cache the log server reads is otherwise kept only when kwok serves metrics
    "pkg/kwok/cmd/root.go": (
        ("\t\tEnablePodCache:                        enableMetrics,\n", "\t\tEnablePodCache:                        true,\n"),
    ),
}

# One change to Kueue: with its own certificate management off (the webhooks here are served under the
# cluster's CA, on loopback), it reads a metrics certificate from a fixed path, /etc/kueue/metrics/certs, even
# when metrics are not served ("0"), and exits without one. Patched, it reads it only when it serves metrics.
KUEUE_PATCHES = {
    "cmd/kueue/main.go": (
        (
            "\tif cfg.InternalCertManagement == nil || !*cfg.InternalCertManagement.Enable {\n"
            '\t\tmetricsCertPath := "/etc/kueue/metrics/certs"\n',
            "\tif (cfg.InternalCertManagement == nil || !*cfg.InternalCertManagement.Enable)"
            ' && cfg.Metrics.BindAddress != "0" {\n'
            '\t\tmetricsCertPath := "/etc/kueue/metrics/certs"\n',
        ),
    ),
}
PATCHES = {"kwok": KWOK_PATCHES, "kueue": KUEUE_PATCHES}
# What an engine's release ships beside its manager, copied into the cache at build time (so that a cluster
# starts without Go): its CRDs and its webhook configurations.
ENGINE_MANIFESTS = ("config/components/crd/bases", "config/components/webhook/manifests.yaml")

ROOT = Path(__file__).resolve().parent.parent


class ClusterError(RuntimeError):
    """A build or start-up failure, worded for the person who ran it."""


def log(msg: str) -> None:
    print(f"cluster: {msg}", file=sys.stderr, flush=True)


# --- binaries -------------------------------------------------------------------------------------------


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("VLMJOBS_CLUSTER_CACHE", Path(base) / "vlmjobs" / "cluster"))


def build_key(binary: str = "etcd") -> str:
    """The cache folder a binary is built into: the control plane's by their versions together; each engine by
    its own version alone (it links none of the others), so moving one rebuilds nothing else."""
    if binary == "kueue":
        return f"kueue{KUEUE_VERSION}"
    if binary == "jobset":
        return f"jobset{JOBSET_VERSION}"
    return f"{K8S_VERSION}-etcd{ETCD_VERSION}-kwok{KWOK_VERSION}"


def cached_binary(binary: str) -> Path:
    return cache_root() / build_key(binary) / "bin" / binary


def staging_version(k8s_version: str = K8S_VERSION) -> str:
    minor, patch = re.fullmatch(r"v1\.(\d+)\.(\d+)", k8s_version).groups()
    return f"v0.{minor}.{patch}"


def fits(binary: str, path: Path) -> bool:
    """Whether a binary found on the machine is the version we pin (same minor for Kubernetes and etcd)."""
    want = {"etcd": ETCD_VERSION, "kwok": KWOK_VERSION}.get(binary, K8S_VERSION)
    args = {"kubectl": ["version", "--client"], "kwok": ["--version"]}.get(binary, ["--version"])
    try:
        out = subprocess.run([str(path), *args], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    found = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    if not found:
        return False
    if binary == "kwok":  # its Stage API moves between minors: only the pinned release
        return found.group(0).lstrip("v") == want.lstrip("v")
    return ".".join(found.groups()[:2]) == ".".join(want.lstrip("v").split(".")[:2])


def found_binary(binary: str) -> Path | None:
    """A fitting binary the user already has: $KUBEBUILDER_ASSETS first (envtest's layout), then $PATH.
    Never kwok, which is patched (KWOK_PATCHES), nor an engine (no usual place to find one, and its CRDs must
    come from the same release)."""
    if binary == "kwok" or binary in ENGINES:
        return None
    candidates = []
    if os.environ.get("KUBEBUILDER_ASSETS"):
        candidates.append(Path(os.environ["KUBEBUILDER_ASSETS"]) / binary)
    if on_path := shutil.which(binary):
        candidates.append(Path(on_path))
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK) and fits(binary, c)), None)


def k8s_wrapper(k8s_version: str, gomod: str) -> str:
    """go.mod of a module that builds k8s.io/kubernetes' commands: its go.mod requires every staging module at
    v0.0.0 and points it at ./staging; a dependency's replace lines don't apply, so the wrapper points each at
    its published release instead."""
    staging = sorted(set(re.findall(r"^\s*(k8s\.io/[\w.-]+) => \./staging/", gomod, re.M)))
    godebug = re.search(r"^godebug .*$", gomod, re.M)
    lines = [
        "module vlmjobs.local/kubernetes-build",
        "",
        "go 1.24.0",
        godebug.group(0) if godebug else "",
        "",
        f"require k8s.io/kubernetes {k8s_version}",
        "",
        "replace (",
        *(f"\t{m} => {m} {staging_version(k8s_version)}" for m in staging),
        ")",
    ]
    return "\n".join(lines) + "\n"


def go_env(in_module: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CGO_ENABLED", "0")
    if in_module:  # the wrapper modules start without a go.sum: let the go command complete it
        env["GOFLAGS"] = (env.get("GOFLAGS", "") + " -mod=mod").strip()
    return env


def go(args: list[str], cwd: Path) -> None:
    proc = subprocess.run(["go", *args], cwd=cwd, env=go_env(), capture_output=True, text=True)
    if proc.returncode:
        raise ClusterError(f"'go {' '.join(args[:3])} ...' in {cwd} failed:\n{proc.stderr.strip()[-4000:]}")


def go_download(spec: str, cwd: Path) -> dict:
    """``go mod download -json`` of one module@version (through GOPROXY): where the go command put it (GoMod,
    Dir, ...)."""
    proc = subprocess.run(
        ["go", "mod", "download", "-json", spec],
        cwd=cwd,
        env=go_env(in_module=False),
        capture_output=True,
        text=True,
    )
    if proc.returncode:  # the go command reports a module's failure in its JSON, on stdout
        raise ClusterError(f"cannot download {spec}: {proc.stdout.strip() or proc.stderr.strip()}")
    return json.loads(proc.stdout)


def module_gomod(module: str, version: str, cwd: Path) -> str:
    """The published go.mod of a module."""
    return Path(go_download(f"{module}@{version}", cwd)["GoMod"]).read_text()


@dataclass
class Build:
    """One Go module to build commands from: a generated wrapper module (in the cache) and its packages."""

    name: str
    gomod: str
    packages: dict[str, str]  # binary -> package
    ldflags: list[str] = field(default_factory=list)
    module: str = ""  # module@version that ``patches`` (path in it -> (old, new) replacements) change
    patches: dict = field(default_factory=dict)
    manifests: tuple[str, ...] = ()  # paths in ``module`` copied into the cache's manifests/ folder

    @property
    def patch_id(self) -> str:
        return patch_id(self.patches)


def patch_id(patches: dict) -> str:
    """Names a set of patches in the cache (the binary's <name>.patch stamp); "" for none."""
    import hashlib

    return hashlib.sha256(json.dumps(patches, sort_keys=True).encode()).hexdigest()[:12] if patches else ""


def builds(work: Path) -> list[Build]:
    k8s_mod = module_gomod("k8s.io/kubernetes", K8S_VERSION, work)
    major, minor = K8S_VERSION.lstrip("v").split(".")[:2]
    version = "k8s.io/component-base/version"
    k8s_flags = [
        f"-X {version}.gitVersion={K8S_VERSION}",
        f"-X {version}.gitMajor={major}",
        f"-X {version}.gitMinor={minor}",
        f"-X {version}.gitTreeState=clean",
        f"-X {version}.buildDate=1970-01-01T00:00:00Z",  # reproducible: the cache key names the version
    ]
    return [
        Build(
            "etcd",
            f"module vlmjobs.local/etcd-build\n\ngo 1.24.0\n\nrequire go.etcd.io/etcd/server/v3 {ETCD_VERSION}\n",
            {"etcd": "go.etcd.io/etcd/server/v3"},
        ),
        Build(
            "kubernetes",
            k8s_wrapper(K8S_VERSION, k8s_mod),
            {b: f"k8s.io/kubernetes/cmd/{b}" for b in K8S_BINARIES},
            k8s_flags,
        ),
        Build(
            "kwok",
            f"module vlmjobs.local/kwok-build\n\ngo 1.26.0\n\nrequire sigs.k8s.io/kwok {KWOK_VERSION}\n",
            {"kwok": "sigs.k8s.io/kwok/cmd/kwok"},
            [f"-X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION}"],
            module=f"sigs.k8s.io/kwok@{KWOK_VERSION}",
            patches=KWOK_PATCHES,
        ),
        Build(
            "kueue",
            f"module vlmjobs.local/kueue-build\n\ngo 1.25.0\n\nrequire sigs.k8s.io/kueue {KUEUE_VERSION}\n",
            {"kueue": "sigs.k8s.io/kueue/cmd/kueue"},
            [
                f"-X sigs.k8s.io/kueue/pkg/version.GitVersion={KUEUE_VERSION}",
                "-X sigs.k8s.io/kueue/pkg/version.BuildDate=1970-01-01T00:00:00Z",
            ],
            module=f"sigs.k8s.io/kueue@{KUEUE_VERSION}",
            patches=KUEUE_PATCHES,
            manifests=ENGINE_MANIFESTS,
        ),
        Build(
            "jobset",
            f"module vlmjobs.local/jobset-build\n\ngo 1.25.0\n\nrequire sigs.k8s.io/jobset {JOBSET_VERSION}\n",
            {"jobset": "sigs.k8s.io/jobset"},  # its manager is the module's root package (main.go)
            [f"-X sigs.k8s.io/jobset/pkg/version.GitVersion={JOBSET_VERSION}"],
            module=f"sigs.k8s.io/jobset@{JOBSET_VERSION}",
            manifests=ENGINE_MANIFESTS,
        ),
    ]


def build(force: bool = False) -> dict[str, Path]:
    """Every binary, from the machine where it fits, else from the cache, else built now (minutes, once)."""
    have = {} if force else {b: p for b in BINARIES if (p := found_binary(b))}
    for b, p in have.items():
        log(f"using {p} ({b})")
    missing = [b for b in BINARIES if b not in have and (force or not built(b))]
    if missing:
        if not shutil.which("go"):
            raise ClusterError(
                f"no Go toolchain to build {', '.join(missing)}: install Go >= 1.24 (https://go.dev/dl), "
                "or put the binaries on PATH / in $KUBEBUILDER_ASSETS"
            )
        for key in dict.fromkeys(build_key(b) for b in missing):
            folder = cache_root() / key
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building the same key
                todo = [b for b in missing if build_key(b) == key and (force or not built(b))]
                if todo:
                    build_into(folder, todo)
    return {b: have.get(b, cached_binary(b)) for b in BINARIES}


def built(binary: str) -> bool:
    """In the cache, and built with today's patches (PATCHES; a changed patch rebuilds only its binary)."""
    want = patch_id(PATCHES.get(binary, {}))
    path = cached_binary(binary)
    stamp = path.with_name(f"{binary}.patch")
    shipped = binary not in ENGINES or engine_manifests(binary).is_dir()
    return path.is_file() and (stamp.read_text() if stamp.exists() else "") == want and shipped


def engine_manifests(engine: str) -> Path:
    """The CRDs and webhook configurations of the engine's release (copied into the cache by its build)."""
    return cache_root() / build_key(engine) / "manifests"


def module_dir(module: str, work: Path) -> Path:
    """Where the go command unpacked ``module`` (module@version) in its module cache."""
    return Path(go_download(module, work)["Dir"])


def patched_source(b: Build, work: Path) -> str:
    """A copy of ``b.module``'s pinned release with ``b.patches`` applied, as a replace line for the wrapper's
    go.mod (the go command compiles nothing beneath the module cache but what was downloaded)."""
    if not b.patches:
        return ""
    module, version = b.module.split("@")
    source, copy = module_dir(b.module, work), work / "patched"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(source, copy)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)  # the module cache's files are read-only
    for relative, changes in b.patches.items():
        text = (copy / relative).read_text()
        for old, new in changes:
            if text.count(old) != 1:
                raise ClusterError(f"the patch to {module} {version} {relative} no longer applies ({__file__})")
            text = text.replace(old, new)
        (copy / relative).write_text(text)
    return f"\nreplace {module} => ./patched  // {version} with the patches of scripts/cluster.py ({b.patch_id})\n"


def build_into(folder: Path, wanted: list[str]) -> None:
    src, bin_dir = folder / "src", folder / "bin"
    src.mkdir(parents=True, exist_ok=True)
    bin_dir.mkdir(exist_ok=True)
    for b in builds(src):
        todo = {name: pkg for name, pkg in b.packages.items() if name in wanted}
        if not todo:
            continue
        work = src / b.name
        work.mkdir(exist_ok=True)
        gomod = b.gomod + patched_source(b, work)
        if not (work / "go.mod").exists() or (work / "go.mod").read_text() != gomod:
            (work / "go.mod").write_text(gomod)
            (work / "go.sum").unlink(missing_ok=True)
        started = time.monotonic()
        log(f"{b.name}: resolving and downloading modules for {', '.join(todo)}")
        go(["list", "-deps", "-f", "{{.ImportPath}}", *todo.values()], work)
        downloaded = time.monotonic()
        log(f"{b.name}: modules ready in {downloaded - started:.0f} s; compiling")
        tmp = bin_dir.parent / f"bin.{b.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        ldflags = " ".join(["-s", "-w", *b.ldflags])
        # One go command for several: it compiles the packages they share once and links them in parallel.
        # Their binaries are named after the packages' last element (cmd/<name>), so only several go to a folder.
        out = f"{tmp}/" if len(todo) > 1 else str(tmp / next(iter(todo)))
        go(["build", "-trimpath", f"-ldflags={ldflags}", "-o", out, *todo.values()], work)
        if b.manifests:  # before the binary appears: a cached binary means its manifests are there
            manifests = folder / "manifests"
            shutil.rmtree(manifests, ignore_errors=True)
            source = module_dir(b.module, work)
            manifests.mkdir()
            for relative in b.manifests:
                copy = shutil.copytree if (source / relative).is_dir() else shutil.copyfile
                copy(source / relative, manifests / Path(relative).name)
            for path in manifests.rglob("*"):
                path.chmod(path.stat().st_mode | 0o200)  # the module cache's files are read-only
        for name in todo:
            os.replace(tmp / name, bin_dir / name)  # a binary appears in bin/ only once it is whole
            (bin_dir / f"{name}.patch").write_text(b.patch_id)
        tmp.rmdir()
        log(f"{b.name}: compiled in {time.monotonic() - downloaded:.0f} s")


# --- the simulation: nodes and pod lifecycles (kwok Stages) ----------------------------------------------

SIM = "sim.vlmjobs.io/"
# Pod annotations (kubernetes.pod_annotations in a recipe) that choose what a simulated container does.
SIM_EXIT_CODE = SIM + "exit-code"  # its exit code when it ends by itself (default 0)
SIM_RUN_SECONDS = SIM + "run-seconds"  # seconds from Running to that exit (default 2)
SIM_FAIL_INDEX = SIM + "fail-index"  # Indexed Job: only this completion index exits (with exit-code); the rest run on
SIM_START_SECONDS = SIM + "start-seconds"  # seconds in ContainerCreating before Running (default 1)
SIM_STOP_SECONDS = SIM + "stop-seconds"  # seconds a deleted pod takes to exit on SIGTERM (default 1; at most its grace)
SIM_STOP_EXIT_CODE = SIM + "stop-exit-code"  # its exit code then (default 143, killed by SIGTERM)

FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"  # =fake: the nodes kwok plays the kubelet of
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
# name, GPU product (None: a CPU node), GPUs, CPUs, memory: the products the shipped recipes ask for; then, on
# some, the labels and extended resources NVIDIA's GPU feature discovery and device plugin add.
NODES = (
    ("gpu-h100-0", "NVIDIA-H100-80GB-HBM3", 8, "192", "2Ti"),
    ("gpu-h100-1", "NVIDIA-H100-80GB-HBM3", 8, "192", "2Ti"),
    ("gpu-a100-0", "NVIDIA-A100-SXM4-40GB", 8, "96", "1Ti"),
    ("gpu-l4-0", "NVIDIA-L4", 4, "48", "192Gi"),
    ("gpu-l4-1", "NVIDIA-L4", 4, "48", "192Gi"),
    ("cpu-0", None, 0, "32", "128Gi"),
    ("cpu-1", None, 0, "32", "128Gi"),
    # 8 H100s time-sliced 4 ways (renameByDefault: the product gets -SHARED): 32 "GPUs", each a quarter of one
    ("shared-h100-0", "NVIDIA-H100-80GB-HBM3-SHARED", 32, "192", "2Ti", {"nvidia.com/gpu.replicas": "4"}, {}),
    # 8 A100s split by MIG under the mixed strategy: no whole GPU left, 7 slices of 1g.5gb each
    ("mig-a100-0", "NVIDIA-A100-SXM4-40GB", 0, "96", "1Ti", {"nvidia.com/mig.strategy": "mixed"}, {"nvidia.com/mig-1g.5gb": "56"}),
)
STORAGE_CLASS = "vlmjobs-sim"  # the default class; kwok provisions its volumes as an external provisioner would
POD_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # the first address of SERVICE_CIDR: the kubernetes Service


def node_manifest(name: str, product: str | None, gpus: int, cpu: str, memory: str, extra_labels: dict | None = None,
                  extra_resources: dict | None = None) -> dict:
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "type": "kwok",
              **(extra_labels or {})}  # fmt: skip
    capacity = {"cpu": cpu, "memory": memory, "pods": "110", "ephemeral-storage": "1Ti", **(extra_resources or {})}
    spec: dict = {}
    if product:
        labels[GPU_PRODUCT_LABEL] = product
        capacity["nvidia.com/gpu"] = str(gpus)
        # GPU nodes are tainted, as the GPU operator and the clouds' GPU pools do; GPU pods tolerate it
        spec["taints"] = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {FAKE_NODE_ANNOTATION: "fake"}},
        "spec": spec,
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def storage_class() -> dict:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": STORAGE_CLASS, "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
        "provisioner": "kwok.x-k8s.io/volume",
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    }


def annotation(key: str, default: str) -> str:
    """A jq expression: the pod's annotation ``key``, or ``default``."""
    return f'(.metadata.annotations["{key}"] // "{default}")'


def seconds(key: str, default: str) -> str:
    """A jq expression giving a Go duration ("2s") from an annotation holding seconds."""
    return f'({annotation(key, default)} | tonumber | tostring) + "s"'


def template_annotation(var: str, key: str, default: str) -> str:
    """A Go template line setting ``$var`` to the pod's annotation ``key`` or ``default`` (annotations may be absent)."""
    return f'{{{{ ${var} := "{default}" }}}}{{{{ with .metadata.annotations }}}}{{{{ with index . "{key}" }}}}{{{{ ${var} = . }}}}{{{{ end }}}}{{{{ end }}}}'


def _stage(name: str, kind: str, match: list[dict], next_: dict, delay: str | None = None) -> dict:
    spec: dict = {"resourceRef": {"apiGroup": "v1", "kind": kind}, "selector": {"matchExpressions": match}}
    if delay:
        spec["delay"] = {"durationMilliseconds": 0, "durationFrom": {"expressionFrom": delay}}
    spec["next"] = next_
    return {"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Stage", "metadata": {"name": name}, "spec": spec}


def _is(key: str, *values: str) -> dict:
    return {"key": key, "operator": "In", "values": list(values)}


def _exists(key: str, yes: bool = True) -> dict:
    return {"key": key, "operator": "Exists" if yes else "DoesNotExist"}


CONTAINERS_WAITING = """\
{{ $now := Now }}
conditions:
- {type: PodReadyToStartContainers, status: "True", lastProbeTime: null, lastTransitionTime: {{ $now | Quote }}}
- {type: Initialized, status: "True", lastProbeTime: null, lastTransitionTime: {{ $now | Quote }}}
- {type: Ready, status: "False", reason: ContainersNotReady, lastProbeTime: null, lastTransitionTime: {{ $now | Quote }}}
- {type: ContainersReady, status: "False", reason: ContainersNotReady, lastProbeTime: null, lastTransitionTime: {{ $now | Quote }}}
containerStatuses:
{{ range .spec.containers }}
- {image: {{ .image | Quote }}, imageID: "", name: {{ .name | Quote }}, ready: false, restartCount: 0, started: false,
   state: {waiting: {reason: ContainerCreating}}}
{{ end }}
hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
podIP: {{ PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) ( or .metadata.name "" ) ( or .metadata.namespace "" ) | Quote }}
startTime: {{ $now | Quote }}
phase: Pending
"""

CONTAINERS_RUNNING = """\
{{ $now := Now }}
conditions:
- {type: Ready, status: "True", lastProbeTime: null, lastTransitionTime: {{ $now | Quote }}}
- {type: ContainersReady, status: "True", lastProbeTime: null, lastTransitionTime: {{ $now | Quote }}}
containerStatuses:
{{ range .spec.containers }}
- {image: {{ .image | Quote }}, imageID: {{ printf "sim://%s" .image | Quote }}, name: {{ .name | Quote }}, ready: true,
   restartCount: 0, started: true, containerID: {{ printf "sim://%s" .name | Quote }},
   state: {running: {startedAt: {{ $now | Quote }}}}}
{{ end }}
phase: Running
"""

# The container ends with $code, as the kubelet reports it: terminated state, phase by exit code (restartPolicy Never).
CONTAINERS_TERMINATED = """\
{{ $now := Now }}
{{ $root := . }}
conditions:
- {type: Ready, status: "False", reason: PodCompleted, lastProbeTime: null, lastTransitionTime: {{ $now | Quote }}}
- {type: ContainersReady, status: "False", reason: PodCompleted, lastProbeTime: null, lastTransitionTime: {{ $now | Quote }}}
containerStatuses:
{{ range $index, $item := .spec.containers }}
{{ $started := $now }}
{{ with $root.status.containerStatuses }}{{ with index . $index }}{{ with .state.running }}{{ $started = .startedAt }}{{ end }}{{ end }}{{ end }}
- {image: {{ $item.image | Quote }}, imageID: {{ printf "sim://%s" $item.image | Quote }}, name: {{ $item.name | Quote }},
   ready: false, restartCount: 0, started: false, containerID: {{ printf "sim://%s" $item.name | Quote }},
   state: {terminated: {exitCode: {{ $code }}, reason: {{ if eq $code "0" }}Completed{{ else }}Error{{ end }},
     startedAt: {{ $started | Quote }}, finishedAt: {{ $now | Quote }}}}}
{{ end }}
phase: {{ if eq $code "0" }}Succeeded{{ else }}Failed{{ end }}
"""

# Whether a running pod ends by itself: every pod, unless fail-index names another completion index.
ENDS_BY_ITSELF = (
    f'if {annotation(SIM_FAIL_INDEX, "")} == "" or {annotation(SIM_FAIL_INDEX, "")} == '
    f'{annotation("batch.kubernetes.io/job-completion-index", "")} then "exits" else "runs on" end'
)


def kwok_stages() -> list[dict]:
    """The kubelet's part, played by kwok: node heartbeats, and each pod from ContainerCreating to an exit code."""
    alive = _exists(".metadata.deletionTimestamp", False)
    node_ready = '.status.conditions.[] | select( .type == "Ready" ) | .status'
    return [
        _stage("node-initialize", "Node", [{"key": node_ready, "operator": "NotIn", "values": ["True"]}],
               {"statusTemplate": NODE_STATUS}),
        _stage("node-heartbeat", "Node", [_is(".status.phase", "Running"), _is(node_ready, "True")],
               {"statusTemplate": NODE_STATUS}, delay='"20s"'),
        _stage("pod-create", "Pod", [alive, _exists(".status.podIP", False)],
               {"statusTemplate": CONTAINERS_WAITING, "event": {"type": "Normal", "reason": "Created",
                                                              "message": "Created container (simulated by kwok)"}}),
        _stage("pod-ready", "Pod",
               [alive, _is(".status.phase", "Pending"), _exists(".status.podIP"),
                _exists(".status.containerStatuses.[].state.running.startedAt", False)],
               {"statusTemplate": CONTAINERS_RUNNING, "event": {"type": "Normal", "reason": "Started",
                                                              "message": "Started container (simulated by kwok)"}},
               delay=seconds(SIM_START_SECONDS, "1")),
        _stage("pod-exit", "Pod", [alive, _is(".status.phase", "Running"), _is(ENDS_BY_ITSELF, "exits")],
               {"statusTemplate": template_annotation("code", SIM_EXIT_CODE, "0") + "\n" + CONTAINERS_TERMINATED},
               delay=seconds(SIM_RUN_SECONDS, "2")),
        # Deleted while running: SIGTERM, then the container exits after stop-seconds, or is killed at the
        # end of its grace period (deletionTimestamp), whichever comes first; then the pod object goes.
        _stage("pod-stop", "Pod", [_exists(".metadata.deletionTimestamp"), _is(".status.phase", "Pending", "Running")],
               {"statusTemplate": template_annotation("code", SIM_STOP_EXIT_CODE, "143") + "\n" + CONTAINERS_TERMINATED},
               delay=f'([({annotation(SIM_STOP_SECONDS, "1")} | tonumber), '
               f'((.metadata.deletionTimestamp | fromdate) - now)] | min | tostring) + "s"'),
        _stage("pod-remove", "Pod",
               [_exists(".metadata.deletionTimestamp"), _exists(".metadata.finalizers", False),
                _is(".status.phase", "Succeeded", "Failed")],
               {"delete": True}),
        # An external provisioner: a PersistentVolume for each claim of the class, deleted once released
        # (reclaimPolicy Delete); kube-controller-manager's PersistentVolume controller binds and releases them.
        _stage("pv-delete", "PersistentVolume",
               [_is(".spec.storageClassName", STORAGE_CLASS), _is(".status.phase", "Released"), alive],
               {"delete": True}),
        {
            "apiVersion": "kwok.x-k8s.io/v1alpha1",
            "kind": "Stage",
            "metadata": {"name": "pvc-provision"},
            "spec": {
                "resourceRef": {"apiGroup": "v1", "kind": "PersistentVolumeClaim"},
                "selector": {"matchExpressions": [
                    _is(".spec.storageClassName", STORAGE_CLASS), alive, _exists(".spec.volumeName", False)]},
                "steps": [{"apply": {"template": PV_TEMPLATE}}],
            },
        },
    ]


PV_TEMPLATE = """\
apiVersion: v1
kind: PersistentVolume
metadata:
  name: pvc-{{ .metadata.uid }}
  annotations:
    pv.kubernetes.io/provisioned-by: kwok.x-k8s.io/volume
spec:
  accessModes:
  {{ YAML .spec.accessModes 1 }}
  capacity:
    storage: {{ .spec.resources.requests.storage | Quote }}
  persistentVolumeReclaimPolicy: Delete
  storageClassName: {{ .spec.storageClassName | Quote }}
  volumeMode: {{ or .spec.volumeMode "Filesystem" | Quote }}
  claimRef:
    apiVersion: v1
    kind: PersistentVolumeClaim
    name: {{ .metadata.name | Quote }}
    namespace: {{ .metadata.namespace | Quote }}
    uid: {{ .metadata.uid | Quote }}
  hostPath:
    path: /simulated/pvc-{{ .metadata.uid }}
"""

NODE_STATUS = """\
{{ $now := Now }}
{{ $lastTransitionTime := or .metadata.creationTimestamp $now }}
conditions:
{{ range NodeConditions }}
- lastHeartbeatTime: {{ $now | Quote }}
  lastTransitionTime: {{ $lastTransitionTime | Quote }}
  message: {{ .message | Quote }}
  reason: {{ .reason | Quote }}
  status: {{ .status | Quote }}
  type: {{ .type | Quote }}
{{ end }}
addresses:
- {address: {{ NodeIP | Quote }}, type: InternalIP}
- {address: {{ .metadata.name | Quote }}, type: Hostname}
{{ with NodePort }}
daemonEndpoints:
  kubeletEndpoint:
    Port: {{ . }}
{{ end }}
allocatable:
{{ YAML .status.allocatable 1 }}
capacity:
{{ YAML .status.capacity 1 }}
nodeInfo:
  architecture: amd64
  bootID: ""
  containerRuntimeVersion: {{ printf "kwok-%s" Version | Quote }}
  kernelVersion: {{ printf "kwok-%s" Version | Quote }}
  kubeProxyVersion: ""
  kubeletVersion: {KUBELET_VERSION}
  machineID: ""
  operatingSystem: linux
  osImage: ""
  systemUUID: ""
phase: Running
""".replace("{KUBELET_VERSION}", K8S_VERSION)


# --- the control plane ------------------------------------------------------------------------------------

STATE = ROOT / ".cache" / "cluster"  # make cluster-up's; the tests start their own elsewhere
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", *ENGINES)  # in start order
# The controllers the launcher meets; "*" is every controller enabled by default, as in a production cluster.
CONTROLLERS = "*"
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None  # node heartbeats and leader leases: a steady stream nobody counts
  resources: [{group: coordination.k8s.io, resources: [leases]}]
- level: Metadata
"""


def free_ports(names) -> dict[str, int]:
    """A free port for each name, all different: every socket is held until all are bound, since the kernel may
    hand a port it has just had back to the next caller (two components on one port: the later one exits, and a
    health probe on that port is answered by the other)."""
    with contextlib.ExitStack() as held:
        sockets = {name: held.enter_context(socket.socket()) for name in names}
        for s in sockets.values():
            s.bind(("127.0.0.1", 0))
        return {name: s.getsockname()[1] for name, s in sockets.items()}


def openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise ClusterError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


def make_pki(pki: Path) -> None:
    """A CA, the serving and client certificates signed by it, and the ServiceAccount token signing key."""
    if not shutil.which("openssl"):
        raise ClusterError("openssl is needed to make the cluster's certificates (apt-get install openssl)")
    pki.mkdir(parents=True, exist_ok=True)
    ec = ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    openssl("genpkey", *ec, "-out", "ca.key", cwd=pki)
    openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=vlmjobs-sim-ca", "-days", "3650",
            "-out", "ca.crt", cwd=pki)  # fmt: skip
    loopback = "IP:127.0.0.1,DNS:localhost"
    service = ",".join(f"DNS:{n}" for n in ("kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                            "kubernetes.default.svc.cluster.local"))  # fmt: skip
    certs = {  # name: (subject, subjectAltName for a server, else None)
        "kube-apiserver": ("/CN=kube-apiserver", f"{loopback},IP:{SERVICE_IP},{service}"),
        "admin": ("/O=system:masters/CN=vlmjobs-admin", None),
        "kube-controller-manager": ("/CN=system:kube-controller-manager", None),
        "kube-scheduler": ("/CN=system:kube-scheduler", None),
        "kwok": ("/O=system:masters/CN=kwok-controller", None),  # plays the kubelet of every node, and a provisioner
        "apiserver-kubelet-client": ("/O=system:masters/CN=kube-apiserver-kubelet-client", None),
        "kwok-serving": ("/CN=kwok-kubelet", loopback),
        # the engines' managers (cluster-admin, as the control plane's own controllers run), and the servers
        # of their webhooks, which the apiserver calls on loopback and verifies against this CA
        **{e: (f"/O=system:masters/CN={e}-controller-manager", None) for e in ENGINES},
        **{f"{e}-webhook": (f"/CN={e}-webhook", loopback) for e in ENGINES},
    }
    for name, (subject, san) in certs.items():
        ext = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
        ext.append(f"extendedKeyUsage={'serverAuth' if san else 'clientAuth'}")
        if san:
            ext.append(f"subjectAltName={san}")
        (pki / f"{name}.ext").write_text("\n".join(ext) + "\n")
        openssl("genpkey", *ec, "-out", f"{name}.key", cwd=pki)
        openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=pki)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "3650", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=pki)  # fmt: skip
    openssl("genpkey", *ec, "-out", "sa.key", cwd=pki)
    openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def kubeconfig(server: str, pki: Path, user: str, namespace: str | None = None) -> str:
    """A kubeconfig (JSON, which is YAML) with the CA and the client certificate embedded."""
    import base64

    def data(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    context = {"cluster": "vlmjobs-sim", "user": user, **({"namespace": namespace} if namespace else {})}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "vlmjobs-sim", "cluster": {"server": server, "certificate-authority-data": data("ca.crt")}}],
        "users": [{"name": user, "user": {"client-certificate-data": data(f"{user}.crt"),
                                          "client-key-data": data(f"{user}.key")}}],  # fmt: skip
        "contexts": [{"name": "vlmjobs-sim", "context": context}],
        "current-context": "vlmjobs-sim",
    }
    return json.dumps(config, indent=2) + "\n"


@dataclass
class ControlPlane:
    """A running (or stopped) control plane, as recorded in ``state``/cluster.json."""

    state: Path
    bins: dict[str, str]
    ports: dict[str, int]
    apiserver_extra_args: list[str] = field(default_factory=list)
    tied: bool = False  # the processes end with the one that started them (a test session), not at make's exit

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['kube-apiserver']}"

    @property
    def audit_log(self) -> Path:
        return self.state / "audit.log"

    @property
    def pod_log(self) -> Path:
        """What every simulated container has written (CRI log format); append to it to make pods log."""
        return self.state / "pod.log"

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    def save(self) -> None:
        record = {
            "bins": self.bins,
            "ports": self.ports,
            "apiserver_extra_args": self.apiserver_extra_args,
            "tied": self.tied,
        }
        (self.state / "cluster.json").write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def load(cls, state: Path) -> ControlPlane | None:
        try:
            record = json.loads((state / "cluster.json").read_text())
        except (OSError, ValueError):
            return None
        return cls(state, record["bins"], record["ports"], record["apiserver_extra_args"], record["tied"])

    # -- processes

    def pid(self, component: str) -> int | None:
        try:
            pid = int((self.state / "pids" / component).read_text())
        except (OSError, ValueError):
            return None
        try:  # alive, and still ours (a pid can be reused)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            return None
        return pid if cmdline == self.bins[component] else None

    def start(self, component: str, args: list[str]) -> None:
        (self.state / "pids").mkdir(exist_ok=True)
        (self.state / "logs").mkdir(exist_ok=True)
        # The kernel signals when the parent *thread* ends: a process started from another thread is not tied.
        tie = self.tied and threading.current_thread() is threading.main_thread()
        with open(self.state / "logs" / f"{component}.log", "ab") as out:
            proc = subprocess.Popen(
                [self.bins[component], *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped by us, not by a Ctrl-C in make
                cwd=self.state,
                preexec_fn=die_with_parent if tie else None,
            )
        (self.state / "pids" / component).write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 10
        while self.pid(component) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # until the forked child has become the binary (its cmdline is ours until exec)

    def stop(self, component: str, timeout: float = 15) -> None:
        pid = self.pid(component)
        if pid is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # reap it when we are its parent (the tests)
                if self.pid(component) is None:
                    (self.state / "pids" / component).unlink(missing_ok=True)
                    return
                time.sleep(0.1)
        raise ClusterError(f"{component} (pid {pid}) did not stop")

    def running(self) -> list[str]:
        return [c for c in COMPONENTS if self.pid(c) is not None]

    def confirm_running(self) -> None:
        """Every component started so far still runs; else a ClusterError with the log of each that exited (one
        may exit after its own readiness was seen, while the next component starts)."""
        started = [c for c in COMPONENTS if (self.state / "pids" / c).exists()]
        if exited := [c for c in started if self.pid(c) is None]:
            logs = "\n".join(f"--- {c}'s log:\n{self.log_tail(c)}" for c in exited)
            raise ClusterError(f"{', '.join(exited)} exited while the control plane started:\n{logs}")

    def log_tail(self, component: str, lines: int = 15) -> str:
        try:
            return "\n".join((self.state / "logs" / f"{component}.log").read_text().splitlines()[-lines:])
        except OSError:
            return ""

    # -- talking to it

    def ssl_context(self):
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        return ctx

    def api(self, method: str, path: str, body: dict | None = None, *, timeout: float = 10) -> tuple[int, dict]:
        """One request as the admin: (status, decoded body)."""
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        def decoded(raw: bytes) -> dict:  # /readyz and friends answer plain text
            try:
                return json.loads(raw or b"{}")
            except ValueError:
                return {"text": raw.decode(errors="replace")}

        try:
            with urllib.request.urlopen(request, context=self.ssl_context(), timeout=timeout) as response:
                return response.status, decoded(response.read())
        except urllib.error.HTTPError as e:
            return e.code, decoded(e.read())

    def create(self, path: str, manifest: dict) -> None:
        code, body = self.api("POST", path, manifest)
        if code not in (200, 201, 409):
            raise ClusterError(f"creating {manifest['kind']} {manifest['metadata']['name']}: {code} {body.get('message')}")

    def healthy(self, component: str) -> bool:
        import ssl
        import urllib.request

        port = self.ports[f"{component}-health" if component in ENGINES else component]
        try:
            if component == "etcd":
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    return json.loads(r.read()).get("health") == "true"
            if component == "kube-apiserver":
                return self.api("GET", "/readyz", timeout=2)[0] == 200
            if component in ENGINES:  # ready: caches synced and its webhook server listening
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    return r.status == 200
            insecure = ssl.create_default_context()  # their serving certificates are self-signed
            insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=insecure, timeout=2) as r:
                return r.status == 200
        except (OSError, ValueError):
            return False

    def wait(self, what: str, check, timeout: float = 120, component: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            self.confirm_running()
            time.sleep(0.2)
        tail = f":\n{self.log_tail(component)}" if component else ""
        raise ClusterError(f"{what} not ready after {timeout:.0f} s{tail}")

    # -- the components

    def args(self, component: str) -> list[str]:
        s, p, pki = self.state, self.ports, self.pki
        api_kubeconfig = {c: str(s / f"{c}.kubeconfig") for c in ("kube-controller-manager", "kube-scheduler", "kwok")}
        if component == "etcd":
            peer = f"http://127.0.0.1:{p['etcd-peer']}"
            return [
                "--name=default", f"--data-dir={s / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{p['etcd']}", f"--advertise-client-urls=http://127.0.0.1:{p['etcd']}",
                f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}", f"--initial-cluster=default={peer}",
                "--unsafe-no-fsync",  # a throw-away cluster on a busy disk: durability buys nothing here
                "--log-level=warn",
            ]  # fmt: skip
        if component == "kube-apiserver":
            return [
                f"--etcd-servers=http://127.0.0.1:{p['etcd']}",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={p['kube-apiserver']}",
                "--endpoint-reconciler-type=none",  # a loopback address may not be the kubernetes Service's endpoint
                f"--tls-cert-file={pki / 'kube-apiserver.crt'}", f"--tls-private-key-file={pki / 'kube-apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--authorization-mode=Node,RBAC",
                # the defaults (PodSecurity, ServiceAccount, LimitRanger, ResourceQuota, DefaultStorageClass, ...)
                # and what kubeadm adds to them
                "--enable-admission-plugins=NodeRestriction",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
                "--kubelet-preferred-address-types=InternalIP",  # the nodes' names resolve nowhere
                # Stopping closes open watches within 2 s, as a rolling upgrade does; without a grace period
                # it would wait for them to end by themselves (minutes).
                "--shutdown-watch-termination-grace-period=2s",
                f"--audit-policy-file={s / 'audit-policy.yaml'}", f"--audit-log-path={self.audit_log}",
                "--audit-log-maxsize=0",  # never rotated: tests count requests in it
                "--profiling=false",
                *self.apiserver_extra_args,
            ]  # fmt: skip
        if component == "kube-controller-manager":
            cfg = api_kubeconfig[component]
            return [
                f"--kubeconfig={cfg}", f"--authentication-kubeconfig={cfg}", f"--authorization-kubeconfig={cfg}",
                "--bind-address=127.0.0.1", f"--secure-port={p[component]}",
                f"--controllers={CONTROLLERS}",
                "--use-service-account-credentials=true",  # each controller with its own RBAC role, as kubeadm does
                f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}", f"--cluster-signing-key-file={pki / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--leader-elect=false",
            ]  # fmt: skip
        if component == "kube-scheduler":
            cfg = api_kubeconfig[component]
            return [
                f"--kubeconfig={cfg}", f"--authentication-kubeconfig={cfg}", f"--authorization-kubeconfig={cfg}",
                "--bind-address=127.0.0.1", f"--secure-port={p[component]}", "--leader-elect=false",
            ]  # fmt: skip
        if component == "kwok":
            return [
                f"--kubeconfig={api_kubeconfig[component]}", f"--config={s / 'kwok.yaml'}",
                "--manage-all-nodes=false", f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
                "--node-ip=127.0.0.1", f"--node-port={p['kwok']}", f"--server-address=127.0.0.1:{p['kwok']}",
                f"--tls-cert-file={pki / 'kwok-serving.crt'}", f"--tls-private-key-file={pki / 'kwok-serving.key'}",
                f"--cidr={POD_CIDR}", "--node-lease-duration-seconds=40",
            ]  # fmt: skip
        if component == "kueue":
            return [f"--config={s / 'kueue.yaml'}", f"--kubeconfig={s / 'kueue.kubeconfig'}"]
        if component == "jobset":
            return [f"--config={s / 'jobset.yaml'}", f"--kubeconfig={s / 'jobset.kubeconfig'}"]
        raise KeyError(component)

    def start_apiserver(self) -> None:
        self.start("kube-apiserver", self.args("kube-apiserver"))
        self.wait("kube-apiserver", lambda: self.healthy("kube-apiserver"), timeout=180, component="kube-apiserver")

    def restart_apiserver(self, extra_args: list[str] | None = None) -> None:
        """Stop kube-apiserver and start it again on the same port (etcd keeps the state); ``extra_args``
        replace the flags added at the last restart, e.g. ["--watch-cache=false"]."""
        self.stop("kube-apiserver")
        if extra_args is not None:
            self.apiserver_extra_args = list(extra_args)
            self.save()
        self.start_apiserver()

    def write_config(self) -> None:
        s = self.state
        (s / "audit-policy.yaml").write_text(AUDIT_POLICY)
        docs = [*kwok_stages(), cluster_logs(self.pod_log)]
        (s / "kwok.yaml").write_text("\n---\n".join(json.dumps(d, indent=1) for d in docs) + "\n")
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())
        self.pod_log.write_text(f"{now} stdout F (simulated by kwok: no container runs)\n")
        for user in ("admin", "kube-controller-manager", "kube-scheduler", "kwok", *ENGINES):
            path = s / ("kubeconfig" if user == "admin" else f"{user}.kubeconfig")
            path.write_text(kubeconfig(self.server, self.pki, user))
            path.chmod(0o600)
        for engine in ENGINES:  # controller-runtime's webhook server reads tls.crt and tls.key from a folder
            certs = s / "certs" / engine
            certs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.pki / f"{engine}-webhook.crt", certs / "tls.crt")
            shutil.copyfile(self.pki / f"{engine}-webhook.key", certs / "tls.key")
        for engine, configuration in (("kueue", kueue_configuration), ("jobset", jobset_configuration)):
            text = json.dumps(configuration(self.ports, s / "certs" / engine), indent=1)  # JSON is YAML
            (s / f"{engine}.yaml").write_text(text + "\n")


# --- the engines: Kueue and JobSet, configured as a platform team configures them ----------------------------

ENGINE_PORTS = ("kueue-webhook", "kueue-health", "jobset-webhook", "jobset-health")
KUEUE_NAMESPACE = "kueue-system"  # Kueue's own (its configuration's namespace); no workload runs there
CLUSTER_QUEUE = "cluster-queue"  # the name make k8s's LocalQueue example points at
QUEUE_NAMESPACE, LOCAL_QUEUE = "vlmjobs", "vlmjobs"  # the namespace make k8s-apply prepares, and its queue
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
PRIORITY_CLASSES = {"low": 100, "high": 1000}  # WorkloadPriorityClasses: a higher one preempts a lower one
# Kueue manages every Job and JobSet of a namespace carrying this label, with a queue label or without: one
# without stays suspended (no quota bypasses the queue), as on a platform that enforces Kueue. Namespaces
# opt in: the control plane's own and those of tests that predate the queue label keep running unqueued.
ENFORCED_NAMESPACE_LABEL = ("kueue.vlmjobs.io/enforced", "true")
CPU_FLAVOR = "cpu"  # cpu and memory, on any node; the GPUs are a resource group of their own, one flavor a product
MIG_FLAVOR = "mig-slices"  # the MIG slices the device plugin advertises under the mixed strategy, a group of their own
WAIT_FOR_PODS_READY_TIMEOUT = "5m"  # admitted pods not all Ready by then: evicted and requeued
WEBHOOK_API = "/apis/admissionregistration.k8s.io/v1"
KUEUE_API = "/apis/kueue.x-k8s.io/v1beta2"
JOBSET_API = "/apis/jobset.x-k8s.io/v1alpha2"
# The Kueue webhooks served for what it manages here: its own objects, batch/v1 Jobs and JobSets (the release
# registers one for every integration; an integration that is off serves none, and its webhook would refuse).
KUEUE_WEBHOOKS = ("-kueue-x-k8s-io-", "-batch-v1-job", "-jobset-x-k8s-io-")
# The CRDs whose versions (v1beta1, v1beta2) Kueue converts between (its release's config/components/crd
# kustomization), so that a client of either version reads the same object.
KUEUE_CONVERTED = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")


def flavor_name(product: str) -> str:
    return product.lower()


def kueue_configuration(ports: dict[str, int], cert_dir: Path) -> dict:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports['kueue-health']}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": ports["kueue-webhook"], "certDir": str(cert_dir)},
        "internalCertManagement": {"enable": False},  # served under the cluster's CA instead (make_pki)
        "leaderElection": {"leaderElect": False},
        "clientConnection": {"qps": 50, "burst": 100},
        "manageJobsWithoutQueueName": True,
        "managedJobsNamespaceSelector": {"matchLabels": dict([ENFORCED_NAMESPACE_LABEL])},
        # A group is admitted whole only once all its pods run: pods that cannot start (a node gone, an image
        # that never pulls) give their quota back instead of holding it while others wait.
        "waitForPodsReady": {"timeout": WAIT_FOR_PODS_READY_TIMEOUT, "blockAdmission": False,
                             "requeuingStrategy": {"timestamp": "Eviction", "backoffBaseSeconds": 10}},
        "integrations": {"frameworks": ["batch/job", "jobset.x-k8s.io/jobset"]},
        # The visibility API (pending workloads' positions, an aggregated API server) reads its certificate from
        # a fixed path, /visibility; the launcher reads the Workloads themselves.
        "featureGates": {"VisibilityOnDemand": False},
    }  # fmt: skip


def jobset_configuration(ports: dict[str, int], cert_dir: Path) -> dict:
    return {
        "apiVersion": "config.jobset.x-k8s.io/v1alpha1",
        "kind": "Configuration",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports['jobset-health']}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": ports["jobset-webhook"], "certDir": str(cert_dir)},
        "internalCertManagement": {"enable": False},
        "leaderElection": {"leaderElect": False},
    }


def gibibytes(quantity: str) -> int:
    units = {"Gi": 1, "Ti": 1024}
    return int(quantity[:-2]) * units[quantity[-2:]]


def platform_objects() -> list[tuple[str, dict]]:
    """(collection path, object): the flavors, the ClusterQueue, the priority classes and the LocalQueue.
    Quota is the nodes' capacity, so two runs wanting one product's GPUs contend for them."""
    gpus: dict[str, int] = {}
    slices: dict[str, int] = {}  # MIG slices by resource name, over the nodes that offer them
    for _, product, count, _, _, *extra in NODES:
        if product and count:
            gpus[product] = gpus.get(product, 0) + count
        for resource, quantity in (extra[1] if extra else {}).items():
            slices[resource] = slices.get(resource, 0) + int(quantity)
    cpus = sum(int(node[3]) for node in NODES)
    memory = sum(gibibytes(node[4]) for node in NODES)

    def flavor(name: str, labels: dict) -> tuple[str, dict]:
        return f"{KUEUE_API}/resourceflavors", {
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": name},
            "spec": {"nodeLabels": labels},
        }  # fmt: skip

    cluster_queue = {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "ClusterQueue",
        "metadata": {"name": CLUSTER_QUEUE},
        "spec": {
            "namespaceSelector": {},
            "queueingStrategy": "BestEffortFIFO",
            "preemption": {"withinClusterQueue": "LowerPriority"},
            "resourceGroups": [
                {"coveredResources": ["cpu", "memory"],
                 "flavors": [{"name": CPU_FLAVOR, "resources": [{"name": "cpu", "nominalQuota": str(cpus)},
                                                                {"name": "memory", "nominalQuota": f"{memory}Gi"}]}]},
                {"coveredResources": ["nvidia.com/gpu"],
                 "flavors": [{"name": flavor_name(p), "resources": [{"name": "nvidia.com/gpu", "nominalQuota": str(n)}]}
                             for p, n in gpus.items()]},
                *([{"coveredResources": sorted(slices),
                    "flavors": [{"name": MIG_FLAVOR, "resources": [{"name": r, "nominalQuota": str(n)}
                                                                   for r, n in sorted(slices.items())]}]}]
                  if slices else []),
            ],
        },
    }  # fmt: skip
    return [
        flavor(CPU_FLAVOR, {}),
        *(flavor(flavor_name(p), {GPU_PRODUCT_LABEL: p}) for p in gpus),
        *([flavor(MIG_FLAVOR, {"nvidia.com/mig.strategy": "mixed"})] if slices else []),
        (f"{KUEUE_API}/clusterqueues", cluster_queue),
        *((f"{KUEUE_API}/workloadpriorityclasses",
           {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass", "metadata": {"name": name},
            "value": value, "description": f"vlmjobs simulation: {name} priority"})
          for name, value in PRIORITY_CLASSES.items()),
        ("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": QUEUE_NAMESPACE}}),
        local_queue(QUEUE_NAMESPACE),
    ]  # fmt: skip


def local_queue(namespace: str, name: str = LOCAL_QUEUE) -> tuple[str, dict]:
    return f"{KUEUE_API}/namespaces/{namespace}/localqueues", {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": namespace}, "spec": {"clusterQueue": CLUSTER_QUEUE},
    }  # fmt: skip


def webhook_configurations(cp: ControlPlane, engine: str) -> list[dict]:
    """The engine's release's webhook configurations, pointed at its server on loopback under the cluster's CA
    (the release points them at a Service, and its kustomization adds what is patched here)."""
    import base64

    proc = subprocess.run(
        [cp.bins["kubectl"], f"--kubeconfig={cp.kubeconfig}", "create", "--dry-run=client", "-o", "json",
         "-f", str(engine_manifests(engine) / "manifests.yaml")],
        capture_output=True, text=True,
    )  # fmt: skip  (kubectl reads the YAML: this script keeps to the standard library)
    if proc.returncode:
        raise ClusterError(f"reading {engine}'s webhook configurations: {proc.stderr.strip()}")
    configurations, decoder, at = [], json.JSONDecoder(), 0
    while proc.stdout[at:].strip():  # one JSON document after another
        document, at = decoder.raw_decode(proc.stdout, len(proc.stdout) - len(proc.stdout[at:].lstrip()))
        configurations += document["items"] if document.get("kind") == "List" else [document]
    ca = base64.b64encode((cp.pki / "ca.crt").read_bytes()).decode()
    for configuration in configurations:
        configuration["metadata"] = {"name": f"{engine}-{configuration['metadata']['name']}"}  # its namePrefix
        kept = []
        for webhook in configuration["webhooks"]:
            path = webhook["clientConfig"]["service"]["path"]
            if engine == "kueue" and not any(part in path for part in KUEUE_WEBHOOKS):
                continue
            url = f"https://127.0.0.1:{cp.ports[f'{engine}-webhook']}{path}"
            webhook["clientConfig"] = {"url": url, "caBundle": ca}
            if engine == "jobset" and path.endswith("-v1-pod"):  # its kustomization: JobSet's pods only
                webhook["objectSelector"] = {"matchExpressions": [
                    {"key": "jobset.sigs.k8s.io/jobset-name", "operator": "Exists"}]}  # fmt: skip
            kept.append(webhook)
        configuration["webhooks"] = kept
    return configurations


def start_engines(cp: ControlPlane) -> None:
    """JobSet and Kueue: their CRDs, their managers (ready: webhooks served), their webhooks registered, then
    the platform's queues, through those webhooks; up once the ClusterQueue is active."""
    for engine in ENGINES:
        proc = subprocess.run(
            [cp.bins["kubectl"], f"--kubeconfig={cp.kubeconfig}", "apply", "--server-side", "-f",
             str(engine_manifests(engine) / "bases")],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode:
            raise ClusterError(f"applying {engine}'s CRDs: {proc.stderr.strip()}")
    import base64

    ca = base64.b64encode((cp.pki / "ca.crt").read_bytes()).decode()
    for plural in KUEUE_CONVERTED:
        conversion = {"strategy": "Webhook", "webhook": {"conversionReviewVersions": ["v1"], "clientConfig": {
            "url": f"https://127.0.0.1:{cp.ports['kueue-webhook']}/convert", "caBundle": ca}}}  # fmt: skip
        proc = subprocess.run(
            [cp.bins["kubectl"], f"--kubeconfig={cp.kubeconfig}", "patch", "crd", f"{plural}.kueue.x-k8s.io",
             "--type=merge", "-p", json.dumps({"spec": {"conversion": conversion}})],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode:
            raise ClusterError(f"pointing {plural}' conversion at Kueue: {proc.stderr.strip()}")
    cp.wait("the engines' CRDs", lambda: all(cp.api("GET", f"{api}/{kind}")[0] == 200 for api, kind in
                                               ((KUEUE_API, "clusterqueues"), (KUEUE_API, "workloads"),
                                                (JOBSET_API, "jobsets"))))  # fmt: skip
    cp.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": KUEUE_NAMESPACE}})
    for engine in ENGINES:
        cp.start(engine, cp.args(engine))
    for engine in ENGINES:
        cp.wait(engine, lambda e=engine: cp.healthy(e), component=engine)
        for configuration in webhook_configurations(cp, engine):
            kind = configuration["kind"].lower() + "s"
            cp.create(f"{WEBHOOK_API}/{kind}", configuration)
    for path, manifest in platform_objects():
        cp.create(path, manifest)

    def active() -> bool:
        queue = cp.api("GET", f"{KUEUE_API}/clusterqueues/{CLUSTER_QUEUE}")[1]
        conditions = queue.get("status", {}).get("conditions", [])
        return any(c["type"] == "Active" and c["status"] == "True" for c in conditions)

    cp.wait(f"Kueue's ClusterQueue {CLUSTER_QUEUE}", active, component="kueue")
    cp.confirm_running()


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent goes (a killed test session leaves nothing behind)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def cluster_logs(path: Path) -> dict:
    """Every simulated container's log: one file, read as the kubelet reads a container's (CRI format)."""
    return {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "ClusterLogs",
        "metadata": {"name": "all-pods"},
        "spec": {"selector": {}, "logs": [{"logsFile": str(path), "follow": True}]},
    }


def up(state: Path = STATE, *, quiet: bool = False, tied: bool = False) -> ControlPlane:
    """Start the control plane in ``state``, or return the one already running there. ``tied``: its
    processes end when this one does."""
    old = ControlPlane.load(state)
    if old and old.running() == list(COMPONENTS) and old.healthy("kube-apiserver"):
        return old
    if old:
        down(state)
    started = time.monotonic()
    bins = {b: str(p) for b, p in build().items()}
    state.mkdir(parents=True, exist_ok=True)
    ports = free_ports(("etcd", "etcd-peer", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok",
                        *ENGINE_PORTS))  # fmt: skip
    cp = ControlPlane(state.resolve(), bins, ports, tied=tied)
    make_pki(cp.pki)
    cp.write_config()
    cp.save()
    try:
        cp.start("etcd", cp.args("etcd"))
        cp.wait("etcd", lambda: cp.healthy("etcd"), component="etcd")
        cp.start_apiserver()
        cp.create("/apis/storage.k8s.io/v1/storageclasses", storage_class())
        for node in NODES:
            cp.create("/api/v1/nodes", node_manifest(*node))
        for component in ("kube-controller-manager", "kube-scheduler", "kwok"):
            cp.start(component, cp.args(component))
        for component in ("kube-controller-manager", "kube-scheduler"):
            cp.wait(component, lambda c=component: cp.healthy(c), component=component)
        cp.wait("the simulated nodes", lambda: nodes_ready(cp), component="kwok")
        # The ServiceAccount controller's first object: the controllers are at work
        cp.wait("kube-controller-manager's controllers",
                lambda: cp.api("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
                component="kube-controller-manager")  # fmt: skip
        start_engines(cp)
    except BaseException:
        down(state, keep=True)
        raise
    if not quiet:
        log(f"control plane up in {time.monotonic() - started:.0f} s at {cp.server} (state in {state})")
    return cp


def nodes_ready(cp: ControlPlane) -> bool:
    code, body = cp.api("GET", "/api/v1/nodes")
    ready = {
        n["metadata"]["name"]
        for n in body.get("items", [])
        if any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))
    }
    return code == 200 and ready >= {n[0] for n in NODES}


def down(state: Path = STATE, *, keep: bool = False) -> None:
    """Stop every component (newest first) and remove the state, unless ``keep`` (to read the logs)."""
    cp = ControlPlane.load(state)
    if cp:
        for component in reversed(COMPONENTS):
            cp.stop(component)
        if left := cp.running():
            raise ClusterError(f"still running after stop: {', '.join(left)}")
    if not keep:
        shutil.rmtree(state, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", type=Path, default=STATE, help="the cluster's folder (default: .cache/cluster)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_build = sub.add_parser("build", help="build (or find) the binaries; prints where each is")
    p_build.add_argument("--force", action="store_true", help="rebuild even when cached or found")
    p_build.add_argument(
        "--unless-no-go", action="store_true", help="without Go, say so and succeed (fail under CI=true)"
    )
    sub.add_parser("up", help="start the control plane (or keep the running one); writes <state>/kubeconfig")
    sub.add_parser("down", help="stop every process and remove the state")
    sub.add_parser("status", help="which components run")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "build":
            if args.unless_no_go and not shutil.which("go") and os.environ.get("CI") != "true":
                with contextlib.suppress(ClusterError):
                    build()
                    return 0
                log("no Go toolchain: the cluster tests will be skipped (install Go >= 1.24 to run them)")
                return 0
            started = time.monotonic()
            paths = build(force=args.force)
            log(f"binaries ready in {time.monotonic() - started:.0f} s")
            for b, p in paths.items():
                print(f"{b}\t{p}")
        elif args.cmd == "up":
            cp = up(args.state)
            kubectl = args.state / "bin" / "kubectl"
            kubectl.parent.mkdir(exist_ok=True)
            if kubectl.is_symlink() or kubectl.exists():
                kubectl.unlink()
            kubectl.symlink_to(cp.bins["kubectl"])  # where the Makefile's KUBECTL finds it
            print(f"Control plane {K8S_VERSION} at {cp.server}, simulated nodes by kwok {KWOK_VERSION},")
            print(f"Kueue {KUEUE_VERSION} (ClusterQueue {CLUSTER_QUEUE}, LocalQueue {QUEUE_NAMESPACE}/{LOCAL_QUEUE}) "
                  f"and JobSet {JOBSET_VERSION}.")  # fmt: skip
            print("Use it with:")
            print(f"  export KUBECONFIG={os.path.relpath(cp.kubeconfig)}")
            print("  make k8s-apply && make pipeline RECIPE=recipes/tiny-demo.yaml")
            print("Stop it with: make cluster-down")
        elif args.cmd == "down":
            down(args.state)
            print("cluster: stopped and removed")
        elif args.cmd == "status":
            cp = ControlPlane.load(args.state)
            running = cp.running() if cp else []
            for c in COMPONENTS:
                print(f"{c}\t{'running' if c in running else 'stopped'}")
            return 0 if running == list(COMPONENTS) else 1
    except ClusterError as e:
        print(f"cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
