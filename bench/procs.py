"""Child processes of the benchmarks: the daemon, the ceiling server, the load generator.

Servers and load run in separate processes so that neither is billed for
the other's CPU time: on a two-core machine the server gets one core and
the load generator the other.  Every child goes through :mod:`bench.guard`
(dies with the benchmark, hard lifetime cap), and every wait here has a
timeout.

``subprocess.Popen`` is called from the main thread on purpose: the
kernel's parent-death signal is tied to the *thread* that forked, and
trio's own process API forks from a worker thread that may exit at any
time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Final

import trio

from smtpdcheck.compat import run_sync_in_thread_abandoning

from .previous import THIS, Release

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
LOOPBACK: Final = "127.0.0.1"
#: Where the daemon's logs go in a benchmark: ``quiet`` (``--log-level
#: warning``, stderr to a file), ``file`` (the default, info: one decision
#: line per RCPT, stderr to a file), ``pipe`` (the default with stderr to a
#: pipe that a reader drains, as journald does) or ``syslog`` (the default
#: with ``--log-target syslog``, to a datagram socket of the benchmark's own).
LOG_MODES: Final = ("quiet", "file", "pipe", "syslog")
#: A line that reports trouble, in a log of decision lines.
_PROBLEM_WORDS: Final = re.compile(rb"warning:|error:|fatal:|Traceback|Error")


def child_env(root: Path = REPO_ROOT) -> dict[str, str]:
    """The environment of children: ours, with the source tree ``root`` importable first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def guarded(argv: list[str], lifetime: float) -> list[str]:
    return [
        sys.executable, "-m", "bench.guard",
        "--max-seconds", str(max(1, int(lifetime + 0.999))),
        "--parent", str(os.getpid()), "--", *argv,
    ]


