"""Log lines off the request path: built cheaply, buffered, written in batches.

The daemon writes one decision line per RCPT.  Through :mod:`logging` that
line cost as much as everything else the daemon does for a request (a
record, %-formatting, a formatter, one write and flush per line), so lines
take this path instead:

* a decision line is a few string concatenations: the part that repeats
  for a memoised answer (domain, action, reason, cache) is built once with
  the memo (:func:`decision_middle`), and only the queue id, recipient and
  time are escaped and added per request;
* every line, decision or not, goes into one buffer, in order; a flusher
  task writes everything buffered once per scheduler pass, so under load
  one system call carries many lines, and when idle a line is written at
  once;
* a pipe or socket that is not writable never blocks the loop: it is
  waited for, meanwhile lines stay in a bounded buffer (1 MiB), and beyond
  it they are dropped, counted, and reported in one warning line once
  writing resumes.  A regular file is written with a plain ``write()``,
  which takes as long as the disk does.

Syslog takes one datagram per line (that is what a syslog message is), sent
by the same flusher, after the replies of the scheduler pass.

Outside a running flusher (start-up, shutdown, tests, ``--check``) lines
are written synchronously, waiting at most a bounded time for the target.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import socket
import stat
import threading
import time
from collections import deque
from typing import Final, TextIO

import trio

from .logfmt import escape, quoted

#: Bytes of lines kept while the target does not take them.
BUFFER_LIMIT: Final = 1 << 20
#: How long a synchronous flush (outside the loop, at exit) waits for the target.
SYNC_FLUSH_S: Final = 2.0
_CHUNK: Final = select.PIPE_BUF  # a pipe that polls writable takes this much without blocking

# Syslog priorities for facility mail: <facility * 8 + severity>.
_LOG_MAIL: Final = 2
_SEVERITY: Final = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def decision_middle(domain: str, action: str, reason: str, cache: str, *, mx: str = "", up: str = "") -> str:
    """The part of a decision line that depends only on the answer.

    Built once per answer and kept with the memo, so a memo hit escapes
    nothing but its queue id and recipient.  ``mx`` is the MX list
    considered (``10:mx1.example.com,20:backup.example.net``) and ``up``
    the address whose greeting a DEFER rests on: what Postfix's own line
    for the 450 does not say.
    """
    found = (f" mx={escape(mx)}" if mx else "") + (f" up={escape(up)}" if up else "")
    return f" domain={escape(domain) or '-'} action={action} reason={quoted(reason)}{found} cache={cache} ms="


def decision_line(queue_id: str, recipient: str, middle: str, elapsed: float, age: float = math.nan) -> str:
    """One decision line, without a newline; byte for byte the documented format.

    ``age``: for a DEFER, how old the greeting it rests on is (changes with
    every request, so it is not part of the memoised middle).
    """
    line = f"{escape(queue_id) or 'NOQUEUE'}: rcpt=<{escape(recipient)}>{middle}{elapsed * 1000:.1f}"
    return line if age != age else f"{line} age={age:.1f}s"  # age != age: NaN, no greeting to age


class _Target:
    """Where bytes go.  ``send`` takes what it can now, never waiting for a pipe or socket."""

    datagrams = False

    def send(self, data: bytes) -> int:
        raise NotImplementedError

    def ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds (blocking) until ``send`` can make progress."""
        return True

    async def wait_writable(self) -> None:
        await trio.sleep(0.05)

    def close(self) -> None:
        pass


class StreamTarget(_Target):
    """stderr or any file descriptor: a regular file, a pipe, a socket, a tty.

    A regular file takes whole batches.  Anything else is written in chunks
    of at most PIPE_BUF, each only after poll() said the descriptor is
    writable: such a write cannot block even though the descriptor stays
    in blocking mode (it is shared with whoever else holds it, so its mode
    is left alone).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:
            self.regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            self.regular = True  # a bad descriptor: writes fail and are counted
        self._poll = select.poll()
        if not self.regular:
            self._poll.register(fd, select.POLLOUT)

    def send(self, data: bytes) -> int:
        if self.regular:
            return os.write(self.fd, data)
        sent = 0
        while sent < len(data):
            if not self._poll.poll(0):
                break
            sent += os.write(self.fd, data[sent : sent + _CHUNK])
        return sent

    def ready(self, timeout: float) -> bool:
        return self.regular or bool(self._poll.poll(max(0, int(timeout * 1000))))

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self.fd)

    def close(self) -> None:
        _release(self.fd)  # the descriptor (stderr) is shared, so it stays open


class TextTarget(_Target):
    """A text stream without a descriptor (stderr replaced in-process): written as text."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def send(self, data: bytes) -> int:
        self.stream.write(data.decode("utf-8", "replace"))
        self.stream.flush()
        return len(data)


