"""A bounded LRU mapping whose entries expire, and where a value came from.

The storage under every cache of :mod:`smtpdcheck.cache`: entries keep
the times the refresh rules and :func:`smtpdcheck.belief.judge` read
(expiry, the stale bound, the planned refresh, the floor), and leave by
LRU order or replacement; :class:`~smtpdcheck.cache.SingleFlight` decides
what they are worth.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Source(enum.IntEnum):
    """Where a value came from; true when it came from the cache (fresh or stale)."""

    NETWORK = 0
    CACHE = 1
    STALE = 2  # expired, served while its refresh runs (or after a refresh failed)


@dataclass(slots=True, eq=False)
class Entry(Generic[V]):
    """One cached value and its times (all trio times)."""

    value: V
    expires: float  # fresh until then
    used: float  # last handed to a caller
    stale_until: float  # may be served past expiry until then (while refreshing)
    due: float = math.inf  # background refresh scheduled for then (inf: none planned)
    not_before: float = -math.inf  # no background fetch before then (the floor; after a failure, the retry time)
    failing: bool = False  # the last refresh failed; ``value`` is the last good one
    credits: float = 0.0  # background fetches the last use still pays for
    lead: float = 0.0  # how long before expiry its refresh is due


class TTLCache(Generic[K, V]):
    """An LRU mapping whose entries expire; at most ``max_entries`` live.

    Expired entries are dropped when read with :meth:`get`; a
    :class:`SingleFlight` with refresh rules reads them with :meth:`raw`
    instead, to serve them stale, and they leave by LRU or replacement.
    """

    def __init__(self, max_entries: int, clock: Callable[[], float] = trio.current_time) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[K, Entry[V]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    def get(self, key: K, now: float | None = None) -> V | None:
        """A fresh value, or None; ``now`` saves a clock read if the caller has one."""
        item = self._data.get(key)
        if item is not None:
            if now is None:
                now = self._clock()
            if item.expires > now:
                self._data.move_to_end(key)
                item.used = now
                self.hits += 1
                return item.value
            del self._data[key]
        self.misses += 1
        return None

    def raw(self, key: K) -> Entry[V] | None:
        """The entry, fresh or not, without touching anything."""
        return self._data.get(key)

    def entries(self) -> list[tuple[K, Entry[V]]]:
        return list(self._data.items())

    def count_hits(self, n: int) -> None:
        self.hits += n

    def put(
        self, key: K, value: V, ttl: float, *, stale_until: float | None = None, keep_order: bool = False
    ) -> Entry[V] | None:
        """Store ``value`` for ``ttl`` seconds (0 or less removes the key); the new entry.

        ``keep_order`` replaces an existing key where it stands in LRU
        order: a refresh nobody asked for must not make an entry look used.
        """
        if ttl <= 0:
            self._data.pop(key, None)
            return None
        now = self._clock()
        expires = now + ttl
        entry = Entry(value, expires, now, expires if stale_until is None else stale_until)
        present = key in self._data
        self._data[key] = entry  # an existing key keeps its place in an OrderedDict
        if not (keep_order and present):
            self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
        return entry

    def touch(self, key: K, entry: Entry[V], now: float) -> None:
        """Mark ``entry`` used now, for LRU and for refreshing."""
        entry.used = now
        self._data.move_to_end(key)

    def clear(self) -> None:
        self._data.clear()
