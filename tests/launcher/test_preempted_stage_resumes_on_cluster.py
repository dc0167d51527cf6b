"""A stage preempted by Kueue resumes from its checkpoint (issue 21), with a kubelet bridge: kwok plays the kubelet and
runs no container, so the test plays the one container that matters. Real: Kueue (quota, priority, preemption,
readmission), the Job controller, the scheduler, the launcher following the Job, and the stage itself (`python -m
jobs.sft` as the pod's own command and environment give it: its training, its checkpoint on SIGTERM, its resume).
Played here (``KubeletBridge``), as a kubelet does it: starting the container's process once kwok has made its pod
Running, SIGTERM when the pod is deleted (SIGKILL at the end of its grace period), and the process's exit status
written to the pod's status. The pod's volume is this machine's folder, mounted at the path the pod names.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from jobs import contract
from launcher import chain, kube, render, state
from tests.conftest import ROOT, run_stages, subprocess_env
from tests.launcher.conftest import IMAGE
from tests.launcher.test_launcher_kueue_on_cluster import QUEUED
from tests.launcher.test_launcher_on_cluster import Lines, assert_preempted_then_succeeded, on, recipe
from scripts.cluster import SIM_RUN_SECONDS, SIM_STOP_SECONDS
from tests.simcluster import wait_for

pytestmark = pytest.mark.cluster
A100 = "NVIDIA-A100-SXM4-40GB"  # the simulated cluster has one node of 8: the ClusterQueue's quota of this flavor
GRACE_S = 60  # the pod's terminationGracePeriodSeconds: ample for the tiny model's checkpoint on a loaded machine
# Far more steps than are trained between the first step and the SIGTERM, and few enough to resume in seconds. Measured
# on two cores: the SIGTERM came 0.4-0.5 s after the high run was created, at step 2 or 3 (the first steps are the
# slowest); warm, the stage trains 24 steps/s on an idle machine and 4 under load 5, so this is room for a preemption
# 8 times slower at full speed (a loaded machine slows the stage's steps and the control plane's preemption alike)
STEPS = 100


@dataclass
class Attempt:
    """One pod's container, played by a local process."""

    pod: str
    process: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    output: Lines = field(default_factory=Lines)
    signalled: float | None = None  # monotonic time of the SIGTERM: when the pod was deleted
    grace_ends: float | None = None
    exit_code: int | None = None
    reported: dict | None = None  # the terminated state written to the pod's status
    ended: float | None = None


