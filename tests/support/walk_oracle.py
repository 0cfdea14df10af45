"""The check as it was before the walk was written once: the oracle of tests/test_walk.py.

A verbatim copy of ``Checker.check_cached``, ``check``, ``_check_concurrent``,
``_known_up`` and ``_check_sequential`` as they were when the walk over a
server list was written three times (cache-only, concurrent, sequential).
It is not product code and is never changed: the new walk is pinned to it,
with the differences that were meant listed in the test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import trio

from smtpdcheck.cache import Source
from smtpdcheck.check import CheckResult, ServerReport
from smtpdcheck.probe import Outcome, Prober
from smtpdcheck.resolver import Lookups
from smtpdcheck.servers import IPAddress, Server
from smtpdcheck.stoprule import StopSet, eligibility


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


class OldChecker:
    """The old three walks."""

    def __init__(self, resolver: Lookups, prober: Prober, *, port: int = 25, timeout: float = 10.0) -> None:
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