def daemon_command(release: Release = THIS) -> list[str]:
    """The installed ``smtpdcheck-policyd`` next to this interpreter, or the module.

    Another release always runs as the module, from its own tree (the
    child's working directory, which ``-m`` puts first on the path).
    """
    script = Path(sys.executable).with_name("smtpdcheck-policyd")
    if release.commit is None and script.exists():
        return [str(script)]
    return [sys.executable, "-m", "policyd.cli"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the daemon cannot listen on 0 and tell us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class Child:
    """One guarded child process; stderr goes to a temporary file we can read back.

    With ``stderr_pipe``, stderr is a pipe instead, which a reader process
    (:mod:`bench.logreader`) copies into that file, as journald reads a
    service's stderr; with ``syslog_socket``, a datagram socket is bound at
    that path and a reader process writes each message's text into the
    file.  Either way ``stderr_text`` reads everything the child logged.
    """

    def __init__(
        self, argv: list[str], *, lifetime: float, name: str, capture_stdout: bool = False,
        stderr_pipe: bool = False, syslog_socket: str | None = None, env: dict[str, str] | None = None,
        root: Path = REPO_ROOT,
    ) -> None:
        self.name = name
        self.argv = argv
        self._stderr: IO[bytes] = tempfile.TemporaryFile(prefix=f"bench-{name}-")
        self.reader: subprocess.Popen[bytes] | None = None
        self._reader_kind = "syslog" if syslog_socket is not None else "pipe" if stderr_pipe else ""
        stderr: IO[bytes] | int = self._stderr
        if syslog_socket is not None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.bind(syslog_socket)
                self.reader = self._start_reader(["syslog", str(sock.fileno())], lifetime, sock.fileno(), None)
        read_end = -1
        if stderr_pipe:
            read_end, stderr = os.pipe()
        try:
            self.proc = subprocess.Popen(
                guarded(argv, lifetime),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
                stderr=stderr,
                env={**child_env(root), **(env or {})},
                cwd=root,
            )
            if stderr_pipe:
                self.reader = self._start_reader(["pipe"], lifetime + 10, None, read_end)
        finally:
            if stderr_pipe:
                os.close(read_end)
                assert isinstance(stderr, int)
                os.close(stderr)
        self.returncode: int | None = None

    def _start_reader(self, args: list[str], lifetime: float, fd: int | None, stdin: int | None) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            guarded([sys.executable, "-m", "bench.logreader", *args], lifetime),
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=self._stderr,
            pass_fds=() if fd is None else (fd,),
            env=child_env(),
            cwd=REPO_ROOT,
        )

    def _stop_reader(self) -> None:
        """The pipe's reader ends with the child (end of file); the socket's when told."""
        reader, self.reader = self.reader, None
        if reader is None:
            return
        if self._reader_kind == "syslog":
            reader.send_signal(signal.SIGTERM)
        try:
            reader.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            reader.kill()
            reader.wait(timeout=2.0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def read_line(self, timeout: float) -> str:
        """One line of stdout (the ceiling server's port), within ``timeout``."""
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        with trio.fail_after(timeout):
            line = await run_sync_in_thread_abandoning(stdout.readline)
        return line.decode("ascii", "replace").strip()

    async def stop(self, grace: float = 7.0) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                while self.proc.poll() is None:
                    await trio.sleep(0.02)
            if self.proc.poll() is None:
                self.proc.kill()
                with trio.move_on_after(2.0):
                    while self.proc.poll() is None:
                        await trio.sleep(0.02)
        self.returncode = self.proc.poll()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.returncode is not None:
            await trio.to_thread.run_sync(self._stop_reader)
        return -999 if self.returncode is None else self.returncode

    def stderr_text(self, limit: int = 1 << 20) -> str:
        """The first ``limit`` bytes the child logged (call after ``stop``)."""
        self._stderr.seek(0)
        return self._stderr.read(limit).decode("utf-8", "replace")

    def problems(self, limit: int = 20) -> list[str]:
        """Warning, error and traceback lines the child logged, scanning the whole log.

        The log may be hundreds of megabytes of decision lines, so it is
        searched in large chunks for the words first, in C.
        """
        self._stderr.seek(0)
        found: list[str] = []
        tail = b""
        while len(found) < limit:
            chunk = self._stderr.read(1 << 24)
            text = tail + chunk
            cut = text.rfind(b"\n") + 1 if chunk else len(text)
            text, tail = text[:cut], text[cut:]
            for match in _PROBLEM_WORDS.finditer(text):
                start = text.rfind(b"\n", 0, match.start()) + 1
                end = text.find(b"\n", match.start())
                line = text[start : end if end >= 0 else len(text)].decode("utf-8", "replace")
                if (line.startswith(("warning:", "error:", "fatal:", "Traceback")) or "Error" in line) and (
                    not found or found[-1] != line
                ):
                    found.append(line)
            if not chunk:
                break
        return found[:limit]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                pass
        self._stop_reader()
        self._stderr.close()


async def wait_for_port(port: int, child: Child, timeout: float) -> None:
    """Wait until something accepts on 127.0.0.1:port, or fail (child died / timeout)."""
    with trio.fail_after(timeout):
        while True:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited with status {child.proc.poll()} before listening:\n{child.stderr_text(4000)}")
            try:
                stream = await trio.open_tcp_stream(LOOPBACK, port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def start_daemon(
    dns_port: int, smtp_port: int, extra: list[str] | None = None, *, lifetime: float, attempts: int = 3,
    log: str = "quiet", release: Release = THIS,
) -> tuple[Child, int]:
    """Start the real smtpdcheck-policyd on a free loopback port; return it and the port.

    ``log`` is one of :data:`LOG_MODES`; ``release`` picks this tree's
    daemon or another release's (:mod:`bench.previous`).
    """
    root = release.tree()
    if log not in LOG_MODES:
        raise ValueError(f"unknown log mode {log!r}")
    last: Exception | None = None
    for _ in range(attempts):
        port = free_port()
        argv = [
            *daemon_command(release),
            "--listen", f"inet:{LOOPBACK}:{port}",
            "--nameserver", f"{LOOPBACK}:{dns_port}",
            "--smtp-port", str(smtp_port),
            *(["--log-level", "warning"] if log == "quiet" else []),
            *(["--log-target", "syslog"] if log == "syslog" else []),
            *(extra or []),
        ]
        syslog_dir = tempfile.mkdtemp(prefix="bench-syslog-") if log == "syslog" else None
        syslog_path = os.path.join(syslog_dir, "log") if syslog_dir else None
        child = Child(
            argv, lifetime=lifetime, name="policyd", stderr_pipe=log == "pipe", syslog_socket=syslog_path,
            root=root, env={"SMTPDCHECK_SYSLOG_SOCKET": syslog_path} if syslog_path else None,
        )
        try:
            await wait_for_port(port, child, timeout=15.0)
            return child, port
        except (RuntimeError, trio.TooSlowError) as exc:
            last = exc
            await child.stop()
            child.close()
        finally:
            # Listening means logging is set up: the daemon's socket is
            # connected, and the name is no longer needed.
            if syslog_path is not None:
                os.unlink(syslog_path)
                os.rmdir(os.path.dirname(syslog_path))
    raise RuntimeError(f"smtpdcheck-policyd did not start: {last}")


async def start_ceiling(*, lifetime: float) -> tuple[Child, int]:
    child = Child([sys.executable, "-m", "bench.ceiling"], lifetime=lifetime, name="ceiling", capture_stdout=True)
    try:
        port = int(await child.read_line(timeout=15.0))
        return child, port
    except (ValueError, trio.TooSlowError) as exc:
        await child.stop()
        text = child.stderr_text(4000)
        child.close()
        raise RuntimeError(f"ceiling server did not start: {exc}\n{text}") from None


async def run_loadgen(job: dict[str, Any]) -> dict[str, Any]:
    """Run one load-generator job in its own process; its JSON result.

    The job's own ``time_limit`` bounds the run; the process gets a little
    more before it is killed.
    """
    limit = float(job.get("time_limit", 60.0))
    proc = subprocess.Popen(
        guarded([sys.executable, "-m", "bench.loadgen"], limit + 15.0),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        cwd=REPO_ROOT,
    )
    payload = json.dumps(job).encode()
    try:
        out, err = await trio.to_thread.run_sync(lambda: proc.communicate(payload, timeout=limit + 10.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError("load generator overran its time limit") from None
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed (status {proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    return result
