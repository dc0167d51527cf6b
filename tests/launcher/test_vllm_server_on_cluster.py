"""GRPO's vLLM server pod (issue 25) against the real JobSet and Kueue controllers: the launcher's JobSet of the trainer
and the server goes through the LocalQueue, admitted whole; JobSet starts the server first and the trainer once the
server is ready, and the trainer's exit 0 completes the JobSet while the server, which never exits by itself, still
runs (successPolicy, decided by the JobSet controller, which then deletes the server). kwok plays the kubelet (a pod's
run time comes from its annotations, tests/simcluster.py)."""

from __future__ import annotations

from datetime import datetime

import pytest

from launcher import chain, render, state
from tests.launcher.conftest import IMAGE
from tests.launcher.test_launcher_on_cluster import on, recipe
from scripts.cluster import CLUSTER_QUEUE, JOBSET_API, LOCAL_QUEUE, SIM_RUN_SECONDS, SIM_START_SECONDS
from tests.simcluster import wait_for

pytestmark = pytest.mark.cluster
H100_FLAVOR = "nvidia-h100-80gb-hbm3"  # scripts/cluster.py names a flavor after its product, lower-cased
SERVER = {"stages": ["prepare", "grpo"], "grpo.args.use_vllm": True, "grpo.args.vllm_mode": "server",
          "grpo.vllm_server.image": "ghcr.io/vlmjobs/vllm-trl:0.31.0-trl1.16.0", "kubernetes.queue": LOCAL_QUEUE}
SERVER_START_S = 5  # the server's pod turns ready this long after it starts (a model loading)


def when(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def test_the_trainers_exit_0_completes_the_jobset_whose_server_started_first_and_never_exits(real_cluster, queued_namespace):
    ns = queued_namespace
    r = recipe(ns, {SIM_RUN_SECONDS: "8"}, **SERVER, **{"run.id": "rl"})
    (manifest,) = render.render_stage(r, "grpo", IMAGE)
    # the API server and JobSet's webhook accept the JobSet as rendered, and Pod Security the server's pod
    code, body = real_cluster.control_plane.api("POST", f"{JOBSET_API}/namespaces/{ns}/jobsets?dryRun=All&fieldValidation=Strict", manifest)
    assert code == 201, body.get("message")
    (server,) = [x["template"] for x in manifest["spec"]["replicatedJobs"] if x["name"] == render.SERVER_JOB]
    pod = {"apiVersion": "v1", "kind": "Pod", "spec": server["spec"]["template"]["spec"],
           "metadata": {**server["spec"]["template"]["metadata"], "name": "server-dry", "namespace": ns}}
    code, body = real_cluster.control_plane.api("POST", f"/api/v1/namespaces/{ns}/pods?dryRun=All&fieldValidation=Strict", pod)
    assert code == 201, body.get("message")

    # the server runs for ever (an hour here), and is ready only after SERVER_START_S; the trainer exits 0 after 8 s
    server["spec"]["template"]["metadata"]["annotations"].update({SIM_RUN_SECONDS: "3600",
                                                                    SIM_START_SECONDS: str(SERVER_START_S)})
    code, body = real_cluster.control_plane.api("POST", f"{JOBSET_API}/namespaces/{ns}/jobsets", manifest)
    assert code == 201, body.get("message")
    jobs, pods = f"/apis/batch/v1/namespaces/{ns}/jobs", f"/api/v1/namespaces/{ns}/pods?labelSelector=job-name="
    # Kueue admits the suspended JobSet, whose Jobs JobSet made suspended: it resumes the server's first, the trainer's
    # once the server's pod is ready (InOrder); without it the trainer's pod would start SERVER_START_S earlier
    (trainer_pod,) = wait_for("the trainer's pod", lambda: real_cluster.get(pods + render.group_job_name(r, "grpo"))["items"], 90)
    (server_pod,) = real_cluster.get(pods + render.server_job_name(r, "grpo"))["items"]
    ready = state.condition(server_pod, "Ready")
    assert ready and ready["status"] == "True", server_pod["status"]
    assert when(trainer_pod["metadata"]["creationTimestamp"]) >= when(ready["lastTransitionTime"])

    c = on(real_cluster, ns)
    chain.run_stage(c, r, "grpo", IMAGE, logs=False)  # follows the JobSet it finds to its end
    assert c.lines[0].startswith(f"==> grpo: JobSet {ns}/rl-grpo already exists: "), c.lines
    assert c.lines[-1] == "==> grpo: succeeded", c.lines
    jobset = real_cluster.get(f"{JOBSET_API}/namespaces/{ns}/jobsets/rl-grpo")
    completed = state.condition(jobset, "Completed")
    assert completed["status"] == "True" and completed["reason"] == "AllJobsCompleted", jobset["status"]
    assert state.jobset_restarts(jobset)[0] == 0
    statuses = {s["name"]: s for s in jobset["status"]["replicatedJobsStatus"]}
    assert statuses["node"]["succeeded"] == 1 and statuses["vllm"].get("succeeded", 0) == 0  # the server did not exit
    assert statuses["vllm"].get("failed", 0) == 0
    # the controller deleted the server (its pods were gone before the launcher said succeeded)
    assert real_cluster.get(f"{jobs}/{render.server_job_name(r, 'grpo')}") is None
    # Kueue admitted the two together: the server's GPU is part of the stage's quota
    workload = real_cluster.workload_of(ns, "JobSet", "rl-grpo")
    assert workload["status"]["admission"]["clusterQueue"] == CLUSTER_QUEUE
    assignments = {p["name"]: p for p in workload["status"]["admission"]["podSetAssignments"]}
    assert set(assignments) == {"vllm", "node"}
    assert all(a["count"] == 1 and a["flavors"]["nvidia.com/gpu"] == H100_FLAVOR for a in assignments.values())
