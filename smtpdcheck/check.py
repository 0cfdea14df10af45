"""Checking a server list: the heart shared by the command and the daemon.

Mail Avenger's smtpdcheck walked the list one server at a time, so a dead
primary cost a full timeout before the next was tried (its BUGS section says
as much).  Here every server the stop rule allows, and every address of each,
is probed at once; the first available one ends the run.  ``sequential``
keeps the old behaviour as a baseline for the benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from . import defaults
from .cache import Source
from .probe import Outcome, Prober, ProbeResult
from .resolver import Lookups
from .servers import IPAddress, Server
from .stoprule import StopSet, eligibility


@dataclass(slots=True)
class ServerReport:
    """What happened to one server; what ``-v`` and the daemon's log show."""

    server: Server
    addresses: tuple[IPAddress, ...] = ()
    lookup_error: str | None = None
    is_stop: bool | None = None
    eligible: bool | None = None
    probes: list[ProbeResult] = field(default_factory=list)
    cached: bool = True
    stale: bool = False  # a stale cached value was used (served while it is refreshed)
    available: bool = False
    timed_out: bool = False
    elapsed: float = 0.0  # how long its check took (lookup and probes), as the requester waited

    def note(self, source: Source) -> None:
        self.cached = self.cached and source is not Source.NETWORK
        self.stale = self.stale or source is Source.STALE

    def summary(self) -> str:
        if self.eligible is False:
            return "this host" if self.is_stop else "not checked (stop rule)"
        if self.available:
            return "available"
        if self.lookup_error:
            return f"lookup failed: {self.lookup_error}"
        if self.timed_out and not self.probes:
            return "timeout"
        if not self.probes:
            return "not probed"
        return "; ".join(p.describe() for p in self.probes)


@dataclass(slots=True)
class CheckResult:
    winner: Server | None
    reports: list[ServerReport]
    elapsed: float
    valid_until: float = math.inf  # for a result from caches: when the first input expires (or a probe is renewed)

    @property
    def from_cache(self) -> bool:
        """True when no lookup or probe had to go to the network."""
        return all(r.cached for r in self.reports if r.eligible is not False)

    @property
    def stale(self) -> bool:
        """True when a stale cached value was used."""
        return any(r.stale for r in self.reports)

    @property
    def confirmed_at(self) -> float:
        """When the winner last greeted (trio time): the evidence a DEFER rests on; NaN without one."""
        if self.winner is None:
            return math.nan
        times = [
            p.at for r in self.reports if r.server is self.winner
            for p in r.probes if p.available and not math.isnan(p.at)
        ]
        return max(times, default=math.nan)


class _Board:
    """Shared state of one run, and a way to wait for it to change."""

    def __init__(self, servers: Sequence[Server], stop: StopSet) -> None:
        self.servers = servers
        self.matches: list[bool | None] = [
            True if stop.matches_name(s) else (False if s.is_literal else None) for s in servers
        ]
        self._changed = trio.Event()

    def set_match(self, i: int, value: bool) -> None:
        self.matches[i] = value
        self._changed.set()
        self._changed = trio.Event()

    def eligible(self, i: int) -> bool | None:
        return eligibility(self.servers, self.matches)[i]

    async def wait_decided(self, i: int) -> bool:
        while (decided := self.eligible(i)) is None:
            await self._changed.wait()
        return decided