class SyslogTarget(_Target):
    """A syslog socket (``/dev/log``, or UDP): one datagram per line, non-blocking."""

    datagrams = True

    def __init__(self, address: str | tuple[str, int]) -> None:
        self.address = address
        self.sock = self._connect()

    def _connect(self) -> socket.socket:
        family = socket.AF_UNIX if isinstance(self.address, str) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(self.address)
        except OSError:
            pass  # syslogd not there yet: sends fail (counted) and reconnect
        return sock

    def send(self, data: bytes) -> int:
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOTCONN, errno.ENOENT, errno.EDESTADDRREQ):
                raise
            # syslogd restarted: its socket is new.  One reconnection, then
            # the line counts as lost.
            _close_socket(self.sock)
            self.sock = self._connect()
            return self.sock.send(data)

    def ready(self, timeout: float) -> bool:
        # poll, not select: select() cannot take a descriptor >= FD_SETSIZE (1024).
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT)
        return bool(poller.poll(max(0, math.ceil(timeout * 1000))))

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self.sock.fileno())

    def close(self) -> None:
        _close_socket(self.sock)


def _release(handle: socket.socket | int) -> None:
    """Wake a flusher waiting for ``handle`` to become writable: it is no longer the target.

    A reload replaces the target while the flusher may be waiting on the
    old one.  Unwoken, it would wait on for a descriptor that is closed
    (forever: lines pile up and are dropped) or that nobody writes to any
    more, and a later socket given the same descriptor number could not be
    waited on (BusyResourceError).  Woken, it gets ClosedResourceError and
    goes on with the new target.
    """
    fd = handle if isinstance(handle, int) else handle.fileno()
    if fd < 0:
        return  # already closed: nobody can be waiting on it
    try:
        trio.lowlevel.notify_closing(fd)
    except RuntimeError:
        pass  # no trio run in this thread: nobody waits on it


def _close_socket(sock: socket.socket) -> None:
    _release(sock)
    sock.close()


class NullTarget(_Target):
    """Nowhere (``--stdio`` without a syslog socket)."""

    def send(self, data: bytes) -> int:
        return len(data)


