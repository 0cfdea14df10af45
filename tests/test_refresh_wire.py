"""Refresh ahead and serve stale, over real sockets: a real DNS server, real greeters, the daemon in-process.

Once a domain is known no RCPT should wait on the network: entries in use
are renewed before they expire, and the old value is served while a late
renewal runs.  The scheduling rules themselves are tested on virtual time;
here the whole path runs on loopback with TTLs of a second or so, and the
latency bounds (100 ms, where a wait would cost a probe timeout or a slow
greeting) are behaviour with a wide margin, not benchmarks.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
import trio

from policyd.client import parse_reply
from policyd.config import Config
from smtpdcheck.core import Core
from smtpdcheck.resolver import MXKind
from tests.conftest import Farm, zone_with_hosts
from tests.policyd_helpers import RunningPolicyd, policyd_config, rcpt, read_replies, start_policyd
from testbeds.dnsserver import Behavior, FakeDNSServer, Zone
from testbeds.greeters import Mode

PERIOD = 0.05
"""One RCPT per connection every 50 ms, as in a steady stream of mail."""

SLOW = 0.100
"""No answer after a domain's first may take longer than this with refresh on."""

STEP = 5.0
"""Bound on any single reply; a stuck request fails the test instead of hanging it."""


def backup_zone(domain: str, primary_ip: str) -> Zone:
    """``domain``: MX 10 mx1 (the primary), MX 20 backup (127.0.0.1, this host)."""
    return {
        (domain, "MX"): [f"10 mx1.{domain}.", f"20 backup.{domain}."],
        **zone_with_hosts({f"mx1.{domain}": [primary_ip], f"backup.{domain}": ["127.0.0.1"]}),
    }


def short_ttl(dns_server: FakeDNSServer, domain: str, ttl: int) -> None:
    """Give the domain and its MX hosts a DNS TTL of ``ttl`` seconds."""
    for name in (domain, f"mx1.{domain}", f"backup.{domain}"):
        dns_server.name_ttls[name] = ttl


@dataclass
class Sample:
    sent: float
    latency: float
    action: str


@dataclass
class Stream:
    """What a steady stream of RCPTs for one domain got back, in order."""

    samples: list[Sample] = field(default_factory=list)

    def after_first(self) -> list[Sample]:
        return self.samples[1:]

    def slow(self, bound: float = SLOW) -> list[Sample]:
        return [s for s in self.after_first() if s.latency > bound]

    def actions(self) -> set[str]:
        return {s.action for s in self.samples}

    def first(self, action: str, since: float) -> Sample | None:
        return next((s for s in self.samples if s.sent >= since and s.action == action), None)


async def steady(running: RunningPolicyd, domain: str, duration: float, out: Stream, *, period: float = PERIOD) -> None:
    """One Postfix-like connection sending an RCPT every ``period`` for ``duration`` seconds.

    Each request's latency is taken with trio.current_time() around it;
    the next one goes out on schedule, or at once if the reply was late.
    """
    stream = await running.connect()
    async with stream:
        start = trio.current_time()
        next_at = start
        for k in range(int(duration / period) + 1):
            if next_at - start >= duration:
                break
            await trio.sleep_until(next_at)
            sent = trio.current_time()
            with trio.fail_after(STEP):
                await stream.send_all(rcpt(f"user{k}@{domain}"))
                action, _ = parse_reply(await read_replies(stream, 1))
            done = trio.current_time()
            out.samples.append(Sample(sent, done - sent, action))
            next_at = max(next_at + period, done)


def describe(samples: list[Sample], origin: float) -> list[str]:
    return [f"t={s.sent - origin:.2f}s {s.action} {s.latency * 1000:.0f}ms" for s in samples]


