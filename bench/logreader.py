"""The daemon's log reader, in a process of its own, as journald or syslogd is.

``python -m bench.logreader pipe`` copies stdin (the daemon's stderr pipe)
to stdout until end of file.  ``python -m bench.logreader syslog FD`` reads
datagrams from the bound socket FD (inherited) and writes each message's
text, after ``ident[pid]: ``, as one line to stdout, until SIGTERM; then it
takes what is still queued and exits.  Either way stdout is a file the
benchmark reads back for warnings.

A thread in the benchmark process would share its interpreter lock with
the fakes' loop and fall behind: the daemon would then drop lines for a
reason of the benchmark's own making.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from types import FrameType

_BYTES = 1 << 16


def copy_pipe() -> int:
    out = sys.stdout.buffer
    while data := os.read(0, _BYTES):
        out.write(data)
    out.flush()
    return 0


def read_syslog(fd: int) -> int:
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    sock = socket.socket(fileno=fd)
    sock.settimeout(0.1)  # how often the stop flag is looked at
    out = sys.stdout.buffer
    while not stopping:
        try:
            message = sock.recv(_BYTES)
        except TimeoutError:
            continue
        out.write(message.rstrip(b"\x00").partition(b"]: ")[2] + b"\n")
    sock.setblocking(False)
    while True:  # what the daemon sent before it stopped
        try:
            message = sock.recv(_BYTES)
        except BlockingIOError:
            break
        out.write(message.rstrip(b"\x00").partition(b"]: ")[2] + b"\n")
    out.flush()
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["pipe"]:
        return copy_pipe()
    if argv[:1] == ["syslog"] and len(argv) == 2:
        return read_syslog(int(argv[1]))
    print("usage: python -m bench.logreader pipe | syslog FD", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
