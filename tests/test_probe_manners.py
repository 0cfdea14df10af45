"""How a probe treats a primary, at exact virtual instants: as a real client would.

A backup MX probes its primaries thousands of times a day, and a primary
judges it by its manners: postscreen logs a client that hangs up before the
greeting's last line as a HANGUP (fail2ban's aggressive and ddos modes ban
it), exim logs it as a lost connection.  And a primary that delays its
greeting on purpose (exim's connect-ACL delay, sendmail's greet_pause) is
up, not dead.  The wire and the real servers are proven elsewhere
(test_real_postscreen, the Debian roots' exim and OpenSMTPD); this is the
arithmetic of time, with the daemon's default configuration.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import trio
import trio.testing

from policyd.config import Config
from policyd.request import PolicyRequest
from policyd.responder import Responder, core_settings
from smtpdcheck.core import build_core
from smtpdcheck.policy import Kind
from smtpdcheck.probe import GREETING_TIMEOUT_S, QUIT_GRACE_S, Outcome
from smtpdcheck.servers import parse_servers
from smtpdcheck.stoprule import StopSet
from testbeds.postfix_request import POSTFIX_37_RCPT_ATTRS
from testbeds.virtual import Peer, VirtualDNS, VirtualNet

DEFAULTS = Config()
PRIMARY = "127.0.0.2"
#: postscreen's default greet wait: the "220-" teaser at once, the last line after it.
POSTSCREEN = Peer(greet_after=0.0, last_line_after=6.0)


def world(nursery: trio.Nursery, peer: Peer, config: Config = DEFAULTS) -> tuple[Responder, VirtualNet]:
    """d.test: MX 10 mx1 (the primary), MX 20 this host; the daemon's responder on ``config``."""
    dns = VirtualDNS()
    dns.set_mx("d.test", [(10, "mx1.d.test"), (20, "backup.d.test")], ttl=86400)
    dns.set_host("mx1.d.test", [PRIMARY], ttl=86400)
    dns.set_host("backup.d.test", ["192.0.2.25"], ttl=86400)
    net = VirtualNet(nursery, {PRIMARY: peer})
    core = build_core(nursery, core_settings(config), connect=net.connect, lookups=dns)
    return Responder(config, core), net


def request(k: int) -> PolicyRequest:
    return PolicyRequest({**POSTFIX_37_RCPT_ATTRS, "recipient": f"user{k}@d.test", "server_address": "192.0.2.25"})


async def answer(responder: Responder, k: int) -> tuple[str, Kind, float]:
    """The action, the verdict's kind and how long the request waited, as the daemon's loop answers it."""
    start = trio.current_time()
    got = responder.answer_now(request(k), start) or await responder.answer(request(k))
    return got.decision.verdict.action.value, got.decision.verdict.kind, trio.current_time() - start


async def test_a_postscreen_primary_is_decided_on_its_teaser_and_left_with_quit_after_the_last_line(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
) -> None:
    responder, net = world(nursery, POSTSCREEN)
    action, _, waited = await answer(responder, 0)
    assert (action, waited) == ("DEFER_IF_PERMIT", 0.0)  # the RCPT is not held for the greet wait
    prober = responder.core.prober
    with trio.fail_after(QUIT_GRACE_S + 1):
        while prober.limiter.borrowed_tokens:
            await trio.sleep(0.01)
    [(host, session)] = net.sessions
    assert host == PRIMARY
    # Nothing sent before the last line (no PREGREET); QUIT right after it, not a hang-up before it.
    assert session.early == b""
    assert session.last_line_at - session.opened == 6.0
    assert session.quit_at == session.last_line_at
    assert session.closed_at == session.quit_at
    assert session.ended == "quit"


async def test_a_greeting_slower_than_the_politeness_budget_is_given_up_on_without_a_word(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
) -> None:
    responder, net = world(nursery, Peer(greet_after=0.0, last_line_after=QUIT_GRACE_S + 5))
    action, _, _ = await answer(responder, 0)
    assert action == "DEFER_IF_PERMIT"
    await trio.sleep(QUIT_GRACE_S + 10)
    session = net.sessions[0][1]
    assert session.early == b"" and math.isnan(session.quit_at)
    assert session.closed_at - session.opened == QUIT_GRACE_S  # the budget, counted from the first line


def test_the_politeness_budget_outlasts_postscreens_greet_wait() -> None:
    assert QUIT_GRACE_S > POSTSCREEN.last_line_after