def log_lines(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


async def test_silent_primary_under_a_steady_stream(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], caplog: pytest.LogCaptureFixture
) -> None:
    """Every expiry of a down result used to cost an RCPT the whole probe timeout; now none waits."""
    caplog.set_level(logging.INFO, logger="smtpdcheck")
    f = await farm(Mode.SILENT)
    dns_server.zone.update(backup_zone("silent.example", f.host(0)))
    ttl, timeout = 1.0, 0.5
    running = await start_policyd(nursery, policyd_config(dns_server.port, f.port, timeout=timeout, cache_down_ttl=ttl))
    out = Stream()
    await steady(running, "silent.example", 3.2, out)

    assert out.actions() == {"DUNNO"}
    assert out.samples[0].latency >= timeout  # the first RCPT has nothing to go on but the probe
    origin = out.samples[0].sent
    assert not out.slow(), describe(out.slow(), origin)
    span = out.samples[-1].sent - origin
    assert f.greeters[0].connections <= span / ttl + 1, "at most one probe per TTL, plus the first"
    assert f.greeters[0].connections >= 2, "the down result was renewed, not kept forever"
    # A silent primary's renewal lasts the whole timeout, so it starts that
    # long before expiry and lands in time: answers come from fresh results.
    assert running.responder.core.prober.flights.refreshes["ok"] >= 1


async def test_slow_greeting_primary_and_counts_per_ttl(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]
) -> None:
    """A live primary that greets late, many RCPTs per TTL: no RCPT waits, one probe and one query per TTL."""
    f = await farm(Mode.OK, greet_delay=0.3)
    dns_server.zone.update(backup_zone("late.example", f.host(0)))
    ttl = 1
    short_ttl(dns_server, "late.example", ttl)
    running = await start_policyd(nursery, policyd_config(dns_server.port, f.port, timeout=1.0, cache_up_ttl=ttl))
    # The cold start first, so the three streams below all measure a known domain.
    with trio.fail_after(STEP):
        assert (await running.ask(rcpt("first@late.example")))[0] == "DEFER_IF_PERMIT"
    probes0, queries0 = f.greeters[0].connections, len(dns_server.queries)
    assert probes0 == 1
    outs = [Stream() for _ in range(3)]
    start = trio.current_time()
    async with trio.open_nursery() as streams:
        for out in outs:
            streams.start_soon(steady, running, "late.example", 2.6, out)
    span = trio.current_time() - start

    for out in outs:
        assert out.actions() == {"DEFER_IF_PERMIT"}
        slow = [s for s in out.samples if s.latency > SLOW]
        assert not slow, describe(slow, start)
    rcpts = sum(len(out.samples) for out in outs)
    assert rcpts >= 120
    probes = f.greeters[0].connections - probes0
    assert 1 <= probes <= span / ttl + 1, f"{probes} probes for {rcpts} RCPTs in {span:.1f} s"
    asked = dns_server.queries[queries0:]
    for name, rdtype in (("late.example", "MX"), ("mx1.late.example", "A"), ("backup.late.example", "A")):
        n = sum(1 for q in asked if q[:2] == (name, rdtype))
        assert 1 <= n <= span / ttl + 1, f"{n} {rdtype} queries for {name} in {span:.1f} s"


