"""When a primary fails, know it within seconds: the confirm rules, then whole outages on virtual time.

The rules are plain arithmetic (:mod:`smtpdcheck.belief`, tested in test_belief).  The outages run
the daemon's own answering path (:class:`policyd.responder.Responder` on a
core built from the default configuration) against virtual peers on
``MockClock(autojump_threshold=0)``, so every time below is exact: one RCPT
every 250 ms, a primary that greets in 20 ms and then hangs, refuses or is
gone, and comes back.
"""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass

import pytest
import trio
import trio.testing

import smtpdcheck.cache

from policyd.config import Config
from policyd.request import PolicyRequest
from policyd.responder import Responder, core_settings
from smtpdcheck.belief import confirm_grace
from smtpdcheck.core import build_core
from smtpdcheck.policy import Kind
from testbeds.postfix_request import POSTFIX_37_RCPT_ATTRS
from testbeds.virtual import REFUSING, SILENT, Peer, VirtualDNS, VirtualNet

# -- the rules, as plain arithmetic -------------------------------------------


# -- whole outages on virtual time, with the defaults -------------------------

GREET = 0.02
"""The primary's usual greeting time."""
PERIOD = 0.25
"""One RCPT every 250 ms."""
DEFAULTS = Config()
GRACE = confirm_grace(GREET, DEFAULTS.timeout)

OUTAGES = {
    "hangs": (SILENT, "timeout"),  # accepts, never greets
    "refuses": (REFUSING, "connect failed"),  # RST to the SYN
    "is gone": (Peer(refuse=True, connect_after=math.inf), "timeout"),  # SYNs unanswered
}


@dataclass(frozen=True)
class Answered:
    sent: float
    waited: float
    kind: Kind
    action: str
    evidence_age: float  # for a DEFER: how old the greeting it rested on was


def request(k: int) -> PolicyRequest:
    return PolicyRequest({**POSTFIX_37_RCPT_ATTRS, "recipient": f"user{k}@d.test", "server_address": "192.0.2.25"})


class World:
    """d.test: MX 10 mx1 (127.0.0.2, greets in 20 ms), MX 20 backup (192.0.2.25, this host).

    The daemon's responder on a core built from the default configuration;
    DNS answers are long-lived so that only the probes matter.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        dns = VirtualDNS()
        dns.set_mx("d.test", [(10, "mx1.d.test"), (20, "backup.d.test")], ttl=86400)
        dns.set_host("mx1.d.test", ["127.0.0.2"], ttl=86400)
        dns.set_host("backup.d.test", ["192.0.2.25"], ttl=86400)
        self.net = VirtualNet(nursery, {"127.0.0.2": Peer(greet_after=GREET)})
        core = build_core(nursery, core_settings(DEFAULTS), connect=self.net.connect, lookups=dns)
        self.responder = Responder(DEFAULTS, core)
        self.start = trio.current_time()
        self.answers: list[Answered] = []

    def probes(self) -> list[float]:
        """When each probe of the primary started, from the start of the run."""
        return [t - self.start for t, host in self.net.attempts if host == "127.0.0.2"]

    def primary(self, peer: Peer) -> None:
        self.net.peers["127.0.0.2"] = peer

    async def traffic(self, until: float) -> None:
        """One RCPT every PERIOD from the start until ``until``, as the daemon's loop answers it."""
        for k in range(int(until / PERIOD) + 1):
            at = self.start + k * PERIOD
            if at - self.start >= until:
                return
            await trio.sleep_until(at)
            now = trio.current_time()
            answer = self.responder.answer_now(request(k), now) or await self.responder.answer(request(k))
            done = trio.current_time()
            decision = answer.decision
            self.answers.append(Answered(
                now - self.start, done - now, decision.verdict.kind, decision.verdict.action.value,
                done - decision.confirmed_at,
            ))

    async def next_probe_after(self, t: float) -> float:
        """Wait for the first probe started after ``t`` (run time); its start."""
        for _ in range(100_000):
            later = [p for p in self.probes() if p > t]
            if later:
                return later[0]
            await trio.sleep(0.01)
        raise AssertionError(f"no probe after {t}")

    def between(self, a: float, b: float) -> list[Answered]:
        return [x for x in self.answers if a < x.sent <= b]


