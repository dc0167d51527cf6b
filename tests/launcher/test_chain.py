"""Stages as Jobs in a chain, over the loopback fake: skipping, 409, the order of creates, the
driver. What the Job controller does (retries, exit 2, disruptions, group restarts, deadlines) is
tested on the real control plane: test_launcher_on_cluster.py."""

from __future__ import annotations

import pytest

from jobs.contract import UserError
from launcher import chain, kube, render
from tests.launcher.conftest import IMAGE, SINGLE, make
from tests.launcher.fake_kube import Attempt, complete, pod, recorded, running


def created(server) -> list[str]:
    return [r.body["metadata"]["name"] for r in server.calls("POST", "/jobs") if r.path.endswith("/jobs")]


def group_pods(*, disrupted_rank: int | None = None, failed_rank: int | None = None, code: int = 1) -> list[dict]:
    pods = []
    for rank in range(2):
        if rank == disrupted_rank:
            pods.append(pod(f"r{rank}", "Running", index=rank, disrupted="preempted"))
        elif rank == failed_rank:
            pods.append(pod(f"r{rank}", "Failed", index=rank, exit_code=code))
        else:
            pods.append(pod(f"r{rank}", "Running", index=rank))
    return pods


def test_a_stage_runs_as_its_rendered_job_and_waits_for_success(cluster, server, single):
    chain.run_stage(cluster, single, "sft", IMAGE, logs=False)
    assert server.calls("POST", "/jobs")[0].body == render.render_stage(single, "sft", IMAGE)[0]
    assert cluster.lines[0] == "==> sft: created Job vlmjobs/llava-chartqa-sft"
    assert cluster.lines[-1] == "==> sft: succeeded"


def test_a_stage_whose_job_already_succeeded_is_skipped(cluster, server, single):
    server.add_job(render.render_stage(single, "sft", IMAGE)[0], complete())
    chain.run_stage(cluster, single, "sft", IMAGE)
    assert created(server) == []
    assert cluster.lines == ["==> sft: Job vlmjobs/llava-chartqa-sft already exists: Complete", "==> sft: succeeded"]


def test_a_running_job_is_followed_not_duplicated(cluster, server, single):
    server.add_job(
        render.render_stage(single, "sft", IMAGE)[0],
        running(),
        Attempt(statuses=[complete()], pods=[pod("p", "Succeeded", exit_code=0)]),
    )
    chain.run_stage(cluster, single, "sft", IMAGE, logs=False)
    assert created(server) == []
    assert "==> sft: succeeded" in cluster.lines


def test_a_409_on_create_reports_the_existing_jobs_state(cluster, server, single):
    manifests = render.render_stage(single, "sft", IMAGE)
    server.add_job(manifests[0], running())
    job = chain._create(cluster, manifests[0], "sft")
    assert job["metadata"]["uid"] == "uid-1"
    assert cluster.lines == ["==> sft: Job vlmjobs/llava-chartqa-sft already exists: Running"]


def test_detached_submit_returns_once_created(cluster, server, single):
    chain.run_stage(cluster, single, "sft", IMAGE, follow=False)
    assert created(server) == ["llava-chartqa-sft"]
    assert not [r for r in server.calls("GET", "/jobs") if r.query.get("watch")]


def failed_attempt(recording: str, job: str) -> Attempt:
    """A Job's attempt that ends as the real Job controller ended the one recorded."""
    replay = recorded(recording, job)
    return Attempt(statuses=[replay.status], pods=replay.pods)


def test_a_job_found_failed_is_reported_with_how_to_run_it_again(cluster, server, single):
    failed = recorded("exit-1-backoff-limit", "llava-chartqa-sft")
    server.add_job(render.render_stage(single, "sft", IMAGE)[0], failed.status, Attempt(statuses=[], pods=failed.pods))
    with pytest.raises(kube.JobFailed, match=r"to run it again: vlmjobs delete --run=llava-chartqa --stage=sft$"):
        chain.run_stage(cluster, single, "sft", IMAGE)
    assert created(server) == []


