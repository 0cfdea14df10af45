"""Real primaries: Debian's exim4 and OpenSMTPD probed by the installed commands.

A backup MX probes each more-preferred MX many times a day, so what the
primary logs for a probe matters as much as the verdict: a probe must be
judged right, and must leave the log of an ordinary client that greets and
says QUIT, not of one that drops the connection.  These tests run the
installed ``smtpdcheck-policyd`` at its defaults (only its listener, its
nameserver and the SMTP port are set) under steady RCPT traffic for long
enough to cover several probes (``--cache-up-ttl`` is 10 s), and the
``smtpdcheck`` command, against a real exim4 and a real OpenSMTPD, and
read what those logged.

They start the servers as root and rewrite exim's localmacros (restored
afterwards), which is for a throwaway root: they run only where
``SMTPDCHECK_REAL_PRIMARIES`` names them (``exim4``, ``opensmtpd``,
``fail2ban``, comma-separated; .ci/debian and debian/tests set it) and skip
loudly elsewhere.  Where it names a server that is not installed, the test
fails: CI cannot skip them.

Each test prints what it measured (pytest -rA shows it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from policyd.client import parse_reply
from policyd.config import Config
from tests.installed import command, start_daemon
from tests.policyd_helpers import rcpt, read_replies
from testbeds.dnsserver import FakeDNSServer
from tests.support.primaries import (
    EXIM_DEBIAN_SELECTOR,
    HOST,
    Exim,
    Leave,
    OpenSMTPD,
    Session,
    client,
    configure_exim,
    restore_exim,
    slow_connect_acl,
    start_exim,
    start_opensmtpd,
)
from tests.test_policyd_server import backup_zone

ENV = "SMTPDCHECK_REAL_PRIMARIES"
_SKIP_BANNER = "REAL-PRIMARY TEST SKIPPED: "

#: Long enough for the first probe and at least two refreshes (--cache-up-ttl 10 s).
LIVE_S = 22.0
#: A stopped primary must be judged down within a refresh and a probe's timeout.
DOWN_WITHIN_S = 30.0
#: exim's connect ACL delay for a slow primary: past the daemon's --timeout
#: (5 s), within what counts as a greeting in time (30 s).
SLOW_GREETING_S = 20
#: A slow primary must be judged up within a little more than its first probe.
SLOW_UP_WITHIN_S = 45.0
#: After the first DEFER: longer than a confirmation of the slow greeter (its 20 s greeting, plus the up TTL).
SLOW_STAYS_UP_S = 35.0
REQUEST_INTERVAL_S = 0.5

#: exim's lines for a connection that did not end as an SMTP client should.
EXIM_BAD = ("lost", "unexpected disconnection", "synchronization error")


def require(name: str, binary: str) -> None:
    """Skip loudly unless ``ENV`` names ``name``; then fail if ``binary`` is missing or we are not root."""
    wanted = {word.strip() for word in os.environ.get(ENV, "").split(",") if word.strip()}
    found = shutil.which(binary)
    if name not in wanted:
        where = f"{found} is installed" if found else f"{binary} is not installed"
        pytest.skip(f"{_SKIP_BANNER}{name} runs only where {ENV} names it, in a throwaway root ({where})")
    if found is None:
        pytest.fail(f"{ENV} names {name}, but {binary} is not installed")
    if os.geteuid() != 0:
        pytest.fail(f"{ENV} names {name}, which the tests start as root, as its package does")


@pytest.fixture(scope="session")
def exim_config() -> Iterator[None]:
    require("exim4", "exim4")
    before = configure_exim()
    yield
    restore_exim(before)


@pytest.fixture
def opensmtpd_required() -> None:
    """Outside the test's trio run, so that a skip reads as one (not wrapped in an exception group)."""
    require("opensmtpd", "smtpd")


@dataclass(frozen=True)
class Answer:
    at: float  # seconds since the traffic started
    action: str
    text: str


