"""The exit codes a stage ends with, which decide whether Kubernetes or the launcher retries it on GPUs: 2 for what a
retry cannot fix, 1 for the rest, 128 + N when stopped by signal N (the shell's and Kubernetes' convention). Run in
this process, so that make mutate maps the exit paths of jobs.entry and jobs.contract to them (issue 26: test_contract.py runs them in
subprocesses, which left all 94 of their mutants without a test)."""

from __future__ import annotations

import logging
import os
import signal
import sys

import pytest

from jobs import contract, entry

STOPPED = "the unfinished work stays in the run folder, and running the same command again resumes it"


@pytest.fixture
def stage(monkeypatch):
    """A stage process's state: Fire reads no arguments, and the signal handlers a stage installs are put back after.
    As under accelerate launch (WORLD_SIZE > 1), a stage that returns ends as Python would, not with os._exit(0),
    which here would end pytest itself with a success."""
    monkeypatch.setattr(sys, "argv", ["stage"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    handlers = {name: signal.getsignal(getattr(signal, name)) for name in contract.STOP_SIGNALS}
    yield
    for name, handler in handlers.items():
        signal.signal(getattr(signal, name), handler)


def ended(run, main) -> int:
    with pytest.raises(SystemExit) as stop:
        run(main)
    return stop.value.code


def raising(error: BaseException):
    def main():
        raise error

    return main


def test_user_errors_exit_2_and_failures_exit_1_in_one_line(stage, capsys):
    assert ended(entry._run, raising(contract.UserError("data.sft: no rows"))) == 2
    assert capsys.readouterr().err == "error: data.sft: no rows\n"
    assert ended(entry._run, raising(contract.Failure("the hub is unreachable"))) == 1
    assert capsys.readouterr().err == "error: the hub is unreachable\n"


def test_out_of_gpu_memory_exits_2_with_its_first_line_and_the_advice(stage, capsys):
    """The same batch does not fit on a retry either: torch's own OutOfMemoryError is a user error."""
    import torch

    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has a total capacity of 79 GiB")
    assert ended(entry._run, raising(error)) == 2
    assert capsys.readouterr().err == (
        "error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB.): halve per_device_train_batch_size "
        "and double gradient_accumulation_steps, or turn on activation_checkpointing\n")


def test_anything_else_is_raised_for_a_traceback_and_exit_1(stage):
    with pytest.raises(MemoryError):  # the host's memory, not the GPU's: worth a retry elsewhere
        entry._run(raising(MemoryError("host")))


def test_without_a_terminal_the_progress_bars_are_off_and_bitsandbytes_cpu_hint_quiet(stage, monkeypatch):
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    monkeypatch.setattr(quiet, "level", logging.NOTSET)
    entry._run(lambda: None)  # pytest's captured stderr is no terminal
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    assert quiet.level == logging.ERROR


@pytest.mark.parametrize("go, runs", [(b"1", True), (b"0", False)])
def test_a_stage_started_ahead_runs_only_on_its_go(stage, monkeypatch, go, runs):
    read, write = os.pipe()
    os.write(write, go)
    os.close(write)
    monkeypatch.setenv(contract.START_FD_ENV, str(read))
    ran = []
    assert entry._run(lambda: ran.append(True)) is None
    assert ran == ([True] if runs else [])


@pytest.mark.parametrize("stop, code, name", [
    (KeyboardInterrupt(), 130, "SIGINT"),  # a Ctrl-C before the stage's handlers were in place
    (contract.Interrupted(signal.SIGINT), 130, "SIGINT"),
    (contract.Interrupted(signal.SIGTERM), 143, "SIGTERM"),  # kubectl delete, preemption
])
def test_a_stopped_stage_exits_128_plus_the_signal_in_one_line(stage, capsys, stop, code, name):
    assert ended(entry.entrypoint, raising(stop)) == code
    assert capsys.readouterr().err == f"stopped on {name}; {STOPPED}\n"


def test_help_is_the_stage_scripts_docstring_and_runs_nothing(stage, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["stage", "--help"])
    ran = []

    def main(recipe: str = ""):
        ran.append(recipe)

    entry.entrypoint(main)
    assert capsys.readouterr().out.startswith(__doc__.split("\n")[0]) and ran == []


def test_a_stage_started_ahead_imports_its_libraries_before_its_go(stage, monkeypatch):
    read, write = os.pipe()
    os.write(write, b"1")
    os.close(write)
    monkeypatch.setenv(contract.START_FD_ENV, str(read))
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    ran = []
    entry.entrypoint(lambda: ran.append("colorsys" in sys.modules), imports=("colorsys",))
    assert ran == [True]


def test_interrupted_keeps_its_signal_across_processes():
    """multiprocessing pickles an exception raised in a worker; unpickling calls the class with its args."""
    import pickle

    assert pickle.loads(pickle.dumps(contract.Interrupted(signal.SIGTERM))).signum == signal.SIGTERM


def test_a_stage_handles_the_stop_signals(stage):
    contract.handle_stop_signals()
    assert all(signal.getsignal(getattr(signal, name)) is contract._raise_interrupted for name in contract.STOP_SIGNALS)


def test_a_stop_signal_raises_in_the_stage_and_ends_a_forked_worker_with_128_plus_it(stage, monkeypatch):
    """A datasets.map or DataLoader worker inherits the handlers; the main process reports, the worker just ends.
    The worker first: a handler that wrongly ended the stage process itself would end pytest here."""
    monkeypatch.setattr(contract, "_HANDLER_PID", [os.getpid()])
    pid = os.fork()
    if pid == 0:  # the worker: not the process that installed the handlers
        try:
            contract._raise_interrupted(signal.SIGTERM, None)
        finally:
            os._exit(99)  # never reached unless the handler returned or raised
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 143
    with pytest.raises(contract.Interrupted) as stopped:
        contract._raise_interrupted(signal.SIGTERM, None)
    assert stopped.value.signum == signal.SIGTERM
    # a second Ctrl-C while the stage stops changes nothing
    assert all(signal.getsignal(getattr(signal, name)) is signal.SIG_IGN for name in contract.STOP_SIGNALS)


@pytest.mark.parametrize("returncode, shown", [(0, 0), (2, 2), (1, 1), (-15, 143), (-9, 137), (-2, 130)])
def test_a_child_killed_by_signal_n_is_reported_as_128_plus_n(returncode, shown):
    """subprocess gives -N for a child killed by signal N; the shell and Kubernetes say 128 + N."""
    assert contract.exit_status(returncode) == shown
