"""When to refresh a cached answer, and how long an old one may still be served.

A backup MX matters most while its primary is down, and that is exactly
when a cache expiry would make an RCPT wait a full probe timeout.  So an
entry that is in use is refreshed in the background shortly before it
expires (as unbound's ``prefetch`` does), and while a refresh is still
running past expiry the old value is served, for a bounded time (RFC 8767
"serve stale", with the upper bound unbound was criticised for lacking).

Background work must be paid for by traffic, or one RCPT for a name with a
TTL of a second buys a query a second for the whole window.  So a use
buys a fixed number of background fetches (``fetches_per_use``), no entry
is fetched in the background more often than a floor (``floor``), an entry
that holds a failure is never refreshed in the background, and background
work gets only part of each concurrency limit (:func:`background_slots`).

Everything here is arithmetic on times and keys -- no I/O, no trio -- so the
rules are tested with plain calls; :class:`smtpdcheck.cache.SingleFlight`
applies them.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

K = TypeVar("K", bound=Hashable)

#: Jitter of a refresh time, as a fraction of the TTL (and at most the stale
#: grace): entries stored in one burst are not all refreshed in one instant.
MAX_JITTER = 0.1
#: No failed refresh is retried sooner than this, whatever a cache's own
#: retry interval (--dns-failure-ttl) says.
MIN_RETRY_AFTER_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class RefreshRules:
    """The rules for one cache.

    Args:
        window: entries used within this many seconds are kept fresh;
            0 turns refreshing and serving stale off.
        stale_grace: past expiry, the old value is served this long while a
            refresh runs (the producer's own timeout: a refresh that takes
            longer has failed anyway).
        failure_stale_max: a refresh that *fails* keeps the last good value
            up to this long past its expiry (0: only ``stale_grace``).
        retry_after: after a failed refresh, wait this long before the next.
        fetches_per_use: a use of an entry buys this many background
            fetches (refreshes and retries), counted from the last use, not
            added up; ``math.inf``: as many as the window allows.
        floor: no entry is fetched in the background twice within this many
            seconds, whatever its TTL.
    """

    window: float
    stale_grace: float
    failure_stale_max: float = 0.0
    retry_after: float = MIN_RETRY_AFTER_S
    fetches_per_use: float = math.inf
    floor: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.window > 0

    def due(self, expires: float, ttl: float, took: float, jitter: float) -> float:
        """When an entry expiring at ``expires`` should be refreshed; ``jitter`` in [0, 1).

        As long before expiry as its last answer took to come (``took``), so
        the new answer lands just in time; minus a little jitter when the
        entry is first stored (``jitter`` 0 for its refreshes, which keep the
        phase).  Starting earlier every time would make more than one probe
        per TTL in the long run; starting later would serve stale values
        every time.
        """
        return expires - took - jitter * min(MAX_JITTER * ttl, self.stale_grace)

    def not_before(self, fetched: float) -> float:
        """The earliest background fetch of an entry whose last fetch started at ``fetched``."""
        return fetched + self.floor

    def refresh_at(self, due: float, not_before: float) -> float:
        """When a refresh due at ``due`` may start: never before the floor allows."""
        return max(due, not_before)

    def kept_fresh(self, used: float, now: float) -> bool:
        """Whether an entry last used at ``used`` is still worth refreshing."""
        return self.enabled and now - used <= self.window

    def may_fetch(self, credits: float, used: float, now: float) -> bool:
        """Whether an entry may be fetched in the background now: a use paid for it, within the window."""
        return credits >= 1 and self.kept_fresh(used, now)

    def stale_until(self, expires: float) -> float:
        """How long an expired value may be served while its refresh runs."""
        return expires + self.stale_grace if self.enabled else expires

    def keep_after_failure_until(self, expires: float, stale_until: float) -> float:
        """How long the last good value may be served once a refresh has failed."""
        if not self.enabled:
            return expires
        if self.failure_stale_max > 0:
            return max(stale_until, expires + self.failure_stale_max)
        return stale_until


@dataclass
class Schedule(Generic[K]):
    """Refresh times of keys: a heap, with superseded times skipped when they come up.

    A key rescheduled keeps its old heap item until it surfaces; the item
    carries the time it was scheduled for, and the caller checks that the
    key is still due then (``entry.due == due``).  ``compact`` rebuilds the
    heap from the live times when stale items pile up.

    Items are ``(due, key)`` pairs, with no insertion counter: there is one
    item per cached entry, and a counter would be an int object each.  Keys
    (names, addresses) compare, so equal times are ordered by key.
    """

    _heap: list[tuple[float, K]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, key: K, due: float) -> bool:
        """Schedule ``key`` at ``due``; True when it is now the earliest (wake the runner)."""
        earliest = self._heap[0][0] if self._heap else math.inf
        heapq.heappush(self._heap, (due, key))
        return due < earliest

    def next_due(self) -> float:
        return self._heap[0][0] if self._heap else math.inf

    def pop_due(self, now: float) -> list[tuple[K, float]]:
        """Every ``(key, due)`` whose time has come, earliest first."""
        out: list[tuple[K, float]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, key = heapq.heappop(heap)
            out.append((key, due))
        return out

    def compact(self, live: Iterable[tuple[K, float]]) -> None:
        """Keep only the given ``(key, due)`` pairs (finite times only)."""
        self._heap = [(due, key) for key, due in live if due < math.inf]
        heapq.heapify(self._heap)


def background_slots(limit: int) -> int:
    """How many of ``limit`` concurrent fetches background work may hold.

    Half, rounded down (at least one): the rest is kept for lookups and
    probes that a request is waiting for, so refreshes piling up behind a
    dead server cannot make new requests queue.
    """
    return max(1, limit // 2)


def make_rng(seed: int | None = None) -> random.Random:
    """The jitter source; tests pass a seed to get the same times every run."""
    return random.Random(seed)
