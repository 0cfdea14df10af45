"""Real MTAs as a domain's primary MX: Debian's exim4 and OpenSMTPD, run by tests.

Both run in the foreground as children of the test, on 127.0.0.2 and a
free port, and stop with the test's nursery.  They are started as root,
as their packages start them, and exim's configuration is Debian's own
(update-exim4.conf) with a few lines of ``exim4.conf.localmacros`` that the
caller writes (see ``EXIM_LOCALMACROS``): that is for a throwaway root or
an autopkgtest testbed, which is why the tests using this module run only
when asked to (tests/test_real_primaries.py).

Also here: three SMTP clients that differ only in how they leave, so that
what each server logs for each can be measured against what a probe does.
"""

from __future__ import annotations

import enum
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from testbeds.greeters import unused_port

#: Where the servers listen (the primary MX's address in the tests' DNS).
HOST = "127.0.0.2"

EXIM_MAINLOG = Path("/var/log/exim4/mainlog")
EXIM_LOCALMACROS = Path("/etc/exim4/exim4.conf.localmacros")
#: Every SMTP event in the main log, and an optional connect ACL (a file)
#: chosen per daemon on the command line (-DSMTPDCHECK_CONNECT_ACL=FILE),
#: for a primary that greets slowly.
EXIM_MACROS = """\
# Written by smtpdcheck's real-primaries tests.
MAIN_LOG_SELECTOR = +all -arguments
.ifdef SMTPDCHECK_CONNECT_ACL
acl_smtp_connect = SMTPDCHECK_CONNECT_ACL
.endif
"""
#: Debian's default (exim4.conf.template), to measure what an untouched exim logs.
EXIM_DEBIAN_SELECTOR = "+smtp_protocol_error +smtp_syntax_error +tls_certificate_verified +tls_peerdn"

_START_TIMEOUT = 20.0
_POLL = 0.1


def configure_exim() -> str | None:
    """Install ``EXIM_MACROS`` and regenerate Debian's configuration; return what was there before."""
    before = EXIM_LOCALMACROS.read_text() if EXIM_LOCALMACROS.exists() else None
    EXIM_LOCALMACROS.write_text(EXIM_MACROS)
    subprocess.run(["update-exim4.conf"], check=True)
    return before


def restore_exim(before: str | None) -> None:
    if before is None:
        EXIM_LOCALMACROS.unlink(missing_ok=True)
    else:
        EXIM_LOCALMACROS.write_text(before)
    subprocess.run(["update-exim4.conf"], check=True)


def _log_size() -> int:
    return EXIM_MAINLOG.stat().st_size if EXIM_MAINLOG.exists() else 0


@dataclass
class Exim:
    """One exim daemon on ``HOST:port``; ``lines()`` are its main log's lines since it started."""

    port: int
    process: trio.Process
    offset: int
    selector: str

    @property
    def tag(self) -> str:
        """What each of this daemon's connection lines holds under ``+all`` (``+incoming_interface``)."""
        return f"I=[{HOST}]:{self.port}"

    def all_lines(self) -> list[str]:
        with EXIM_MAINLOG.open("rb") as log:
            log.seek(self.offset)
            return log.read().decode(errors="replace").splitlines()

    def lines(self) -> list[str]:
        """This daemon's connection lines (``+all`` only: other selectors omit the interface)."""
        return [line for line in self.all_lines() if self.tag in line]

    async def stop(self) -> None:
        self.process.terminate()
        with trio.fail_after(10):
            await self.process.wait()


async def start_exim(
    nursery: trio.Nursery, *, connect_acl: Path | None = None, selector: str | None = None
) -> Exim:
    """``exim4 -bdf`` on ``HOST`` and a free port; returns once its main log says it listens."""
    port = unused_port(HOST)
    argv = [shutil.which("exim4") or "exim4", "-bdf", "-oX", f"{HOST}.{port}"]
    if connect_acl is not None:
        argv.append(f"-DSMTPDCHECK_CONNECT_ACL={connect_acl}")
    if selector is not None:
        argv.append(f"-DMAIN_LOG_SELECTOR={selector}")
    offset = _log_size()
    process: trio.Process = await nursery.start(partial(trio.run_process, argv, check=False))
    exim = Exim(port, process, offset, selector or "+all -arguments")
    listening = f"listening for SMTP on [{HOST}]:{port}"
    with trio.fail_after(_START_TIMEOUT):
        while not (EXIM_MAINLOG.exists() and any(listening in line for line in exim.all_lines())):
            if process.returncode is not None:
                raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}")
            await trio.sleep(_POLL)
    return exim


