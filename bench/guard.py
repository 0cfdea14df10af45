"""Start a benchmark child process so that it cannot outlive the benchmark.

``python -m bench.guard --max-seconds S --parent PID -- COMMAND ARGS...``
arranges two things, then replaces itself with COMMAND (same pid, so the
benchmark can still read the child's /proc entry):

* the kernel sends SIGTERM to the child when the benchmark process dies
  (``PR_SET_PDEATHSIG``), so a crashed or killed benchmark leaves no server
  behind;
* an ``alarm(S)``, which survives ``execve``, ends the child after S seconds
  whatever happens: a hard lifetime for servers, such as the real daemon,
  that have no lifetime option of their own.

Both need nothing from the child's code, which is the point: the daemon
under test runs exactly as it would in production.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.guard")
    parser.add_argument("--max-seconds", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.max_seconds < 1:
        parser.error("need --max-seconds >= 1 and a command after --")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        print(f"bench.guard: prctl failed: errno {ctypes.get_errno()}", file=sys.stderr)
        return 2
    if os.getppid() != args.parent:  # the parent died before prctl took effect
        return 2
    signal.alarm(args.max_seconds)
    os.execvp(command[0], command)
    return 2  # not reached


if __name__ == "__main__":
    sys.exit(main())
