"""smtpdcheck-policyd as a real process: signals, systemd, spawn mode, metrics, --check.

Each test runs the installed code as a child process and talks to it over
real sockets; the DNS server and greeters run in the test's own loop.
Readiness is learned the way systemd learns it, from READY=1 on a
NOTIFY_SOCKET, so no test sleeps and hopes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from policyd.client import parse_reply
from tests.conftest import Farm
from tests.policyd_helpers import rcpt, read_replies
from testbeds.dnsserver import FakeDNSServer, nameserver_arg
from testbeds.greeters import Mode, unused_port
from tests.test_policyd_server import backup_zone

PYTHON = sys.executable
# Whatever /etc/smtpdcheck/policyd.toml this machine has, the tests do not read it.
NO_SYSTEM_CONFIG = ["--config", ""]


@dataclass
class Daemon:
    process: trio.Process
    port: int
    stderr_lines: list[str] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    async def wait_log(self, needle: str, timeout: float = 5.0) -> str:
        with trio.fail_after(timeout):
            while True:
                for line in self.stderr_lines:
                    if needle in line:
                        return line
                await self.changed.wait()

    async def ask(self, request: bytes, stream: trio.SocketStream) -> tuple[str, str]:
        await stream.send_all(request)
        return parse_reply(await read_replies(stream, 1))


async def _collect(daemon: Daemon, stream: trio.abc.ReceiveStream) -> None:
    buf = b""
    while data := await stream.receive_some(65536):
        buf += data
        *lines, buf = buf.split(b"\n")
        daemon.stderr_lines.extend(line.decode("utf-8", "replace") for line in lines)
        daemon.changed.set()
        daemon.changed = trio.Event()


def _notify_socket() -> tuple[socket.socket, str]:
    path = tempfile.mktemp(prefix="sdnotify", dir="/tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    return sock, path


async def start_daemon(
    nursery: trio.Nursery, args: list[str], *, port: int | None = None, prefix: list[str] | None = None,
    pass_fds: tuple[int, ...] = (),
    read_stderr: bool = True,
    while_starting: Callable[[trio.Process], Awaitable[None]] | None = None,
) -> Daemon:
    """The daemon as a child process, ready (sd_notify) on ``port``.

    ``read_stderr=False`` leaves its stderr pipe unread, for tests of a log
    target that stops taking lines.  ``while_starting`` runs alongside the
    wait for readiness (to signal the process during start-up).
    """
    port = port or unused_port()
    notify, notify_path = _notify_socket()
    env = {**os.environ, "NOTIFY_SOCKET": notify_path}
    command = (prefix or []) + [PYTHON, "-m", "policyd.cli", *NO_SYSTEM_CONFIG, "--listen", f"inet:127.0.0.1:{port}", *args]
    process = await trio.lowlevel.open_process(
        command, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, pass_fds=pass_fds
    )
    daemon = Daemon(process, port)
    assert process.stderr is not None
    if read_stderr:
        nursery.start_soon(_collect, daemon, process.stderr)

    async def reap() -> None:
        try:
            await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()

    nursery.start_soon(reap)
    if while_starting is not None:
        nursery.start_soon(while_starting, process)
    try:
        with trio.fail_after(15):
            tsock = trio.socket.from_stdlib_socket(notify)
            message = await tsock.recv(4096)
        assert message == b"READY=1", message
    except BaseException as exc:
        process.kill()
        raise AssertionError(f"daemon not ready; stderr: {daemon.stderr_lines}") from exc
    finally:
        notify.close()
        os.unlink(notify_path)
    return daemon


@pytest.fixture
async def world(nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]) -> tuple[list[str], Farm]:
    f = await farm(Mode.OK, Mode.CODE_421)
    dns_server.zone.update(backup_zone("up.example", "127.0.0.2"))
    dns_server.zone.update(backup_zone("down.example", "127.0.0.3"))
    base = [*NO_SYSTEM_CONFIG, "--nameserver", nameserver_arg(dns_server), "--smtp-port", str(f.port), "--timeout", "1", "--dns-timeout", "1", "--deadline", "3"]
    return base, f


async def test_reload_keeps_connections_and_cache_and_rejects_bad_config(
    nursery: trio.Nursery, world: tuple[list[str], Farm], tmp_path: Path
) -> None:
    base, f = world
    conf = tmp_path / "policyd.toml"
    conf.write_text('mode = "enforce"\n')
    daemon = await start_daemon(nursery, [*base, "--config", str(conf)])
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
        async with stream:
            assert (await daemon.ask(rcpt("a@up.example"), stream))[0] == "DEFER_IF_PERMIT"
            conf.write_text('mode = "warn"\ndefer_text = "shadow: {mx} is up"\n')
            daemon.process.send_signal(signal.SIGHUP)
            await daemon.wait_log("configuration reloaded")
            assert await daemon.ask(rcpt("b@up.example"), stream) == ("WARN", "shadow: mx1.up.example is up")
            # A broken file is refused; the running configuration stays.
            conf.write_text('mode = "warn"\ntiemout = 3\n')
            daemon.process.send_signal(signal.SIGHUP)
            line = await daemon.wait_log("reload failed")
            assert "tiemout" in line and "policyd.toml" in line
            assert (await daemon.ask(rcpt("c@up.example"), stream))[0] == "WARN"
        daemon.process.send_signal(signal.SIGTERM)
        assert await daemon.process.wait() == 0
    assert f.greeters[0].connections == 1  # the probe cache survived the reload
    warn_line = next(l for l in daemon.stderr_lines if "action=WARN" in l)
    assert warn_line.startswith("NOQUEUE: rcpt=<b@up.example> domain=up.example action=WARN")


async def test_sigterm_finishes_request_in_flight(nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]) -> None:
    """A request being decided when SIGTERM arrives is still answered; then exit 0."""
    f = await farm(Mode.PAUSED_MULTILINE, pause=5.0)
    dns_server.zone.update(backup_zone("slowdns.example", "127.0.0.2"))
    from testbeds.dnsserver import Slow

    dns_server.zone[("slowdns.example", "MX")] = Slow(1.0, ["10 mx1.slowdns.example.", "20 backup.slowdns.example."])
    daemon = await start_daemon(
        nursery, ["--nameserver", nameserver_arg(dns_server), "--smtp-port", str(f.port), "--dns-timeout", "3", "--timeout", "0.5", "--deadline", "4"]
    )
    with trio.fail_after(15):
        stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
        idle = await trio.open_tcp_stream("127.0.0.1", daemon.port)
        async with stream, idle:
            await stream.send_all(rcpt("a@slowdns.example"))
            await dns_server.wait_for_query("slowdns.example", "MX")  # the request is now waiting on DNS
            daemon.process.send_signal(signal.SIGTERM)
            reply = parse_reply(await read_replies(stream, 1))
            assert reply[0] == "DEFER_IF_PERMIT"
            assert await idle.receive_some(10) == b""  # idle connections are closed
        assert await daemon.process.wait() == 0
    # The probe decided on postscreen's teaser; stopping did not cut it off
    # before the greeting's last line (a HANGUP): it said QUIT after it.
    greeter = f.greeters[0]
    assert greeter.pregreet == [b""]
    assert greeter.received == [b"QUIT\r\n"]
    assert any("ending their SMTP session with QUIT" in line for line in daemon.stderr_lines)
    # Accepting stopped: the port is closed.
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", daemon.port)


async def test_socket_activation(nursery: trio.Nursery, world: tuple[list[str], Farm]) -> None:
    base, _ = world
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    # As systemd does: the socket at fd 3, LISTEN_FDS=1, LISTEN_PID = the service's pid
    # (known only after fork, hence a small exec wrapper).
    wrapper = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_FDS'] = '1'; "
        "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[2], sys.argv[2:])"
    )
    prefix = [PYTHON, "-c", wrapper, str(fd)]
    try:
        daemon = await start_daemon(nursery, base, port=unused_port(), prefix=prefix, pass_fds=(fd,))
    finally:
        listener.close()
    await daemon.wait_log("socket activation")
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            assert (await daemon.ask(rcpt("a@up.example"), stream))[0] == "DEFER_IF_PERMIT"
        # The --listen endpoint was not opened: the inherited socket replaces it.
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", daemon.port)
        daemon.process.send_signal(signal.SIGTERM)
        assert await daemon.process.wait() == 0


async def test_sighup_during_a_slow_start_up_is_held_until_the_daemon_serves(
    nursery: trio.Nursery, world: tuple[list[str], Farm], dns_server: FakeDNSServer
) -> None:
    """A --stop name whose lookup is slow: SIGHUP arriving meanwhile must not kill
    the daemon (SIGHUP's default action); it reloads once the daemon serves."""
    base, _ = world
    from testbeds.dnsserver import Slow

    dns_server.zone[("slowstop.example", "A")] = Slow(1.0, ["192.0.2.25"])
    dns_server.zone[("slowstop.example", "AAAA")] = Slow(1.0, [])

    async def hangup_while_resolving(process: trio.Process) -> None:
        await dns_server.wait_for_query("slowstop.example")
        process.send_signal(signal.SIGHUP)

    daemon = await start_daemon(
        nursery, [*base, "--stop", "slowstop.example", "--dns-timeout", "5", "--deadline", "7"], while_starting=hangup_while_resolving,
    )
    with trio.fail_after(15):
        await daemon.wait_log("configuration reloaded", timeout=15)
        stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
        async with stream:
            assert (await daemon.ask(rcpt("a@up.example"), stream))[0] == "DEFER_IF_PERMIT"
        daemon.process.send_signal(signal.SIGTERM)
        assert await daemon.process.wait() == 0


def _activated(sock: socket.socket, *args: str) -> subprocess.CompletedProcess[str]:
    """The daemon started by socket activation with ``sock`` as its one descriptor."""
    wrapper = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_FDS'] = '1'; "
        "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[2], sys.argv[2:])"
    )
    return subprocess.run(
        [PYTHON, "-c", wrapper, str(sock.fileno()), PYTHON, "-m", "policyd.cli", *NO_SYSTEM_CONFIG,
         "--nameserver", "127.0.0.1:9", *args],
        pass_fds=(sock.fileno(),), capture_output=True, text=True, timeout=60, check=False,
    )