def daemon_config(dns_server: FakeDNSServer, smtp_port: int) -> Config:
    """The daemon's defaults, but for its listener, the tests' nameserver and the primaries' port."""
    return Config(listen=("inet:127.0.0.1:0",), nameserver=(f"127.0.0.1:{dns_server.port}",), smtp_port=smtp_port)


async def steady(
    endpoint: str, recipient: str, *, seconds: float, until: Callable[[Answer], bool] = lambda _: False
) -> list[Answer]:
    """One RCPT request every REQUEST_INTERVAL_S on one connection, as Postfix sends them, for ``seconds`` or ``until``."""
    host, port = endpoint.removeprefix("inet:").rsplit(":", 1)
    answers: list[Answer] = []
    start = trio.current_time()
    with trio.fail_after(seconds + 30):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            while trio.current_time() - start < seconds:
                await stream.send_all(rcpt(recipient))
                action, text = parse_reply(await read_replies(stream, 1))
                answers.append(Answer(round(trio.current_time() - start, 1), action, text))
                if until(answers[-1]):
                    break
                await trio.sleep(REQUEST_INTERVAL_S)
    return answers


def summary(answers: list[Answer]) -> str:
    """Runs of equal actions: ``DUNNO x3 (0.0-1.0 s), DEFER_IF_PERMIT x40 (1.5-21.5 s)``."""
    runs: list[list[Answer]] = []
    for answer in answers:
        if runs and runs[-1][-1].action == answer.action:
            runs[-1].append(answer)
        else:
            runs.append([answer])
    return ", ".join(f"{run[0].action} x{len(run)} ({run[0].at:g}-{run[-1].at:g} s)" for run in runs)


def is_defer_naming(domain: str) -> Callable[[Answer], bool]:
    return lambda answer: answer.action == "DEFER_IF_PERMIT" and f"mx1.{domain}" in answer.text


def exim_connections(lines: list[str]) -> list[str]:
    return [line for line in lines if "(TCP/IP connection count" in line]


async def exim_settled(exim: Exim) -> list[str]:
    """This daemon's lines once every connection it took has ended (``+all`` logs ``no MAIL`` last)."""
    with trio.fail_after(SLOW_GREETING_S + 10):
        while True:
            lines = exim.lines()
            if len([line for line in lines if "no MAIL in SMTP connection" in line]) >= len(exim_connections(lines)):
                return lines
            await trio.sleep(0.2)


def exim_bad(lines: list[str]) -> list[str]:
    return [line for line in lines if any(word in line for word in EXIM_BAD)]


def report(title: str, lines: list[str]) -> None:
    print(f"--- {title}")
    for line in lines:
        print(f"    {line}")