def jobset_status(*conditions: tuple[str, str, str], restarts: int = 0, counted: int = 0) -> dict:
    """A JobSet's status as its controller (v0.11) writes it: conditions (type, reason, message) True."""
    return {"restarts": restarts, "restartsCountTowardsMax": counted, "conditions": [
        {"type": kind, "status": "True", "reason": reason, "message": message,
         "lastTransitionTime": "2025-01-01T00:10:00Z"} for kind, reason, message in conditions]}


COMPLETED = ("Completed", "AllJobsCompleted", "jobset completed successfully")


def test_a_multi_node_stage_is_created_as_a_jobset_and_followed_to_its_end(cluster, server, multi):
    """The JobSet controller restarts the group (status.restarts); the launcher creates nothing more, deletes nothing."""
    server.jobset_statuses["qwen2vl-chartqa-sft"] = [jobset_status(), jobset_status(restarts=1),
                                                     jobset_status(restarts=2, counted=1),
                                                     jobset_status(COMPLETED, restarts=2, counted=1)]
    chain.run_stage(cluster, multi, "sft", IMAGE, logs=False)
    created_sets = [r.body["metadata"]["name"] for r in server.calls("POST", "/jobsets")]
    assert created_sets == ["qwen2vl-chartqa-sft"] and created(server) == [] and not server.calls("DELETE", "")
    assert cluster.lines == [
        "==> sft: created JobSet vlmjobs/qwen2vl-chartqa-sft (2 nodes)",
        "==> JobSet vlmjobs/qwen2vl-chartqa-sft: Running",
        ("==> JobSet vlmjobs/qwen2vl-chartqa-sft: restarted by JobSet, restart 1 (0 of at most 1 counted; disruptions "
         "are not): every rank resumes from the last checkpoint"),
        ("==> JobSet vlmjobs/qwen2vl-chartqa-sft: restarted by JobSet, restart 2 (1 of at most 1 counted; disruptions "
         "are not): every rank resumes from the last checkpoint"),
        "==> JobSet vlmjobs/qwen2vl-chartqa-sft: Completed",
        "==> sft: succeeded after 2 restart(s)",
    ]


def test_a_restarted_launcher_follows_the_existing_jobset(cluster, server, multi):
    """A launcher killed and started again (or the driver restarted) finds the JobSet and follows it."""
    server.jobsets["qwen2vl-chartqa-sft"] = {**render.render_stage(multi, "sft", IMAGE)[0], "status": jobset_status()}
    server.jobset_statuses["qwen2vl-chartqa-sft"] = [jobset_status(restarts=1), jobset_status(COMPLETED, restarts=1)]
    chain.run_stage(cluster, multi, "sft", IMAGE, logs=False)
    assert not server.calls("POST", "/jobsets")
    assert cluster.lines[0] == "==> sft: JobSet vlmjobs/qwen2vl-chartqa-sft already exists: Running"


def test_a_jobset_failed_on_exit_2_fails_the_stage_with_exit_2_naming_the_rank(cluster, server, multi):
    failed = recorded("exit-2", "qwen2vl-chartqa-sft-node-0")
    server.add_job({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "qwen2vl-chartqa-sft-node-0",
                    "namespace": "vlmjobs", "labels": {}}, "spec": {}}, failed.status,
                   Attempt(statuses=[], pods=failed.pods))
    message = "applying FailJobSet failure policy action (first failed job: qwen2vl-chartqa-sft-node-0)"
    server.jobset_statuses["qwen2vl-chartqa-sft"] = [
        jobset_status(("Failed", "FailJobSetFailurePolicyAction", message))]
    with pytest.raises(kube.JobFailed, match=r"^stage sft: JobSet vlmjobs/qwen2vl-chartqa-sft failed: applying "
                       r"FailJobSet failure policy action \(first failed job: qwen2vl-chartqa-sft-node-0\); .*exit code 2"
                       r".*\(the stage exited 2: a recipe or data error") as info:
        chain.run_stage(cluster, multi, "sft", IMAGE, logs=False)
    assert info.value.exit_code == 2


