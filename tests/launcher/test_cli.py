"""The `vlmjobs` cluster commands in-process, with $KUBECONFIG naming the loopback API server:
what they print and the exit codes the Make targets pass on."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from launcher import cli, render
from tests.launcher.conftest import IMAGE, MULTI, SINGLE, make
from tests.launcher.fake_kube import Attempt, complete, pod, recorded, running


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "llava-chartqa.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(SINGLE)))
    return str(path)


def exit_code(fn, *args, **kwargs) -> int:
    with pytest.raises(SystemExit) as info:
        fn(*args, **kwargs)
    return info.value.code


def test_render_prints_the_stages_manifests_with_no_cluster(recipe_file, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    cli.render(recipe_file, stage="sft")
    (job,) = yaml.safe_load_all(capsys.readouterr().out)
    assert job == render.render_stage(make(SINGLE), "sft", IMAGE)[0]


def test_render_takes_the_run_id(recipe_file, capsys):
    cli.render(recipe_file, stage="sft", run="exp-7")
    assert yaml.safe_load(capsys.readouterr().out)["metadata"]["name"] == "exp-7-sft"


def test_render_without_a_stage_says_which(recipe_file):
    from jobs.contract import UserError

    with pytest.raises(UserError, match=r"^--stage: which stage\? \(prepare, sft, dpo, evaluate, merge_push\)$"):
        cli.render(recipe_file)


def test_submit_follows_the_job_and_prints_its_log(kubeconfig, server, recipe_file, capsys):
    server.script(
        "llava-chartqa-sft",
        Attempt(pods=[pod("p", "Succeeded", exit_code=0)], logs={"p": ["sft: step 1", "sft: done"]}),
    )
    cli.submit(recipe_file, stage="sft")
    out = capsys.readouterr().out
    assert "sft: step 1\nsft: done\n" in out and out.endswith("==> sft: succeeded\n")


def test_submit_exits_2_when_the_stage_exited_2(kubeconfig, server, recipe_file, capsys):
    exited_2 = recorded("exit-2", "llava-chartqa-sft")  # the Job controller's FailJob verdict
    server.script("llava-chartqa-sft", Attempt(statuses=[exited_2.status], pods=exited_2.pods))
    assert exit_code(cli.submit, recipe_file, stage="sft", logs=False) == 2
    assert re.fullmatch(
        r"error: stage sft: Job vlmjobs/llava-chartqa-sft failed: PodFailurePolicy: Container stage for pod "
        r"vlmjobs/llava-chartqa-sft-\w+ failed with exit code 2 matching FailJob rule at index 1 \(the stage exited 2: "
        r"a recipe or data error, which a retry cannot fix\); its log: .*\n",
        capsys.readouterr().err,
    )


def test_submit_exits_1_on_a_server_error(kubeconfig, server, recipe_file, capsys):
    server.fail("POST", r"/jobs$", 500, "internal error")
    assert exit_code(cli.submit, recipe_file, stage="sft") == 1
    assert (
        capsys.readouterr().err
        == "error: cannot create Job vlmjobs/llava-chartqa-sft: API server error 500 (internal error)\n"
    )


def test_submit_without_rbac_exits_2_naming_the_verb(kubeconfig, server, recipe_file, capsys):
    server.fail("GET", r"/jobs/llava-chartqa-sft$", 403, 'jobs.batch "llava-chartqa-sft" is forbidden')
    assert exit_code(cli.submit, recipe_file, stage="sft") == 2
    assert "needs verb 'get' on resource 'jobs.batch' in namespace vlmjobs" in capsys.readouterr().err


def test_submit_detached_returns_after_creating(kubeconfig, server, recipe_file, capsys):
    cli.submit(recipe_file, stage="sft", detach=True)
    assert capsys.readouterr().out == "==> sft: created Job vlmjobs/llava-chartqa-sft\n"


def test_submit_of_an_existing_job_reports_it(kubeconfig, server, recipe_file, capsys):
    server.add_job(render.render_stage(make(SINGLE), "sft", IMAGE)[0], running())
    cli.submit(recipe_file, stage="sft", detach=True)
    assert capsys.readouterr().out == "==> sft: Job vlmjobs/llava-chartqa-sft already exists: Running\n"


def test_submit_without_credentials_is_a_user_error(recipe_file, monkeypatch, tmp_path):
    from jobs.contract import UserError

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(UserError, match=r"^no Kubernetes credentials in \$KUBECONFIG or ~/\.kube/config: "):
        cli.submit(recipe_file, stage="sft")


def test_pipeline_in_cluster_creates_the_driver_and_detaches(kubeconfig, server, recipe_file, capsys):
    cli.pipeline(recipe_file, in_cluster=True, detach=True)
    (request,) = server.calls("POST", "/jobs")
    assert request.body["metadata"]["name"] == "llava-chartqa-pipeline"
    assert "it runs on if you disconnect" in capsys.readouterr().out


def test_pipeline_in_the_driver_reads_the_recipe_from_its_environment(kubeconfig, server, capsys, monkeypatch):
    driver = render.render_driver_job(make(SINGLE, stages=["prepare"]), IMAGE)
    for variable in driver["spec"]["template"]["spec"]["containers"][0]["env"]:
        monkeypatch.setenv(variable["name"], variable["value"])
    cli.pipeline()
    assert [r.body["metadata"]["name"] for r in server.calls("POST", "/jobs")] == ["llava-chartqa-prepare"]


def test_the_nightly_cronjobs_command_runs_the_pipeline_on_the_run_id_of_its_scheduled_night(kubeconfig, server):
    """Issue 26 (7): the CronJob's own container command and environment, run as the pod runs them (a process,
    through Fire), creates the night's Jobs under run.id-YYYYMMDD: undated, every night after the first would find
    the first night's Jobs and skip every stage as done. Issue 22: the night is the one the CronJob controller
    scheduled the driver's Job for (its annotation, in the CronJob's time zone), not the day the pod happens to
    start: a driver pod retried after midnight continues that night's run. The Job's name reaches the pod through
    the downward API, resolved here as the kubelet resolves it."""
    import os
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    cron = render.render_cronjob(make(SINGLE, stages=["prepare"]), IMAGE)
    template = cron["spec"]["jobTemplate"]
    container = template["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["python", "-m", "launcher.cli"]
    # The Job the CronJob controller made for 23:59 in Los Angeles on 5 December 2026 (07:59 UTC on the 6th)
    driver = {**template, "apiVersion": "batch/v1", "kind": "Job", "metadata": {
        **template["metadata"], "name": "llava-chartqa-nightly-29416799", "namespace": "vlmjobs",
        "annotations": {"batch.kubernetes.io/cronjob-scheduled-timestamp": "2026-12-05T23:59:00-08:00"}}}  # fmt: skip
    # started 21 h 50 min ago with the nightly's 22 h deadline: its stages get the 10 minutes left, not the recipe's 7 days
    from datetime import datetime, timedelta, timezone

    started = datetime.now(timezone.utc) - timedelta(hours=21, minutes=50)
    server.add_job(driver, {"active": 1, "startTime": started.strftime("%Y-%m-%dT%H:%M:%SZ")})
    pod_labels = {**template["spec"]["template"]["metadata"]["labels"], "batch.kubernetes.io/job-name": "llava-chartqa-nightly-29416799"}
    values = {}
    for v in container["env"]:
        if "value" in v:
            values[v["name"]] = v["value"]
        else:  # metadata.labels['...']: the downward API
            values[v["name"]] = pod_labels[v["valueFrom"]["fieldRef"]["fieldPath"].split("'")[1]]
    env = subprocess_env(KUBECONFIG=os.environ["KUBECONFIG"], **values)
    env.pop("KUBERNETES_SERVICE_HOST", None)
    done = subprocess.run([sys.executable, *container["command"][1:]], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (created,) = [request.body for request in server.calls("POST", "/jobs")]
    assert created["metadata"]["name"] == "llava-chartqa-20261205-prepare"
    assert template["spec"]["activeDeadlineSeconds"] == 22 * 3600 and make(SINGLE).kubernetes.active_deadline_seconds == 7 * 24 * 3600
    assert 540 < created["spec"]["activeDeadlineSeconds"] <= 600, "the stage ends with the night"
    assert "==> pipeline done: prepare of run llava-chartqa-20261205 in " in done.stdout


def test_status_lists_the_runs_jobs(kubeconfig, server, recipe_file, capsys):
    server.add_job(render.render_stage(make(SINGLE), "prepare", IMAGE)[0], complete())
    cli.status(recipe_file, run="llava-chartqa")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RUN", "STAGE", "STATE", "ACTIVE", "SUCCEEDED", "FAILED", "JOB", "MESSAGE"]
    assert lines[1].split() == ["llava-chartqa", "prepare", "Complete", "0", "1", "0", "llava-chartqa-prepare"]
    assert server.calls("GET", "/jobs")[0].query["labelSelector"] == [
        "app.kubernetes.io/part-of=vlmjobs,app.kubernetes.io/instance=llava-chartqa"
    ]


def test_status_says_why_a_night_did_not_start(kubeconfig, server, recipe_file, capsys):
    """The CronJob controller's own records (Kubernetes 1.34, cronjob_controllerv2.go): a JobAlreadyActive event when a
    night is due while the last one runs under Forbid, MissSchedule when a start was missed by more than
    startingDeadlineSeconds; the night still running is in the CronJob's status.active. The real controller writes them
    in tests/launcher/test_nightly_on_cluster.py."""
    cron = render.render_cronjob(make(SINGLE), IMAGE)
    name = cron["metadata"]["name"]
    template = cron["spec"]["jobTemplate"]
    last_night = {"apiVersion": "batch/v1", "kind": "Job", "spec": template["spec"],
                  "metadata": {"name": f"{name}-29419020", "namespace": "vlmjobs", "labels": template["metadata"]["labels"],
                               "annotations": {render.CRONJOB_SCHEDULED_ANNOTATION: "2026-12-06T03:00:00Z"}}}
    server.add_job(last_night, running())
    server.cronjobs = [{**cron, "status": {"active": [{"kind": "Job", "name": f"{name}-29419020"}]}}]
    server.events = [
        {"involvedObject": {"kind": "CronJob", "name": name}, "reason": "JobAlreadyActive", "count": 2,
         "lastTimestamp": "2026-12-08T03:00:00Z", "message": "Not starting job because prior execution is running and concurrency policy is Forbid"},
        {"involvedObject": {"kind": "CronJob", "name": name}, "reason": "MissSchedule", "count": 1,
         "lastTimestamp": "2026-12-05T04:10:00Z", "message": "Missed scheduled time to start a job: Sat, 05 Dec 2026 03:00:00 +0000"},
        {"involvedObject": {"kind": "CronJob", "name": "another-nightly"}, "reason": "JobAlreadyActive", "count": 1,
         "lastTimestamp": "2026-12-08T03:00:00Z"},
    ]
    cli.status(namespace="vlmjobs")
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2:] == [
        f"{name}: a night did not start (at 2026-12-05T04:10:00Z): Missed scheduled time to start a job: Sat, 05 Dec 2026 "
        "03:00:00 +0000 (more than startingDeadlineSeconds late: the CronJob controller was down or the CronJob suspended)",
        f"{name}: a night did not start (2 times, last at 2026-12-08T03:00:00Z): the night of 2026-12-06T03:00:00Z (Job "
        f"{name}-29419020) was still running, and concurrencyPolicy Forbid keeps one night at a time "
        "(kubernetes.nightly_deadline_hours bounds a night)",
    ]
    assert server.calls("GET", "/events")[0].query["fieldSelector"] == [f"involvedObject.kind=CronJob,involvedObject.name={name}"]
    cli.status(namespace="vlmjobs", run="another-run")  # another recipe's run: not this CronJob's nights
    assert "did not start" not in capsys.readouterr().out


def test_status_with_no_jobs_says_so(kubeconfig, server, capsys):
    cli.status(namespace="team-a")
    assert capsys.readouterr().out == "no vlmjobs Jobs in namespace team-a\n"


def test_logs_prints_the_stages_log(kubeconfig, server, recipe_file, capsys):
    server.add_job(
        render.render_stage(make(SINGLE), "sft", IMAGE)[0],
        running(),
        Attempt(statuses=[], pods=[pod("p", "Succeeded")], logs={"p": ["loss 0.9"]}),
    )
    cli.logs(recipe_file, stage="sft")
    assert capsys.readouterr().out == "loss 0.9\n"


def test_delete_removes_every_job_of_the_run(kubeconfig, server, recipe_file, capsys):
    recipe = make(SINGLE)
    for stage in ("prepare", "sft"):
        server.add_job(render.render_stage(recipe, stage, IMAGE)[0], complete())
    cli.delete(recipe_file, run="llava-chartqa")
    assert capsys.readouterr().out.splitlines() == [
        "deleted Job vlmjobs/llava-chartqa-prepare (its pods and Service go with it)",
        "deleted Job vlmjobs/llava-chartqa-sft (its pods and Service go with it)",
    ]
    assert server.jobs == {}


def test_delete_of_one_stage_leaves_the_others(kubeconfig, server, recipe_file, capsys):
    recipe = make(SINGLE)
    for stage in ("prepare", "sft"):
        server.add_job(render.render_stage(recipe, stage, IMAGE)[0], complete())
    cli.delete(recipe_file, run="llava-chartqa", stage="sft")
    assert list(server.jobs) == ["llava-chartqa-prepare"]


def test_delete_needs_a_run(recipe_file):
    from jobs.contract import UserError

    with pytest.raises(UserError, match=r"^--run: which run\? \(vlmjobs status lists them\)$"):
        cli.delete(recipe_file)


def test_cronjob_prints_the_nightly_pipeline(recipe_file, capsys):
    cli.cronjob(recipe_file)
    cron = yaml.safe_load(capsys.readouterr().out)
    assert (cron["kind"], cron["metadata"]["name"]) == ("CronJob", "llava-chartqa-nightly")


def test_the_readmes_cluster_examples_run_on_the_default_cluster_recipe(capsys):
    """Issue 13 (2): `make render STAGE=sft` failed on the default cluster recipe, which has no sft stage. The command
    the Makefile runs for the README's first example is read from `make -n` (which builds no .venv) and run here."""
    import shlex
    import shutil
    import subprocess

    import fire

    from jobs import recipe as recipes
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## On a cluster"):].split("```sh\n", 1)[1].split("```", 1)[0]
    default = re.search(r"^CLUSTER_RECIPE \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    stages = recipes.load(ROOT / default).stages
    named = re.findall(r"STAGE=(\w+)", block)
    assert named and all(stage in stages for stage in named), (named, stages)

    if not shutil.which("make"):
        pytest.skip("needs make to read the Makefile's command")
    first = next(line.split("#")[0].split() for line in block.splitlines() if line.startswith("make render"))
    planned = subprocess.run([*first, "-n"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert planned.returncode == 0, planned.stderr
    command = shlex.split(next(line for line in planned.stdout.splitlines() if "vlmjobs render" in line))
    assert command[0].endswith("/bin/vlmjobs"), command  # the console script of `launcher.cli:main`
    fire.Fire(cli.COMMANDS, command=command[1:])  # as entry.entrypoint hands them to Fire, from the checkout
    assert yaml.safe_load(capsys.readouterr().out)["kind"] == "Job"


def test_ctrl_c_while_following_stops_at_once_in_one_line_leaving_the_job_running(kubeconfig, server, tmp_path):
    """Issue 26. Ctrl-C (SIGINT from the terminal) on `vlmjobs submit` following a multi-node stage and its log: exit
    130 within seconds, not after the 30 s the log is given to drain when a Job ends; one line; the JobSet (issue 21)
    left running for `vlmjobs status`; nothing deleted."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import subprocess_env

    path = tmp_path / "qwen2vl-chartqa.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(MULTI)))
    group_job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "qwen2vl-chartqa-sft-node-0",
                 "namespace": "vlmjobs", "labels": {}}, "spec": {}}  # what the JobSet controller makes
    server.add_job(group_job, running(), Attempt(statuses=[], pods=[pod("r0", "Running", index=0),
                                                                    pod("r1", "Running", index=1)],
                                                 logs={"r0": ["sft: step 1/100"]}))  # fmt: skip
    env = subprocess_env(KUBECONFIG=str(kubeconfig))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    submit = subprocess.Popen([sys.executable, "-m", "launcher.cli", "submit", str(path), "--stage=sft"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        shown = []
        for line in submit.stdout:  # following: the Job's state, then its log
            shown.append(line)
            if line == "sft: step 1/100\n":
                break
        assert shown[-1] == "sft: step 1/100\n", "".join(shown) + submit.stderr.read()
        submit.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        out, err = submit.communicate(timeout=60)
        took = time.monotonic() - interrupted
    finally:
        submit.kill()
    assert (submit.returncode, err, out) == (130, "stopped following; what was created runs on (vlmjobs status)\n", "")
    assert took < 15, f"{took:.1f}s from Ctrl-C to exit"
    assert [(r.method, r.path) for r in server.requests if r.method != "GET"] == [
        ("POST", "/apis/jobset.x-k8s.io/v1alpha2/namespaces/vlmjobs/jobsets")]
    assert list(server.jobsets) == ["qwen2vl-chartqa-sft"]


def test_ctrl_c_between_attempts_says_the_job_is_not_created_again(kubeconfig, server, tmp_path, monkeypatch, capsys):
    """Issue 26. Before 1.31 the launcher retries a failed Job: it deletes it and waits for its pods to go before
    creating it again. Ctrl-C in that wait leaves no Job at all, which 'what was created runs on' would hide."""
    from launcher import kube
    from tests.launcher.fake_kube import recorded

    path = tmp_path / "llava-chartqa.yaml"
    old = copy.deepcopy(SINGLE)
    old["kubernetes"].update(target_version="1.29", backoff_limit=1)
    path.write_text(yaml.safe_dump(old))
    failed = recorded("exit-1-backoff-limit", "llava-chartqa-sft")
    server.script("llava-chartqa-sft", Attempt(statuses=[failed.status], pods=failed.pods))

    def ctrl_c(self, name):  # where the signal lands: the old pods are still terminating
        raise KeyboardInterrupt

    monkeypatch.setattr(kube.Cluster, "wait_job_gone", ctrl_c)
    assert exit_code(cli.submit, str(path), stage="sft", logs=False) == 130
    assert capsys.readouterr().err == (
        "stopped while restarting stage sft: Job vlmjobs/llava-chartqa-sft is deleted and not created again; run the "
        "same command again to create it (it resumes from the last checkpoint)\n"
    )
    assert server.jobs == {}