def slow_connect_acl(directory: Path, seconds: int) -> Path:
    """A connect ACL file that makes exim greet ``seconds`` after the connect.

    exim reads it in the child serving the connection, which runs as
    Debian-exim: the file and its directories must be readable by all.
    """
    path = directory / "slow-connect.acl"
    path.write_text(f"accept delay = {seconds}s\n")
    path.chmod(0o644)
    for parent in [directory, *directory.parents]:
        parent.chmod(parent.stat().st_mode | 0o055)  # r-x for group and others, as /tmp has
        if parent == Path("/tmp") or parent.parent == parent:
            break
    return path


@dataclass
class OpenSMTPD:
    """``smtpd -d -v`` on ``HOST:port``; its log is its stderr, kept in ``log``."""

    port: int
    process: trio.Process
    log: list[str] = field(default_factory=list)

    async def stop(self) -> None:
        self.process.terminate()
        with trio.fail_after(10):
            await self.process.wait()


async def start_opensmtpd(nursery: trio.Nursery, directory: Path) -> OpenSMTPD:
    """OpenSMTPD with a configuration of its own that only listens; returns once it says it is ready."""
    port = unused_port(HOST)
    conf = directory / "smtpd.conf"
    conf.write_text(
        f"listen on {HOST} port {port}\n"
        'action "local" mbox\n'
        'match from local for local action "local"\n'
    )
    conf.chmod(0o644)
    argv = [shutil.which("smtpd") or "/usr/sbin/smtpd", "-d", "-v", "-f", str(conf)]
    process: trio.Process = await nursery.start(
        partial(trio.run_process, argv, stderr=subprocess.PIPE, check=False)
    )
    server = OpenSMTPD(port, process)
    ready = trio.Event()

    async def keep_log() -> None:
        assert process.stderr is not None
        pending = b""
        async for chunk in process.stderr:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                server.log.append(line)
                sys.stderr.write(f"smtpd: {line}\n")
                if "smtp: will accept at most" in line:  # logged once its listeners take connections
                    ready.set()
        ready.set()  # EOF: it exited

    nursery.start_soon(keep_log)
    with trio.fail_after(_START_TIMEOUT):
        await ready.wait()
    if process.returncode is not None:
        raise RuntimeError(f"{' '.join(argv)} exited; its log:\n" + "\n".join(server.log))
    return server


class Leave(enum.Enum):
    """How a measuring client ends its connection."""

    POLITE = "reads the whole greeting, sends QUIT, reads the 221, closes"
    AFTER_FIRST_LINE = "reads the first greeting line, closes 2 s later without QUIT"
    BEFORE_GREETING = "closes 5 s after the connect, before any greeting"
    EARLY_QUIT = "sends QUIT before the greeting, reads until the server closes"


@dataclass
class Session:
    leave: Leave
    local_port: int
    received: bytes


async def client(port: int, leave: Leave) -> Session:
    """One connection to ``HOST:port`` that leaves as ``leave`` says; what it received."""
    with trio.fail_after(60):
        stream = await trio.open_tcp_stream(HOST, port)
        local_port = stream.socket.getsockname()[1]
        received = b""
        async with stream:
            if leave is Leave.EARLY_QUIT:
                await stream.send_all(b"QUIT\r\n")
                try:
                    while chunk := await stream.receive_some(4096):
                        received += chunk
                except trio.BrokenResourceError:
                    pass  # reset: the server closed with our QUIT unread
                return Session(leave, local_port, received)
            if leave is Leave.BEFORE_GREETING:
                with trio.move_on_after(5):
                    received += await stream.receive_some(4096)
                    raise AssertionError(f"greeted within 5 s: {received!r}")
                return Session(leave, local_port, received)
            while b"\n" not in received:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return Session(leave, local_port, received)
                received += chunk
            if leave is Leave.AFTER_FIRST_LINE:
                await trio.sleep(2)
                return Session(leave, local_port, received)
            while not _greeting_complete(received):
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return Session(leave, local_port, received)
                received += chunk
            mark = len(received)
            await stream.send_all(b"QUIT\r\n")
            while b"\n" not in received[mark:]:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                received += chunk
        return Session(leave, local_port, received)


def _greeting_complete(data: bytes) -> bool:
    """True once a line of the form ``220 text`` (no hyphen: the last) has arrived."""
    lines: Sequence[bytes] = data.split(b"\r\n")[:-1]
    return any(len(line) >= 4 and line[3:4] == b" " for line in lines)