class Checker:
    """Runs the stop rule, lookups and probes for a server list.

    ``timeout`` bounds each server's whole check (lookup, connect, greeting).
    Give the resolver a shorter timeout than this: a server waits for the
    lookups of the servers before it (one of them may be this host), and a
    hung lookup must be given up on while there is still time to probe.
    """

    def __init__(self, resolver: Lookups, prober: Prober, *, port: int = defaults.SMTP_PORT, timeout: float = defaults.CHECK_TIMEOUT_S) -> None:
        self.resolver = resolver
        self.prober = prober
        self.port = port
        self.timeout = timeout

    @property
    def _budget(self) -> float:
        return self.timeout if self.timeout > 0 else math.inf

    async def _lookup(self, report: ServerReport) -> None:
        server = report.server
        if server.address is not None:
            report.addresses = (server.address,)
            return
        lookup, source = await self.resolver.addresses(server.host)
        report.note(source)
        report.addresses = lookup.addresses
        report.lookup_error = lookup.error

    async def _probe_all(self, report: ServerReport) -> None:
        """Probe every address of one server at once; the first 220 wins."""
        async with trio.open_nursery() as nursery:

            async def one(address: IPAddress) -> None:
                result, source = await self.prober.probe(address, self.port, report.server.name)
                report.note(source)
                report.probes.append(result)
                if result.outcome is Outcome.AVAILABLE:
                    report.available = True
                    nursery.cancel_scope.cancel()

            for address in report.addresses:
                nursery.start_soon(one, address)

    def check_cached(self, servers: Sequence[Server], stop: StopSet) -> CheckResult | None:
        """The result from caches alone, or None if anything must go to the network.

        This is the daemon's hot path: under load nearly every RCPT is for a
        domain seen seconds ago.  Answering it without starting a single
        task gives the same result the concurrent check would (cached values
        arrive first there too, and the earliest available server wins).
        """
        reports = [ServerReport(s) for s in servers]
        matches: list[bool | None] = []
        lookups_used = probes_used = stale_lookups = stale_probes = 0
        valid_until = math.inf
        for report in reports:
            server = report.server
            if stop.matches_name(server):
                matches.append(True)
                continue
            if server.address is not None:
                report.addresses = (server.address,)
                matches.append(False)
                continue
            entry = self.resolver.cached_addresses(server.host)
            if entry is None:
                matches.append(None)
                continue
            lookup, expires, source = entry
            report.note(source)
            lookups_used += 1
            stale_lookups += source is Source.STALE
            valid_until = min(valid_until, expires)
            report.addresses = lookup.addresses
            report.lookup_error = lookup.error
            matches.append(stop.matches(server, lookup.addresses))
        decided = eligibility(servers, matches)
        winner: Server | None = None
        complete = True
        for i, report in enumerate(reports):
            report.is_stop = matches[i]
            report.eligible = decided[i]
            if decided[i] is None:
                complete = False
            if not decided[i] or winner is not None:
                continue
            for address in report.addresses:
                cached = self.prober.cached(address, self.port)
                if cached is None:
                    complete = False
                    continue
                result, expires, source = cached
                report.note(source)
                probes_used += 1
                stale_probes += source is Source.STALE
                valid_until = min(valid_until, expires)
                report.probes.append(result)
                if result.available:
                    report.available = True
            if report.available:
                winner = report.server
        if winner is None and not complete:
            return None
        # As if each had been a get(); not before, as the full path may follow.
        self.resolver.count_cache_hits(addresses=lookups_used, stale_addresses=stale_lookups)
        self.prober.count_cache_hits(probes_used, stale_probes)
        return CheckResult(winner, reports, 0.0, valid_until)

    async def check(self, servers: Sequence[Server], stop: StopSet, *, sequential: bool = False) -> CheckResult:
        """Which server of ``servers`` (in list order) is available, if any.

        The contract: the stop rule decides which servers are probed (none
        that is this host, after it, or of its preference); each of those
        gets at most ``timeout`` for lookup and probes together, all at once;
        the first server to answer 220 ends the run and is the winner (of
        several that answer in the same instant, or are already known up
        from the cache, the earliest in the list), or None once every probed
        server failed or ran out of time.  ``sequential`` walks the list one
        server at a time instead, as Mail Avenger did.  Never raises for DNS or network trouble:
        each report says what happened.  A result taken wholly from caches
        costs no task and says until when it stays valid (``valid_until``).
        """
        start = trio.current_time()
        if not sequential:
            cached = self.check_cached(servers, stop)
            if cached is not None:
                await trio.lowlevel.checkpoint()
                return cached
        reports = [ServerReport(s) for s in servers]
        if sequential:
            winner = await self._check_sequential(servers, stop, reports)
        else:
            winner = await self._check_concurrent(servers, stop, reports)
        return CheckResult(winner, reports, trio.current_time() - start)

    async def _check_concurrent(
        self, servers: Sequence[Server], stop: StopSet, reports: list[ServerReport]
    ) -> Server | None:
        board = _Board(servers, stop)
        found: list[int] = []

        async with trio.open_nursery() as nursery:

            async def run(i: int) -> None:
                report = reports[i]
                began = trio.current_time()
                try:
                    await checked(i, report)
                finally:
                    report.elapsed = trio.current_time() - began

            async def checked(i: int, report: ServerReport) -> None:
                with trio.move_on_after(self._budget) as scope:
                    if board.matches[i] is None:
                        await self._lookup(report)
                        board.set_match(i, stop.matches(report.server, report.addresses))
                    elif report.server.address is not None:
                        report.addresses = (report.server.address,)
                    if board.eligible(i) is False:
                        return
                    # Wait for the lookups that could still make this server
                    # "this host or after it": probing a host the rule
                    # excludes would be load on it for nothing.  Lookups are
                    # bounded by the resolver's own, shorter, timeout.
                    if not await board.wait_decided(i):
                        return
                    await self._probe_all(report)
                    if report.available:
                        found.append(i)
                        nursery.cancel_scope.cancel()
                report.timed_out = scope.cancelled_caught

            for i in range(len(servers)):
                nursery.start_soon(run, i)

        for i, report in enumerate(reports):
            report.is_stop = board.matches[i]
            report.eligible = board.eligible(i)
        if not found:
            return None
        # A server listed earlier may have become known up in the same
        # instant -- a probe it shares with the winner, whose result its
        # own task had not taken yet when the winner cancelled the run.  It
        # is the earlier one that wins, as from the caches.
        first = min(found)
        for i in range(first):
            if reports[i].eligible and self._known_up(reports[i]):
                return servers[i]
        return servers[first]

    def _known_up(self, report: ServerReport) -> bool:
        """Whether a cached probe already says one of the report's addresses is up."""
        for address in report.addresses:
            cached = self.prober.cached(address, self.port)
            if cached is not None and cached[0].available:
                report.probes.append(cached[0])
                report.available = True
                return True
        return False

    async def _check_sequential(
        self, servers: Sequence[Server], stop: StopSet, reports: list[ServerReport]
    ) -> Server | None:
        """Mail Avenger's order: look up until the stop host, then probe in turn."""
        matches: list[bool] = []
        spent: list[float] = []
        for report in reports:
            t0 = trio.current_time()
            with trio.move_on_after(self._budget) as scope:
                if stop.matches_name(report.server):
                    matches.append(True)
                else:
                    await self._lookup(report)
                    matches.append(stop.matches(report.server, report.addresses))
            if scope.cancelled_caught:
                matches.append(False)
                report.timed_out = True
            spent.append(trio.current_time() - t0)
            report.elapsed = spent[-1]
            report.is_stop = matches[-1]
            if matches[-1]:
                break
        matches.extend([True] * (len(servers) - len(matches)))
        decided = eligibility(servers, matches)
        for i, report in enumerate(reports):
            report.eligible = bool(decided[i])
        for i, report in enumerate(reports):
            if not report.eligible:
                continue
            t0 = trio.current_time()
            try:
                with trio.move_on_after(self._budget - spent[i]) as scope:
                    for address in report.addresses:
                        result, source = await self.prober.probe(address, self.port, report.server.name)
                        report.note(source)
                        report.probes.append(result)
                        if result.available:
                            report.available = True
                            return report.server
            finally:
                report.elapsed = spent[i] + trio.current_time() - t0
            report.timed_out = report.timed_out or scope.cancelled_caught
        return None
