"""Kueue and JobSet on the project's control plane (issue 21): the engines a platform team runs decide
admission, preemption and a multi-node group's restarts, not the launcher. The manifests are written here
by hand, shaped as the launcher is to render them (one replicated Job of ``nodes`` pods; the child Job's
podFailurePolicy turns exit 2 and a disruption into Job failures the JobSet's rules tell apart); kwok plays
the kubelet (a pod's exit code and run time come from its annotations, tests/simcluster.py). What is
asserted comes from the engines' documented behaviour, read back from their objects.
"""

from __future__ import annotations

import time

import pytest

from scripts.cluster import (
    CLUSTER_QUEUE,
    JOBSET_API,
    LOCAL_QUEUE,
    PRIORITY_LABEL,
    QUEUE_LABEL,
    SIM_EXIT_CODE,
    SIM_FAIL_INDEX,
    SIM_RUN_SECONDS,
)
from tests.launcher.conftest import IMAGE
from tests.simcluster import wait_for

pytestmark = pytest.mark.cluster
H100, A100 = "NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-40GB"
EXIT_USER_ERROR = 2
# The child Job's policy and the JobSet's rules that read it: the Job controller's failure message names
# what matched (pkg/controller/job/pod_failure_policy.go), and a JobSet rule matches that message.
USER_ERROR_MESSAGE = f"failed with exit code {EXIT_USER_ERROR} matching FailJob rule"
DISRUPTION_MESSAGE = "has condition DisruptionTarget matching FailJob rule"


def pod_template(gpus: int, product: str, annotations: dict) -> dict:
    """A pod that meets the restricted Pod Security Standard of the prepared namespace, on ``gpus`` GPUs."""
    return {
        "metadata": {"annotations": {SIM_RUN_SECONDS: "2", **annotations}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "nodeSelector": {"nvidia.com/gpu.product": product},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "main", "image": IMAGE,
                "resources": {"requests": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": str(gpus)},
                              "limits": {"nvidia.com/gpu": str(gpus)}},
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }  # fmt: skip


def job(namespace: str, name: str, *, gpus: int, product: str, priority: str | None = None, **annotations) -> dict:
    labels = {QUEUE_LABEL: LOCAL_QUEUE, **({PRIORITY_LABEL: priority} if priority else {})}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"backoffLimit": 0, "template": pod_template(gpus, product, annotations)},
    }


def jobset(namespace: str, name: str, *, max_restarts: int, **annotations) -> dict:
    """A 2-node stage: one replicated Job of two indexed pods, 4 H100s each, through the LocalQueue."""
    child = {
        "parallelism": 2, "completions": 2, "completionMode": "Indexed", "backoffLimit": 0,
        "podFailurePolicy": {"rules": [
            {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob",
             "onExitCodes": {"containerName": "main", "operator": "In", "values": [EXIT_USER_ERROR]}},
        ]},
        "template": pod_template(4, H100, annotations),
    }  # fmt: skip
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "namespace": namespace, "labels": {QUEUE_LABEL: LOCAL_QUEUE}},
        "spec": {
            "failurePolicy": {
                "maxRestarts": max_restarts,
                "rules": [
                    {"name": "UserError", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"],
                     "onJobFailureMessagePatterns": [USER_ERROR_MESSAGE]},
                    {"name": "Disruption", "action": "RestartJobSetAndIgnoreMaxRestarts",
                     "onJobFailureReasons": ["PodFailurePolicy"], "onJobFailureMessagePatterns": [DISRUPTION_MESSAGE]},
                ],  # anything else (a crash: BackoffLimitExceeded) restarts the group, counted
            },
            "replicatedJobs": [{"name": "node", "replicas": 1, "template": {"spec": child}}],
        },
    }  # fmt: skip


def create(real_cluster, path: str, manifest: dict) -> None:
    code, body = real_cluster.control_plane.api("POST", path, manifest)
    assert code == 201, f"creating {manifest['kind']} {manifest['metadata']['name']}: {code} {body.get('message')}"


def condition(obj: dict | None, kind: str) -> dict | None:
    return next((c for c in (obj or {}).get("status", {}).get("conditions", []) if c["type"] == kind), None)


def is_true(obj: dict | None, kind: str) -> bool:
    found = condition(obj, kind)
    return bool(found and found["status"] == "True")


def finished_jobset(real_cluster, namespace: str, name: str, timeout: float = 120) -> dict:
    path = f"{JOBSET_API}/namespaces/{namespace}/jobsets/{name}"
    return wait_for(
        f"JobSet {name} finished",
        lambda: (js := real_cluster.get(path)) and (is_true(js, "Completed") or is_true(js, "Failed")) and js,
        timeout,
    )