def test_a_cluster_without_jobset_is_told_in_one_line_how_to_install_it(cluster, server, multi):
    server.jobset_served = False
    with pytest.raises(UserError, match=r"^stage sft runs on 2 nodes as a JobSet, but the cluster serves no "
                       r"jobset.x-k8s.io/v1alpha2 \(JobSet is not installed\); an admin installs it with: kubectl apply "
                       r"--server-side -f https://github.com/kubernetes-sigs/jobset/releases/download/v0.11.1/manifests.yaml$"):
        chain.run_stage(cluster, multi, "sft", IMAGE, logs=False)
    assert not server.calls("POST", "")


def test_before_1_31_a_single_node_failure_is_retried_by_the_launcher(cluster, server):
    recipe = make(SINGLE, **{"kubernetes.target_version": "1.29", "kubernetes.backoff_limit": 1})
    server.script("llava-chartqa-sft", failed_attempt("exit-1-backoff-limit", "llava-chartqa-sft"), Attempt())
    chain.run_stage(cluster, recipe, "sft", IMAGE, logs=False)
    assert created(server) == ["llava-chartqa-sft", "llava-chartqa-sft"]


def test_pipeline_starts_each_stage_after_the_last_one_succeeded_and_its_pods_ended(cluster, server, single):
    chain.pipeline(cluster, single, IMAGE, logs=False)
    assert created(server) == [f"llava-chartqa-{s}" for s in ("prepare", "sft", "dpo", "evaluate", "merge-push")]
    order = [
        (r.method, r.query.get("labelSelector", [""])[0], r.body["metadata"]["name"] if r.body else "")
        for r in server.requests
        if r.method == "POST" or "pods" in r.path
    ]
    prepare_done = max(
        i for i, (m, sel, _) in enumerate(order) if sel == "batch.kubernetes.io/job-name=llava-chartqa-prepare"
    )
    sft_created = next(i for i, (m, _, name) in enumerate(order) if name == "llava-chartqa-sft")
    assert prepare_done < sft_created
    assert (
        cluster.lines[-1]
        == "==> pipeline done: prepare, sft, dpo, evaluate, merge_push of run llava-chartqa in /runs/llava-chartqa"
    )


def test_pipeline_skips_stages_that_already_succeeded(cluster, server, single):
    server.add_job(render.render_stage(single, "prepare", IMAGE)[0], complete())
    chain.pipeline(cluster, single, IMAGE, ("prepare", "sft"), logs=False)
    assert created(server) == ["llava-chartqa-sft"]


def test_pipeline_stops_at_the_first_failed_stage(cluster, server, single):
    server.script("llava-chartqa-sft", failed_attempt("exit-2", "llava-chartqa-sft"))
    with pytest.raises(kube.JobFailed):
        chain.pipeline(cluster, single, IMAGE, logs=False)
    assert created(server) == ["llava-chartqa-prepare", "llava-chartqa-sft"]


def test_pipeline_waits_for_a_finished_stages_pods_to_end(cluster, server, single):
    server.script("llava-chartqa-prepare", Attempt(pods=[pod("p", "Running", deleting=True)]))
    with pytest.raises(kube.KubeError, match=r"pods p still not terminated"):
        chain.pipeline(cluster, single, IMAGE, logs=False)
    assert created(server) == ["llava-chartqa-prepare"]


def test_the_driver_job_is_handed_the_chain_and_followed(cluster, server, single):
    server.script(
        "llava-chartqa-pipeline",
        Attempt(
            pods=[pod("d", "Succeeded", exit_code=0)],
            logs={"d": ["==> prepare: created Job vlmjobs/llava-chartqa-prepare"]},
        ),
    )
    chain.submit_driver(cluster, single, IMAGE)
    assert server.calls("POST", "/jobs")[0].body["spec"]["template"]["spec"]["serviceAccountName"] == "vlmjobs-driver"
    assert "==> prepare: created Job vlmjobs/llava-chartqa-prepare" in cluster.lines