class LineSink(logging.Handler):
    """Every line the daemon logs, in order, buffered and written in batches.

    It is also the :mod:`logging` handler, so warnings and errors share the
    buffer with decision lines and keep their order.
    """

    def __init__(self, target: _Target, *, ident: str = "smtpdcheck-policyd", limit: int = BUFFER_LIMIT) -> None:
        super().__init__()
        self.limit = limit
        self.dropped = 0  # lines lost, ever: the target did not keep up, or writing failed
        self.decisions = True  # decision lines wanted (level info or lower)
        self._unreported = 0  # of those, lost because the target did not keep up, not yet reported
        self._unreported_errors = 0  # lost to write errors, not yet reported
        self._last_error = ""  # the last write error, for the report
        self._queue: list[str] = []  # lines not yet encoded
        self._out: deque[bytes] = deque()  # encoded, not yet (fully) sent
        self._queued = 0  # characters in _queue
        self._pending = 0  # bytes in _out
        self._task: trio.lowlevel.Task | None = None
        self._parked = False
        self._stalled = False  # a synchronous write found the target blocked
        self._thread = 0  # the flusher's thread and loop, while it runs
        self._token: trio.lowlevel.TrioToken | None = None
        self._ident = ident
        self.target: _Target = NullTarget()
        self.retarget(target)

    # -- configuration ------------------------------------------------------

    def retarget(self, target: _Target) -> None:
        """Send future lines to ``target``, after writing what is buffered to the old one.

        With the flusher running (a reload), the old target gets only what
        it takes at once: the loop must not wait for it.  What it did not
        take goes to the new target if that takes the same kind of writes,
        and is otherwise counted as dropped.
        """
        self.flush_sync(0.0 if self._task is not None else SYNC_FLUSH_S)
        old, self.target = self.target, target
        if old is not target:
            old.close()
        if self._out and old.datagrams != target.datagrams:
            lost = len(self._out) if old.datagrams else sum(max(1, data.count(b"\n")) for data in self._out)
            self._out.clear()
            self._pending = 0
            self.dropped += lost
            self._unreported += lost
        if target.datagrams:
            head = f"{self._ident}[{os.getpid()}]: "
            self._prefix = {level: f"<{_LOG_MAIL * 8 + sev}>{head}" for level, sev in _SEVERITY.items()}
            self._end = "\x00"
        else:
            self._prefix = {level: "" for level in _SEVERITY}
            self._end = "\n"
        self._info = self._prefix[logging.INFO]

    # -- writing ------------------------------------------------------------

    def decision(self, queue_id: str, recipient: str, middle: str, elapsed: float, age: float = math.nan) -> None:
        """Add one decision line (see :func:`decision_line`).

        With the flusher running it only buffers; without it (start-up,
        shutdown, ``--check``) it writes at once, waiting a bounded time.
        """
        self._add(f"{self._info}{decision_line(queue_id, recipient, middle, elapsed, age)}{self._end}")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a bad format argument must not take the daemon down
            self.handleError(record)
            return
        if self.target.datagrams:
            # One event, one syslog message: a traceback or a newline in a
            # message is folded into the line.
            text = text.rstrip("\n").replace("\n", "\\x0a")
        else:
            text = text.rstrip("\n")
        self._add(f"{self._prefix.get(record.levelno, self._info)}{text}{self._end}")

    def _add(self, line: str) -> None:
        if self._queued + self._pending >= self.limit:
            self.dropped += 1
            self._unreported += 1
            return
        self._queue.append(line)
        self._queued += len(line)
        if self._task is None:
            # No loop to wait in: write now, waiting for a blocked target
            # once, not once per line.
            self._stalled = not self.flush_sync(0.0 if self._stalled else SYNC_FLUSH_S)
        elif self._parked:
            if threading.get_ident() == self._thread:
                self._wake()
            elif self._token is not None:  # logged from a worker thread: wake the flusher from the loop
                try:
                    self._token.run_sync_soon(self._wake)
                except trio.RunFinishedError:
                    pass

    def _wake(self) -> None:
        if self._parked and self._task is not None:
            self._parked = False
            trio.lowlevel.reschedule(self._task)

    def _encode(self) -> None:
        queue = self._queue
        if self.target.datagrams:
            for line in queue:
                data = line.encode("utf-8", "backslashreplace")
                self._out.append(data)
                self._pending += len(data)
        else:
            data = "".join(queue).encode("utf-8", "backslashreplace")
            self._out.append(data)
            self._pending += len(data)
        queue.clear()
        self._queued = 0

    def _send_some(self) -> bool:
        """Send what the target takes now; True when everything went."""
        if self._queue:
            self._encode()
        out = self._out
        target = self.target
        failed = False
        while out:
            data = out[0]
            try:
                sent = target.send(data)
            except OSError as exc:  # the target failed: these lines are lost, counted and reported
                out.popleft()
                self._pending -= len(data)
                lost = 1 if target.datagrams else max(1, data.count(b"\n"))
                self.dropped += lost
                self._unreported_errors += lost
                self._last_error = errno.errorcode.get(exc.errno or 0, str(exc))
                failed = True
                continue
            if sent == 0:
                return False
            if target.datagrams or sent >= len(data):
                out.popleft()
                self._pending -= len(data)
            else:
                out[0] = data[sent:]
                self._pending -= sent
        # Reported once writing works again: a report written into a target
        # that is failing would only be lost (and reported) in turn.
        if (self._unreported or self._unreported_errors) and not failed:
            warning = f"{self._prefix[logging.WARNING]}warning: "
            if self._unreported:
                count, self._unreported = self._unreported, 0
                line = f"{warning}{count} log lines dropped: the log target did not keep up{self._end}"
                self._queue.append(line)
                self._queued += len(line)
            if self._unreported_errors:
                count, self._unreported_errors = self._unreported_errors, 0
                line = f"{warning}{count} log lines dropped: writing them failed ({self._last_error}){self._end}"
                self._queue.append(line)
                self._queued += len(line)
            return self._send_some()
        return True

    def flush_sync(self, timeout: float) -> bool:
        """Write everything buffered, waiting at most ``timeout`` s in all; True if all went."""
        end = time.monotonic() + timeout
        while not self._send_some():
            left = end - time.monotonic()
            if left <= 0 or not self.target.ready(left):
                return False
        return True

    def flush(self) -> None:
        self.flush_sync(SYNC_FLUSH_S)

    def close(self) -> None:
        self.flush_sync(SYNC_FLUSH_S)
        self.target.close()
        super().close()

    @property
    def buffered(self) -> int:
        """Bytes (characters before encoding) waiting for the target."""
        return self._queued + self._pending

    # -- the flusher --------------------------------------------------------

    async def run(self) -> None:
        """Write buffered lines as they come, until cancelled; then lines go synchronously."""
        if self._task is not None:
            raise RuntimeError("the log flusher is already running")
        self._task = trio.lowlevel.current_task()
        self._thread = threading.get_ident()
        self._token = trio.lowlevel.current_trio_token()
        try:
            while True:
                if not self._queue and not self._out:
                    await self._park()
                # Lines added by the rest of this scheduler pass ride along.
                await trio.lowlevel.checkpoint()
                if not self._send_some():
                    try:
                        await self.target.wait_writable()
                    except trio.ClosedResourceError:
                        pass  # the target was closed and replaced (a reload): go on with the new one
        finally:
            self._task = None
            self._parked = False

    async def _park(self) -> None:
        self._parked = True

        def abort(_: object) -> trio.lowlevel.Abort:
            self._parked = False
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
