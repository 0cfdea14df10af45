"""A real primary with postscreen in front of smtpd, probed by the policy server; fail2ban reads its log.

The policy server probes each more-preferred MX of a recipient domain.
Postfix's postscreen greets with a ``220-`` teaser, waits
``postscreen_greet_wait`` (6 s) and only then sends the final ``220 ``
line; a client that leaves in that time is logged ``HANGUP after ... in
tests before SMTP handshake``, which Debian's fail2ban filter
(``filter.d/postfix.conf``, modes ddos and aggressive) counts towards a
ban of the backup MX -- and a ban also blocks the backup's deliveries to
that primary.  Here a private Postfix with postscreen (the greeting test
and the deep protocol tests, all enforced) is the primary, the policy
server runs as a process at its defaults, and the primary's maillog is
judged as fail2ban judges it, in every mode the filter offers.

Two controls prove the judge: a client that hangs up 2 s after the
teaser is seen (a HANGUP line, matched in mode ddos), and one that waits
for the final greeting line, says QUIT and reads the 221 passes.

Marked ``postfix``: skipped loudly without Postfix or fail2ban-regex, a
failure under CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.policyd_helpers import rcpt
from testbeds.dnsserver import FakeDNSServer, nameserver_arg
from tests.support.postfix import PostfixInstance
from tests.support.pytest_postfix import PostfixFactory
from tests.test_daemon_process import start_daemon
from tests.test_policyd_server import backup_zone

pytestmark = pytest.mark.postfix

DOMAIN = "primary.example"
PRIMARY = f"mx1.{DOMAIN}"
#: The primary's address, and so the address its log names each probe by
#: (the policy server connects from 127.0.0.1 to 127.0.0.1).
PRIMARY_ADDRESS = CLIENT_ADDRESS = "127.0.0.1"
#: This host: the requests' server_address, MX 20 of the domain.
BACKUP_ADDRESS = "127.0.0.10"

GREET_WAIT = 6.0
#: The primary's postscreen as a careful site runs it: the greeting test
#: (with the default teaser banner) and the deep protocol tests, all enforced.
POSTSCREEN_SETTINGS = {
    "myhostname": PRIMARY,
    "postscreen_greet_wait": f"{GREET_WAIT:g}s",
    "postscreen_greet_action": "enforce",
    "postscreen_pipelining_enable": "yes",
    "postscreen_pipelining_action": "enforce",
    "postscreen_non_smtp_command_enable": "yes",
    "postscreen_non_smtp_command_action": "enforce",
    "postscreen_bare_newline_enable": "yes",
    "postscreen_bare_newline_action": "enforce",
}
#: What postscreen logs for a client that failed one of its tests.
VIOLATIONS = ("HANGUP", "PREGREET", "NON-SMTP COMMAND", "COMMAND PIPELINING", "BARE NEWLINE")

FAIL2BAN_REGEX = "fail2ban-regex"
POSTFIX_FILTER = Path("/etc/fail2ban/filter.d/postfix.conf")
#: The modes the filter is known to offer; it is read for its own list, which must hold these.
KNOWN_MODES = {"normal", "more", "aggressive", "ddos", "auth", "rbl", "errors", "extra"}

#: The policy requests: one RCPT every REQUEST_EVERY seconds for STREAM_FOR
#: seconds: three probes at the default --cache-up-ttl (10 s), at about 0,
#: 10 and 20 s, and the stop falls halfway between the third and the fourth.
STREAM_FOR = 25.0
REQUEST_EVERY = 0.25
#: How long the log may take to show that a connection ended.
LOG_SETTLE = 10.0


def require_fail2ban() -> None:
    """Skip (loudly) or, under CI=true, fail when fail2ban's filter cannot be run here."""
    reason = None
    if shutil.which(FAIL2BAN_REGEX) is None:
        reason = f"{FAIL2BAN_REGEX} not found: install Debian's fail2ban package (apt-get install fail2ban)"
    elif not POSTFIX_FILTER.is_file():
        reason = f"{POSTFIX_FILTER} is missing: reinstall Debian's fail2ban package"
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"postscreen tests cannot run under CI=true: {reason}")
    pytest.skip(f"END-TO-END POSTFIX TEST SKIPPED: {reason}")