def test_a_driver_that_exits_2_fails_with_exit_code_2(cluster, server, single):
    server.script("llava-chartqa-pipeline", failed_attempt("exit-2", "llava-chartqa-pipeline"))
    with pytest.raises(kube.JobFailed, match=r"its log: kubectl logs -n vlmjobs job/llava-chartqa-pipeline$") as info:
        chain.submit_driver(cluster, single, IMAGE)
    assert info.value.exit_code == 2


def test_a_second_driver_is_not_created(cluster, server, single):
    server.add_job(render.render_driver_job(single, IMAGE), running())
    chain.submit_driver(cluster, single, IMAGE, follow=False)
    assert server.jobs["llava-chartqa-pipeline"]["metadata"]["uid"] == "uid-1"
    assert cluster.lines == ["==> pipeline: driver Job vlmjobs/llava-chartqa-pipeline already exists: Running"]


def test_a_jobset_made_from_another_recipe_is_refused_naming_the_keys(cluster, server, multi):
    """As for a one-node Job: a Complete JobSet of an edited recipe is not the edited recipe's result."""
    import dataclasses

    before = dataclasses.replace(multi, seed=multi.seed + 1)
    server.jobsets["qwen2vl-chartqa-sft"] = {**render.render_stage(before, "sft", IMAGE)[0],
                                             "status": jobset_status(COMPLETED)}  # fmt: skip
    with pytest.raises(UserError, match=r"^sft: JobSet vlmjobs/qwen2vl-chartqa-sft of run .* was made from another "
                                        r"recipe \(1 key differ: seed\)"):
        chain.run_stage(cluster, multi, "sft", IMAGE, logs=False)
    assert not server.calls("POST", "/jobsets")


GRPO_SERVER = {"stages": ["prepare", "grpo"], "grpo.args.use_vllm": True, "grpo.args.vllm_mode": "server",
               "grpo.vllm_server.image": "ghcr.io/vlmjobs/vllm-trl:0.31.0-trl1.16.0"}


def test_grpo_with_its_vllm_server_is_a_jobset_followed_to_the_trainers_end_and_the_servers_pods_gone(cluster, server):
    recipe = make(SINGLE, **GRPO_SERVER)
    server.jobset_statuses["llava-chartqa-grpo"] = [jobset_status(), jobset_status(COMPLETED)]
    chain.run_stage(cluster, recipe, "grpo", IMAGE, logs=False)
    assert [r.body["metadata"]["name"] for r in server.calls("POST", "/jobsets")] == ["llava-chartqa-grpo"]
    assert cluster.lines[0] == "==> grpo: created JobSet vlmjobs/llava-chartqa-grpo (1 node, a vLLM server on 1 GPU)"
    assert cluster.lines[-1] == "==> grpo: succeeded"
    waited = [r.query.get("labelSelector") for r in server.calls("GET", "/pods")]
    assert ["batch.kubernetes.io/job-name=llava-chartqa-grpo-vllm-0"] in waited  # its GPU is free once JobSet's deletion has taken its pod


def test_a_restarted_launcher_compares_the_recipe_of_the_trainer_not_of_the_server_listed_first(cluster, server):
    recipe = make(SINGLE, **GRPO_SERVER)
    server.jobsets["llava-chartqa-grpo"] = {**render.render_stage(recipe, "grpo", IMAGE)[0], "status": jobset_status()}
    server.jobset_statuses["llava-chartqa-grpo"] = [jobset_status(COMPLETED)]
    chain.run_stage(cluster, recipe, "grpo", IMAGE, logs=False)
    assert cluster.lines[0] == "==> grpo: JobSet vlmjobs/llava-chartqa-grpo already exists: Completed"
    with pytest.raises(UserError, match=r"^grpo: JobSet vlmjobs/llava-chartqa-grpo of run llava-chartqa was made from "
                       r"another recipe \(1 key differ: grpo.args.learning_rate\)"):
        chain.run_stage(cluster, make(SINGLE, **GRPO_SERVER, **{"grpo.args.learning_rate": 1e-6}), "grpo", IMAGE, logs=False)
