"""The decision-line writer: same bytes as before, batched, bounded, never blocking."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import resource
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from policyd import logfmt
from policyd.decisionlog import LineSink, StreamTarget, SyslogTarget, decision_line, decision_middle
from tests.conftest import Farm
from tests.policyd_helpers import rcpt, read_replies
from tests.test_daemon_process import start_daemon, world  # noqa: F401 (a fixture)

_SAFE = frozenset(chr(c) for c in range(0x21, 0x7F)) - {'"', "\\", "="}


def reference_escape(value: str, limit: int = 256) -> str:
    """The character-by-character escape the fast path must agree with."""
    out: list[str] = []
    for ch in value[:limit]:
        if ch in _SAFE:
            out.append(ch)
        elif ch == " ":
            out.append("\\x20")
        else:
            code = ord(ch)
            if 0xDC80 <= code <= 0xDCFF:
                code -= 0xDC00
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    if len(value) > limit:
        out.append("...")
    return "".join(out)


values = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7F), max_size=300),
    st.text(alphabet="ab=\\\" \x00\r\n\udc80\udcff\u00e9", max_size=20),
)


@given(values)
def test_escape_agrees_with_the_character_loop(value: str) -> None:
    assert logfmt.escape(value) == reference_escape(value)
    assert logfmt.quoted(value) == '"' + reference_escape(value).replace("\\x20", " ") + '"'


@given(values, values, values, st.sampled_from(["DUNNO", "DEFER_IF_PERMIT", "WARN"]), values,
       st.sampled_from(["hit", "miss", "stale"]), st.floats(min_value=0, max_value=100, allow_nan=False))
def test_decision_line_is_byte_for_byte_the_logging_format(
    queue_id: str, recipient: str, domain: str, action: str, reason: str, cache: str, elapsed: float
) -> None:
    old = "%s: rcpt=<%s> domain=%s action=%s reason=%s cache=%s ms=%.1f" % (
        reference_escape(queue_id) or "NOQUEUE", reference_escape(recipient), reference_escape(domain) or "-",
        action, '"' + reference_escape(reason).replace("\\x20", " ") + '"', cache, elapsed * 1000,
    )
    assert decision_line(queue_id, recipient, decision_middle(domain, action, reason, cache), elapsed) == old


# -- a pipe whose reader stops reading ----------------------------------------

LINE = re.compile(r"NOQUEUE: rcpt=<u(\d+)@d\.example> domain=d\.example action=DUNNO reason=\"r\" cache=hit ms=1\.0")
MIDDLE = decision_middle("d.example", "DUNNO", "r", "hit")


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    try:
        yield read_end, write_end
    finally:
        os.close(read_end)
        os.close(write_end)


def pipe_capacity(fd: int) -> int:
    return fcntl.fcntl(fd, 1032)  # F_GETPIPE_SZ


async def read_until(fd: int, done: Callable[[bytes], bool]) -> bytes:
    data = b""
    with trio.fail_after(10):
        while not done(data):
            await trio.lowlevel.wait_readable(fd)
            data += os.read(fd, 1 << 20)
    return data


async def test_a_reader_that_stops_costs_lines_not_replies(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    limit = 16384
    sink = LineSink(StreamTarget(write_end), limit=limit)
    written = (pipe_capacity(write_end) + 4 * limit) // 60  # far more than the pipe and the buffer hold
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(written):
            sink.decision("", f"u{i}@d.example", MIDDLE, 0.001)
            if i % 50 == 0:
                await trio.lowlevel.checkpoint()
        # Nobody reads: the flusher waits for the pipe, the loop runs on.
        await trio.testing.wait_all_tasks_blocked()
        assert 0 < sink.buffered <= limit + 200
        assert sink.dropped > 0
        dropped = sink.dropped
        # The reader comes back: everything kept arrives, then one warning.
        data = await read_until(read_end, lambda d: b"log lines dropped" in d)
        nursery.cancel_scope.cancel()
    lines = data.decode().splitlines()
    assert lines[-1] == f"warning: {dropped} log lines dropped: the log target did not keep up"
    numbers = []
    for line in lines[:-1]:
        match = LINE.fullmatch(line)
        assert match, line  # whole lines only, never a torn one
        numbers.append(int(match.group(1)))
    assert numbers == list(range(len(numbers)))  # in order; the tail was dropped, not the middle
    assert len(numbers) + dropped == written
    assert sink.buffered == 0


async def test_an_idle_line_is_written_at_once(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    sink = LineSink(StreamTarget(write_end))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        await trio.testing.wait_all_tasks_blocked()
        sink.decision("4F2A", "u1@d.example", MIDDLE, 0.001)
        # No other line follows and nothing else runs: the flusher alone writes it.
        data = await read_until(read_end, lambda d: d.endswith(b"\n"))
        nursery.cancel_scope.cancel()
    assert data == b'4F2A: rcpt=<u1@d.example> domain=d.example action=DUNNO reason="r" cache=hit ms=1.0\n'


async def test_a_line_from_a_worker_thread_wakes_the_flusher(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    sink = LineSink(StreamTarget(write_end))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        await trio.testing.wait_all_tasks_blocked()
        await trio.to_thread.run_sync(sink.decision, "", "u7@d.example", MIDDLE, 0.001)
        data = await read_until(read_end, lambda d: d.endswith(b"\n"))
        nursery.cancel_scope.cancel()
    assert b"rcpt=<u7@d.example>" in data


async def test_many_lines_of_one_pass_go_in_one_write(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    target = StreamTarget(write_end)
    writes: list[int] = []
    send = target.send

    def counting_send(data: bytes) -> int:
        writes.append(len(data))
        return send(data)

    target.send = counting_send  # type: ignore[method-assign]
    sink = LineSink(target)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(30):
            sink.decision("", f"u{i}@d.example", MIDDLE, 0.001)
        data = await read_until(read_end, lambda d: d.count(b"\n") == 30)
        nursery.cancel_scope.cancel()
    assert len(writes) == 1 and writes[0] == len(data)


async def test_shutdown_with_lines_buffered_delivers_them(pipe: tuple[int, int]) -> None:
    """The flusher is cancelled while the pipe is full; close() writes the rest when the reader returns."""
    read_end, write_end = pipe
    sink = LineSink(StreamTarget(write_end))
    written = pipe_capacity(write_end) // 60 + 500
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(written):
            sink.decision("", f"u{i}@d.example", MIDDLE, 0.001)
        await trio.testing.wait_all_tasks_blocked()
        assert sink.buffered > 0
        nursery.cancel_scope.cancel()  # shutdown: no exception, lines still buffered
    assert sink.buffered > 0
    # Nobody reads yet: a bounded flush gives up instead of hanging.
    assert sink.flush_sync(0.01) is False
    received: list[bytes] = []

    def reader() -> None:
        os.set_blocking(read_end, True)
        lines = 0
        while lines < written and (chunk := os.read(read_end, 1 << 16)):
            received.append(chunk)
            lines += chunk.count(b"\n")

    thread = threading.Thread(target=reader)
    thread.start()
    sink.close()
    thread.join(timeout=10)
    lines = b"".join(received).decode().splitlines()
    assert [int(LINE.fullmatch(line).group(1)) for line in lines] == list(range(written))  # type: ignore[union-attr]
    assert sink.dropped == 0


# -- a syslog socket replaced while the flusher waits on it (a reload) ----------


@pytest.fixture
def syslog_pair(tmp_path: Path) -> Iterator[tuple[socket.socket, socket.socket]]:
    """Two datagram sockets standing in for syslog daemons: the old one, never
    read (it fills up), and the one a reload moves to."""
    socks = []
    for name in ("old", "new"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(tmp_path / name))
        sock.setblocking(False)
        socks.append(sock)
    try:
        yield socks[0], socks[1]
    finally:
        for sock in socks:
            sock.close()


def _numbers(datagrams: list[bytes]) -> list[int]:
    out = []
    for data in datagrams:
        match = LINE.search(data.rstrip(b"\x00").decode())
        assert match, data
        out.append(int(match.group(1)))
    return out


async def test_a_reload_while_the_flusher_waits_on_syslog_moves_every_line_to_the_new_socket(
    syslog_pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    old_syslog, new_syslog = syslog_pair
    old = SyslogTarget(str(tmp_path / "old"))
    old_fd = old.sock.fileno()
    sink = LineSink(old)
    written = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            while sink.buffered == 0:  # until the old socket's queue is full
                sink.decision("", f"u{written}@d.example", MIDDLE, 0.001)
                written += 1
                await trio.testing.wait_all_tasks_blocked()
            for _ in range(5):  # and a few more, waiting behind it
                sink.decision("", f"u{written}@d.example", MIDDLE, 0.001)
                written += 1
        await trio.testing.wait_all_tasks_blocked()  # the flusher waits for the old socket
        sink.retarget(SyslogTarget(str(tmp_path / "new")))
        # The old socket's number is free again; a new socket given it (as
        # the next accept() may be) can be waited on.
        with pytest.raises(OSError):
            os.fstat(old_fd)
        reuse = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # the lowest free number, likely the old one
        if reuse.fileno() != old_fd:
            spare, reuse = reuse, socket.socket(fileno=os.dup2(reuse.fileno(), old_fd))
            spare.close()
        try:
            with trio.fail_after(5):
                await trio.lowlevel.wait_writable(reuse)
                for _ in range(3):  # lines after the reload
                    sink.decision("", f"u{written}@d.example", MIDDLE, 0.001)
                    written += 1
                received: list[bytes] = []
                taken = []
                while True:
                    try:
                        taken.append(old_syslog.recv(4096))
                    except BlockingIOError:
                        break
                while len(taken) + len(received) < written:
                    await trio.lowlevel.wait_readable(new_syslog)
                    received.append(new_syslog.recv(4096))
        finally:
            reuse.close()
        nursery.cancel_scope.cancel()
    sink.close()
    # Nothing dropped: what the old socket did not take went to the new one, in order.
    assert _numbers(taken) + _numbers(received) == list(range(written))
    assert sink.dropped == 0


async def test_a_reload_from_a_full_pipe_to_syslog_does_not_wait_for_the_pipe(
    pipe: tuple[int, int], syslog_pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    """stderr stalled (nobody reads it), the reload moves logging to syslog:
    lines go there at once; those that were waiting for the pipe are counted
    and reported (they were encoded for a stream, not as datagrams)."""
    _, write_end = pipe
    _, new_syslog = syslog_pair
    sink = LineSink(StreamTarget(write_end))
    written = pipe_capacity(write_end) // 60 + 100
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(written):
            sink.decision("", f"u{i}@d.example", MIDDLE, 0.001)
        await trio.testing.wait_all_tasks_blocked()
        assert sink.buffered > 0  # the flusher waits for the pipe
        sink.retarget(SyslogTarget(str(tmp_path / "new")))
        sink.decision("", "u9999@d.example", MIDDLE, 0.001)
        received: list[bytes] = []
        with trio.fail_after(5):
            while len(received) < 2:
                await trio.lowlevel.wait_readable(new_syslog)
                received.append(new_syslog.recv(4096))
        nursery.cancel_scope.cancel()
    sink.close()
    assert b"rcpt=<u9999@d.example>" in received[0]
    assert b"log lines dropped: the log target did not keep up" in received[1]
    assert sink.dropped > 0


@pytest.fixture
def high_fd_limit() -> Iterator[None]:
    """A soft RLIMIT_NOFILE above 1024 (within the hard limit), as a busy daemon has."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2048
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.fail(f"the hard RLIMIT_NOFILE ({hard}) leaves no descriptor above 1024 to test with")
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _unused_fd_from(first: int) -> int:
    """A descriptor number not in use (dup2 onto one in use would close it)."""
    for fd in range(first, first + 100):
        try:
            os.fstat(fd)
        except OSError:
            return fd
    raise AssertionError(f"descriptors {first} to {first + 99} are all in use")


