"""Coarse connection deadlines, checked by one task for all connections.

Every Postfix connection needs a deadline that moves twice per request:
the reply must be taken within ``request_timeout``, then the connection
may wait up to ``idle_timeout`` for the next request.  Moving a trio cancel
scope's deadline files it again in trio's deadline heap, which cost about
a tenth of the time of a whole cached answer.  Here a move is one float
assignment, and one task looks at every connection a few times a second
and cancels those whose time is up.  A deadline therefore fires up to one
tick late; the tick is a tenth of the shortest timeout in force (at most a
second), which does not matter for timeouts measured in seconds.

The scan is linear in the open connections, which ``max_connections``
bounds (a thousand connections cost some tens of microseconds per tick).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import TracebackType

import trio

#: Bounds of the interval between two scans, seconds.
MAX_TICK_S = 1.0
MIN_TICK_S = 0.01


def tick_for(*timeouts: float) -> float:
    """A tenth of the shortest positive timeout, within the bounds."""
    shortest = min((t for t in timeouts if t > 0), default=math.inf)
    return min(MAX_TICK_S, max(MIN_TICK_S, shortest / 10))


class Deadline:
    """One connection's deadline: a cancel scope and when to cancel it.

    Entering opens the cancel scope and puts the deadline under watch;
    leaving takes it off.  ``at`` is a :func:`trio.current_time` value and
    starts at infinity (never).
    """

    __slots__ = ("at", "scope", "_watchdog")

    def __init__(self, watchdog: Watchdog) -> None:
        self.at = math.inf
        self.scope = trio.CancelScope()
        self._watchdog = watchdog

    def __enter__(self) -> Deadline:
        self.scope.__enter__()
        self._watchdog._watched.add(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self._watchdog._watched.discard(self)
        return bool(self.scope.__exit__(exc_type, exc, tb))

    @property
    def expired(self) -> bool:
        """Whether the watchdog cancelled this connection (after the block)."""
        return self.scope.cancelled_caught


class Watchdog:
    """Cancels the scopes of watched connections whose deadline has passed."""

    def __init__(self) -> None:
        self._watched: set[Deadline] = set()

    def __len__(self) -> int:
        return len(self._watched)

    def deadline(self) -> Deadline:
        """A deadline for one connection; use it as a ``with`` block."""
        return Deadline(self)

    def check(self) -> None:
        """Cancel every overdue connection now (the tick's work)."""
        now = trio.current_time()
        for watched in self._watched:
            if watched.at <= now:
                watched.scope.cancel()

    async def run(self, tick: Callable[[], float]) -> None:
        """Check every ``tick()`` seconds until cancelled.

        ``tick`` is asked again each time, so a reloaded configuration with
        shorter timeouts takes effect from the next scan.
        """
        while True:
            await trio.sleep(tick())
            self.check()
