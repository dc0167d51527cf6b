"""The entry layer: a stage script or the ``vlmjobs`` command run as a process, under Fire.

``--help`` answered before Fire runs anything (``usage``), user errors as one line and exit code 2, SIGTERM and
SIGINT as 128 + N, and a finished one-process stage ending without the interpreter's teardown. Above the stage
contract (``contract``), which says what those exit codes and the run folder mean, and above the recipe, whose
stages the help lists.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from jobs import upstream, usage
from jobs.contract import (EXIT_USER_ERROR, Failure, Interrupted, Regressed, UserError, handle_stop_signals, stopped,
                           wait_for_turn)


def entrypoint(main: Callable, *, imports: tuple[str, ...] = ()) -> None:
    """Run a stage's ``main`` under Fire, turning user errors into one line and exit code 2. ``imports`` are the
    heavy libraries ``main`` will import (``module`` or ``module:name``, for the lazy ones); a process the local
    runner starts ahead of its turn imports them while the stage before it runs, then waits for its go."""
    import signal

    handle_stop_signals()
    if callable(main) and usage.wants_help(sys.argv[1:]):  # before Fire, which would run main to find its help
        usage.print_help(usage.stage_help(main))
        return
    try:
        _run(main, imports)
    except KeyboardInterrupt as e:  # Interrupted, or a Ctrl-C before the handlers were in place
        signum = getattr(e, "signum", signal.SIGINT)
        print(stopped(signum), file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    except Exception as e:
        interrupted = _interruption_behind(e)
        if interrupted is None:
            raise
        print(stopped(interrupted.signum), file=sys.stderr, flush=True)
        sys.exit(128 + interrupted.signum)
    leave_process_group()
    _exit_at_once()


def leave_process_group() -> None:
    """A process of a multi-process stage that finished its work leaves torch.distributed's group before it exits.
    Left to the interpreter's teardown, the group's threads abort the process (SIGABRT, exit 134, "terminate called
    without an active exception"): 6 of 20 two-process gloo exits, measured, and 0 of 20 after destroying the group.
    Also on the way out with a recognised error: a peer still waiting in a collective then fails at once instead of
    waiting for the timeout. No-op in one process."""
    if "torch.distributed" not in sys.modules:  # a stage that never imported torch has no group
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _interruption_behind(error: BaseException) -> Interrupted | None:
    """The stop signal an error was raised while handling, if any: library code that catches everything around an
    import turns the Interrupted our handler raised into its own error (multiprocess, which datasets imports, falls
    back to `from version import ...` and fails with ModuleNotFoundError: a Ctrl-C while a stage imported gave a
    traceback and exit 1, not one line and 130)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Interrupted):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _exit_at_once() -> None:
    """End a finished one-process stage as the interpreter would, less its teardown: the atexit handlers run
    (logging's flush among them) and the streams are flushed, but the 2 s CPython then spends freeing torch's and
    transformers' modules one by one (measured after importing TRL) is skipped. Processes under accelerate launch,
    and under a profiler or tracer (python -m cProfile, coverage), which write their results after the stage's
    module has run, end as they always have."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or sys.getprofile() or sys.gettrace():
        return
    upstream.run_exit_handlers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run(main: Callable, imports: tuple[str, ...] = ()) -> None:
    import logging

    import fire

    # Progress bars redraw a line with carriage returns, which a pod's log keeps as one endless line:
    # without a terminal, the Hugging Face libraries' bars are off (the trainer prints a line per step).
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers follows the hub's switch
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # On CPU bitsandbytes asks for an optional kernel from the hub; its own fallback is what runs here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if not wait_for_turn(imports):
        return
    try:
        fire.Fire(main)
    except (UserError, Failure, Regressed) as e:
        print(f"error: {e}", file=sys.stderr)
        leave_process_group()  # or the abort turns exit 2 (do not retry) into 134 (retry)
        sys.exit(e.exit_code)
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":  # torch's; the same batch will not fit on a retry either
            print(
                f"error: out of GPU memory ({str(e).splitlines()[0]}): halve per_device_train_batch_size and double "
                "gradient_accumulation_steps, or turn on activation_checkpointing",
                file=sys.stderr,
            )
            leave_process_group()
            sys.exit(EXIT_USER_ERROR)
        raise  # a traceback and exit code 1: worth a retry