@pytest.fixture
async def primary(postfix_factory: PostfixFactory) -> PostfixInstance:
    """The primary MX: postscreen in front of smtpd on 127.0.0.1, as POSTSCREEN_SETTINGS say."""
    require_fail2ban()
    # Nobody sends mail to the primary here; its policy endpoint is never asked.
    instance = postfix_factory(policy_endpoint="inet:127.0.0.1:9", relay_domains=[DOMAIN])
    instance.postscreen = True
    instance.main_cf_extra = dict(POSTSCREEN_SETTINGS)
    await trio.to_thread.run_sync(instance.start)
    return instance


# ---------------------------------------------------------------------- the judge


@dataclass(frozen=True)
class Verdict:
    """fail2ban-regex's count for one mode of the filter."""

    lines: int
    matched: int


_LINES = re.compile(r"^Lines: (\d+) lines, (\d+) ignored, (\d+) matched, (\d+) missed", re.MULTILINE)


def filter_modes() -> list[str]:
    """Every mode the filter offers: each has a prefix regex of its own, ``mdpr-MODE``."""
    modes = re.findall(r"^mdpr-(\w+)\s*=", POSTFIX_FILTER.read_text(), re.MULTILINE)
    assert KNOWN_MODES <= set(modes), f"{POSTFIX_FILTER} offers modes {modes}"
    return modes


async def fail2ban_verdicts(log: Path) -> dict[str, Verdict]:
    """What fail2ban-regex says of ``log`` in each mode of the postfix filter (run at once)."""
    verdicts: dict[str, Verdict] = {}

    async def judge(mode: str) -> None:
        result = await trio.run_process(
            [FAIL2BAN_REGEX, str(log), f"{POSTFIX_FILTER}[mode={mode}]"],
            capture_stdout=True, capture_stderr=True, check=False,
        )
        out = result.stdout.decode(errors="replace")
        match = _LINES.search(out)
        assert result.returncode == 0 and match is not None, (mode, out, result.stderr)
        verdicts[mode] = Verdict(lines=int(match[1]), matched=int(match[3]))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for mode in filter_modes():
                nursery.start_soon(judge, mode)
    return verdicts


def open_connections(log: str, client: str) -> int:
    """Connections from ``client`` whose end the log does not show yet.

    postscreen logs ``CONNECT from``; the connection ends with its
    ``DISCONNECT``, or, once postscreen passed the client to smtpd, with
    smtpd's ``disconnect from``.
    """
    connects = log.count(f"CONNECT from [{client}]:")
    ends = log.count(f"DISCONNECT [{client}]:")
    ends += len(re.findall(rf"smtpd\[\d+\]: disconnect from \S*\[{re.escape(client)}\]", log))
    return connects - ends


async def settled_log(instance: PostfixInstance, client: str) -> str:
    """The maillog once it shows the end of every connection from ``client`` (or LOG_SETTLE passed)."""
    with trio.move_on_after(LOG_SETTLE):
        while open_connections(instance.maillog(), client) > 0:
            await trio.sleep(0.1)
    return instance.maillog()


def violations(log: str) -> list[str]:
    return [line for line in log.splitlines() if any(word in line for word in VIOLATIONS)]


async def judged(log: str, tmp_path: Path) -> dict[str, Verdict]:
    """fail2ban's verdicts on this text of the maillog (a copy, so the text judged is the text asserted on)."""
    path = tmp_path / "primary.maillog"
    path.write_text(log)
    return await fail2ban_verdicts(path)


# ---------------------------------------------------------------------- clients


class _LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def line(self) -> bytes:
        for _ in range(64):  # a reply line is far shorter than 64 chunks
            if b"\n" in self._buffer:
                line, _, self._buffer = self._buffer.partition(b"\n")
                return line.rstrip(b"\r")
            chunk = await self._stream.receive_some(4096)
            if not chunk:
                raise EOFError(f"closed after {self._buffer!r}")
            self._buffer += chunk
        raise ValueError(f"no line end in {self._buffer[:200]!r}")


async def greet_and_leave(port: int, *, patience: float) -> list[bytes]:
    """A probe: read the first greeting line, then leave.

    If the rest of the greeting comes within ``patience`` seconds, say QUIT
    and read the reply before closing; else hang up.  Returns the lines read.
    """
    with trio.fail_after(patience + 10):
        stream = await trio.open_tcp_stream(PRIMARY_ADDRESS, port)
        async with stream:
            reader = _LineReader(stream)
            lines = [await reader.line()]
            with trio.move_on_after(patience):
                while lines[-1][3:4] == b"-":
                    lines.append(await reader.line())
                await stream.send_all(b"QUIT\r\n")
                lines.append(await reader.line())
    return lines