async def test_flips_are_seen_within_ttl_plus_timeout_without_a_slow_answer(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smtpdcheck")
    f = await farm(Mode.OK)
    greeter = f.greeters[0]
    dns_server.zone.update(backup_zone("flip.example", f.host(0)))
    ttl, timeout = 1.0, 0.5
    config = policyd_config(dns_server.port, f.port, timeout=timeout, cache_up_ttl=ttl, cache_down_ttl=ttl)
    running = await start_policyd(nursery, config)
    out = Stream()
    async with trio.open_nursery() as inner:
        inner.start_soon(steady, running, "flip.example", 5.0, out)
        await trio.sleep(1.2)
        went_down = trio.current_time()
        greeter.mode = Mode.SILENT
        await trio.sleep(2.0)
        came_up = trio.current_time()
        greeter.mode = Mode.OK

    origin = out.samples[0].sent
    assert out.samples[0].action == "DEFER_IF_PERMIT"
    assert not out.slow(), describe(out.slow(), origin)
    # Margin: a refresh of the old result may have started just before the flip.
    margin = 0.3
    down = out.first("DUNNO", went_down)
    assert down is not None and down.sent - went_down <= ttl + timeout + margin, describe(out.samples, origin)
    assert all(s.action == "DEFER_IF_PERMIT" for s in out.samples if s.sent < went_down)
    up = out.first("DEFER_IF_PERMIT", came_up)
    assert up is not None and up.sent - came_up <= ttl + timeout + margin, describe(out.samples, origin)
    assert all(s.action == "DUNNO" for s in out.samples if down.sent <= s.sent < came_up)
    lines = log_lines(caplog)
    address = f"mx1.flip.example [{f.host(0)}]:{f.port}"  # the port is named when it is not 25
    assert sum(1 for line in lines if f"{address} up -> down" in line) == 1, [l for l in lines if " -> " in l]
    assert sum(1 for line in lines if f"{address} down -> up" in line) == 1, [l for l in lines if " -> " in l]
    assert any(f"{address} up -> down (timeout)" in line for line in lines)


async def test_idle_domain_stops_being_refreshed_after_the_window(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]
) -> None:
    f = await farm(Mode.OK)
    greeter = f.greeters[0]
    dns_server.zone.update(backup_zone("idle.example", f.host(0)))
    ttl, timeout, window = 1, 0.5, 1.5
    short_ttl(dns_server, "idle.example", ttl)
    config = policyd_config(dns_server.port, f.port, timeout=timeout, cache_up_ttl=ttl, refresh_window=window)
    running = await start_policyd(nursery, config)
    with trio.fail_after(STEP):
        assert (await running.ask(rcpt("last@idle.example")))[0] == "DEFER_IF_PERMIT"
    last_use = trio.current_time()
    probes_at_last_use = greeter.connections

    # Within the window the entries are renewed by time, with no RCPT arriving.
    await trio.sleep_until(last_use + window)
    assert greeter.connections > probes_at_last_use
    # A renewal that started at the very end of the window is allowed to
    # finish; then nothing more goes out, to the primary or to DNS.
    await trio.sleep_until(last_use + window + ttl + timeout)
    probes, queries = greeter.connections, len(dns_server.queries)
    await trio.sleep(2 * ttl)
    assert greeter.connections == probes
    assert dns_server.queries[queries:] == []

    # Expired as today: the next RCPT goes to the network again, and is answered.
    with trio.fail_after(STEP):
        assert (await running.ask(rcpt("back@idle.example")))[0] == "DEFER_IF_PERMIT"
    assert greeter.connections == probes + 1


