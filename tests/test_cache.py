"""TTL caches and single-flight, on trio's MockClock (no sockets involved)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing

from smtpdcheck.cache import SingleFlight, TTLCache


def test_ttl_and_lru_bound() -> None:
    now = [0.0]
    cache: TTLCache[str, int] = TTLCache(3, clock=lambda: now[0])
    cache.put("a", 1, 10)
    cache.put("b", 2, 5)
    entry = cache.raw("b")
    assert cache.get("a") == 1 and entry is not None and entry.expires == 5
    now[0] = 6
    assert cache.get("b") is None
    entry = cache.raw("a")
    assert entry is not None and entry.value == 1 and entry.expires > now[0]
    for key in "cde":
        cache.put(key, 0, 100)
    assert len(cache) == 3 and cache.get("a") is None  # least recently used went first
    cache.put("c", 9, 0)  # a zero TTL removes instead of storing
    assert cache.raw("c") is None
    assert (cache.hits, cache.misses) == (1, 2)  # raw() does not count


def _flight(nursery: trio.Nursery) -> SingleFlight[str, str]:
    return SingleFlight(nursery, TTLCache(100), lambda value: 0 if value.startswith("fail") else 60.0,
                        lambda exc: f"fail: {type(exc).__name__ if exc else 'none'}")


async def test_concurrent_callers_share_one_producer(autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def produce(deliver: Callable[[str], None]) -> None:
        nonlocal calls
        calls += 1
        await trio.sleep(1)
        deliver("up")
        await trio.sleep(2)  # goes on after delivering, like a probe saying QUIT

    results: list[tuple[str, bool]] = []
    async with trio.open_nursery() as background:
        flights = _flight(background)

        async def ask() -> None:
            results.append(await flights.get("k", produce))

        async with trio.open_nursery() as callers:
            for _ in range(20):
                callers.start_soon(ask)
        assert trio.current_time() == pytest.approx(1.0)  # answered on delivery, not on return
        assert flights.lingering == 1 and flights.inflight == 0
        assert await flights.get("k", produce) == ("up", True)
    assert calls == 1 and results == [("up", False)] * 20
    assert (flights.started, flights.joined) == (1, 19)


async def test_a_caller_giving_up_does_not_cancel_the_flight(autojump_clock: trio.testing.MockClock) -> None:
    async def produce(deliver: Callable[[str], None]) -> None:
        await trio.sleep(5)
        deliver("late")

    async with trio.open_nursery() as background:
        flights = _flight(background)
        with trio.move_on_after(1):
            await flights.get("k", produce)
        assert flights.inflight == 1
        await trio.sleep(5)
        entry = flights.cache.raw("k")
        assert entry is not None and entry.value == "late" and entry.expires > trio.current_time()


async def test_a_failing_producer_wakes_everyone_and_is_not_cached(autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(deliver: Callable[[str], None]) -> None:
        await trio.sleep(1)
        raise RuntimeError("bug")

    async def silent(deliver: Callable[[str], None]) -> None:
        await trio.sleep(1)

    async with trio.open_nursery() as background:
        flights = _flight(background)
        assert await flights.get("a", broken) == ("fail: RuntimeError", False)
        assert await flights.get("b", silent) == ("fail: none", False)
        assert flights.cache.raw("a") is None and flights.cache.raw("b") is None
    # The messages, not the text: a traceback's file paths may hold any word.
    assert not any("probe" in m for m in caplog.messages) and "RuntimeError" in caplog.text
