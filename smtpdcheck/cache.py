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

A flight is *background* work when no request asked for it: a refresh
ahead of expiry, a refresh started because a request was handed an expired
value, or a retry after a failed refresh.  Each costs the network (a query,
a connection to someone's primary), so each is paid for by a use of the
entry (see :class:`smtpdcheck.refresh.RefreshRules`) and counted by reason.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from .belief import Judgement, State, judge
from .refresh import RefreshRules, Schedule, make_rng
from .ttlcache import Entry as Entry, Source as Source, TTLCache as TTLCache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

log = logging.getLogger("smtpdcheck.cache")


Deliver = Callable[[V], None]
Producer = Callable[[Deliver[V]], Awaitable[None]]

#: Why a background fetch was started (the ``reason`` label of its counter).
REFRESH_AHEAD = "refresh-ahead"  # scheduled shortly before expiry
STALE_USE = "stale-use"  # a request was handed the expired value
RETRY_AFTER_FAILURE = "retry-after-failure"  # the last refresh failed; the last good value is served
REASONS = (REFRESH_AHEAD, STALE_USE, RETRY_AFTER_FAILURE)


@dataclass(eq=False)
class _Flight(Generic[V]):
    done: trio.Event = field(default_factory=trio.Event)
    value: V | None = None
    refresh: bool = False  # started to refresh a cached value, not for a waiting caller
    started: float = 0.0
    waiters: int = 0  # callers that waited for it (each a use of the key)
    running: bool = True  # its producer has not returned yet


class SingleFlight(Generic[K, V]):
    """Cache lookups, sharing one producer run among concurrent callers.

    ``produce_for(key)`` makes the producer that fetches ``key`` (a caller
    may pass its own for a miss).  A producer receives a ``deliver``
    callback.  It may deliver early and keep running (a probe reports "available" on the first greeting line and
    then says QUIT politely); if it ends without delivering, or raises, the
    waiters get ``fallback(exc)`` so nobody waits forever.

    With ``rules`` enabled, entries used within the window are refreshed in
    the background before they expire (by a task of this object's own, so a
    domain that sees one RCPT every few minutes is refreshed too), expired
    values are served while their refresh runs, and a refresh whose result
    ``is_failure`` keeps the last good value as long as the rules allow.
    Background fetches are paid for by uses: each use restores the entry's
    credits to ``rules.fetches_per_use`` and each background fetch spends
    one; none comes sooner than ``rules.floor`` after the entry's last
    fetch started; an entry holding a failure is neither refreshed nor
    served stale (its name is only asked again when a request needs it).
    Refreshes are flights like any other: callers share them.  They are
    made by ``refresh_for(key)`` (default ``produce_for``), so a producer
    can take its slot from the smaller background share of its limit.

    What a cached value is worth at any moment is
    :func:`smtpdcheck.belief.judge`'s to say; this class only applies it.
    ``confirm(value)`` gives the confirm grace of a value that is evidence
    to be confirmed (None for others), ``doubt(value, now)`` the stand-in
    answered for such a value when it is not believed, and
    ``revisable(value)`` says a value may be replaced by the flight that
    delivered it while that flight still runs.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        cache: TTLCache[K, V],
        ttl_of: Callable[[V], float],
        fallback: Callable[[BaseException | None], V],
        name: str = "flight",
        *,
        produce_for: Callable[[K], Producer[V]] | None = None,
        refresh_for: Callable[[K], Producer[V]] | None = None,
        rules: RefreshRules | None = None,
        is_failure: Callable[[V], bool] | None = None,
        describe: Callable[[K], str] = repr,
        reason_of: Callable[[V], str] | None = None,
        rng: random.Random | None = None,
        confirm: Callable[[V], float | None] | None = None,
        doubt: Callable[[V, float], V] | None = None,
        revisable: Callable[[V], bool] | None = None,
    ) -> None:
        self._nursery = nursery
        self.cache = cache
        self._clock = cache.clock
        self._ttl_of = ttl_of
        self._fallback = fallback
        self._inflight: dict[K, _Flight[V]] = {}
        self._produce_for = produce_for
        self._name = name
        self._describe = describe
        self._reason_of = reason_of
        self._confirm = confirm or (lambda value: None)
        self._doubt = doubt or (lambda value, now: value)
        self._revisable = revisable or (lambda value: False)
        # Flights that delivered and still run, by key (a probe saying QUIT,
        # or one that reported silence and still waits for a greeting).
        self._lingering: dict[K, _Flight[V]] = {}
        self.started = 0
        self.joined = 0
        self._running = 0
        self._flight_ended: trio.Event | None = None
        # Refreshing needs a way to fetch a key without a caller's producer.
        self._refresh_for = refresh_for or produce_for
        self.rules = rules if rules is not None and rules.enabled and self._refresh_for is not None else None
        # A fetch that learnt nothing (SERVFAIL, a timeout), as opposed to an
        # answer: a zero TTL is not a failure, it means "do not keep".
        self._is_failure = is_failure or (lambda value: False)
        self._rng = rng or make_rng()
        self._schedule: Schedule[K] = Schedule()
        self._wake = trio.Event()
        self.refreshes: Counter[str] = Counter()  # "ok" / "failed"
        self.background: Counter[str] = Counter()  # background fetches started, by reason (REASONS)
        self.stale_served = 0
        if self.rules is not None:
            nursery.start_soon(self._refresher, name=f"{name} refresher")

    @property
    def inflight(self) -> int:
        """Flights whose callers are still waiting for a value."""
        return len(self._inflight)

    def running_since(self, key: K) -> float | None:
        """When the flight now fetching ``key`` started, or None if none is.

        A cached value's owner may judge it by how long its renewal has
        been under way (a probe still unanswered after the primary's usual
        greeting time says more than the value it would replace).
        """
        flight = self._inflight.get(key)
        return None if flight is None else flight.started

    @property
    def lingering(self) -> int:
        """Flights that delivered and are ending politely (a probe saying QUIT).

        Not those whose value the flight may still replace (a probe that
        reported silence and waits on for a greeting): nobody needs them to end.
        """
        revisable = self._revisable
        return len([f for f in self._lingering.values() if f.value is None or not revisable(f.value)])

    def kept_fresh(self) -> int:
        """Entries a use still pays background fetches for, within the window; O(n), for scrapes."""
        rules = self.rules
        if rules is None:
            return 0
        now = self._clock()
        return sum(
            1 for _, e in self.cache.entries()
            if rules.may_fetch(e.credits, e.used, now) and not self._is_failure(e.value)
        )

    async def wait_lingering(self) -> None:
        """Return once no delivered flight is still finishing (bound it with a cancel scope)."""
        while self.lingering > 0:
            event = self._flight_ended = trio.Event()
            await event.wait()

    def _judge(self, key: K, entry: Entry[V], now: float) -> Judgement:
        """What ``entry`` is worth now (:func:`~smtpdcheck.belief.judge`); a judgement that uses it is a use.

        A use starts the fetch the judgement asks for, as background work
        (the value is served, or waited for only briefly, meanwhile).
        """
        rules = self.rules
        flight = self._inflight.get(key)
        lingering = self._lingering.get(key)
        verdict = judge(
            now,
            expires=entry.expires,
            stale_until=entry.stale_until if rules is not None else entry.expires,
            due=entry.due,
            fetch_started=None if flight is None else flight.started,
            can_fetch=(
                rules is not None and self._refresh_for is not None and now >= entry.not_before
                and rules.fetches_per_use >= 1
            ),
            revising=lingering is not None and lingering.value is entry.value and self._revisable(entry.value),
            confirm=self._confirm(entry.value),
        )
        if verdict.state is State.EXPIRED:
            return verdict
        self._use(key, entry, now)
        if verdict.fetch and self._refresh_for is not None:
            reason = RETRY_AFTER_FAILURE if entry.failing else STALE_USE
            self._start(key, self._refresh_for(key), refresh=True, reason=reason)
        return verdict

    def _use(self, key: K, entry: Entry[V], now: float) -> None:
        """A caller is handed ``entry``: LRU, the window, and the credits it buys."""
        self.cache.touch(key, entry, now)
        rules = self.rules
        if rules is None:
            return
        entry.credits = rules.fetches_per_use
        if entry.due == math.inf and key not in self._inflight and not self._is_failure(entry.value):
            # Its credits had run out (or it went idle): plan its refresh again.
            self._plan(key, entry, rules.refresh_at(entry.expires - entry.lead, entry.not_before))

    def cached(self, key: K) -> tuple[V, float, Source] | None:
        """A value usable without waiting, until when what is built on it may be kept, and whether it is stale; no I/O.

        The cache-only decision path uses this.  A value not believed comes
        back as its stand-in (``doubt``), stale; None when the caller must
        wait (nothing usable, or a fetch worth waiting for), which it does
        with :meth:`get`.  Statistics (hits, stale answers) are the caller's
        to count, with :meth:`count_served`, once it has used the value.
        """
        entry = self.cache.raw(key)
        if entry is None:
            return None
        now = self._clock()
        verdict = self._judge(key, entry, now)
        return self._served(entry, verdict, now)

    def _served(self, entry: Entry[V], verdict: Judgement, now: float) -> tuple[V, float, Source] | None:
        """What a caller is handed for ``verdict`` without waiting (None: it must wait)."""
        state = verdict.state
        if state is State.FRESH:
            return entry.value, verdict.until, Source.CACHE
        if state is State.STALE:
            return entry.value, verdict.until, Source.STALE
        if state is State.UNCONFIRMED:
            return self._doubt(entry.value, now), -math.inf, Source.STALE
        return None

    def count_served(self, hits: int, stale: int = 0) -> None:
        """Statistics for values taken with :meth:`cached`, as if each had come from :meth:`get`."""
        self.cache.count_hits(hits)
        self.stale_served += stale

    async def get(self, key: K, produce: Producer[V] | None = None) -> tuple[V, Source]:
        """Return ``(value, source)``; waits for a flight if nothing usable is cached.

        ``produce`` fetches the key on a miss (default: ``produce_for(key)``).
        A value whose fetch is worth waiting for (WAIT) is waited for until
        the judgement says, then judged again.
        """
        entry = self.cache.raw(key)
        if entry is not None:
            now = self._clock()
            verdict = self._judge(key, entry, now)
            if verdict.state is State.WAIT and key in self._inflight:
                with trio.move_on_at(verdict.until):
                    return await self._wait(self._inflight[key], joined=True)
                now = self._clock()
                verdict = self._judge(key, entry, now)
            served = self._served(entry, verdict, now)
            if served is not None:
                self.cache.hits += 1
                if served[2] is Source.STALE:
                    self.stale_served += 1
                await trio.lowlevel.checkpoint()
                return served[0], served[2]
        flight = self._inflight.get(key)
        if flight is None:
            if produce is None:
                if self._produce_for is None:
                    raise TypeError(f"{self._name}: no producer for {key!r}")
                produce = self._produce_for(key)
            return await self._wait(self._start(key, produce, refresh=False), joined=False)
        return await self._wait(flight, joined=True)

    async def _wait(self, flight: _Flight[V], *, joined: bool) -> tuple[V, Source]:
        self.cache.misses += 1
        self.joined += joined
        flight.waiters += 1
        await flight.done.wait()
        assert flight.value is not None
        return flight.value, Source.NETWORK

    def _start(self, key: K, produce: Producer[V], *, refresh: bool, reason: str = "") -> _Flight[V]:
        flight: _Flight[V] = _Flight(refresh=refresh, started=self._clock())
        if refresh:
            self.background[reason] += 1
            entry = self.cache.raw(key)
            if entry is not None:
                entry.credits -= 1
                entry.due = math.inf  # the flight plans the next one when it lands
        self._inflight[key] = flight
        self.started += 1
        self._nursery.start_soon(self._fly, key, flight, produce, name=f"{self._name} {key!r}")
        return flight

    def _deliver(self, key: K, flight: _Flight[V], value: V, *, store: bool = True) -> None:
        now = self._clock()
        old = self.cache.raw(key)
        if flight.done.is_set():
            # A producer that delivers again revises its own answer (a
            # greeting after the probe reported silence): it replaces the
            # cached value if that is still the one this flight delivered.
            if store and old is not None and old.value is flight.value and key not in self._inflight:
                self._store(key, flight, value, now, old)
            return
        rules = self.rules
        if rules is not None and old is not None and self._is_failure(value) and not self._is_failure(old.value):
            keep_until = rules.keep_after_failure_until(old.expires, old.stale_until)
            if now < keep_until:
                # The last good value stays; callers waiting on this flight get it too.
                self.refreshes["failed"] += 1
                if not old.failing:
                    why = f" ({self._reason_of(value)})" if self._reason_of is not None else ""
                    log.warning(
                        "%s %s: refresh failed%s; serving the stale last good answer for up to %gs",
                        self._name, self._describe(key), why, keep_until - max(now, old.expires),
                    )
                old.failing = True
                old.stale_until = keep_until
                old.not_before = max(now + rules.retry_after, rules.not_before(flight.started))
                if flight.waiters:
                    self._use(key, old, now)
                self._finish(key, flight, old.value)
                self._plan_next(key, old, old.not_before)
                return
        if flight.refresh:
            self.refreshes["failed" if self._is_failure(value) else "ok"] += 1
        if old is not None and old.failing and not self._is_failure(value):
            log.info("%s %s: answering again", self._name, self._describe(key))
        self._finish(key, flight, value)
        if not store:
            return
        if old is None and not flight.waiters:
            return  # a refresh of an entry evicted meanwhile, that nobody waited for
        self._store(key, flight, value, now, old)

    def _store(self, key: K, flight: _Flight[V], value: V, now: float, old: Entry[V] | None) -> None:
        """Cache what ``flight`` fetched, and plan the entry's next refresh."""
        rules = self.rules
        ttl = self._ttl_of(value)
        failed = self._is_failure(value)
        stale_until = None if rules is None or failed else rules.stale_until(now + ttl)
        # A refresh nobody waited for is not a use: it keeps the entry's
        # place in LRU order, its last use and the credits that use left.
        unused = old is not None and not flight.waiters
        entry = self.cache.put(key, value, ttl, stale_until=stale_until, keep_order=unused)
        if entry is None or rules is None:
            return
        if unused:
            assert old is not None
            entry.used, entry.credits = old.used, old.credits
        else:
            entry.credits = rules.fetches_per_use
        entry.not_before = rules.not_before(flight.started)
        if failed:
            return  # never refreshed in the background: asked again only when a request needs it
        # Jitter only when an entry is first stored: its refreshes keep
        # that phase, so entries cached in one burst stay spread out,
        # and refreshes come once per TTL on average, not more often.
        jitter = 0.0 if flight.refresh else self._rng.random()
        due = rules.due(entry.expires, ttl, now - flight.started, jitter)
        entry.lead = entry.expires - due
        self._plan_next(key, entry, rules.refresh_at(due, entry.not_before))

    def _abandon(self, key: K, flight: _Flight[V]) -> None:
        """A flight that ended without an answer (cancelled at shutdown, or a
        producer that returned without delivering): nothing is learnt, so
        nothing is counted or logged; waiters get the cached value if there
        is a good one, else the fallback."""
        old = self.cache.raw(key)
        keep = (
            old is not None and self.rules is not None and not self._is_failure(old.value)
            and self._clock() < old.stale_until
        )
        if old is not None:
            old.due = math.inf  # a later use plans its refresh again
        self._finish(key, flight, old.value if keep and old is not None else self._fallback(None))

    def _finish(self, key: K, flight: _Flight[V], value: V) -> None:
        flight.value = value
        flight.done.set()
        if self._inflight.get(key) is flight:
            del self._inflight[key]
            if flight.running:
                self._lingering[key] = flight

    def _plan_next(self, key: K, entry: Entry[V], at: float) -> None:
        """Plan the next background fetch at ``at`` if the last use still pays for one."""
        if entry.credits >= 1:
            self._plan(key, entry, at)
        else:
            entry.due = math.inf  # a use plans it again

    def _plan(self, key: K, entry: Entry[V], due: float) -> None:
        entry.due = due
        if self._schedule.push(key, due):
            self._wake.set()
        # Superseded and evicted keys' times stay in the heap until they
        # come up; compacting once they are a quarter of the live ones
        # keeps the heap's peak (and so the daemon's resident size) near
        # the cache's own, for a linear rebuild every max_entries / 4 plans.
        if len(self._schedule) > self.cache.max_entries + self.cache.max_entries // 4 + 64:
            self._schedule.compact((k, e.due) for k, e in self.cache.entries())

    async def _refresher(self) -> None:
        """Start the refreshes that are due, sleeping until the next one."""
        rules, refresh_for = self.rules, self._refresh_for
        assert rules is not None and refresh_for is not None
        while True:
            now = self._clock()
            for key, due in self._schedule.pop_due(now):
                entry = self.cache.raw(key)
                if entry is None or entry.due != due:
                    continue  # gone, or rescheduled since
                if key in self._inflight or not rules.may_fetch(entry.credits, entry.used, now):
                    # A flight is on it (it plans the next when it lands), or
                    # no use pays for one: let it expire until a use plans it again.
                    entry.due = math.inf
                    continue
                if now < entry.not_before:
                    self._plan(key, entry, entry.not_before)
                    continue
                reason = RETRY_AFTER_FAILURE if entry.failing else REFRESH_AHEAD
                self._start(key, refresh_for(key), refresh=True, reason=reason)
            self._wake = trio.Event()
            with trio.move_on_at(self._schedule.next_due()):
                await self._wake.wait()

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
            flight.running = False
            if self._lingering.get(key) is flight:
                del self._lingering[key]
            if not flight.done.is_set():
                if error is None:
                    self._abandon(key, flight)
                else:
                    # A bug: waiters get the fallback, which is not cached;
                    # a last good value may stay, as after a failed refresh.
                    self._deliver(key, flight, self._fallback(error), store=False)
            if self._flight_ended is not None:
                self._flight_ended.set()
                self._flight_ended = None
