"""``accelerate launch`` that keeps the stage's exit code.

    python -m launcher.distributed --multi_gpu --num_processes 8 --num_machines 1 -m jobs.sft

Takes exactly ``accelerate launch``'s arguments. accelerate re-raises torch's ``ChildFailedError``,
so any failing rank exits 1, and a recipe error (exit 2: never retry) would look like a machine
failure (exit 1: retry) to the Job's pod failure policy. Here a rank that exited 2 makes this exit
2; otherwise the first failure's code is passed on (a signal N as 128+N), and SIGTERM to this
process, which torch's agent forwards to the ranks, gives 143 once they have written their
checkpoint (within $TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds).
"""

from __future__ import annotations

import sys

from jobs.contract import EXIT_FAILURE, EXIT_USER_ERROR, exit_status


def exit_code(codes_in_order: list[int]) -> int:
    """The launcher's exit code from the ranks' exit codes, first failure first."""
    if EXIT_USER_ERROR in codes_in_order:
        return EXIT_USER_ERROR
    return next((exit_status(code) for code in codes_in_order if code), EXIT_FAILURE)


def main(argv: list[str] | None = None) -> None:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as e:
        failures = sorted(e.failures.values(), key=lambda f: f.timestamp)
        code = exit_code([f.exitcode for f in failures])
        print(f"error: {e.name} failed on rank(s) {sorted(e.failures)}; exit code {code}", file=sys.stderr)
        sys.exit(code)
    except SignalException as e:
        sys.exit(128 + int(e.sigval))


if __name__ == "__main__":
    main()