async def test_failing_dns_serves_the_last_good_answer_then_the_bound(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smtpdcheck")
    f = await farm(Mode.OK)
    dns_server.zone.update(backup_zone("fail.example", f.host(0)))
    ttl, stale_max = 1, 2.0
    short_ttl(dns_server, "fail.example", ttl)
    config = policyd_config(
        dns_server.port, f.port, timeout=0.5, dns_timeout=0.5, cache_up_ttl=3.0,
        dns_stale_max=stale_max, dns_failure_ttl=0.3,
    )
    running = await start_policyd(nursery, config)
    out = Stream()
    async with trio.open_nursery() as inner:
        inner.start_soon(steady, running, "fail.example", 4.8, out)
        await trio.sleep(1.0)
        broke = trio.current_time()
        for name in ("fail.example", "mx1.fail.example", "backup.fail.example"):
            dns_server.zone[(name, "*")] = Behavior.SERVFAIL

    origin = out.samples[0].sent
    assert not out.slow(), describe(out.slow(), origin)
    # The last good MX list expired at most one TTL after the break and is
    # served for stale_max more; a refresh is retried every dns_failure_ttl.
    failed = out.first("DUNNO", broke)
    assert failed is not None, describe(out.samples, origin)
    # A refresh sent a moment before the break is answered after it (SERVFAIL), and
    # the answer it would have renewed may expire a few milliseconds after it was sent.
    assert failed.sent - broke >= stale_max - 0.1, describe(out.samples, origin)
    assert failed.sent - broke <= ttl + stale_max + 0.3 + 0.5, describe(out.samples, origin)
    stale = [s for s in out.samples if broke <= s.sent < failed.sent]
    assert len(stale) >= 30 and {s.action for s in stale} == {"DEFER_IF_PERMIT"}
    assert {s.action for s in out.samples if s.sent >= failed.sent} == {"DUNNO"}
    assert running.responder.metrics.requests[("DUNNO", "dns failure")] > 0

    warnings = [line for line in log_lines(caplog, logging.WARNING) if "stale" in line]
    apex = re.compile(r"(?<![\w.-])fail\.example\b")
    assert sum(1 for line in warnings if apex.search(line)) == 1, warnings
    for host in ("mx1.fail.example", "backup.fail.example"):
        assert sum(1 for line in warnings if host in line) <= 1, warnings
    assert len(warnings) <= 3, "once per name, not once per RCPT"
    assert any("cache=stale" in line for line in log_lines(caplog) if "rcpt=" in line)


async def test_refresh_window_zero_is_todays_behaviour(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], caplog: pytest.LogCaptureFixture
) -> None:
    """Without refresh an RCPT after the expiry waits for the probe, as before."""
    caplog.set_level(logging.INFO, logger="smtpdcheck")
    f = await farm(Mode.SILENT)
    dns_server.zone.update(backup_zone("today.example", f.host(0)))
    ttl, timeout = 1.0, 0.5
    config = policyd_config(dns_server.port, f.port, timeout=timeout, cache_down_ttl=ttl, refresh_window=0)
    running = await start_policyd(nursery, config)
    out = Stream()
    await steady(running, "today.example", 2.2, out)

    assert out.actions() == {"DUNNO"}
    waited = out.slow(timeout * 0.9)  # a probe's timeout, less the part a request may arrive into
    assert waited, "an RCPT after the expiry waited for the probe"
    origin = out.samples[0].sent
    assert all(s.sent - origin >= ttl for s in waited), describe(waited, origin)
    assert f.greeters[0].connections == 1 + len(waited)  # no probe without a request
    assert running.responder.core.prober.flights.stale_served == 0
    assert not any("cache=stale" in line for line in log_lines(caplog))


async def test_shutdown_during_a_refresh_logs_no_failure(
    dns_server: FakeDNSServer, farm: Callable[..., Farm], caplog: pytest.LogCaptureFixture
) -> None:
    """Stopping the daemon cancels the refreshes under way; that is not a failure worth a warning."""
    caplog.set_level(logging.INFO, logger="smtpdcheck")
    f = await farm(Mode.SILENT)
    greeter = f.greeters[0]
    dns_server.zone.update(backup_zone("stopping.example", f.host(0)))
    config = policyd_config(dns_server.port, f.port, timeout=0.5, greeting_timeout=0.5, cache_down_ttl=1.0)
    async with trio.open_nursery() as daemon:
        running = await start_policyd(daemon, config)
        with trio.fail_after(STEP):
            assert (await running.ask(rcpt("user@stopping.example")))[0] == "DUNNO"
            await greeter.wait_until(lambda: greeter.connections == 2 and greeter.active == 1)
        daemon.cancel_scope.cancel()  # what SIGTERM does: the refresh probe is still waiting for a greeting
    assert running.responder.core.prober.flights.refreshes["failed"] == 0
    assert log_lines(caplog, logging.WARNING) == []


# -- background work is paid for by traffic ------------------------------------


def one_off_zone(dns_server: FakeDNSServer, domain: str, primary_ip: str) -> None:
    dns_server.zone.update(backup_zone(domain, primary_ip))
    short_ttl(dns_server, domain, 1)