class KubeletBridge:
    """The kubelet's part for the pods of one Job, polled every 0.2 s in a thread of its own: a pod Running (kwok has
    "started" it) and not being deleted gets a local process running its container's command with its environment;
    a pod deleted gets SIGTERM, and SIGKILL at the end of its grace period; a process's exit status goes to its pod's
    status (phase and the container's terminated state), as the kubelet reports it. Its pods carry SIM_RUN_SECONDS
    long enough that kwok never ends them itself, and SIM_STOP_SECONDS of their grace period, so that kwok marks a
    deleted one terminated only when the kubelet would have killed it (scripts/cluster.py, kwok_stages)."""

    def __init__(self, real_cluster, namespace: str, job: str, volume: Path):
        from kubernetes import client

        self.cluster, self.namespace, self.volume = real_cluster, namespace, volume
        self.core = client.CoreV1Api(real_cluster.api_client())
        self.pods_path = f"/api/v1/namespaces/{namespace}/pods?labelSelector=job-name={job}"
        self.attempts: list[Attempt] = []
        self.changed = threading.Condition()
        self.stopping = threading.Event()
        self.error: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> KubeletBridge:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)
        for attempt in self.attempts:
            if attempt.process.poll() is None:
                attempt.process.kill()
                attempt.process.wait(timeout=30)
            print(f"--- the container of pod {attempt.pod} (exit code {attempt.process.returncode}):",
                  *attempt.output[-40:], sep="\n")  # fmt: skip

    def attempt(self, number: int, timeout: float) -> Attempt:
        """The ``number``-th container started (1 first), waiting for it."""
        with self.changed:
            found = self.changed.wait_for(lambda: len(self.attempts) >= number or self.error, timeout)
        self._raise()
        assert found, f"container {number} not started within {timeout:.0f} s: {[a.pod for a in self.attempts]}"
        return self.attempts[number - 1]

    def ended(self, attempt: Attempt, timeout: float) -> Attempt:
        """``attempt`` once its exit status is in its pod's status."""
        with self.changed:
            self.changed.wait_for(lambda: attempt.reported is not None or self.error, timeout)
        self._raise()
        assert attempt.reported is not None, f"the container of pod {attempt.pod} did not end within {timeout:.0f} s"
        return attempt

    def _raise(self) -> None:
        if self.error:
            raise self.error[0]

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                self._turn()
                time.sleep(0.2)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            with self.changed:
                self.error.append(e)
                self.changed.notify_all()

    def _turn(self) -> None:
        pods = {p["metadata"]["name"]: p for p in self.cluster.get(self.pods_path)["items"]}
        mine = {a.pod: a for a in self.attempts}
        for name, pod in pods.items():
            if name not in mine and pod["status"].get("phase") == "Running" and not state.deleting(pod):
                self._start(pod)
            elif name in mine and state.deleting(pod) and mine[name].grace_ends is None:
                attempt = mine[name]
                attempt.process.send_signal(signal.SIGTERM)
                attempt.signalled = time.monotonic()
                attempt.grace_ends = attempt.signalled + pod["spec"]["terminationGracePeriodSeconds"]
        for attempt in self.attempts:
            if attempt.grace_ends and attempt.process.poll() is None and time.monotonic() > attempt.grace_ends:
                attempt.process.kill()  # the grace period is over
            if attempt.reported is None and attempt.process.poll() is not None:
                attempt.process.wait()
                self._report(attempt)

    def _start(self, pod: dict) -> None:
        (container,) = pod["spec"]["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["runs"] == str(self.volume), mounts  # the claim, where the pod mounts it: this machine's folder
        env = {e["name"]: e["value"] for e in container["env"]}  # plain values only: this recipe names no Secret
        program, *args = container["command"]
        argv = [sys.executable if program == "python" else program, *args]  # the image's python is this one
        # on the CPU even where this machine has a GPU: the stage runs where the test runs, not on an A100
        process = subprocess.Popen(argv, cwd=ROOT, env=subprocess_env(**env, CUDA_VISIBLE_DEVICES=""),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        attempt = Attempt(pod["metadata"]["name"], process)

        def read() -> None:
            for line in process.stdout:
                attempt.output.append(line.rstrip("\n"))

        threading.Thread(target=read, daemon=True).start()
        with self.changed:
            self.attempts.append(attempt)
            self.changed.notify_all()

    def _report(self, attempt: Attempt) -> None:
        """The container's end in its pod's status, as the kubelet patches it (strategic merge: containers by name)."""
        code = attempt.process.returncode
        code = 128 - code if code < 0 else code  # killed by a signal: 128 + its number, as a container's exit code
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        # None when already gone: kwok ended it at the end of its grace period, as the kubelet would have killed it
        pod = self.cluster.get(f"/api/v1/namespaces/{self.namespace}/pods/{attempt.pod}")
        if pod:
            (status,) = pod["status"]["containerStatuses"]
            started = (status.get("state") or {}).get("running", {}).get("startedAt", now)
            ended = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "startedAt": started,
                     "finishedAt": now}  # fmt: skip
            containers = [{"name": status["name"], "ready": False, "started": False,
                           "state": {"running": None, "terminated": ended}}]  # fmt: skip
            not_ready = {"status": "False", "reason": "PodCompleted", "lastTransitionTime": now}
            body = {"status": {"phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": containers,
                               "conditions": [{"type": "Ready", **not_ready}, {"type": "ContainersReady", **not_ready}]}}
            self.core.patch_namespaced_pod_status(attempt.pod, self.namespace, body,
                                                  _content_type="application/strategic-merge-patch+json")
        with self.changed:
            attempt.exit_code, attempt.reported, attempt.ended = code, (ended if pod else {}), time.monotonic()
            self.changed.notify_all()


def on_the_volume(volume: Path, model: Path, chartqa: Path) -> dict:
    """The tiny model and the data copied onto the run volume, as a cluster's recipe names them there; the overrides."""
    shutil.copytree(model, volume / "models" / "tiny-llava")
    shutil.copytree(chartqa, volume / "data" / "chartqa")
    return {"model.name_or_path": str(volume / "models" / "tiny-llava"),
            "data.sft": {"path": str(volume / "data" / "chartqa"), "format": "chartqa", "eval_split": "val",
                         "test_split": "test"}}  # fmt: skip


def test_a_stage_preempted_by_kueue_saves_on_sigterm_is_readmitted_and_resumes_from_its_checkpoint(
    real_cluster, queued_namespace, tiny_model, synthetic_data, tmp_path
):
    """Quota for 8 A100s: the launcher's low-priority sft on one A100 is admitted and its stage trains; another run's
    high-priority sft on 8 arrives once the stage has logged a step. Kueue preempts the low one (the Job suspended, its
    pod deleted), the stage saves a checkpoint on SIGTERM and exits 143, and the launcher says preempted and waits.
    Once the high run is done Kueue admits the low one again, its new pod's stage resumes from that checkpoint and
    finishes, and the launcher reports success with no restart; Kueue's Workload is the same one throughout, with one
    preemption on record."""
    ns = queued_namespace
    started = time.monotonic()
    volume = tmp_path / "volume"
    args = {"max_steps": STEPS, "per_device_train_batch_size": 1, "logging_steps": 1, "save_steps": 10_000,
            "report_to": "none"}  # fmt: skip
    low = recipe(ns, {SIM_RUN_SECONDS: "3600", SIM_STOP_SECONDS: str(GRACE_S)}, **QUEUED,
                 **on_the_volume(volume, tiny_model("llava"), synthetic_data("chartqa")),
                 **{"run.id": "low", "kubernetes.priority": "low", "resources.gpu_product": A100, "resources.gpus": 1,
                    "kubernetes.mount_path": str(volume), "kubernetes.termination_grace_period_seconds": GRACE_S,
                    "prepare.max_rows": 40, "sft.method": "full", "sft.args": args})  # fmt: skip
    high = recipe(ns, {SIM_RUN_SECONDS: "3"}, **QUEUED,
                  **{"run.id": "high", "kubernetes.priority": "high", "resources.gpu_product": A100, "resources.gpus": 8})
    # prepare, in-process, on the run folder the Job's stage reads: the recipe as the cluster resolves it
    resolved = tmp_path / "low.yaml"
    resolved.write_text(yaml.safe_dump(render.cluster_recipe(low, IMAGE).to_dict(), sort_keys=False))
    run_dir = run_stages(resolved, "prepare").run_dir
    assert run_dir == volume / "low"

    job = render.job_name(low, "sft")
    c, other = on(real_cluster, ns), on(real_cluster, ns)
    outcome: list[BaseException | None] = []
    high_outcome: list[BaseException | None] = []

    def follow(cluster: kube.Cluster, r, ended: list) -> None:
        try:
            chain.run_stage(cluster, r, "sft", IMAGE, logs=False)
            ended.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            ended.append(e)

    with KubeletBridge(real_cluster, ns, job, volume) as kubelet:
        follower = threading.Thread(target=follow, args=(c, low, outcome), daemon=True)
        follower.start()
        first = kubelet.attempt(1, 120)
        # training, not importing (or ended: its output says why)
        wait_for("the stage's first step", lambda: first.process.poll() is not None
                 or any(x.startswith("sft: step 1/") for x in first.output), 300)  # fmt: skip
        assert first.process.poll() is None, list(first.output)
        low_workload = real_cluster.workload_of(ns, "Job", job)
        assert state.condition(low_workload, "Admitted"), low_workload["status"]
        preempting = time.monotonic()

        higher = threading.Thread(target=follow, args=(other, high, high_outcome), daemon=True)
        higher.start()  # waits in the queue until Kueue has preempted the low run, then runs
        kubelet.ended(first, GRACE_S + 120)
        assert first.signalled, f"the stage ended (exit {first.exit_code}) before Kueue preempted it: raise STEPS"
        saved = contract.newest_complete_checkpoint(run_dir / ".sft.partial" / "checkpoints")  # before any resume
        signalled_after, stopped_after = first.signalled - preempting, time.monotonic() - preempting
        higher.join(timeout=180)
        assert high_outcome == [None] and other.lines[-1] == "==> sft: succeeded", (high_outcome, other.lines)

        second = kubelet.ended(kubelet.attempt(2, 180), 600)
        follower.join(timeout=120)
    took = time.monotonic() - started
    print(*c.lines, sep="\n")

    # the first container: stopped by SIGTERM mid-run, a checkpoint at the step it stopped, exit 143
    said = first.output.wait_for(lambda x: x.startswith("sft: stopped on SIGTERM at step "), 0)
    step = int(said.removeprefix("sft: stopped on SIGTERM at step ").split(";")[0])
    assert 1 <= step < STEPS, said
    assert first.exit_code == contract.EXIT_SIGTERM == 143 and first.reported.get("exitCode") == 143, first.reported
    # the second: resumed from that checkpoint, its first step the one after it, to the last step; exit 0
    checkpoint = str(run_dir / ".sft.partial" / "checkpoints" / f"checkpoint-{step}")
    assert saved == checkpoint, (saved, said)
    assert f"sft: resuming from {checkpoint}" in second.output, list(second.output)
    first_step = next(x for x in second.output if x.startswith("sft: step "))
    assert first_step.startswith(f"sft: step {step + 1}/{STEPS} "), first_step
    assert second.exit_code == 0, list(second.output)
    record = contract.read_json(run_dir / "sft" / contract.SUCCESS_FILE)
    assert record["resumed_from"] == checkpoint and record["steps"] == STEPS, record
    # the pod's end is the bridge's, not kwok's: kwok's pod-exit would come only after SIM_RUN_SECONDS
    pod = real_cluster.get(f"/api/v1/namespaces/{ns}/pods/{second.pod}")
    (status,) = pod["status"]["containerStatuses"]
    assert pod["status"]["phase"] == "Succeeded" and status["state"]["terminated"] == second.reported, pod["status"]

    # the launcher: preempted, not failed; then succeeded, no restart counted
    assert outcome == [None], outcome
    assert_preempted_then_succeeded(c.lines, "Job", f"{ns}/{job}", "Complete")
    # Kubernetes' and Kueue's own records: no failed pod counted, the same Workload, one preemption
    job_status = real_cluster.get(f"/apis/batch/v1/namespaces/{ns}/jobs/{job}")["status"]
    assert job_status.get("failed", 0) == 0 and job_status.get("succeeded") == 1, job_status
    final = real_cluster.workload_of(ns, "Job", job)
    assert final["metadata"]["uid"] == low_workload["metadata"]["uid"]  # never deleted by vlmjobs
    assert state.condition(final, "Finished"), final["status"]
    evictions = [(e["reason"], e["count"]) for e in final["status"].get("schedulingStats", {}).get("evictions", [])]
    assert evictions == [("Preempted", 1)], final["status"]
    print(f"SIGTERM {signalled_after:.1f} s after the high run was created, checkpoint at step {step} of {STEPS}, the "
          f"container's end reported after {stopped_after:.1f} s; containers {first.started - started:.0f}-"
          f"{first.ended - started:.0f} s and {second.started - started:.0f}-{second.ended - started:.0f} s of {took:.0f} s")
