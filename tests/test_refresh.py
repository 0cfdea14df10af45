"""Refresh ahead and serve stale: the pure rules, then SingleFlight on virtual time."""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Callable

import pytest
import trio
import trio.testing

from smtpdcheck.cache import SingleFlight, Source, TTLCache
from smtpdcheck.policy import Cache, Policy
from smtpdcheck.core import CoreSettings, build_core
from smtpdcheck.resolver import MXLookup
from smtpdcheck.refresh import MAX_JITTER, RefreshRules, Schedule, background_slots
from smtpdcheck.servers import parse_address, parse_servers
from smtpdcheck.stoprule import StopSet
from testbeds.virtual import SILENT, Peer, VirtualDNS, VirtualNet

# -- the rules, as plain arithmetic -------------------------------------------


def test_refresh_is_due_as_long_before_expiry_as_the_last_answer_took_plus_jitter() -> None:
    rules = RefreshRules(window=600, stale_grace=5)
    assert rules.due(160.0, 60.0, took=2.0, jitter=0.0) == pytest.approx(158.0)
    # Jitter is at most a tenth of the TTL, and never more than the stale grace.
    assert rules.due(160.0, 30.0, took=0.0, jitter=0.999999) == pytest.approx(160.0 - MAX_JITTER * 30.0, abs=1e-4)
    assert rules.due(160.0, 3600.0, took=0.0, jitter=0.999999) == pytest.approx(155.0, abs=1e-4)
    # Entries stored together are refreshed over a spread of times, not one instant.
    rng = random.Random(7)
    times = {round(rules.due(60.0, 60.0, 0.0, rng.random()), 3) for _ in range(50)}
    assert len(times) > 40 and min(times) >= 55.0 and max(times) <= 60.0


def test_refresh_period_averages_one_ttl() -> None:
    """Jitter once, then refresh as long before expiry as the answer takes: one refresh per TTL."""
    rules = RefreshRules(window=600, stale_grace=5)
    rng = random.Random(3)
    expires, took, count, jitter = 60.0, 0.5, 0, rng.random()
    while True:
        start = rules.due(expires, 60.0, took, jitter)
        jitter = 0.0
        took = 0.2 + rng.random()  # answers take more or less time
        if start > 3600.0:
            break
        count += 1
        expires = start + took + 60.0
    assert count <= 3600.0 / 60.0 + 1


def test_kept_fresh_only_within_the_window_and_never_when_off() -> None:
    rules = RefreshRules(window=600, stale_grace=5)
    assert rules.kept_fresh(used=1000.0, now=1600.0)
    assert not rules.kept_fresh(used=1000.0, now=1600.001)
    off = RefreshRules(window=0, stale_grace=5)
    assert not off.enabled and not off.kept_fresh(used=1000.0, now=1000.0)


def test_stale_bounds() -> None:
    rules = RefreshRules(window=600, stale_grace=2, failure_stale_max=3600)
    assert rules.stale_until(100.0) == 102.0
    assert rules.keep_after_failure_until(100.0, 102.0) == 3700.0
    no_failure_stale = RefreshRules(window=600, stale_grace=2, failure_stale_max=0)
    assert no_failure_stale.keep_after_failure_until(100.0, 102.0) == 102.0
    off = RefreshRules(window=0, stale_grace=2, failure_stale_max=3600)
    assert off.stale_until(100.0) == 100.0 and off.keep_after_failure_until(100.0, 100.0) == 100.0


def test_background_fetches_need_a_use_to_pay_for_them_within_the_window() -> None:
    rules = RefreshRules(window=600, stale_grace=2, fetches_per_use=3)
    assert rules.may_fetch(credits=1, used=1000.0, now=1600.0)
    assert not rules.may_fetch(credits=0, used=1000.0, now=1000.0)  # spent: wait for the next use
    assert not rules.may_fetch(credits=3, used=1000.0, now=1600.001)  # paid for, but idle too long
    assert RefreshRules(window=600, stale_grace=2).may_fetch(credits=math.inf, used=0.0, now=600.0)


def test_the_floor_delays_a_refresh_that_its_ttl_would_bring_sooner() -> None:
    rules = RefreshRules(window=600, stale_grace=2, floor=2.0)
    assert rules.not_before(fetched=100.0) == 102.0
    assert rules.refresh_at(due=100.9, not_before=102.0) == 102.0  # a TTL of 1 s
    assert rules.refresh_at(due=160.0, not_before=102.0) == 160.0  # a TTL longer than the floor
    assert RefreshRules(window=600, stale_grace=2).not_before(fetched=100.0) == 100.0


