"""The connection watchdog: coarse deadlines, one task for all connections.

No sockets here, so trio's MockClock keeps these exact and instant.
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from policyd.watchdog import MAX_TICK_S, MIN_TICK_S, Watchdog, tick_for


@pytest.mark.parametrize(
    ("timeouts", "tick"),
    [
        ((10.0, 3600.0), MAX_TICK_S),
        ((0.5, 3600.0), 0.05),
        ((10.0, 0.0), MAX_TICK_S),  # 0 = no idle timeout: not the shortest
        ((0.001,), MIN_TICK_S),
        ((), MAX_TICK_S),
    ],
)
def test_tick_is_a_tenth_of_the_shortest_timeout_within_bounds(timeouts: tuple[float, ...], tick: float) -> None:
    assert tick_for(*timeouts) == pytest.approx(tick)


async def _watched_until_cancelled(watchdog: Watchdog, at: float, record: list[float]) -> None:
    with watchdog.deadline() as deadline:
        deadline.at = at
        await trio.sleep_forever()
    assert deadline.expired
    record.append(trio.current_time())


async def test_deadlines_fire_at_most_one_tick_late(autojump_clock: trio.testing.MockClock) -> None:
    watchdog = Watchdog()
    fired: list[float] = []
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog.run, lambda: 0.25)
        async with trio.open_nursery() as connections:
            for delay in (1.0, 1.1, 3.0):
                connections.start_soon(_watched_until_cancelled, watchdog, start + delay, fired)
        nursery.cancel_scope.cancel()
    offsets = [t - start for t in fired]
    assert len(offsets) == 3
    for offset, delay in zip(sorted(offsets), (1.0, 1.1, 3.0)):
        assert delay <= offset <= delay + 0.25 + 1e-9
    assert len(watchdog) == 0  # leaving the block stops the watch


async def test_moving_a_deadline_postpones_it(autojump_clock: trio.testing.MockClock) -> None:
    watchdog = Watchdog()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog.run, lambda: 0.1)
        with watchdog.deadline() as deadline:
            for _ in range(20):  # kept alive by moving it forward, like a busy connection
                deadline.at = trio.current_time() + 0.5
                await trio.sleep(0.3)
            deadline.at = math.inf
            await trio.sleep(100)
        assert not deadline.expired
        nursery.cancel_scope.cancel()


async def test_a_deadline_that_has_passed_cancels_only_its_own_connection() -> None:
    watchdog = Watchdog()
    survivor_done = False
    with watchdog.deadline() as late:
        late.at = trio.current_time() + 100
        with watchdog.deadline() as overdue:
            overdue.at = trio.current_time() - 1
            watchdog.check()
            await trio.sleep(0)  # a checkpoint delivers the cancellation
        assert overdue.expired
        await trio.sleep(0)
        survivor_done = True
    assert survivor_done and not late.expired
