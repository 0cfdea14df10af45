"""Refresh ahead and serve stale: the pure rules, then SingleFlight on virtual time."""

from __future__ import annotations

import logging
import math
import random

import pytest
import trio
import trio.testing

from smtpdcheck.cache import SingleFlight, Source, TTLCache
from smtpdcheck.refresh import MAX_JITTER, RefreshRules, Schedule

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
            stale_max: float = 0.0, retry_after: float = 2.0) -> SingleFlight[str, str]:
    return SingleFlight(
        nursery, TTLCache(100), lambda v: ttl, lambda exc: "fallback", name="test",
        produce_for=lambda key: origin.produce,
        rules=RefreshRules(window=window, stale_grace=grace, failure_stale_max=stale_max, retry_after=retry_after),
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