def test_background_work_gets_half_of_a_limit_and_requests_keep_the_rest() -> None:
    assert background_slots(100) == 50
    assert background_slots(200) == 100
    assert background_slots(3) == 1
    assert background_slots(1) == 1  # one slot: shared, as there is nothing to split


def test_schedule_pops_due_keys_in_order_and_compacts() -> None:
    schedule: Schedule[str] = Schedule()
    assert schedule.push("b", 20.0) is True  # the earliest: wake the runner
    assert schedule.push("c", 30.0) is False
    assert schedule.push("a", 10.0) is True
    assert schedule.next_due() == 10.0
    assert schedule.pop_due(19.9) == [("a", 10.0)]
    assert schedule.pop_due(100.0) == [("b", 20.0), ("c", 30.0)]
    assert schedule.next_due() == math.inf
    for i in range(10):
        schedule.push("k", float(i))
    schedule.compact([("k", 9.0), ("gone", math.inf)])
    assert len(schedule) == 1 and schedule.pop_due(100.0) == [("k", 9.0)]


# -- SingleFlight with the rules, on MockClock ---------------------------------


class Origin:
    """A producer whose answers take ``delay`` and count; ``answers`` is what it says next."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls = 0
        self.started_at: list[float] = []
        self.answers: list[str] = []

    async def produce(self, deliver: object) -> None:
        self.calls += 1
        self.started_at.append(trio.current_time())
        await trio.sleep(self.delay)
        value = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        deliver(value)  # type: ignore[operator]


def flights(nursery: trio.Nursery, origin: Origin, *, ttl: float = 10.0, window: float = 100.0, grace: float = 5.0,
            stale_max: float = 0.0, retry_after: float = 2.0, fetches_per_use: float = math.inf, floor: float = 0.0,
            size: int = 100) -> SingleFlight[str, str]:
    return SingleFlight(
        nursery, TTLCache(size), lambda v: ttl, lambda exc: "fallback", name="test",
        produce_for=lambda key: origin.produce,
        rules=RefreshRules(window=window, stale_grace=grace, failure_stale_max=stale_max, retry_after=retry_after,
                           fetches_per_use=fetches_per_use, floor=floor),
        is_failure=lambda v: v.startswith("fail"), describe=str, rng=random.Random(1),
    )


async def until(t: float) -> None:
    await trio.sleep_until(t)


async def test_an_entry_in_use_is_refreshed_before_it_expires(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    origin = Origin()
    origin.answers = ["v1", "v2", "v3"]
    f = flights(nursery, origin)
    start = trio.current_time()
    assert await f.get("k", origin.produce) == ("v1", Source.NETWORK)
    await until(start + 8.9)
    assert origin.calls == 1  # not before the last tenth of the TTL
    assert await f.get("k", origin.produce) == ("v1", Source.CACHE)
    await until(start + 9.999)
    assert origin.calls == 2 and f.refreshes["ok"] == 1  # refreshed by time, with no request due
    assert await f.get("k", origin.produce) == ("v2", Source.CACHE)
    # ... and again a TTL later, by time alone, as long as it is used within the window.
    await until(start + 19.998)
    assert origin.calls == 3


async def test_an_idle_entry_is_not_refreshed_and_expires(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    origin = Origin()
    origin.answers = ["v1", "v2"]
    f = flights(nursery, origin, window=5.0)
    start = trio.current_time()
    await f.get("k", origin.produce)
    await until(start + 30.0)
    assert origin.calls == 1 and f.kept_fresh() == 0
    assert await f.get("k", origin.produce) == ("v2", Source.NETWORK)


async def test_stale_value_served_at_once_while_a_slow_refresh_runs(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    origin = Origin(delay=3.0)
    origin.answers = ["v1", "v2"]
    f = flights(nursery, origin)
    start = trio.current_time()
    await f.get("k", origin.produce)  # stored at 3.0, expires at 13.0
    origin.delay = 6.0  # slower than last time: the refresh starts ~3 s early but lands late
    await until(start + 13.5)  # refresh started near 9.x, answers near 15.x
    before = trio.current_time()
    assert await f.get("k", origin.produce) == ("v1", Source.STALE)
    assert trio.current_time() == before  # no waiting
    assert f.stale_served == 1
    await until(start + 17.0)
    assert await f.get("k", origin.produce) == ("v2", Source.CACHE)


async def test_stale_is_bounded_by_the_grace(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    origin = Origin()
    origin.answers = ["v1"]
    f = flights(nursery, origin, window=100.0, grace=5.0)
    start = trio.current_time()
    await f.get("k", origin.produce)
    origin.delay = 30.0  # the refresh hangs
    origin.answers = ["v2"]
    await until(start + 14.9)
    assert (await f.get("k", origin.produce))[1] is Source.STALE
    await until(start + 15.1)  # TTL 10 + grace 5 passed: wait for the refresh under way
    before = trio.current_time()
    value, source = await f.get("k", origin.produce)
    assert (value, source) == ("v2", Source.NETWORK)
    assert origin.calls == 2  # joined the running refresh, did not start another
    assert trio.current_time() > before


async def test_one_refresh_however_many_callers(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    origin = Origin(delay=2.0)
    origin.answers = ["v1", "v2"]
    f = flights(nursery, origin, window=100.0)
    start = trio.current_time()
    await f.get("k", origin.produce)
    await until(start + 12.5)
    results: list[tuple[str, Source]] = []
    async with trio.open_nursery() as callers:
        for _ in range(100):
            callers.start_soon(lambda: _collect(f, origin, results))
    assert len(results) == 100 and origin.calls == 2


async def _collect(f: SingleFlight[str, str], origin: Origin, out: list[tuple[str, Source]]) -> None:
    out.append(await f.get("k", origin.produce))


async def test_failed_refresh_keeps_the_last_good_value_up_to_the_bound(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    origin = Origin()
    origin.answers = ["good"]
    f = flights(nursery, origin, ttl=10.0, stale_max=30.0, retry_after=2.0)
    start = trio.current_time()
    with caplog.at_level(logging.INFO, logger="smtpdcheck"):
        await f.get("k", origin.produce)
        origin.answers = ["fail: SERVFAIL"]
        for t in range(11, 40):  # one use a second
            await until(start + t)
            assert await f.get("k", origin.produce) == ("good", Source.STALE), t
        # Retried every retry_after while in use, not once per request.
        assert 10 <= f.refreshes["failed"] <= 17
        await until(start + 40.5)  # 30 s past expiry: fails as before
        assert (await f.get("k", origin.produce))[0] == "fail: SERVFAIL"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "k" in warnings[0].getMessage() and "stale" in warnings[0].getMessage()


async def test_recovered_refresh_replaces_the_stale_value(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    origin = Origin()
    origin.answers = ["good"]
    f = flights(nursery, origin, ttl=10.0, stale_max=30.0, retry_after=2.0)
    start = trio.current_time()
    await f.get("k", origin.produce)
    origin.answers = ["fail"]
    await until(start + 12.0)
    assert (await f.get("k", origin.produce))[1] is Source.STALE
    origin.answers = ["better"]
    await until(start + 15.0)
    assert await f.get("k", origin.produce) == ("better", Source.CACHE)


async def test_window_zero_is_the_old_behaviour(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    origin = Origin(delay=1.0)
    origin.answers = ["v1", "v2"]
    f = flights(nursery, origin, window=0.0)
    start = trio.current_time()
    await f.get("k", origin.produce)
    await until(start + 30.0)
    assert origin.calls == 1  # nothing refreshed in the background
    before = trio.current_time()
    assert await f.get("k", origin.produce) == ("v2", Source.NETWORK)
    assert trio.current_time() - before == pytest.approx(1.0)  # the caller waited


# -- paying for background work -------------------------------------------------


@pytest.mark.parametrize("ttl", [0.0, 1.0])
async def test_a_name_asked_once_buys_at_most_three_background_fetches(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, ttl: float
) -> None:
    origin = Origin(delay=0.25)
    origin.answers = ["v"]
    f = flights(nursery, origin, ttl=ttl, grace=2.0, fetches_per_use=3, floor=2.0)
    start = trio.current_time()
    assert await f.get("k", origin.produce) == ("v", Source.NETWORK)
    await until(start + 100.0)
    if ttl == 0:
        assert origin.calls == 1 and sum(f.background.values()) == 0  # a TTL of 0 is not kept, so not refreshed
        return
    # One fetch every floor (2 s) from the first, whose TTL of 1 s would
    # have asked for one a second, and three of them: then it expires.
    assert [t - start for t in origin.started_at] == [0.0, 2.0, 4.0, 6.0]
    assert f.background == {"refresh-ahead": 3}
    assert f.kept_fresh() == 0
    assert await f.get("k", origin.produce) == ("v", Source.NETWORK)


async def test_a_failing_name_is_not_fetched_in_the_background(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    origin = Origin(delay=0.5)
    origin.answers = ["fail: SERVFAIL"]
    f = flights(nursery, origin, ttl=10.0, grace=5.0, fetches_per_use=3)
    start = trio.current_time()
    assert await f.get("k", origin.produce) == ("fail: SERVFAIL", Source.NETWORK)
    await until(start + 5.0)
    assert await f.get("k", origin.produce) == ("fail: SERVFAIL", Source.CACHE)  # a use, but it buys nothing
    await until(start + 12.0)  # past its TTL, within what would be its stale grace
    assert origin.calls == 1 and sum(f.background.values()) == 0
    # Not served stale either: the request that needs it asks, and waits.
    assert await f.get("k", origin.produce) == ("fail: SERVFAIL", Source.NETWORK)
    assert trio.current_time() == pytest.approx(start + 12.5)
    await until(start + 100.0)
    assert origin.calls == 2 and sum(f.background.values()) == 0


async def test_the_floor_holds_under_steady_use(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    """A TTL of 1 s in steady use: fetched every 3 s (the floor), served stale in between, never waited for."""
    origin = Origin(delay=0.1)
    origin.answers = ["v"]
    f = flights(nursery, origin, ttl=1.0, grace=3.0, fetches_per_use=3, floor=3.0)
    start = trio.current_time()
    await f.get("k", origin.produce)
    for i in range(1, 61):
        await until(start + i * 0.5)
        value, source = await f.get("k", origin.produce)
        assert source is not Source.NETWORK, i
    await until(start + 31.0)
    gaps = [b - a for a, b in itertools.pairwise(origin.started_at)]
    assert gaps and min(gaps) >= 3.0, gaps
    assert len(origin.started_at) == 11  # 0, 3, ..., 30


async def test_steady_use_keeps_an_entry_fresh_as_before(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    """Each use restores the credits: an entry in use is refreshed once per TTL for as long as it is used."""
    origin = Origin(delay=0.5)
    origin.answers = ["v"]
    f = flights(nursery, origin, ttl=10.0, grace=2.0, fetches_per_use=3, floor=2.0)
    start = trio.current_time()
    await f.get("k", origin.produce)
    for i in range(1, 101):
        await until(start + i)
        assert await f.get("k", origin.produce) == ("v", Source.CACHE), i
    assert 10 <= origin.calls <= 11


async def test_a_use_after_the_credits_ran_out_plans_the_refresh_again(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    origin = Origin()
    origin.answers = ["v"]
    f = flights(nursery, origin, ttl=10.0, fetches_per_use=1)
    start = trio.current_time()
    await f.get("k", origin.produce)
    await until(start + 15.0)
    assert origin.calls == 2  # the one fetch the first use paid for, near 10 s
    assert await f.get("k", origin.produce) == ("v", Source.CACHE)  # fresh until about 20 s
    await until(start + 20.0)
    assert origin.calls == 3  # this use paid for the next, before expiry


# -- fixes ----------------------------------------------------------------------


async def test_a_refresh_keeps_the_entrys_place_in_lru_order(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    origin = Origin()
    origin.answers = ["v"]
    f = flights(nursery, origin, ttl=10.0, size=2)
    start = trio.current_time()
    await f.get("a", origin.produce)
    await until(start + 5.0)
    await f.get("b", origin.produce)
    await until(start + 10.5)  # "a" was refreshed near 10 s (and "b" not yet)
    assert origin.calls == 3 and f.refreshes["ok"] == 1
    await f.get("c", origin.produce)  # evicts the least recently *used*
    assert f.cache.raw("a") is None and f.cache.raw("b") is not None


async def test_an_abandoned_refresh_serves_the_stale_value_only_within_its_bound(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    delivered = ["v1"]

    async def produce(deliver: Callable[[str], None]) -> None:
        if delivered:
            deliver(delivered.pop())
            return
        await trio.sleep(5.0)  # then ends without an answer

    f: SingleFlight[str, str] = SingleFlight(
        nursery, TTLCache(10), lambda v: 10.0, lambda exc: "fallback", name="test",
        produce_for=lambda key: produce, rules=RefreshRules(window=100, stale_grace=1.0), rng=random.Random(1),
    )
    start = trio.current_time()
    assert await f.get("k") == ("v1", Source.NETWORK)
    await until(start + 11.5)  # the refresh started near 10 s is still running; the stale bound was 11 s
    value, source = await f.get("k")
    assert trio.current_time() == pytest.approx(start + 15.0, abs=1.0)
    assert (value, source) == ("fallback", Source.NETWORK)


async def test_a_stale_answer_is_counted_once_when_the_cache_only_path_falls_through(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    net = VirtualNet(nursery, {"127.0.0.2": SILENT, "127.0.0.3": SILENT})
    settings = CoreSettings(probe_timeout=1.0, check_timeout=3.0, down_ttl=5.0, refresh_window=2.0)
    core = build_core(nursery, settings, connect=net.connect, lookups=VirtualDNS())
    prober, checker = core.prober, core.checker
    start = trio.current_time()
    await checker.check(parse_servers(["10:127.0.0.2"]), StopSet())  # down after 1 s, until 6 s
    await until(start + 6.5)  # idle past the window: not refreshed, stale until 7 s
    # The cache-only attempt has .2 stale and nothing for .3, so the full path runs and uses .2 again.
    await checker.check(parse_servers(["10:127.0.0.2", "20:127.0.0.3"]), StopSet())
    assert prober.flights.stale_served == 1
    # From the cache-only path alone, counted when the result is used.
    await until(start + 13.0)  # .2 refreshed at 6.5 (down until 12.5), stale again; .3 fresh until 12.5 + ...
    prober.flights.stale_served = 0
    result = checker.check_cached(parse_servers(["10:127.0.0.2"]), StopSet())
    assert result is not None and result.stale and prober.flights.stale_served == 1


@pytest.mark.parametrize("flip", ["up", "down"])
async def test_a_probe_ttl_of_zero_means_do_not_keep(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, flip: str
) -> None:
    """--cache-up-ttl 0 (or --cache-down-ttl 0): the result is answered, not kept, and the old state goes."""
    live, silent = Peer(greet_after=0.1), SILENT
    net = VirtualNet(nursery, {"127.0.0.2": silent if flip == "up" else live})
    up_ttl, down_ttl = (0.0, 5.0) if flip == "up" else (5.0, 0.0)
    settings = CoreSettings(probe_timeout=1.0, up_ttl=up_ttl, down_ttl=down_ttl, refresh_window=60.0)
    prober = build_core(nursery, settings, connect=net.connect, lookups=VirtualDNS()).prober
    address = parse_address("127.0.0.2")
    assert address is not None
    start = trio.current_time()
    with caplog.at_level(logging.INFO, logger="smtpdcheck"):
        first, _ = await prober.probe(address, 25)
        assert first.available is (flip == "down")
        net.peers["127.0.0.2"] = live if flip == "up" else silent
        await until(start + 8.0)  # the kept result was refreshed near its expiry, with the new state
        assert prober.cached(address, 25) is None  # nothing kept: neither the new state nor the old
        result, source = await prober.probe(address, 25)
    assert result.available is (flip == "up") and source is Source.NETWORK
    # Trouble is not logged; the state change is (a warning, like every change of state).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and " -> " not in r.getMessage()] == []


async def test_background_probes_leave_a_share_of_the_limit_to_waiting_requests(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """--max-probes 4: refreshes of four silent primaries hold two slots, and a request's probe gets one at once."""
    silent = [f"127.0.0.{i}" for i in range(2, 6)]
    net = VirtualNet(nursery, {**dict.fromkeys(silent, SILENT), "127.0.0.9": Peer(greet_after=0.1)})
    settings = CoreSettings(probe_timeout=2.0, check_timeout=3.0, down_ttl=5.0, max_probes=4, refresh_window=100.0)
    core = build_core(nursery, settings, connect=net.connect, lookups=VirtualDNS())
    prober, checker = core.prober, core.checker
    start = trio.current_time()
    await checker.check(parse_servers([f"10:{a}" for a in silent]), StopSet())  # four slots, down at 2 s
    await until(start + 5.5)  # their refreshes (due from 4.5 s) are running, each for 2 s
    assert prober.limiter.borrowed_tokens == 2 and prober.background_limiter.borrowed_tokens == 2
    result = await checker.check(parse_servers(["10:127.0.0.9"]), StopSet())
    assert result.winner is not None
    assert trio.current_time() == pytest.approx(start + 5.6)