# ---------------------------------------------------------------------- controls


async def test_control_a_client_hanging_up_during_the_greeting_is_logged_and_matched(
    primary: PostfixInstance, tmp_path: Path
) -> None:
    """Leaving 2 s after the teaser: the HANGUP that fail2ban's ddos mode counts towards a ban."""
    lines = await greet_and_leave(primary.smtp_port, patience=2.0)
    assert lines == [f"220-{PRIMARY} ESMTP Postfix".encode()]
    log = await settled_log(primary, CLIENT_ADDRESS)
    hangup = rf"postscreen\[\d+\]: HANGUP after \d+ from \[{re.escape(CLIENT_ADDRESS)}\]:\d+ in tests before SMTP handshake$"
    assert len(violations(log)) == 1 and re.search(hangup, violations(log)[0]), log
    verdicts = await judged(log, tmp_path)
    assert verdicts["ddos"].matched == 1, verdicts
    assert verdicts["aggressive"].matched == 1, verdicts


async def test_control_a_client_that_waits_for_the_greeting_and_quits_is_not_matched(
    primary: PostfixInstance, tmp_path: Path
) -> None:
    """The whole greeting, QUIT, the 221: postscreen logs only CONNECT and DISCONNECT."""
    lines = await greet_and_leave(primary.smtp_port, patience=GREET_WAIT + 10)
    assert lines[0].startswith(b"220-") and lines[-2].startswith(b"220 ") and lines[-1].startswith(b"221 "), lines
    log = await settled_log(primary, CLIENT_ADDRESS)
    assert violations(log) == [], log
    assert log.count(f"CONNECT from [{CLIENT_ADDRESS}]:") == 1
    assert_not_matched(await judged(log, tmp_path), log)


def assert_not_matched(verdicts: dict[str, Verdict], log: str) -> None:
    assert set(verdicts) >= KNOWN_MODES
    assert all(v.lines > 0 for v in verdicts.values()), (verdicts, log)
    assert {mode: v.matched for mode, v in verdicts.items() if v.matched} == {}, log


# ---------------------------------------------------------------------- the policy server


async def test_policy_server_probes_a_postscreen_primary_without_tripping_fail2ban(
    nursery: trio.Nursery, dns_server: FakeDNSServer, primary: PostfixInstance, tmp_path: Path
) -> None:
    """A steady stream of RCPTs for a domain whose primary runs postscreen.

    Every answer defers to the primary, which is probed several times
    (--cache-up-ttl 10 s); the primary's log holds no test failure, and
    no mode of fail2ban's postfix filter matches a line of it.
    """
    dns_server.zone.update(backup_zone(DOMAIN, PRIMARY_ADDRESS, backup_ip=BACKUP_ADDRESS))
    daemon = await start_daemon(nursery, ["--nameserver", nameserver_arg(dns_server), "--smtp-port", str(primary.smtp_port)])
    answers: list[tuple[str, str]] = []
    with trio.fail_after(STREAM_FOR + 3 * LOG_SETTLE):
        stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
        async with stream:
            start = trio.current_time()
            for n in range(round(STREAM_FOR / REQUEST_EVERY)):
                await trio.sleep_until(start + n * REQUEST_EVERY)
                request = rcpt(f"user{n}@{DOMAIN}", server_address=BACKUP_ADDRESS)
                answers.append(await daemon.ask(request, stream))
        # Stop between two probes (the daemon probes the primary again every
        # --cache-up-ttl while the answer is in its refresh window): what is
        # judged is how a probe leaves, not whether a stop cuts one short.
        await settled_log(primary, CLIENT_ADDRESS)
        daemon.process.send_signal(signal.SIGTERM)
        assert await daemon.process.wait() == 0, daemon.stderr_lines
        log = await settled_log(primary, CLIENT_ADDRESS)
    deferred = [a for a in answers if a[0] == "DEFER_IF_PERMIT" and PRIMARY in a[1]]
    assert len(deferred) == len(answers), [a for a in answers if a not in deferred][:5]
    probes = log.count(f"CONNECT from [{CLIENT_ADDRESS}]:")
    assert probes >= 3, log
    assert open_connections(log, CLIENT_ADDRESS) == 0, log
    assert violations(log) == [], "\n".join(violations(log))
    assert_not_matched(await judged(log, tmp_path), log)
