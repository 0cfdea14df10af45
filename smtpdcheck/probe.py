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

from . import defaults
from .cache import Producer, SingleFlight, Source, TTLCache
from .belief import confirm_grace
from .refresh import MIN_RETRY_AFTER_S, RefreshRules, background_slots
from .greeting import MAX_GREETING_BYTES, GreetingError, GreetingReader
from .servers import IPAddress

log = logging.getLogger("smtpdcheck.probe")

#: The politeness budget: once a probe has its verdict (the greeting's first
#: line), it may take this long to end the conversation as a client should:
#: read the greeting to its last line, say QUIT, read the 221 and close.
#: Postscreen sends a "220-" teaser at once and the last line only after its
#: greet wait (6 s by default); a client that hangs up before it is logged
#: as a HANGUP, which fail2ban's aggressive and ddos modes count towards a
#: ban of this host.  The probe's slot is held until the conversation ends.
QUIT_GRACE_S: Final = 15.0
#: How long a probe waits for a greeting at all, from the connect (the
#: daemon's --greeting-timeout).  RFC 5321 4.5.3.2 asks a client to wait
#: 5 minutes; a primary that delays its greeting on purpose (exim's connect
#: ACL ``delay``, sendmail's greet_pause) typically waits 5 to 30 s.  A probe
#: that is still silent when a request may wait no longer (--timeout) is
#: reported as a timeout then, and revised if the greeting comes after.
GREETING_TIMEOUT_S: Final = 40.0

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
    # (see smtpdcheck.belief); treated as not up, never cached.
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
    silent_at: float = math.inf,
    name: str = "",
) -> None:
    """Connect, read the first greeting line, deliver the verdict, then end the conversation properly.

    The greeting's first line must arrive within ``timeout`` (0 = no limit)
    and before ``deadline`` (absolute trio time), whichever comes first.

    The verdict is delivered as soon as the first line is read.  Then, with
    nobody waiting on it, the task reads the rest of a multi-line greeting,
    says QUIT and reads the reply, within ``quit_grace`` of the first line,
    so the primary logs a client that left properly.  Nothing is ever sent
    before the greeting is complete.

    A probe still silent at ``silent_at`` (absolute trio time, before the
    deadline) delivers TIMEOUT then, for the requests that cannot wait
    longer, and keeps waiting: a 220 that comes later is delivered too, and
    replaces the timeout.  Nothing else is delivered after it.
    """
    start = trio.current_time()
    host = str(address)
    delivered: Outcome | None = None

    def finish(outcome: Outcome, detail: str = "") -> None:
        nonlocal delivered
        if delivered is None or (delivered is Outcome.TIMEOUT and outcome is Outcome.AVAILABLE):
            delivered = outcome
            now = trio.current_time()
            deliver(ProbeResult(outcome, host, port, detail, now - start, name, at=now, since=now))

    if timeout > 0:
        deadline = min(deadline, start + timeout)

    async def report_silence() -> None:
        await trio.sleep_until(silent_at)
        finish(Outcome.TIMEOUT, f"no greeting within {silent_at - start:g}s")

    async with trio.open_nursery() as nursery:
        if silent_at < deadline:
            nursery.start_soon(report_silence)
        await _converse(host, port, connect, deadline, quit_grace, finish)
        nursery.cancel_scope.cancel()
    finish(Outcome.TIMEOUT, f"no greeting within {deadline - start:g}s")


async def _converse(
    host: str, port: int, connect: Connect, deadline: float, quit_grace: float,
    finish: Callable[[Outcome, str], None],
) -> None:
    """The conversation of :func:`probe_greeting`: returns having finished it, or at the deadline without a greeting."""
    stream: trio.abc.Stream | None = None
    with trio.move_on_at(deadline):
        try:
            stream = await connect(host, port)
        except OSError as exc:
            finish(Outcome.CONNECT_FAILED, _os_error_text(exc))
            return
    if stream is None:
        return
    async with stream:
        reader = GreetingReader()
        with trio.move_on_at(deadline):
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
        if first is None:
            return  # the deadline passed in silence
        line = printable(f"{first.code}{'-' if first.continues else ' '}{first.text}")
        finish(Outcome.AVAILABLE if first.available else Outcome.DECLINED, line)
        # The verdict is in: the rest is politeness, measured from the first
        # line, not from the connect (a slow greeter answering just before
        # the deadline still gets its QUIT).
        with trio.move_on_after(quit_grace):
            await _say_quit(stream, reader)


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