async def test_background_fetches_are_counted_by_why_they_started(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    origin = Origin()
    origin.answers = ["good"]
    f = flights(nursery, origin, ttl=10.0, window=5.0, grace=5.0, stale_max=60.0, retry_after=2.0, fetches_per_use=3)
    start = trio.current_time()
    await f.get("k", origin.produce)
    await until(start + 12.0)  # idle past the window at its refresh time: expired, still servable
    assert f.background == {}
    origin.answers = ["fail"]
    assert await f.get("k", origin.produce) == ("good", Source.STALE)  # starts a refresh, which fails
    await until(start + 40.0)
    # Two retries were left of the three that use paid for; then nothing until the next use.
    assert f.background == {"stale-use": 1, "retry-after-failure": 2}
    assert origin.calls == 4
    assert await f.get("k", origin.produce) == ("good", Source.STALE)  # the last good value, still kept
    assert f.background == {"stale-use": 1, "retry-after-failure": 3}


class StaleMX(VirtualDNS):
    """Every cached MX list is handed out as stale; what the policy counts is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.counted: list[tuple[int, int]] = []

    def cached_mx(self, domain: str) -> tuple[MXLookup, float, Source] | None:
        found = super().cached_mx(domain)
        return None if found is None else (found[0], found[1], Source.STALE)

    def count_cache_hits(self, *, mx: int = 0, addresses: int = 0, stale_mx: int = 0, stale_addresses: int = 0) -> None:
        if mx or stale_mx:
            self.counted.append((mx, stale_mx))


async def test_a_stale_mx_list_is_counted_by_the_cache_only_path_only_when_it_decides(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    dns = StaleMX()
    dns.set_mx("d.example", [(10, "mx1.d.example"), (20, "backup.d.example")])
    dns.set_host("mx1.d.example", ["127.0.0.2"])
    dns.set_host("backup.d.example", ["127.0.0.1"])
    settings = CoreSettings(probe_timeout=1.0, check_timeout=3.0, refresh_window=60.0)
    core = build_core(nursery, settings, connect=VirtualNet(nursery, {"127.0.0.2": Peer()}).connect, lookups=dns)
    prober = core.prober
    policy = Policy(dns, core.checker, StopSet())
    await policy.decide_recipient("a@d.example", "127.0.0.1")  # the full path fills the caches
    dns.counted.clear()
    decision = await policy.decide_recipient("b@d.example", "127.0.0.1")
    assert decision.cache is Cache.STALE and dns.counted == [(1, 1)]
    prober.flights.cache.clear()  # the cache-only attempt now falls through: the full path counts for itself
    dns.counted.clear()
    await policy.decide_recipient("c@d.example", "127.0.0.1")
    assert all(stale == 0 for _, stale in dns.counted), dns.counted


async def test_the_refresh_schedule_stays_near_the_cache_size_under_eviction(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A stream of new keys evicts old ones, whose planned refresh times stay
    in the heap until they come up: they are compacted away once they are a
    quarter of the cache size, so the heap (a resident-size cost) never
    holds much more than the cache."""
    origin = Origin()
    origin.answers = ["v"]
    f = flights(nursery, origin, size=400)
    peak = 0
    for i in range(4000):
        await f.get(f"k{i}", origin.produce)
        peak = max(peak, len(f._schedule))
    assert len(f.cache) == 400
    assert 400 <= peak <= 400 + 400 // 4 + 64


async def test_running_since_tells_when_the_flight_under_way_started(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    origin = Origin(delay=2.0)
    origin.answers = ["v1", "v2"]
    f = flights(nursery, origin)
    start = trio.current_time()
    assert f.running_since("k") is None
    await f.get("k", origin.produce)  # 0 -> 2, expires at 12, refreshed from about 9
    assert f.running_since("k") is None
    await until(start + 10.5)
    assert origin.calls == 2 and f.running_since("k") == origin.started_at[-1]
    await until(start + 12.5)
    assert f.running_since("k") is None