def record_fail2ban(lines: list[str], directory: Path) -> None:
    """What Debian's stock exim filter makes of these lines (recorded, not judged: see the module)."""
    if not shutil.which("fail2ban-regex"):
        if "fail2ban" in os.environ.get(ENV, ""):
            pytest.fail(f"{ENV} names fail2ban, but fail2ban-regex is not installed")
        print("--- fail2ban-regex: not installed, nothing recorded")
        return
    log = directory / "mainlog"
    log.write_text("".join(f"{line}\n" for line in lines))
    result = subprocess.run(
        ["fail2ban-regex", str(log), "/etc/fail2ban/filter.d/exim.conf"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    counts = re.search(r"^Lines: .*$", result.stdout, re.MULTILINE)
    assert counts, result.stdout
    matched = [line for line in lines if "no MAIL in SMTP connection" in line and "C=QUIT" in line]
    print(f"--- fail2ban-regex {log.name} filter.d/exim.conf: {counts.group(0)}")
    print(f"    ({len(matched)} 'no MAIL ... C=QUIT' lines: any client that greets and says QUIT; the remedy is ignoreip)")


# exim4 -----------------------------------------------------------------------------------------


async def test_exim_primary_under_steady_traffic(
    exim_config: None, nursery: trio.Nursery, dns_server: FakeDNSServer, tmp_path: Path
) -> None:
    """DEFER naming exim while it greets, each probe closed by QUIT, DUNNO once it is stopped."""
    exim = await start_exim(nursery)
    dns_server.zone.update(backup_zone("exim.example", HOST))
    endpoint = await start_daemon(nursery, daemon_config(dns_server, exim.port))
    live = await steady(endpoint, "user@exim.example", seconds=LIVE_S)
    print(f"--- while exim greets: {summary(live)}")
    lines = await exim_settled(exim)
    report(f"exim main log, {len(exim_connections(lines))} probes in {LIVE_S:g} s", lines)
    record_fail2ban(lines, tmp_path)
    await exim.stop()
    down = await steady(endpoint, "user@exim.example", seconds=DOWN_WITHIN_S, until=lambda a: a.action == "DUNNO")
    print(f"--- once exim is stopped: {summary(down)}")

    assert all(map(is_defer_naming("exim.example"), live)), summary(live)
    connections = exim_connections(lines)
    assert len(connections) >= 2, lines
    assert exim_bad(lines) == []
    assert len([line for line in lines if "closed by QUIT" in line]) == len(connections), lines
    assert down[-1].action == "DUNNO", summary(down)


async def test_exim_primary_smtpdcheck(exim_config: None, nursery: trio.Nursery, dns_server: FakeDNSServer) -> None:
    """The command names exim as the live primary, and its probe leaves as a client should."""
    exim = await start_exim(nursery)
    dns_server.zone.update(backup_zone("exim.example", HOST))
    with trio.fail_after(30):
        result = await trio.run_process(
            [command("smtpdcheck"), "--nameserver", f"127.0.0.1:{dns_server.port}", "--smtp-port", str(exim.port),
             "--stop", "127.0.0.1", "10:mx1.exim.example", "20:backup.exim.example"],
            capture_stdout=True, capture_stderr=True, check=False,
        )
    lines = await exim_settled(exim)
    report("exim main log for one smtpdcheck run", lines)
    assert (result.returncode, result.stdout) == (1, b"mx1.exim.example\n"), result.stderr
    assert len(exim_connections(lines)) == 1, lines
    assert exim_bad(lines) == []
    assert [line for line in lines if "closed by QUIT" in line], lines


async def test_exim_slow_greeting_is_judged_up(
    exim_config: None, nursery: trio.Nursery, dns_server: FakeDNSServer, tmp_path: Path
) -> None:
    """A primary whose greeting takes 20 s (a connect ACL delay) is up, and no probe of it is cut short.

    The first RCPTs may get DUNNO while the first probe waits (fail-open);
    within a bounded time of steady traffic the answers become DEFER, and
    stay DEFER through the confirmations that follow (each takes 20 s too).
    """
    exim = await start_exim(nursery, connect_acl=slow_connect_acl(tmp_path, SLOW_GREETING_S))
    dns_server.zone.update(backup_zone("slow.example", HOST))
    endpoint = await start_daemon(nursery, daemon_config(dns_server, exim.port))
    answers = await steady(endpoint, "user@slow.example", seconds=SLOW_UP_WITHIN_S, until=is_defer_naming("slow.example"))
    up = await steady(endpoint, "user@slow.example", seconds=SLOW_STAYS_UP_S)
    lines = exim.lines()
    print(f"--- exim greeting after {SLOW_GREETING_S} s: {summary(answers)}; then {summary(up)}")
    report("exim main log", lines)
    assert is_defer_naming("slow.example")(answers[-1]), summary(answers)
    assert [a for a in up if not is_defer_naming("slow.example")(a)] == [], summary(up)
    assert exim_bad(lines) == []


async def test_exim_logs_per_client(exim_config: None, nursery: trio.Nursery, tmp_path: Path) -> None:
    """What exim logs for a client that leaves politely and for ones that do not (a measurement, and the
    control that shows the log checks above can fail: the clients that hang up are logged ``lost``)."""
    acl = slow_connect_acl(tmp_path, 8)
    fast, slow = await start_exim(nursery), await start_exim(nursery, connect_acl=acl)
    cases = [(fast, Leave.POLITE), (fast, Leave.AFTER_FIRST_LINE), (slow, Leave.POLITE), (slow, Leave.BEFORE_GREETING),
             (slow, Leave.EARLY_QUIT)]
    sessions: list[Session] = [Session(Leave.POLITE, 0, b"")] * len(cases)

    async def run(i: int) -> None:
        sessions[i] = await client(cases[i][0].port, cases[i][1])

    async with trio.open_nursery() as clients:
        for i in range(len(cases)):
            clients.start_soon(run, i)
    by_exim = {id(fast): await exim_settled(fast), id(slow): await exim_settled(slow)}
    failures: list[tuple[Leave, list[str]]] = []
    for (exim, leave), session in zip(cases, sessions):
        mine = [line for line in by_exim[id(exim)] if f"[127.0.0.1]:{session.local_port} " in line]
        speed = "slow (8 s) greeting" if exim is slow else "prompt greeting"
        report(f"+all -arguments, {speed}, client {leave.value}: {len(mine)} lines", mine)
        if leave is Leave.POLITE and (exim_bad(mine) or not any("closed by QUIT" in line for line in mine)):
            failures.append((leave, mine))
        # (exim 4.98 answers a QUIT sent during a connect ACL's delay after the delay, as if in
        # turn: that client is measured, not judged.)
        expected = {Leave.AFTER_FIRST_LINE: " lost", Leave.BEFORE_GREETING: " lost"}.get(leave)
        if expected and not any(expected in line for line in mine):
            failures.append((leave, mine))
    await fast.stop()
    await slow.stop()
    await _measure_debian_selector(nursery, acl)
    assert failures == []


async def _measure_debian_selector(nursery: trio.Nursery, acl: Path) -> None:
    """The same clients one at a time, with Debian's default log selector (its lines name no port)."""
    fast = await start_exim(nursery, selector=EXIM_DEBIAN_SELECTOR)
    slow = await start_exim(nursery, selector=EXIM_DEBIAN_SELECTOR, connect_acl=acl)
    for exim, leave in [(fast, Leave.POLITE), (fast, Leave.AFTER_FIRST_LINE), (slow, Leave.POLITE),
                        (slow, Leave.BEFORE_GREETING), (slow, Leave.EARLY_QUIT)]:
        before = len(exim.all_lines())
        await client(exim.port, leave)
        lines = await _quiet(exim)
        speed = "slow (8 s) greeting" if exim is slow else "prompt greeting"
        new = lines[before:]
        report(f"Debian's selector, {speed}, client {leave.value}: {len(new)} lines", new)
    await fast.stop()
    await slow.stop()


async def _quiet(exim: Exim) -> list[str]:
    """The main log once it has not grown for a second (a connection's lines come within milliseconds)."""
    lines = exim.all_lines()
    with trio.move_on_after(10):
        while True:
            await trio.sleep(1)
            now = exim.all_lines()
            if now == lines:
                break
            lines = now
    return lines


# OpenSMTPD -------------------------------------------------------------------------------------


def opensmtpd_sessions(log: list[str]) -> dict[str, list[str]]:
    """Each SMTP session's lines, by OpenSMTPD's session id (the word before ``smtp``)."""
    sessions: dict[str, list[str]] = {}
    for line in log:
        match = re.search(r"\b([0-9a-f]{16}) smtp ", line)
        if match:
            sessions.setdefault(match.group(1), []).append(line)
    return sessions


def opensmtpd_rude(sessions: dict[str, list[str]]) -> dict[str, list[str]]:
    """The sessions that did not end with ``disconnected reason=quit``, or logged an error."""
    return {
        sid: lines for sid, lines in sessions.items()
        if not any("disconnected reason=quit" in line for line in lines)
        or any(re.search(r"disconnected reason=(?!quit\b)|io-error|failed-command", line) for line in lines)
    }


async def opensmtpd_settled(server: OpenSMTPD) -> dict[str, list[str]]:
    with trio.fail_after(10):
        while True:
            sessions = opensmtpd_sessions(server.log)
            if all(any("disconnected" in line for line in lines) for lines in sessions.values()):
                return sessions
            await trio.sleep(0.2)


async def test_opensmtpd_primary_under_steady_traffic(
    opensmtpd_required: None, nursery: trio.Nursery, dns_server: FakeDNSServer, tmp_path: Path
) -> None:
    """DEFER naming OpenSMTPD while it greets, each probe's disconnect ``reason=quit``, DUNNO once it is stopped."""
    server = await start_opensmtpd(nursery, tmp_path)
    dns_server.zone.update(backup_zone("opensmtpd.example", HOST))
    endpoint = await start_daemon(nursery, daemon_config(dns_server, server.port))
    live = await steady(endpoint, "user@opensmtpd.example", seconds=LIVE_S)
    print(f"--- while OpenSMTPD greets: {summary(live)}")
    sessions = await opensmtpd_settled(server)
    for sid, lines in sessions.items():
        report(f"OpenSMTPD session {sid}", lines)
    await server.stop()
    down = await steady(endpoint, "user@opensmtpd.example", seconds=DOWN_WITHIN_S, until=lambda a: a.action == "DUNNO")
    print(f"--- once OpenSMTPD is stopped: {summary(down)}")

    assert all(map(is_defer_naming("opensmtpd.example"), live)), summary(live)
    assert len(sessions) >= 2, server.log
    assert opensmtpd_rude(sessions) == {}
    assert down[-1].action == "DUNNO", summary(down)


async def test_opensmtpd_primary_smtpdcheck(
    opensmtpd_required: None, nursery: trio.Nursery, dns_server: FakeDNSServer, tmp_path: Path
) -> None:
    """The command names OpenSMTPD as the live primary, and its probe ends with QUIT."""
    server = await start_opensmtpd(nursery, tmp_path)
    dns_server.zone.update(backup_zone("opensmtpd.example", HOST))
    with trio.fail_after(30):
        result = await trio.run_process(
            [command("smtpdcheck"), "--nameserver", f"127.0.0.1:{dns_server.port}", "--smtp-port", str(server.port),
             "--stop", "127.0.0.1", "10:mx1.opensmtpd.example", "20:backup.opensmtpd.example"],
            capture_stdout=True, capture_stderr=True, check=False,
        )
    sessions = await opensmtpd_settled(server)
    for sid, lines in sessions.items():
        report(f"OpenSMTPD session {sid}", lines)
    assert (result.returncode, result.stdout) == (1, b"mx1.opensmtpd.example\n"), result.stderr
    assert len(sessions) == 1, server.log
    assert opensmtpd_rude(sessions) == {}


async def test_opensmtpd_logs_per_client(opensmtpd_required: None, nursery: trio.Nursery, tmp_path: Path) -> None:
    """What OpenSMTPD logs for a polite client and for one that hangs up after the greeting's first line."""
    server = await start_opensmtpd(nursery, tmp_path)
    results = {}
    for leave in (Leave.POLITE, Leave.AFTER_FIRST_LINE):
        known = set(opensmtpd_sessions(server.log))
        await client(server.port, leave)
        sessions = await opensmtpd_settled(server)
        new = {sid: lines for sid, lines in sessions.items() if sid not in known}
        for sid, lines in new.items():
            report(f"OpenSMTPD, client {leave.value}: {len(lines)} lines", lines)
        results[leave] = new
    assert len(results[Leave.POLITE]) == 1 and opensmtpd_rude(results[Leave.POLITE]) == {}
    assert len(opensmtpd_rude(results[Leave.AFTER_FIRST_LINE])) == 1