def test_a_syslog_socket_numbered_above_1024_can_be_waited_for(
    high_fd_limit: None, syslog_pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    """select() refuses descriptors >= 1024; a daemon with many connections has such numbers."""
    old_syslog, _ = syslog_pair
    target = SyslogTarget(str(tmp_path / "old"))
    high = socket.socket(fileno=os.dup2(target.sock.fileno(), _unused_fd_from(1500)))
    target.sock.close()
    target.sock = high
    assert target.sock.fileno() >= 1024
    assert target.ready(1.0)
    while target.send(b"x" * 100):  # until the reader's queue is full
        pass
    assert target.ready(0.05) is False
    old_syslog.recv(4096)
    assert target.ready(1.0)
    sink = LineSink(target)  # no flusher: synchronous writes wait through ready()
    sink.decision("", "u0@d.example", MIDDLE, 0.001)
    target.close()


# -- lines lost to write errors -------------------------------------------------


async def test_lines_lost_to_write_errors_are_reported_once_writing_works_again(pipe: tuple[int, int]) -> None:
    """EPIPE, EIO: the lines are gone, but the dropped-lines warning says how many."""
    read_end, write_end = pipe
    target = StreamTarget(write_end)
    send = target.send
    failing = [True]

    def sometimes_failing(data: bytes) -> int:
        if failing[0]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return send(data)

    target.send = sometimes_failing  # type: ignore[method-assign]
    sink = LineSink(target)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(3):
            sink.decision("", f"u{i}@d.example", MIDDLE, 0.001)
            await trio.testing.wait_all_tasks_blocked()
        assert sink.dropped == 3
        failing[0] = False
        sink.decision("", "u3@d.example", MIDDLE, 0.001)
        data = await read_until(read_end, lambda d: b"log lines dropped" in d)
        nursery.cancel_scope.cancel()
    lines = data.decode().splitlines()
    assert [int(m.group(1)) for m in map(LINE.fullmatch, lines[:-1]) if m] == [3]
    assert lines[-1] == "warning: 3 log lines dropped: writing them failed (EIO)"
    assert sink.dropped == 3


# -- the daemon: signals flush, a full stderr does not delay replies -----------


async def _daemon_with_unread_stderr(
    nursery: trio.Nursery, base: list[str]
) -> tuple[trio.Process, trio.SocketStream, int]:
    daemon = await start_daemon(nursery, base, read_stderr=False)
    stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
    return daemon.process, stream, daemon.port


async def _fill_stderr(process: trio.Process, stream: trio.SocketStream) -> int:
    """Requests until the daemon's stderr pipe is full, each answered promptly all the same."""
    assert process.stderr is not None
    capacity = 65536  # the default pipe size; the lines below are > 60 bytes each
    count = capacity // 60 + 300
    with trio.fail_after(20):
        for i in range(count):
            await stream.send_all(rcpt(f"u{i}@up.example"))
            assert b"DEFER_IF_PERMIT" in await read_replies(stream, 1)
    return count


async def _read_all(process: trio.Process, until: bytes) -> str:
    assert process.stderr is not None
    data = b""
    with trio.fail_after(15):
        while until not in data:
            chunk = await process.stderr.receive_some(1 << 20)
            if not chunk:
                break
            data += chunk
    return data.decode()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_stop_signals_flush_lines_buffered_behind_a_full_pipe(
    nursery: trio.Nursery, world: tuple[list[str], Farm], signum: int  # noqa: F811
) -> None:
    base, _ = world
    process, stream, _ = await _daemon_with_unread_stderr(nursery, base)
    count = await _fill_stderr(process, stream)
    await stream.aclose()
    process.send_signal(signum)
    text = await _read_all(process, b"\x00never")  # to EOF: the daemon wrote everything, then exited
    with trio.fail_after(10):
        assert await process.wait() == 0
    decisions = [line for line in text.splitlines() if " rcpt=<" in line]
    assert [line.split("rcpt=<", 1)[1].split("@")[0] for line in decisions] == [f"u{i}" for i in range(count)]
    assert f"stopping on {signal.Signals(signum).name}" in text
    assert "dropped" not in text and "Traceback" not in text


async def test_sighup_flushes_and_keeps_serving(nursery: trio.Nursery, world: tuple[list[str], Farm]) -> None:  # noqa: F811
    base, _ = world
    process, stream, _ = await _daemon_with_unread_stderr(nursery, base)
    count = await _fill_stderr(process, stream)
    process.send_signal(signal.SIGHUP)
    text = await _read_all(process, b"configuration reloaded\n")
    decisions = [line for line in text.splitlines() if " rcpt=<" in line]
    assert len(decisions) == count
    await stream.send_all(rcpt("after@up.example"))
    assert b"DEFER_IF_PERMIT" in await read_replies(stream, 1)
    assert "rcpt=<after@up.example>" in await _read_all(process, b"rcpt=<after@up.example>")
    await stream.aclose()
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(10):
        assert await process.wait() == 0