def test_an_inherited_socket_of_the_wrong_kind_is_fatal_in_one_line() -> None:
    """A unit with ListenDatagram= or Accept=yes passes what cannot be served: say so, exit 2."""
    datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    datagram.bind(("127.0.0.1", 0))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    connected = socket.create_connection(listener.getsockname())
    with datagram, listener, connected:
        for sock, why in [(datagram, "is not a stream socket (want ListenStream=)"),
                          (connected, "is not listening (want Accept=no)")]:
            run = _activated(sock)
            assert run.returncode == 2, run
            assert run.stderr == f"fatal: socket activation: descriptor 3 {why}\n"


def test_a_metrics_endpoint_that_cannot_be_bound_leaves_nothing_behind(tmp_path: Path) -> None:
    """The policy socket file this run made is removed, and one line says why."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    path = tmp_path / "policy.sock"
    with taken:
        metrics = f"inet:127.0.0.1:{taken.getsockname()[1]}"
        run = subprocess.run(
            [PYTHON, "-m", "policyd.cli", *NO_SYSTEM_CONFIG, "--nameserver", "127.0.0.1:9",
             "--listen", f"unix:{path}", "--metrics", metrics],
            capture_output=True, text=True, timeout=60, check=False,
        )
    assert run.returncode == 2, run
    assert run.stderr.startswith(f"fatal: {metrics}: ") and run.stderr.count("\n") == 1, run.stderr
    assert not path.exists()


async def test_metrics_scrape(nursery: trio.Nursery, world: tuple[list[str], Farm]) -> None:
    base, _ = world
    mport = unused_port()
    daemon = await start_daemon(nursery, [*base, "--metrics", f"inet:127.0.0.1:{mport}"])
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
        async with stream:
            for rcpt_to in ("a@up.example", "b@up.example", "c@down.example"):
                await daemon.ask(rcpt(rcpt_to), stream)
            http = await trio.open_tcp_stream("127.0.0.1", mport)
            async with http:
                await http.send_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
                body = b""
                while chunk := await http.receive_some(65536):
                    body += chunk
        daemon.process.send_signal(signal.SIGTERM)
        await daemon.process.wait()
    text = body.decode()
    assert text.startswith("HTTP/1.0 200 OK")
    assert 'smtpdcheck_policy_requests_total{action="DEFER_IF_PERMIT",reason="primary live"} 2.0' in text
    assert 'smtpdcheck_policy_requests_total{action="DUNNO",reason="all down"} 1.0' in text
    assert 'smtpdcheck_probes_total{outcome="available"} 1.0' in text
    assert 'smtpdcheck_probes_total{outcome="declined"} 1.0' in text
    assert 'smtpdcheck_cache_hits_total{cache="probe"}' in text
    assert "smtpdcheck_policy_decision_seconds_count 3.0" in text
    assert "smtpdcheck_connections_open 1.0" in text
    assert "smtpdcheck_accept_errors_total 0.0" in text
    assert "smtpdcheck_log_lines_dropped_total 0.0" in text
    assert 'smtpdcheck_cache_entries{cache="answer"}' in text


async def test_spawn_mode_stdio(nursery: trio.Nursery, world: tuple[list[str], Farm]) -> None:
    """As spawn(8) runs it: stdin, stdout AND stderr are the one socket."""
    base, _ = world
    ours, theirs = socket.socketpair()
    with ours, theirs:
        process = await trio.lowlevel.open_process(
            [PYTHON, "-m", "policyd.cli", "--stdio", *base], stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=theirs.fileno()
        )
        theirs.close()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours.dup()))
        with trio.fail_after(15):
            async with stream:
                await stream.send_all(rcpt("a@up.example") + rcpt("b@down.example") + b"request=smtpd_access_policy\nbroken\n\n")
                data = b""
                while chunk := await stream.receive_some(65536):
                    data += chunk
            assert await process.wait() == 0
    # Exactly the two replies: no log line leaked into the socket.
    assert data.startswith(b"action=DEFER_IF_PERMIT ")
    assert data.endswith(b"\n\naction=DUNNO\n\n") and data.count(b"\n\n") == 2


@pytest.mark.parametrize(("recipient", "code", "action"), [("user@up.example", 1, "DEFER_IF_PERMIT"), ("user@down.example", 0, "DUNNO")])
async def test_check_explains_a_decision(world: tuple[list[str], Farm], recipient: str, code: int, action: str) -> None:
    base, _ = world
    with trio.fail_after(15):
        result = await trio.run_process(
            [PYTHON, "-m", "policyd.cli", *base, "--check", recipient, "--server-address", "127.0.0.1"],
            capture_stdout=True, capture_stderr=True, check=False,
        )
    out = result.stdout.decode()
    assert result.returncode == code, (out, result.stderr)
    domain = recipient.split("@")[1]
    assert out.splitlines()[0] == f"nameservers {base[base.index('--nameserver') + 1]} (from --nameserver)"
    assert out.splitlines()[1] == f"domain {domain}: mx"
    assert f"mx1.{domain}" in out and "probed:" in out and "this host" in out
    assert out.splitlines()[-1].startswith(f"action={action}")


async def test_start_up_errors_exit_2(tmp_path: Path, world: tuple[list[str], Farm]) -> None:
    base, _ = world
    bad = tmp_path / "bad.toml"
    bad.write_text("timeout = -3\n")
    regular = tmp_path / "not-a-socket"
    regular.write_text("x")
    cases = [
        ["--config", str(bad)],
        ["--stop", "nonexistent.example"],
        ["--listen", f"unix:{regular}"],
        ["--listen", "inet:127.0.0.1:99999"],
    ]
    for extra in cases:
        with trio.fail_after(15):
            result = await trio.run_process(
                [PYTHON, "-m", "policyd.cli", *base, *extra], capture_stdout=True, capture_stderr=True, check=False
            )
        assert result.returncode == 2, (extra, result.stderr)
        assert result.stderr.strip(), extra
    assert regular.read_text() == "x"


async def test_check_exits_2_when_it_cannot_decide(world: tuple[list[str], Farm], dns_server: FakeDNSServer) -> None:
    from testbeds.dnsserver import Behavior

    base, _ = world
    dns_server.zone[("broken.example", "MX")] = Behavior.SERVFAIL
    with trio.fail_after(15):
        result = await trio.run_process(
            [PYTHON, "-m", "policyd.cli", *base, "--check", "user@broken.example"],
            capture_stdout=True, capture_stderr=True, check=False,
        )
    assert result.returncode == 2
    assert result.stdout.decode().splitlines()[-1] == "action=DUNNO"
    assert result.stderr.decode().strip() == "smtpdcheck-policyd: --check user@broken.example: dns failure: SERVFAIL"


async def test_sigint_stops_cleanly(nursery: trio.Nursery, world: tuple[list[str], Farm]) -> None:
    base, _ = world
    daemon = await start_daemon(nursery, base)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
        async with stream:
            assert (await daemon.ask(rcpt("a@up.example"), stream))[0] == "DEFER_IF_PERMIT"
            daemon.process.send_signal(signal.SIGINT)
            assert await stream.receive_some(10) == b""
        assert await daemon.process.wait() == 0
    await daemon.wait_log("stopping on SIGINT")
    assert not any("Traceback" in line for line in daemon.stderr_lines)