def running_pods(real_cluster, namespace: str, selector: str) -> list[dict]:
    pods = real_cluster.get(f"/api/v1/namespaces/{namespace}/pods?labelSelector={selector}")["items"]
    return [p for p in pods if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]


# ---------------------------------------------------------------------------------------------
# A multi-node stage as a JobSet: its restarts decided by the JobSet controller


def test_a_jobset_is_admitted_whole_through_the_local_queue_with_its_headless_service(real_cluster, queued_namespace):
    ns = queued_namespace
    create(real_cluster, f"{JOBSET_API}/namespaces/{ns}/jobsets", jobset(ns, "g", max_restarts=0))
    done = finished_jobset(real_cluster, ns, "g")
    assert is_true(done, "Completed"), done["status"]
    workload = real_cluster.workload_of(ns, "JobSet", "g")
    assert is_true(workload, "Admitted")
    admission = workload["status"]["admission"]
    assert admission["clusterQueue"] == CLUSTER_QUEUE
    (pod_set,) = admission["podSetAssignments"]
    assert pod_set["count"] == 2 and pod_set["flavors"]["nvidia.com/gpu"] == H100.lower()
    # the ranks find each other by name: the headless Service JobSet creates for the group
    service = real_cluster.get(f"/api/v1/namespaces/{ns}/services/g")
    assert service["spec"]["clusterIP"] == "None"


