"""Probing one address for an SMTP greeting.

"Available" means what the man page means: a TCP connection to the SMTP
port and a greeting whose first line has code 220, within the deadline.
Everything else -- refused, reset, closed, silent, 421, 554, garbage -- is
"not available", and each of those is recorded distinctly because an admin
reading the log wants to know *why* a primary was judged down.
"""

from __future__ import annotations

import enum
import errno
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Final, TypeAlias

import trio

from .cache import Producer, SingleFlight, Source, TTLCache
from .confirm import Belief, believe_up
from .refresh import RefreshRules, background_slots
from .greeting import MAX_GREETING_BYTES, GreetingError, GreetingReader
from .servers import IPAddress

log = logging.getLogger("smtpdcheck.probe")

QUIT_GRACE_S: Final = 2.0

#: No address is probed in the background more often than this, whatever
#: --cache-up-ttl / --cache-down-ttl say.  Probes are not limited per use
#: (a primary's state must stay current while its domains see mail); the
#: refresh window ends them once the mail stops.
PROBE_REFRESH_FLOOR_S: Final = 1.0
RECEIVE_CHUNK: Final = 1024

#: How a probe opens its connection: ``trio.open_tcp_stream`` on the wire,
#: an in-memory stream pair in tests that run on virtual time.
Connect: TypeAlias = Callable[[str, int], Awaitable[trio.abc.Stream]]


class Outcome(enum.Enum):
    AVAILABLE = "available"
    DECLINED = "declined"  # greeted, but with a code other than 220 (421, 554, ...)
    CONNECT_FAILED = "connect failed"
    TIMEOUT = "timeout"
    CLOSED = "closed"  # EOF or reset before a greeting line
    BAD_GREETING = "bad greeting"
    OVERLOADED = "not probed"  # our own probe limit, not the server's fault
    ERROR = "error"
    # Not a probe's outcome: a cached "up" whose confirming probe is overdue
    # (see smtpdcheck.confirm); treated as not up, never cached.
    UNCONFIRMED = "unconfirmed"


#: What a probe can come back with (UNCONFIRMED is the cache's verdict, not a probe's).
PROBE_OUTCOMES: Final = tuple(o for o in Outcome if o is not Outcome.UNCONFIRMED)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    outcome: Outcome
    address: str
    port: int
    detail: str = ""
    elapsed: float = 0.0
    name: str = ""  # the MX host it was probed for, for log lines (a background refresh has no caller)
    # When the probe came back (trio time): for an "up", the greeting a DEFER rests on.
    at: float = field(default=math.nan, compare=False)
    # When the address entered its present state (the first of a run of results
    # that agree): how long it had been up or down when it changes.
    since: float = field(default=math.nan, compare=False)

    @property
    def available(self) -> bool:
        return self.outcome is Outcome.AVAILABLE

    def describe(self) -> str:
        target = f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"
        detail = f" ({self.detail})" if self.detail else ""
        return f"{target} {self.outcome.value}{detail}"