async def outage(nursery: trio.Nursery, peer: Peer) -> tuple[World, float, float, float, float]:
    """Up for a while, then down right after a confirmation (the worst moment), back right
    after a probe of the down primary began (again the worst moment), then traffic stops.

    Returns the world, when it went down, the confirmation before that, when
    it came back, and the probe of the down primary just before that.
    """
    w = World(nursery)
    traffic_until = 200.0
    nursery.start_soon(w.traffic, traffic_until)
    confirmed = await w.next_probe_after(25.0)
    went_down = confirmed + GREET + 0.001
    await trio.sleep_until(w.start + went_down)
    w.primary(peer)
    first_down = await w.next_probe_after(went_down)
    down_probe = await w.next_probe_after(first_down)  # the down result being renewed
    came_back = down_probe + 0.1
    await trio.sleep_until(w.start + came_back)
    w.primary(Peer(greet_after=GREET))
    await trio.sleep_until(w.start + traffic_until + DEFAULTS.refresh_window + 60)
    return w, went_down, confirmed, came_back, down_probe


class FixedJitter(random.Random):
    """A jitter source that always draws the same fraction: the run is exact, and each phase is tried."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction

    def random(self) -> float:
        return self.fraction


#: Where the first store's jitter puts the probes against the RCPT grid; 0.259
#: and 0.0123 once let a decision made while the down result's refresh ran be
#: memoised past the moment that refresh found the primary back.
JITTERS = (0.0, 0.0123, 0.259, 0.5)


@pytest.mark.parametrize("jitter", JITTERS)
@pytest.mark.parametrize("what", list(OUTAGES))
async def test_a_primary_that_stops_greeting_gets_dunno_within_its_ttl_plus_the_grace_and_defer_again_within_65s(
    what: str, jitter: float, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(smtpdcheck.cache, "make_rng", lambda seed=None: FixedJitter(jitter))
    caplog.set_level(logging.INFO, logger="smtpdcheck")
    peer, outcome = OUTAGES[what]
    w, went_down, confirmed, came_back, down_probe = await outage(nursery, peer)
    probes = w.probes()

    # Up: one probe per TTL, each started as long before expiry as the last greeting took.
    up_probes = [p for p in probes if p <= went_down]
    assert [b - a for a, b in zip(up_probes[1:], up_probes[2:])] == pytest.approx([DEFAULTS.cache_up_ttl] * (len(up_probes) - 2))
    assert all(a.action == "DEFER_IF_PERMIT" for a in w.answers if a.sent <= went_down)

    # Down: the confirming probe comes a TTL after the last one; it is refused at once,
    # or it is overdue after the grace; the first RCPT after that gets DUNNO.
    confirm = probes[probes.index(confirmed) + 1]
    assert confirm == pytest.approx(confirmed + DEFAULTS.cache_up_ttl)
    doubted_from = confirm if peer is REFUSING else confirm + GRACE
    assert {a.action for a in w.between(went_down, doubted_from)} == {"DEFER_IF_PERMIT"}
    # (An RCPT at the very instant a probe ends may be scheduled before or after it:
    # trio runs tasks due at one time in either order, so such an instant belongs to neither side.)
    first_dunno = next(a for a in w.answers if a.action == "DUNNO")
    assert doubted_from <= first_dunno.sent <= min(a.sent for a in w.answers if a.sent > doubted_from)
    window = first_dunno.sent - went_down
    assert window <= 15.0 and window <= DEFAULTS.cache_up_ttl + GRACE + PERIOD
    # ... and no DEFER while it stays down.
    assert {a.action for a in w.between(first_dunno.sent - 1e-9, came_back)} == {"DUNNO"}
    # Doubted at once while the probe runs ("unconfirmed"); down once it has failed.
    settled = confirm + (0.0 if peer is REFUSING else DEFAULTS.timeout)
    assert {a.kind for a in w.between(first_dunno.sent - 1e-9, settled - 1e-9)} <= {Kind.UNCONFIRMED}
    assert {a.kind for a in w.between(settled, came_back)} == {Kind.ALL_DOWN}

    # Back: the next probe of the down primary, a down TTL after the last, sees it greet.
    recovered_probe = probes[probes.index(down_probe) + 1]
    assert recovered_probe == pytest.approx(down_probe + DEFAULTS.cache_down_ttl)
    first_defer = next(a for a in w.answers if a.sent > came_back and a.action == "DEFER_IF_PERMIT")
    greeted = recovered_probe + GREET
    assert greeted <= first_defer.sent <= min(a.sent for a in w.answers if a.sent > greeted)
    assert first_defer.sent - came_back <= 65.0
    assert {a.action for a in w.answers if a.sent > first_defer.sent} == {"DEFER_IF_PERMIT"}

    # Nobody waited, ever, after the very first RCPT (which had nothing to go on).
    assert w.answers[0].waited > 0 and [a for a in w.answers[1:] if a.waited > 0] == []
    # Every DEFER rested on a greeting at most a TTL plus the grace old, and was counted so.
    defers = [a for a in w.answers if a.action == "DEFER_IF_PERMIT"]
    assert max(a.evidence_age for a in defers) <= DEFAULTS.cache_up_ttl + GRACE
    assert sum(w.responder.metrics.evidence_counts) == len(defers)

    # One line per change, with how long the old state had held and how old the last greeting was.
    changes = [r.getMessage() for r in caplog.records if " -> " in r.getMessage()]
    went = confirm + (0.0 if peer is REFUSING else DEFAULTS.timeout)
    assert changes[0] == (
        f"mx1.d.test [127.0.0.2] up -> down ({outcome}) after {went - GREET:.1f}s up, "
        f"last greeting {went - (confirmed + GREET):.1f}s ago"
    )
    assert re.fullmatch(r"mx1\.d\.test \[127\.0\.0\.2\] down -> up \(available\) after [0-9.]+s down", changes[1])
    assert len(changes) == 2
    # At warning: --log-level warning keeps them and drops the per-RCPT decision lines.
    assert {r.levelno for r in caplog.records if " -> " in r.getMessage()} == {logging.WARNING}


async def test_probe_budget_one_per_ttl_while_rcpts_flow_and_none_after_the_refresh_window(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    w = World(nursery)
    await w.traffic(120.0)
    last_rcpt = w.answers[-1].sent
    await trio.sleep_until(w.start + last_rcpt + DEFAULTS.refresh_window + 120)
    probes = w.probes()
    flowing = [p for p in probes if p <= last_rcpt]
    after = [p for p in probes if p > last_rcpt]
    # The first probe, then one per TTL (the first refresh a little early: jitter).
    assert len(flowing) <= 120.0 / DEFAULTS.cache_up_ttl + 1
    assert [b - a for a, b in zip(probes[1:], probes[2:])] == pytest.approx([DEFAULTS.cache_up_ttl] * (len(probes) - 2))
    # After the last RCPT, as often as before, and none once the window has passed.
    assert len(after) <= DEFAULTS.refresh_window / DEFAULTS.cache_up_ttl + 1
    assert after[-1] <= last_rcpt + DEFAULTS.refresh_window


# -- the prober's own answers: the full path and an entry expired for good ----


async def test_the_full_path_answers_an_overdue_up_at_once_without_waiting_for_its_probe(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    w = World(nursery)
    prober = w.responder.core.prober
    address = w.responder.core.checker.resolver.host_answers["mx1.d.test"][1].addresses[0]  # type: ignore[attr-defined]
    result, _ = await prober.probe(address, 25, "mx1.d.test")
    assert result.available
    first = await w.next_probe_after(0.0)  # a little early (jitter, when first stored) ...
    await trio.sleep_until(w.start + first + GREET + 0.001)
    w.primary(SILENT)
    refresh = await w.next_probe_after(first)  # ... then as long before expiry as the greeting took
    assert refresh == pytest.approx(first + DEFAULTS.cache_up_ttl)
    await trio.sleep_until(w.start + refresh + GRACE / 2)
    held, source = await prober.probe(address, 25, "mx1.d.test")
    assert held.available and source.name == "STALE"  # young: still believed
    await trio.sleep_until(w.start + refresh + GRACE + 0.01)
    before = trio.current_time()
    doubted, _ = await prober.probe(address, 25, "mx1.d.test")
    assert trio.current_time() == before  # answered at once, not after the probe's timeout
    assert doubted.outcome.value == "unconfirmed" and not doubted.available
    assert doubted.detail == f"last greeting {refresh + GRACE + 0.01 - (first + GREET):.1f}s ago"
    assert prober.flights.cache.raw(("127.0.0.2", 25)).value.available  # type: ignore[union-attr]  # nothing of it cached


async def test_an_up_expired_for_good_is_probed_again_and_waited_for(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Unused past the refresh window, nothing confirms it: the next RCPT probes, as after any expiry."""
    w = World(nursery)
    prober = w.responder.core.prober
    address = w.responder.core.checker.resolver.host_answers["mx1.d.test"][1].addresses[0]  # type: ignore[attr-defined]
    await prober.probe(address, 25, "mx1.d.test")
    await trio.sleep(DEFAULTS.refresh_window + 60)
    assert prober.cached(address, 25) is None
    before = trio.current_time()
    result, source = await prober.probe(address, 25, "mx1.d.test")
    assert result.available and source.name == "NETWORK"
    assert trio.current_time() - before == pytest.approx(GREET)