def test_a_crashed_rank_is_retried_by_the_jobset_up_to_max_restarts(real_cluster, queued_namespace):
    ns = queued_namespace
    crash = {SIM_EXIT_CODE: "1", SIM_FAIL_INDEX: "1"}
    create(real_cluster, f"{JOBSET_API}/namespaces/{ns}/jobsets", jobset(ns, "crash", max_restarts=1, **crash))
    done = finished_jobset(real_cluster, ns, "crash")
    failed = condition(done, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "ReachedMaxRestarts", done["status"]
    assert done["status"]["restarts"] == 1 and done["status"].get("restartsCountTowardsMax") == 1


def test_exit_2_fails_the_jobset_at_once(real_cluster, queued_namespace):
    ns = queued_namespace
    error = {SIM_EXIT_CODE: str(EXIT_USER_ERROR), SIM_FAIL_INDEX: "1"}
    create(real_cluster, f"{JOBSET_API}/namespaces/{ns}/jobsets", jobset(ns, "usererr", max_restarts=3, **error))
    done = finished_jobset(real_cluster, ns, "usererr")
    failed = condition(done, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "FailJobSetFailurePolicyAction", done["status"]
    assert failed["message"].endswith("(first failed job: usererr-node-0)")
    assert done["status"].get("restarts", 0) == 0


def test_an_evicted_rank_restarts_the_group_without_counting(real_cluster, queued_namespace):
    ns = queued_namespace
    drain = jobset(ns, "drain", max_restarts=0, **{SIM_RUN_SECONDS: "6"})
    create(real_cluster, f"{JOBSET_API}/namespaces/{ns}/jobsets", drain)
    selector = "jobset.sigs.k8s.io/jobset-name=drain,batch.kubernetes.io/job-completion-index=1"
    (rank_1,) = wait_for("rank 1 running", lambda: running_pods(real_cluster, ns, selector), 60)
    name = rank_1["metadata"]["name"]
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": ns}}
    create(real_cluster, f"/api/v1/namespaces/{ns}/pods/{name}/eviction", eviction)  # as a node drain does
    done = finished_jobset(real_cluster, ns, "drain")
    assert is_true(done, "Completed"), done["status"]  # maxRestarts 0: a counted restart would have failed it
    assert done["status"]["restarts"] == 1 and done["status"].get("restartsCountTowardsMax", 0) == 0


# ---------------------------------------------------------------------------------------------
# Kueue: admission, preemption by priority, and a reason for what waits


def test_a_higher_priority_job_preempts_a_lower_one_suspended_then_readmitted(real_cluster, queued_namespace):
    """Quota for one 8-GPU A100 run (one node's worth): low is admitted, suspended (not failed) when high
    arrives, readmitted once high is done, and completes; Kueue keeps its Workload throughout."""
    ns = queued_namespace
    jobs = f"/apis/batch/v1/namespaces/{ns}/jobs"
    create(real_cluster, jobs, job(ns, "low", gpus=8, product=A100, priority="low", **{SIM_RUN_SECONDS: "12"}))
    wait_for("low running", lambda: running_pods(real_cluster, ns, "job-name=low"), 60)
    low_workload = real_cluster.workload_of(ns, "Job", "low")
    assert is_true(low_workload, "Admitted")
    create(real_cluster, jobs, job(ns, "high", gpus=8, product=A100, priority="high", **{SIM_RUN_SECONDS: "3"}))

    evicted = wait_for(
        "low preempted",
        lambda: (w := real_cluster.workload_of(ns, "Job", "low")) and is_true(w, "Evicted") and w,
        60,
    )
    assert condition(evicted, "Evicted")["reason"] == "Preempted"
    assert condition(evicted, "Preempted")["reason"] == "InClusterQueue"
    suspended = wait_for(
        "low suspended", lambda: (j := real_cluster.get(f"{jobs}/low")) and j["spec"]["suspend"] and j, 30
    )
    assert not is_true(suspended, "Failed")
    assert suspended["status"].get("failed", 0) == 0  # the preempted pod is not counted against backoffLimit 0

    wait_for("high complete", lambda: is_true(real_cluster.get(f"{jobs}/high"), "Complete"), 60)
    low = wait_for("low complete", lambda: (j := real_cluster.get(f"{jobs}/low")) and is_true(j, "Complete") and j, 90)
    assert low["status"].get("failed", 0) == 0
    final = real_cluster.workload_of(ns, "Job", "low")
    assert final["metadata"]["uid"] == low_workload["metadata"]["uid"]  # the same Workload, never deleted
    assert is_true(final, "Finished")


def test_a_job_whose_flavor_no_node_has_waits_with_kueues_reason(real_cluster, queued_namespace):
    ns = queued_namespace
    started = time.monotonic()
    create(real_cluster, f"/apis/batch/v1/namespaces/{ns}/jobs", job(ns, "nowhere", gpus=1, product="NVIDIA-B200"))
    workload = wait_for(
        "Kueue's reason for not admitting it",
        lambda: (w := real_cluster.workload_of(ns, "Job", "nowhere")) and condition(w, "QuotaReserved") and w,
        30,
    )
    assert time.monotonic() - started < 30
    reserved = condition(workload, "QuotaReserved")
    assert reserved["status"] == "False" and reserved["reason"] == "Pending"
    assert "couldn't assign flavors to pod set main" in reserved["message"], reserved["message"]
    assert real_cluster.get(f"/apis/batch/v1/namespaces/{ns}/jobs/nowhere")["spec"]["suspend"] is True


def test_an_unlabelled_job_in_an_enforced_namespace_stays_suspended(real_cluster, queued_namespace):
    """manageJobsWithoutQueueName, as the platform chose: no Job runs around the queue."""
    ns = queued_namespace
    unlabelled = job(ns, "bypass", gpus=1, product=H100)
    unlabelled["metadata"]["labels"] = {}
    create(real_cluster, f"/apis/batch/v1/namespaces/{ns}/jobs", unlabelled)
    time.sleep(3)
    bypass = real_cluster.get(f"/apis/batch/v1/namespaces/{ns}/jobs/bypass")
    assert bypass["spec"]["suspend"] is True and bypass["status"].get("active", 0) == 0


def test_a_mig_slice_is_admitted_through_the_queue_and_lands_on_the_mig_node(real_cluster, queued_namespace):
    """The device plugin's mixed strategy advertises slices, not GPUs: without a quota for them in the
    ClusterQueue, Kueue would hold a MIG request as inadmissible for ever."""
    ns = queued_namespace
    sliced = job(ns, "slice", gpus=1, product=A100)
    resources = sliced["spec"]["template"]["spec"]["containers"][0]["resources"]
    resources["requests"] = {"cpu": "1", "memory": "1Gi", "nvidia.com/mig-1g.5gb": "2"}
    resources["limits"] = {"nvidia.com/mig-1g.5gb": "2"}
    create(real_cluster, f"/apis/batch/v1/namespaces/{ns}/jobs", sliced)
    (pod,) = wait_for("the slice's pod running", lambda: running_pods(real_cluster, ns, "job-name=slice"), 60)
    assert pod["spec"]["nodeName"] == "mig-a100-0"
    (pod_set,) = real_cluster.workload_of(ns, "Job", "slice")["status"]["admission"]["podSetAssignments"]
    assert pod_set["flavors"]["nvidia.com/mig-1g.5gb"] == "mig-slices"
