"""Bounded TTL caches with single-flight.

A backup MX under a spam run sees the same few recipient domains many times a
second.  Without a cache every RCPT would cost a DNS round trip and an SMTP
connection to the primary; without single-flight, a burst that arrives before
the first answer would still make one probe per RCPT.  Here a burst makes
one: later callers wait on the flight already under way.

Flights run in a long-lived nursery owned by the caller (the daemon's or the
command's top level), not in the requester's task, so a requester that gives
up (its own deadline passed) does not cancel an answer others wait for, and
the answer still lands in the cache for the next one.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

K = TypeVar("K")
V = TypeVar("V")

log = logging.getLogger("smtpdcheck.cache")


class TTLCache(Generic[K, V]):
    """An LRU mapping whose entries expire; at most ``max_entries`` live."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = trio.current_time) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K, now: float | None = None) -> V | None:
        """A fresh value, or None; ``now`` saves a clock read if the caller has one."""
        item = self._data.get(key)
        if item is not None:
            expires, value = item
            if expires > (self._clock() if now is None else now):
                self._data.move_to_end(key)
                self.hits += 1
                return value
            del self._data[key]
        self.misses += 1
        return None

    def peek(self, key: K) -> V | None:
        """A fresh value without touching recency or statistics."""
        item = self._data.get(key)
        if item is not None and item[0] > self._clock():
            return item[1]
        return None

    def entry(self, key: K) -> tuple[V, float] | None:
        """A fresh value and when it expires, without touching recency or statistics."""
        item = self._data.get(key)
        if item is not None and item[0] > self._clock():
            return item[1], item[0]
        return None

    def expires(self, key: K) -> float:
        """When ``key``'s value stops being fresh (-inf if it is not cached)."""
        item = self._data.get(key)
        return item[0] if item is not None else -math.inf

    def count_hits(self, n: int) -> None:
        self.hits += n

    def put(self, key: K, value: V, ttl: float) -> None:
        if ttl <= 0:
            self._data.pop(key, None)
            return
        self._data[key] = (self._clock() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()


Deliver = Callable[[V], None]
Producer = Callable[[Deliver[V]], Awaitable[None]]


@dataclass(eq=False)
class _Flight(Generic[V]):
    done: trio.Event = field(default_factory=trio.Event)
    value: V | None = None


class SingleFlight(Generic[K, V]):
    """Cache lookups, sharing one producer run among concurrent callers.

    A producer receives a ``deliver`` callback.  It may deliver early and
    keep running (a probe reports "available" on the first greeting line and
    then says QUIT politely); if it ends without delivering, or raises, the
    waiters get ``fallback(exc)`` so nobody waits forever.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        cache: TTLCache[K, V],
        ttl_of: Callable[[V], float],
        fallback: Callable[[BaseException | None], V],
        name: str = "flight",
    ) -> None:
        self._nursery = nursery
        self.cache = cache
        self._ttl_of = ttl_of
        self._fallback = fallback
        self._inflight: dict[K, _Flight[V]] = {}
        self._name = name
        self.started = 0
        self.joined = 0
        self._running = 0
        self._flight_ended: trio.Event | None = None

    @property
    def inflight(self) -> int:
        """Flights whose callers are still waiting for a value."""
        return len(self._inflight)

    @property
    def lingering(self) -> int:
        """Flights that delivered but are still finishing (a probe saying QUIT)."""
        return self._running - len(self._inflight)

    async def wait_lingering(self) -> None:
        """Return once no delivered flight is still finishing (bound it with a cancel scope)."""
        while self.lingering > 0:
            event = self._flight_ended = trio.Event()
            await event.wait()

    async def get(self, key: K, produce: Producer[V]) -> tuple[V, bool]:
        """Return ``(value, from_cache)``; waits for a flight if needed."""
        cached = self.cache.get(key)
        if cached is not None:
            await trio.lowlevel.checkpoint()
            return cached, True
        flight = self._inflight.get(key)
        if flight is None:
            flight = _Flight()
            self._inflight[key] = flight
            self.started += 1
            self._nursery.start_soon(self._fly, key, flight, produce, name=f"{self._name} {key!r}")
        else:
            self.joined += 1
        await flight.done.wait()
        assert flight.value is not None
        return flight.value, False

    def _deliver(self, key: K, flight: _Flight[V], value: V) -> None:
        if flight.done.is_set():
            return
        flight.value = value
        flight.done.set()
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        self.cache.put(key, value, self._ttl_of(value))

    async def _fly(self, key: K, flight: _Flight[V], produce: Producer[V]) -> None:
        error: BaseException | None = None
        self._running += 1
        try:
            await produce(lambda value: self._deliver(key, flight, value))
        except Exception as exc:  # a bug in a producer must not take the daemon down
            log.exception("%s for %r failed", self._name, key)
            error = exc
        finally:
            self._running -= 1
            if not flight.done.is_set():
                flight.value = self._fallback(error)
                flight.done.set()
                if self._inflight.get(key) is flight:
                    del self._inflight[key]
            if self._flight_ended is not None:
                self._flight_ended.set()
                self._flight_ended = None
