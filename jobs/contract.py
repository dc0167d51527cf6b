"""The stage contract: how every stage reads and writes the run folder, the same locally and in a Job.

    <run>/<stage>/                 finished output, never written in place
    <run>/<stage>/_SUCCESS.json    the commit marker: config, inputs, rows, versions, duration
    <run>/.<stage>.partial/        where a stage writes while it runs; checkpoints survive restarts

A stage refuses to start while an input has no ``_SUCCESS.json``, skips itself when its own
``_SUCCESS.json`` was written for the same config, and refuses to replace output of another config
unless forced. Exit codes tell user errors (recipe, data, stage order: a retry cannot help) from
failures of the machine, which are worth a retry, and a night that scored worse than the last good one
(``EXIT_REGRESSED``) from both.

A stage holds a shared lock on ``<run>/.lock`` while it runs (and the local runner while it runs a chain), so that
pruning (``jobs.history``) can tell a running run from a finished one.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

EXIT_FAILURE = 1  # the machine, the network, the cluster: worth a retry
EXIT_USER_ERROR = 2  # the recipe, the data or the stage order: retrying cannot help (Fire's usage errors use 2 too)
# evaluate: the run's primary metric fell below the last good night's by more than the noise of its test set
# (jobs.history). Neither a broken machine nor a broken recipe: the run worked and its model is worse. Not retried
# (a retry scores the same), not merged by the chain, and merge_push refuses to push it.
EXIT_REGRESSED = 3
RUN_LOCK = ".lock"
SUCCESS_FILE = "_SUCCESS.json"
CONFIG_FILE = "_CONFIG.json"
VERSIONED_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "vlmjobs")


class UserError(Exception):
    """A mistake the user can fix: reported as one line, exit code 2, no retry."""

    exit_code = EXIT_USER_ERROR


class Failure(Exception):
    """A failure this code recognises (a broken merge, an unreachable hub): one line, exit code 1, retried."""

    exit_code = EXIT_FAILURE


class Regressed(Exception):
    """The run scored worse than the last good night (jobs.history): one line, exit code 3, no retry."""

    exit_code = EXIT_REGRESSED


EXIT_SIGTERM = 143  # 128 + SIGTERM: stopped from outside (preemption, kubectl delete); worth a retry
EXIT_SIGINT = 130  # 128 + SIGINT: Ctrl-C; the unfinished attempt stays for a restart, as after SIGTERM
STOP_SIGNALS = ("SIGTERM", "SIGINT")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived outside training (where the trainer checkpoints instead). A KeyboardInterrupt,
    so that library code catching Exception does not swallow it, and code that stops following on Ctrl-C
    stops on SIGTERM too."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_HANDLER_PID: list[int] = []  # the process that installed the handlers (forked workers inherit them)


def _raise_interrupted(signum, frame):
    import signal

    if os.getpid() not in _HANDLER_PID:  # a forked worker (datasets.map, a DataLoader): the main process reports
        os._exit(128 + signum)
    for name in STOP_SIGNALS:  # one line, once: a second Ctrl-C while stopping changes nothing
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise Interrupted(signum)


def wait_for_turn(imports: tuple[str, ...]) -> bool:
    """Started ahead of its turn (``START_FD_ENV``): import what the stage will, then wait for the runner's go.
    False when the runner closed the pipe instead (the stage before failed, or this one turned out to be done, or
    the runner is gone): the stage then ends without having run."""
    import importlib

    fd = os.environ.pop(START_FD_ENV, None)  # popped: not for the processes this stage starts
    if fd is None:
        return True
    started = time.time()
    for name in imports:
        module, _, attribute = name.partition(":")
        loaded = importlib.import_module(module)
        if attribute:
            getattr(loaded, attribute)
    global _imported_ahead_s
    _imported_ahead_s = round(time.time() - started, 2)  # for the stage's record
    go = os.read(int(fd), 1)
    os.close(int(fd))
    return go == b"1"


def handle_stop_signals() -> None:
    """SIGTERM and SIGINT raise ``Interrupted`` in this process: one line and exit 128 + N (``entrypoint``).

    As a container's PID 1 a process ignores SIGTERM unless it handles it: the Job would hang for the
    whole grace period. Training stages replace these handlers with one that writes a checkpoint first."""
    import signal

    _HANDLER_PID[:] = [os.getpid()]
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), _raise_interrupted)


def stopped(signum: int) -> str:
    import signal

    name = signal.Signals(signum).name
    return f"stopped on {name}; the unfinished work stays in the run folder, and running the same command again resumes it"


# Set by the local runner on a stage it starts ahead of its turn: the file descriptor its go arrives on.
START_FD_ENV = "VLMJOBS_START_FD"
_imported_ahead_s: float | None = None  # seconds the stage's imports took before its turn, when started ahead


def exit_status(returncode: int) -> int:
    """A child process's return code as a shell reports it: killed by signal N (-N) is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Stage:
    """One stage's view of the run folder, from ``begin`` to ``finish``."""

    name: str
    run_dir: Path
    config: dict
    fingerprint: str
    inputs: dict[str, dict] = field(default_factory=dict)
    skipped: bool = False
    replacing: bool = False
    started: float = field(default_factory=time.time)

    @property
    def out(self) -> Path:
        return self.run_dir / self.name

    @property
    def work(self) -> Path:
        return self.run_dir / f".{self.name}.partial"

    @property
    def scratch(self) -> Path:
        """Files the stage needs only while it runs (datasets' cache of what it derives from its inputs, which
        would otherwise land beside the input stage's finished files): removed before the output is committed."""
        return self.work / "scratch"

    def input(self, name: str) -> Path:
        return self.run_dir / name

    def finish(self, **record: Any) -> Path:
        """Move the work folder into place and write the commit marker; returns the output folder."""
        if not is_main_process():
            return self.out
        shutil.rmtree(self.scratch, ignore_errors=True)
        success = {
            "stage": self.name,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "inputs": {name: {"path": str(self.input(name)), "fingerprint": rec["fingerprint"]} for name, rec in self.inputs.items()},
            **record,
            **({} if _imported_ahead_s is None else {"imported_ahead_of_its_turn_s": _imported_ahead_s}),
            "started_at": _iso(self.started),
            "finished_at": _iso(time.time()),
            "duration_s": round(time.time() - self.started, 2),
            "versions": library_versions(),
            "host": platform.node(),
        }
        (self.work / CONFIG_FILE).unlink(missing_ok=True)
        if self.replacing and self.out.exists():
            old = self.run_dir / f".{self.name}.replaced"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
            shutil.rmtree(old)
        os.replace(self.work, self.out)
        write_json_atomic(self.out / SUCCESS_FILE, success)
        print(f"{self.name}: done in {success['duration_s']:.0f}s, output in {self.out}")
        return self.out