@pytest.mark.parametrize("greets_after", [6.0, 20.0, 30.0])
async def test_a_primary_that_delays_its_greeting_is_judged_up_and_stays_up_under_steady_traffic(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, greets_after: float,
) -> None:
    """exim's connect-ACL delay: nothing until the delay ends, then a plain 220."""
    responder, net = world(nursery, Peer(greet_after=greets_after))
    start = trio.current_time()
    answers: list[tuple[float, str, float]] = []
    for k in range(int(180 / 0.25)):
        await trio.sleep_until(start + k * 0.25)
        action, _, waited = await answer(responder, k)
        answers.append((trio.current_time() - start, action, waited))
    # No RCPT waits longer than a request may wait for a probe (today's bound).
    assert max(w for _, _, w in answers) <= DEFAULTS.timeout
    # Up from the moment its first greeting came, and never doubted after:
    # each confirmation is given as long as this primary takes.
    deferred = [t for t, action, _ in answers if action == "DEFER_IF_PERMIT"]
    assert deferred and deferred[0] <= greets_after + 0.25
    assert all(action == "DEFER_IF_PERMIT" for t, action, _ in answers if t > greets_after + 0.25)
    # Every probe waited for the whole greeting and left with QUIT.
    sessions = [s for host, s in net.sessions if not math.isnan(s.closed_at)]
    assert sessions and all(s.ended == "quit" for s in sessions)


async def test_a_first_greeting_after_the_request_gave_up_replaces_the_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
) -> None:
    responder, _ = world(nursery, Peer(greet_after=12.0))
    action, kind, waited = await answer(responder, 0)
    assert (action, waited) == ("DUNNO", DEFAULTS.timeout)  # fail-open when it is too slow to wait for
    prober = responder.core.prober
    cached = prober.cached(parse_servers([PRIMARY])[0].address, DEFAULTS.smtp_port)  # type: ignore[arg-type]
    assert cached is not None and cached[0].outcome is Outcome.TIMEOUT
    await trio.sleep(12.5 - DEFAULTS.timeout)
    cached = prober.cached(parse_servers([PRIMARY])[0].address, DEFAULTS.smtp_port)  # type: ignore[arg-type]
    assert cached is not None and cached[0].outcome is Outcome.AVAILABLE
    assert cached[0].elapsed == 12.0
    action, _, waited = await answer(responder, 1)
    assert (action, waited) == ("DEFER_IF_PERMIT", 0.0)


async def test_a_primary_that_never_greets_is_given_up_on_at_the_greeting_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
) -> None:
    responder, net = world(nursery, Peer(greet_after=math.inf))
    action, _, waited = await answer(responder, 0)
    assert (action, waited) == ("DUNNO", DEFAULTS.timeout)
    await trio.sleep(GREETING_TIMEOUT_S + 1)
    session = net.sessions[0][1]
    assert session.closed_at - session.opened == GREETING_TIMEOUT_S
    assert responder.core.prober.limiter.borrowed_tokens == 0


@pytest.mark.parametrize("refresh_window", [0.0, DEFAULTS.refresh_window])
async def test_a_burst_after_a_lull_waits_for_the_confirming_probe_and_every_rcpt_is_deferred(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, refresh_window: float,
) -> None:
    responder, net = world(nursery, Peer(greet_after=0.02), replace(DEFAULTS, refresh_window=refresh_window))
    assert (await answer(responder, 0))[0] == "DEFER_IF_PERMIT"
    await trio.sleep(refresh_window + 25.0)  # the window and then some: no refresh keeps it fresh
    probes_before = len(net.attempts)
    results: list[tuple[str, Kind, float]] = []

    async def one(k: int) -> None:
        results.append(await answer(responder, k))

    async with trio.open_nursery() as burst:
        for k in range(1, 21):
            burst.start_soon(one, k)
    assert [action for action, _, _ in results] == ["DEFER_IF_PERMIT"] * 20
    assert [waited for _, _, waited in results] == [pytest.approx(0.02)] * 20
    assert len(net.attempts) == probes_before + 1  # one probe for the whole burst


async def test_verbose_report_gives_a_timed_out_servers_real_time(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
) -> None:
    """``smtpdcheck -v`` once printed ``timeout 0.0 ms`` for a server cut off by --timeout after 5 s.

    The lookup took part of the server's budget, so the check ended before
    its probe could report anything: no probe result to time.
    """
    import io

    from smtpdcheck.cli import format_report
    from smtpdcheck.core import CoreSettings

    net = VirtualNet(nursery, {PRIMARY: Peer(greet_after=math.inf)})
    settings = CoreSettings(probe_timeout=5.0, check_timeout=5.0)
    dns = VirtualDNS()
    dns.set_host("mx1.d.test", [PRIMARY], delay=0.2)
    core = build_core(nursery, settings, connect=net.connect, lookups=dns)
    result = await core.checker.check(parse_servers(["10:mx1.d.test"]), StopSet())
    assert result.reports[0].probes == []
    out = io.StringIO()
    format_report(result, out)
    assert out.getvalue() == f"smtpdcheck: 10:mx1.d.test [{PRIMARY}] timeout 5000.0 ms\n"