def printable(text: str, limit: int = 120) -> str:
    """Peer text for logs: printable ASCII only, bounded."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


def _os_error_text(exc: BaseException) -> str:
    """The errno name (ECONNREFUSED, ...) of an error, digging through causes.

    trio.open_tcp_stream reports a failed connect as a generic OSError whose
    cause holds the real per-attempt errors.
    """
    seen = 0
    todo: list[BaseException] = [exc]
    while todo and seen < 16:
        current = todo.pop(0)
        seen += 1
        number = getattr(current, "errno", None)
        if isinstance(number, int):
            return errno.errorcode.get(number, str(number))
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        if current.__cause__ is not None:
            todo.append(current.__cause__)
    return type(exc).__name__


async def probe_greeting(
    address: IPAddress | str,
    port: int,
    timeout: float,
    deliver: Callable[[ProbeResult], None],
    *,
    quit_grace: float = QUIT_GRACE_S,
    connect: Connect = trio.open_tcp_stream,
    deadline: float = math.inf,
    name: str = "",
) -> None:
    """Connect, read the first greeting line, deliver the verdict, then leave politely.

    The greeting must arrive within ``timeout`` (0 = no limit) and before
    ``deadline`` (absolute trio time), whichever comes first.

    The verdict is delivered as soon as the first line is read; the task then
    goes on (bounded by ``quit_grace`` and ``timeout``) to read the rest of a
    multi-line greeting and say QUIT, so the primary does not log a lost
    connection.  Nothing is ever sent before the greeting is complete.
    """
    start = trio.current_time()
    host = str(address)
    delivered = False

    def finish(outcome: Outcome, detail: str = "") -> None:
        nonlocal delivered
        if not delivered:
            delivered = True
            now = trio.current_time()
            deliver(ProbeResult(outcome, host, port, detail, now - start, name, at=now, since=now))

    if timeout > 0:
        deadline = min(deadline, start + timeout)
    with trio.move_on_at(deadline):
        try:
            stream = await connect(host, port)
        except OSError as exc:
            finish(Outcome.CONNECT_FAILED, _os_error_text(exc))
            return
        async with stream:
            reader = GreetingReader()
            try:
                while reader.first is None:
                    data = await stream.receive_some(RECEIVE_CHUNK)
                    reader.feed(data)
                    if reader.eof:
                        finish(Outcome.CLOSED, "closed before greeting")
                        return
            except GreetingError as exc:
                finish(Outcome.BAD_GREETING, str(exc))
                return
            except (trio.BrokenResourceError, OSError) as exc:
                finish(Outcome.CLOSED, _os_error_text(exc))
                return
            first = reader.first
            line = printable(f"{first.code}{'-' if first.continues else ' '}{first.text}")
            finish(Outcome.AVAILABLE if first.available else Outcome.DECLINED, line)
            with trio.move_on_after(quit_grace):
                await _say_quit(stream, reader)
    finish(Outcome.TIMEOUT, f"no greeting within {timeout:g}s")


async def _say_quit(stream: trio.abc.Stream, reader: GreetingReader) -> None:
    """Finish reading the greeting, send QUIT and wait for its reply.

    Waiting for the reply before closing avoids a reset (closing with unread
    data) that the primary would log as an error.  Any failure here is
    irrelevant to the verdict, which is already delivered.
    """
    try:
        while not reader.complete and not reader.eof:
            reader.feed(await stream.receive_some(RECEIVE_CHUNK))
        if not reader.complete:
            return
        await stream.send_all(b"QUIT\r\n")
        seen = 0
        while seen < MAX_GREETING_BYTES:
            data = await stream.receive_some(RECEIVE_CHUNK)
            if not data or b"\n" in data:
                return
            seen += len(data)
    except (GreetingError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return


def _grace(timeout: float) -> float:
    """How long past expiry a probe result may be served while it is probed again."""
    return timeout if timeout > 0 else QUIT_GRACE_S


class Prober:
    """Probes with a shared result cache, single-flight and a global limit.

    Args:
        nursery: where probe flights run; it must outlive every caller.
        timeout: the whole budget of one probe: waiting for a slot under
            ``max_concurrent``, connecting, and reading the first greeting
            line.  A probe that could not get a slot in time is "not
            probed" (our limit, not the server's fault) and is not cached.
        up_ttl / down_ttl: how long "available" / "not available" is believed.
        max_concurrent: probes connecting at once, process-wide; background
            probes (refreshes) may hold only
            :func:`~smtpdcheck.refresh.background_slots` of them, the rest
            is kept for probes a request waits for.
        connect: opens the connection (a seam for tests on virtual time).
        refresh_window: results used within this many seconds are probed
            again before they expire, and served (up to ``timeout`` past
            expiry) while that probe runs; 0 = neither.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        timeout: float,
        up_ttl: float = 10.0,
        down_ttl: float = 60.0,
        max_entries: int = 10_000,
        max_concurrent: int = 200,
        quit_grace: float = QUIT_GRACE_S,
        connect: Connect = trio.open_tcp_stream,
        refresh_window: float = 0.0,
    ) -> None:
        self.timeout = timeout
        self.up_ttl = up_ttl
        self.down_ttl = down_ttl
        self.quit_grace = quit_grace
        self._connect = connect
        self.limiter = trio.CapacityLimiter(max_concurrent)
        # Background probes take a slot here first, then one of ``limiter``.
        self.background_limiter = trio.CapacityLimiter(background_slots(max_concurrent))
        self.outcomes: dict[Outcome, int] = dict.fromkeys(PROBE_OUTCOMES, 0)
        self.flights: SingleFlight[tuple[str, int], ProbeResult] = SingleFlight(
            nursery,
            TTLCache(max_entries),
            self._ttl_of,
            lambda exc: ProbeResult(Outcome.ERROR, "?", 0, type(exc).__name__ if exc else "no result"),
            name="probe",
            produce_for=self._refetch,
            rules=RefreshRules(
                window=refresh_window, stale_grace=_grace(timeout), retry_after=1.0, floor=PROBE_REFRESH_FLOOR_S,
            ),
            # Only "we could not probe" is a failure; a TTL of 0 means "do not keep".
            is_failure=lambda result: result.outcome in (Outcome.OVERLOADED, Outcome.ERROR),
            describe=lambda key: f"{key[0]}:{key[1]}",
        )

    def reconfigure(self, *, timeout: float, up_ttl: float, down_ttl: float) -> None:
        """New timeout and TTLs (a reload); the stale grace follows the timeout."""
        self.timeout = timeout
        self.up_ttl = up_ttl
        self.down_ttl = down_ttl
        if self.flights.rules is not None:
            self.flights.rules = replace(self.flights.rules, stale_grace=_grace(timeout))

    def _ttl_of(self, result: ProbeResult) -> float:
        if result.outcome is Outcome.AVAILABLE:
            return self.up_ttl
        if result.outcome in (Outcome.OVERLOADED, Outcome.ERROR):
            return 0.0
        return self.down_ttl

    def cached(self, address: IPAddress, port: int) -> tuple[ProbeResult, float, Source] | None:
        """A result usable without waiting, until when it holds and whether it is stale; no I/O.

        It holds until it expires or its refresh starts, whichever is first.

        An "up" whose confirming probe is overdue comes back UNCONFIRMED (it
        expires at once: nothing built on it is reused).
        """
        return self._from_cache((str(address), port))

    def count_cache_hits(self, n: int, stale: int = 0) -> None:
        self.flights.count_served(n, stale)

    async def probe(self, address: IPAddress, port: int, name: str = "") -> tuple[ProbeResult, Source]:
        """Return ``(result, where it came from)`` for one address; ``name`` is for the log.

        Waits only when nothing usable is cached: an "up" that is no longer
        believed is answered at once as UNCONFIRMED, not by waiting for the
        probe that would settle it.
        """
        key = (str(address), port)
        got = self._from_cache(key)
        if got is not None:
            self.flights.count_served(1, int(got[2] is Source.STALE))
            await trio.lowlevel.checkpoint()
            return got[0], got[2]
        return await self.flights.get(key, self._producer(key, name))

    def _from_cache(self, key: tuple[str, int]) -> tuple[ProbeResult, float, Source] | None:
        got = self.flights.cached(key)  # starts the confirming probe of an expired entry
        doubt = self._doubted(key, self.flights.cache.clock())
        if doubt is not None:
            return doubt, -math.inf, Source.STALE
        if got is None:
            return None
        result, expires, source = got
        entry = self.flights.cache.raw(key)
        # Its refresh may land a new state before it expires (a primary back
        # up is seen a whole silent probe earlier): what is built on this
        # result is not kept past the time that refresh starts, nor at all
        # while it runs (it may land at any moment).
        if self.flights.running_since(key) is not None:
            return result, -math.inf, source
        due = entry.due if entry is not None else expires
        return result, min(expires, due), source

    def _doubted(self, key: tuple[str, int], now: float) -> ProbeResult | None:
        """An UNCONFIRMED stand-in for a cached "up" that is no longer believed, else None.

        None also when the entry has expired for good with no probe under way
        (unused for a while): the caller then probes and waits, as after any
        expiry.
        """
        entry = self.flights.cache.raw(key)
        if entry is None or not entry.value.available or now < entry.expires:
            return None
        started = self.flights.running_since(key)
        if started is None and now >= entry.stale_until:
            return None
        up = entry.value
        if believe_up(now, entry.expires, started, up.elapsed, self.timeout) is not Belief.UNCONFIRMED:
            return None
        return ProbeResult(
            Outcome.UNCONFIRMED, up.address, up.port, f"last greeting {now - up.at:.1f}s ago",
            name=up.name, at=up.at, since=up.since,
        )

    def _refetch(self, key: tuple[str, int]) -> Producer[ProbeResult]:
        """A refresh probes for the MX host the cached result was probed for, in the background share."""
        entry = self.flights.cache.raw(key)
        return self._producer(key, entry.value.name if entry is not None else "", background=True)

    def _producer(self, key: tuple[str, int], name: str, *, background: bool = False) -> Producer[ProbeResult]:
        address, port = key
        limiters = (self.background_limiter, self.limiter) if background else (self.limiter,)

        async def produce(deliver: Callable[[ProbeResult], None]) -> None:
            def counted(result: ProbeResult) -> None:
                self.outcomes[result.outcome] += 1
                deliver(self._note_change(key, name, result))

            timeout = self.timeout
            deadline = trio.current_time() + timeout if timeout > 0 else math.inf
            held: list[trio.CapacityLimiter] = []
            try:
                with trio.move_on_at(deadline):
                    for limiter in limiters:
                        await limiter.acquire()
                        held.append(limiter)
                if len(held) < len(limiters):
                    counted(ProbeResult(Outcome.OVERLOADED, address, port, "probe limit reached", name=name))
                    return
                # The slot wait came out of the same budget: --timeout bounds
                # the whole probe as the caller sees it.
                await probe_greeting(
                    address, port, timeout, counted, quit_grace=self.quit_grace, connect=self._connect,
                    deadline=deadline, name=name,
                )
            finally:
                for limiter in reversed(held):
                    limiter.release()

        return produce

    def _note_change(self, key: tuple[str, int], name: str, result: ProbeResult) -> ProbeResult:
        """Carry the start of the present state over, and log one line when it changes.

        The line is what an admin watching a failover wants: which address,
        what it did, how long it had been in its old state and, for an "up"
        that ends, how old its last greeting was (a DEFER may have rested on
        it until then).
        """
        if result.outcome in (Outcome.OVERLOADED, Outcome.ERROR):
            return result  # says nothing about the server
        old = self.flights.cache.raw(key)
        if old is None:
            return result
        before = old.value
        if before.available == result.available:
            # The same state, still believed: it began when the old one did.
            if result.at < old.stale_until and not math.isnan(before.since):
                return replace(result, since=before.since)
            return result
        def state(r: ProbeResult) -> str:
            return "up" if r.available else "down"
        address = f"[{key[0]}]" if key[1] == 25 else f"[{key[0]}]:{key[1]}"
        label = f"{printable(name)} {address}" if name else address
        held = "" if math.isnan(before.since) else f" after {result.at - before.since:.1f}s {state(before)}"
        last = f", last greeting {result.at - before.at:.1f}s ago" if before.available and not math.isnan(before.at) else ""
        log.warning("%s %s -> %s (%s)%s%s", label, state(before), state(result), result.outcome.value, held, last)
        return result