async def test_names_asked_once_cost_at_most_three_background_fetches_with_the_defaults(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]
) -> None:
    """One RCPT for a name with a 1 s TTL used to buy a query a second for ten minutes; a SERVFAIL name one every 10 s."""
    f = await farm(Mode.OK)
    one_off = [f"once{i}.example" for i in range(5)]
    failing = [f"broken{i}.example" for i in range(5)]
    for domain in one_off:
        one_off_zone(dns_server, domain, f.host(0))
    for domain in failing:
        dns_server.zone[(domain, "*")] = Behavior.SERVFAIL
    config = replace(Config(), listen=("inet:127.0.0.1:0",), nameserver=(f"127.0.0.1:{dns_server.port}",), smtp_port=f.port)
    running = await start_policyd(nursery, config)
    with trio.fail_after(STEP):
        await running.ask(rcpt(f"user@{one_off[0]}"))
    # The floor (--dns-timeout, 2 s by default) holds back the refresh its TTL of 1 s asks for.
    await trio.sleep(1.5)
    assert dns_server.query_count(one_off[0], "MX") == 1
    with trio.fail_after(STEP):
        for domain in one_off[1:] + failing:
            await running.ask(rcpt(f"user@{domain}"))
    # Three fetches, one per floor, are done in about 6 s; a failing name
    # would have been retried after --dns-failure-ttl (10 s).
    await trio.sleep(max(4 * config.dns_timeout, config.dns_failure_ttl) + 1.0)

    for domain in one_off:
        assert dns_server.query_count(domain, "MX") == 1 + 3, domain
        for host in (f"mx1.{domain}", f"backup.{domain}"):
            assert dns_server.query_count(host, "A") == 1 + 3, host
    for domain in failing:
        assert dns_server.query_count(domain, "MX") == 1, domain
    resolver = running.responder.core.resolver
    assert resolver.mx_flights.background == {"refresh-ahead": 3 * len(one_off)}
    assert resolver.mx_flights.kept_fresh() == 0


async def test_background_lookups_leave_a_share_of_the_limit_to_waiting_requests(
    dns_server: FakeDNSServer, make_core: Callable[..., Core]
) -> None:
    """--max-dns-queries 2: refreshes hung on a dead zone hold one slot, and a new name is looked up at once."""
    for name in ("a.example", "b.example", "c.example"):
        dns_server.zone[(name, "MX")] = [f"10 mx.{name}."]
    for name in ("a.example", "b.example"):
        dns_server.name_ttls[name] = 1
    timeout = 1.5
    core = make_core(dns_timeout=timeout, max_dns_queries=2, refresh_window=60.0)
    resolver = core.resolver
    with trio.fail_after(STEP):
        await resolver.mx("a.example")
        await resolver.mx("b.example")
    for name in ("a.example", "b.example"):
        dns_server.zone[(name, "*")] = Behavior.HANG
    await trio.sleep(timeout + 0.3)  # both refreshes are due (the floor is the 1.5 s grace); both hang
    assert resolver.background_limiter.borrowed_tokens == 1 and resolver.limiter.borrowed_tokens == 1
    started = trio.current_time()
    with trio.fail_after(STEP):
        lookup, _ = await resolver.mx("c.example")
    assert lookup.kind is MXKind.LIST
    assert trio.current_time() - started < 0.5, "waited for a slot the refreshes held"


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
async def test_refreshes_against_a_dead_upstream_stop_and_close_their_sockets(
    dns_server: FakeDNSServer, make_core: Callable[..., Core]
) -> None:
    """Names asked once, then the upstream stops answering: a few retries each, then nothing open and nothing sent."""
    names = [f"gone{i}.example" for i in range(20)]
    for name in names:
        dns_server.zone[(name, "MX")] = [f"10 mx.{name}."]
        dns_server.name_ttls[name] = 1
    timeout = 0.5
    core = make_core(dns_timeout=timeout, refresh_window=600.0, dns_failure_ttl=0.5, dns_stale_max=3600.0)
    resolver = core.resolver
    with trio.fail_after(STEP):
        for name in names:
            await resolver.mx(name)
    await trio.sleep(0.2)
    baseline = open_descriptors()
    for name in names:
        dns_server.zone[(name, "*")] = Behavior.HANG
    peak = baseline
    deadline = trio.current_time() + 5.5
    while trio.current_time() < deadline:  # three fetches each: about 1, 2.5 and 4 s, each for 0.5 s
        peak = max(peak, open_descriptors())
        await trio.sleep(0.05)
    assert peak > baseline, "the refresh queries' sockets were seen open"
    queries = len(dns_server.queries)
    await trio.sleep(1.5)
    assert open_descriptors() == baseline
    assert len(dns_server.queries) == queries, "still asking a dead upstream about names asked once"
    assert sum(resolver.mx_flights.background.values()) == 3 * len(names)