class Prober:
    """Probes with a shared result cache, single-flight and a global limit.

    Two budgets, because a request and a primary see time differently: a
    request may wait ``timeout`` for a probe's verdict (its RCPT is open
    meanwhile), while a primary may take up to ``greeting_timeout`` to greet
    (one that delays its greeting on purpose is up, not dead).

    Args:
        nursery: where probe flights run; it must outlive every caller.
        timeout: how long a request waits for a probe: for a probe slot
            under ``max_concurrent`` (a probe that could not get one in time
            is "not probed", our limit, not the server's fault, and is not
            cached), and for the greeting, after which the probe reports a
            timeout (later, for a primary known to greet slower: see
            :func:`~smtpdcheck.belief.confirm_grace`) and goes on waiting.
        greeting_timeout: how long a probe waits for the greeting's first
            line at all, from its start; a 220 that comes after ``timeout``
            replaces the timeout in the cache.  At least ``timeout``.
        up_ttl / down_ttl: how long "available" / "not available" is believed.
        max_concurrent: probes open at once, process-wide, including those
            ending their conversation (``quit_grace``); background probes
            (refreshes) may hold only
            :func:`~smtpdcheck.refresh.background_slots` of them, the rest
            is kept for probes a request waits for.
        quit_grace: the politeness budget (:data:`QUIT_GRACE_S`).
        connect: opens the connection (a seam for tests on virtual time).
        refresh_window: results used within this many seconds are probed
            again before they expire, and served (up to ``greeting_timeout``
            past expiry, an "up" only as :func:`~smtpdcheck.belief.judge`
            says) while that probe runs; 0 = neither.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        timeout: float,
        greeting_timeout: float | None = None,
        up_ttl: float = defaults.UP_TTL_S,
        down_ttl: float = defaults.DOWN_TTL_S,
        max_entries: int = defaults.CACHE_SIZE,
        max_concurrent: int = defaults.MAX_PROBES,
        quit_grace: float = QUIT_GRACE_S,
        connect: Connect = trio.open_tcp_stream,
        refresh_window: float = 0.0,
    ) -> None:
        self.timeout = timeout
        self.greeting_timeout = timeout if greeting_timeout is None else greeting_timeout
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
                window=refresh_window, stale_grace=self._stale_grace, retry_after=MIN_RETRY_AFTER_S, floor=PROBE_REFRESH_FLOOR_S,
            ),
            # Only "we could not probe" is a failure; a TTL of 0 means "do not keep".
            is_failure=lambda result: result.outcome in (Outcome.OVERLOADED, Outcome.ERROR),
            describe=lambda key: f"{key[0]}:{key[1]}",
            # An "up" is evidence with an age (smtpdcheck.belief); a reported
            # silence may be replaced by a greeting while its probe still waits.
            confirm=lambda result: confirm_grace(result.elapsed, self.greeting_timeout) if result.available else None,
            doubt=_unconfirmed,
            revisable=lambda result: result.outcome is Outcome.TIMEOUT,
        )

    @property
    def _stale_grace(self) -> float:
        """How long past expiry a result may be served while it is probed again: as long as that probe may run."""
        budget = max(self.timeout, self.greeting_timeout)
        return budget if budget > 0 else QUIT_GRACE_S

    def reconfigure(self, *, timeout: float, greeting_timeout: float, up_ttl: float, down_ttl: float) -> None:
        """New budgets and TTLs (a reload); the stale grace follows the budgets."""
        self.timeout = timeout
        self.greeting_timeout = greeting_timeout
        self.up_ttl = up_ttl
        self.down_ttl = down_ttl
        if self.flights.rules is not None:
            self.flights.rules = replace(self.flights.rules, stale_grace=self._stale_grace)

    def _ttl_of(self, result: ProbeResult) -> float:
        if result.outcome is Outcome.AVAILABLE:
            return self.up_ttl
        if result.outcome in (Outcome.OVERLOADED, Outcome.ERROR):
            return 0.0
        return self.down_ttl

    def cached(self, address: IPAddress, port: int) -> tuple[ProbeResult, float, Source] | None:
        """A result usable without waiting, until when what is built on it may be kept, and whether it is stale; no I/O.

        An "up" no longer believed comes back UNCONFIRMED (nothing built on
        it is kept); None when the caller must wait: nothing usable, or an
        "up" being confirmed by a probe worth waiting for (:meth:`probe`).
        """
        return self.flights.cached((str(address), port))

    def count_cache_hits(self, n: int, stale: int = 0) -> None:
        self.flights.count_served(n, stale)

    async def probe(self, address: IPAddress, port: int, name: str = "") -> tuple[ProbeResult, Source]:
        """Return ``(result, where it came from)`` for one address; ``name`` is for the log.

        Waits only when nothing usable is cached, or while an old "up" is
        being confirmed by a probe that is still young: past that the "up"
        is answered as UNCONFIRMED, not by waiting for the probe that would
        settle it (smtpdcheck.belief).
        """
        key = (str(address), port)
        return await self.flights.get(key, self._producer(key, name))

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

            start = trio.current_time()
            waited = start + self.timeout if self.timeout > 0 else math.inf
            held: list[trio.CapacityLimiter] = []
            try:
                with trio.move_on_at(waited):
                    for limiter in limiters:
                        await limiter.acquire()
                        held.append(limiter)
                if len(held) < len(limiters):
                    counted(ProbeResult(Outcome.OVERLOADED, address, port, "probe limit reached", name=name))
                    return
                # Silence is reported when a request can wait no longer, or
                # later for a primary known to greet slower than that (its
                # old "up" is believed meanwhile, see smtpdcheck.belief).  The slot
                # wait came out of the same budgets.
                entry = self.flights.cache.raw(key)
                greeted = entry.value.elapsed if entry is not None and entry.value.available else 0.0
                silent_at = max(waited, start + confirm_grace(greeted, self.greeting_timeout))
                greeting = self.greeting_timeout
                await probe_greeting(
                    address, port, 0.0, counted, quit_grace=self.quit_grace, connect=self._connect,
                    deadline=start + greeting if greeting > 0 else math.inf, silent_at=silent_at, name=name,
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
        address = f"[{key[0]}]" if key[1] == defaults.SMTP_PORT else f"[{key[0]}]:{key[1]}"
        label = f"{printable(name)} {address}" if name else address
        held = "" if math.isnan(before.since) else f" after {result.at - before.since:.1f}s {state(before)}"
        last = f", last greeting {result.at - before.at:.1f}s ago" if before.available and not math.isnan(before.at) else ""
        log.warning("%s %s -> %s (%s)%s%s", label, state(before), state(result), result.outcome.value, held, last)
        return result


def _unconfirmed(up: ProbeResult, now: float) -> ProbeResult:
    """The stand-in for an "up" no longer believed: not up, and how old its greeting is."""
    return ProbeResult(
        Outcome.UNCONFIRMED, up.address, up.port, f"last greeting {now - up.at:.1f}s ago",
        name=up.name, at=up.at, since=up.since,
    )