def begin(
    name: str, run_dir: Path, config: dict, *, needs: tuple[str, ...] = (), force: bool = False, resumable: bool = False
) -> Stage:
    """Check inputs, decide skip/resume/replace, and make the work folder; see the module docstring.

    A ``resumable`` stage (one that checkpoints) keeps an unfinished attempt of the same config to
    resume from; any other stage starts over.
    """
    run_dir = Path(run_dir)
    hold_run(run_dir)
    inputs = {}
    for need in needs:
        marker = run_dir / need / SUCCESS_FILE
        if not marker.is_file():
            raise UserError(missing_input(name, run_dir, need))
        inputs[need] = read_json(marker)
    config = {"stage": name, **config, "inputs": {n: rec["fingerprint"] for n, rec in inputs.items()}}
    stage = Stage(name, run_dir, config, _fingerprint(config), inputs)

    done = stage.out / SUCCESS_FILE
    if done.is_file():
        previous = read_json(done)
        if previous.get("fingerprint") == stage.fingerprint and not force:
            print(f"{name}: already done for this config ({done}); skipping (--force redoes it)")
            stage.skipped = True
            return stage
        if previous.get("fingerprint") != stage.fingerprint and not force:
            changed = changed_keys(previous.get("config", {}), config)
            raise UserError(
                f"{name}: {stage.out} holds output of another config (changed: {', '.join(changed) or 'unknown'}; "
                f"fingerprint {previous.get('fingerprint')}, now {stage.fingerprint}): use another run.id, or --force to replace it"
            )
        stage.replacing = True
    if not is_main_process():
        return stage

    if stage.out.exists() and not done.is_file() and not stage.work.exists():
        os.replace(stage.out, stage.work)  # interrupted between the rename and the marker: resume it
    if stage.work.exists():
        started = read_json(stage.work / CONFIG_FILE) if (stage.work / CONFIG_FILE).is_file() else {}
        if started.get("fingerprint") == stage.fingerprint and resumable:
            print(f"{name}: resuming the unfinished attempt in {stage.work}")
        else:
            why = "" if started.get("fingerprint") == stage.fingerprint else " of another config"
            print(f"{name}: starting over; discarding an unfinished attempt{why} in {stage.work}")
            shutil.rmtree(stage.work)
    stage.work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stage.work / CONFIG_FILE, {"fingerprint": stage.fingerprint, "config": config})
    return stage


_HELD: dict[str, int] = {}  # run folder -> the descriptor whose lock this process holds until it ends


def hold_run(run_dir: Path) -> None:
    """Hold a shared lock on the run folder for the rest of this process: the run is in use (``run_in_use``). The
    kernel drops it when the process ends, however it ends, so a crashed stage never leaves a run looking busy."""
    import fcntl

    run_dir = Path(run_dir)
    if str(run_dir) in _HELD:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _HELD[str(run_dir)] = fd


def release_run(run_dir: Path) -> None:
    """Drop this process's lock on the run folder (the local runner, once its chain has ended)."""
    fd = _HELD.pop(str(Path(run_dir)), None)
    if fd is not None:
        os.close(fd)


def run_in_use(run_dir: Path) -> bool:
    """Whether a process (a stage, the local runner) holds the run folder's lock now."""
    import fcntl

    lock = Path(run_dir) / RUN_LOCK
    if not lock.is_file():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock if we got it
    return False


def missing_input(name: str, run_dir: Path, need: str) -> str:
    return f"{name} needs the {need} stage's output: {Path(run_dir) / need / SUCCESS_FILE} not found; run {need} first"


def is_done(name: str, run_dir: Path, config: dict, needs: tuple[str, ...] = ()) -> bool:
    """Whether ``begin`` would skip the stage: its marker written for this config and these inputs. Read by the
    local runner, which then starts no process for it."""
    run_dir = Path(run_dir)
    markers = [run_dir / need / SUCCESS_FILE for need in needs]
    done = run_dir / name / SUCCESS_FILE
    if not done.is_file() or not all(m.is_file() for m in markers):
        return False
    config = {"stage": name, **config, "inputs": {n: read_json(m)["fingerprint"] for n, m in zip(needs, markers)}}
    return read_json(done).get("fingerprint") == _fingerprint(config)


def changed_keys(before: dict, after: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs (``inputs.prepare``: an input was redone)."""
    changed = []
    for key in sorted(set(before) | set(after), key=str):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_keys(a, b, f"{prefix}{key}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            changed.append(f"{prefix}{key}")
    return changed


def newest_complete_checkpoint(folder: Path) -> str | None:
    """The newest ``checkpoint-N`` that the Trainer finished writing (it writes trainer_state.json last)."""
    if not folder.is_dir():
        return None
    steps = [
        (int(m.group(1)), path)
        for path in folder.iterdir()
        if (m := re.fullmatch(r"checkpoint-(\d+)", path.name)) and (path / "trainer_state.json").is_file()
    ]
    return str(max(steps)[1]) if steps else None


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    if "torch" in sys.modules:
        import torch

        # torch.version.cuda is the CUDA torch was built with, there whether or not this run had a GPU
        versions["cuda"] = f"{torch.version.cuda} ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "none (CPU)"
    return versions


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def _fingerprint(config: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
