"""Checking a server list: the heart shared by the command and the daemon.

Mail Avenger's smtpdcheck walked the list one server at a time, so a dead
primary cost a full timeout before the next was tried (its BUGS section says
as much).  Here every server the stop rule allows, and every address of each,
is probed at once; the first available one ends the run.  ``sequential``
keeps the old behaviour as a baseline for the benchmark.

The walk itself -- the stop rule, which lookups are worth making, what ends
it and who wins -- is :class:`~smtpdcheck.walk.Walk`, written once.  What is
here are its lookup sources, the three ways of feeding it: from the caches
alone (:meth:`Checker.check_cached`, synchronous), and from the network, all
at once or one server after another (:meth:`Checker.check`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import trio

from . import defaults
from .cache import Source
from .probe import Prober
from .resolver import Lookups
from .servers import IPAddress, Server
from .stoprule import StopSet
from .walk import CheckResult, ServerReport, Walk

__all__ = ["Checker", "CheckResult", "ServerReport"]


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

    def check_cached(self, servers: Sequence[Server], stop: StopSet) -> CheckResult | None:
        """The walk fed from caches alone, or None if it cannot end without the network.

        This is the daemon's hot path: under load nearly every RCPT is for a
        domain seen seconds ago.  Answering it without starting a single
        task gives the result the concurrent check would (cached values
        arrive first there too, and the earliest server known up wins).  A
        lookup or probe with nothing cached is left open; the walk is
        incomplete when a server's fate or the winner depends on it.
        """
        walk = Walk(servers, stop)
        resolver, prober, port = self.resolver, self.prober, self.port
        valid_until = math.inf
        lookups = stale_lookups = probes = stale_probes = 0
        matches = walk.matches
        for i, server in enumerate(servers):
            if walk.settled:
                break  # what is left cannot change a thing
            if matches[i] is not None:
                continue  # known without a lookup (walk.wants_lookup, inlined: this is the hot path)
            entry = resolver.cached_addresses(server.host)
            if entry is None:
                continue  # open: so is the fate of this server and of those it could exclude
            lookup, expires, source = entry
            walk.looked_up(i, lookup, source)
            lookups += 1
            stale_lookups += source is Source.STALE
            if expires < valid_until:
                valid_until = expires
        complete, won = True, None
        decided = walk.eligibility()
        for i, ok in enumerate(decided):
            if ok is None:
                complete = False
                continue
            if not ok:
                continue
            for address in walk.reports[i].addresses:
                cached = prober.cached(address, port)
                if cached is None:
                    complete = False
                    continue
                result, expires, source = cached
                probes += 1
                stale_probes += source is Source.STALE
                if expires < valid_until:
                    valid_until = expires
                if walk.probed(i, result, source):
                    won = i  # read in list order: the earliest known up
                    break
            if won is not None:
                break
        if won is None and not complete:
            return None
        # As if each had been a get(); not before, as the full path may follow.
        resolver.count_cache_hits(addresses=lookups, stale_addresses=stale_lookups)
        prober.count_cache_hits(probes, stale_probes)
        return walk.result(0.0, valid_until, decided, won)

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
        walk = Walk(servers, stop)
        if sequential:
            await self._check_sequential(walk)
        else:
            await self._check_concurrent(walk)
        return walk.result(trio.current_time() - start)

    async def _check_concurrent(self, walk: Walk) -> None:
        """Every server at once, each within its budget; the first one up ends the run."""
        changed = trio.Event()

        async with trio.open_nursery() as nursery:

            async def run(i: int) -> None:
                report = walk.reports[i]
                began = trio.current_time()
                try:
                    with trio.move_on_after(self._budget) as scope:
                        await checked(i)
                    report.timed_out = scope.cancelled_caught
                finally:
                    report.elapsed = trio.current_time() - began

            async def checked(i: int) -> None:
                nonlocal changed
                if walk.wants_lookup(i):
                    lookup, source = await self.resolver.addresses(walk.servers[i].host)
                    walk.looked_up(i, lookup, source)
                    changed.set()
                    changed = trio.Event()
                # Wait for the lookups that could still make this server
                # "this host or after it": probing a host the rule excludes
                # would be load on it for nothing.  Lookups are bounded by
                # the resolver's own, shorter, timeout.
                while (ok := walk.eligible(i)) is None:
                    await changed.wait()
                if ok and await self._probe_all(walk, i):
                    nursery.cancel_scope.cancel()

            decided = walk.eligibility()
            for i in range(len(walk.servers)):
                if decided[i] is False and not walk.wants_lookup(i):
                    continue  # out already (this host, or after it): nothing to ask or wait for
                nursery.start_soon(run, i)

        won = walk.winner()
        if won is None:
            return
        # A server listed earlier may have become known up in the same
        # instant -- a probe it shares with the winner, whose result its
        # own task had not taken yet when the winner cancelled the run.  It
        # is the earlier one that wins, as from the caches: ask them.
        decided = walk.eligibility()
        for i in range(won):
            if decided[i] and self._known_up(walk, i):
                return

    async def _probe_all(self, walk: Walk, i: int) -> bool:
        """Probe every address of one server at once; the first 220 wins."""
        report = walk.reports[i]
        async with trio.open_nursery() as nursery:

            async def one(address: IPAddress) -> None:
                result, source = await self.prober.probe(address, self.port, report.server.name)
                if walk.probed(i, result, source):
                    nursery.cancel_scope.cancel()

            for address in report.addresses:
                nursery.start_soon(one, address)
        return report.available

    def _known_up(self, walk: Walk, i: int) -> bool:
        """Whether a cached probe already says one of server ``i``'s addresses is up (recorded if so)."""
        for address in walk.reports[i].addresses:
            cached = self.prober.cached(address, self.port)
            if cached is not None and cached[0].available:
                return walk.probed(i, cached[0], cached[2])
        return False

    async def _check_sequential(self, walk: Walk) -> None:
        """Mail Avenger's order: look up until the stop host, then probe in turn."""
        spent = [0.0] * len(walk.servers)
        for i, report in enumerate(walk.reports):
            if not walk.wants_lookup(i):
                continue
            t0 = trio.current_time()
            with trio.move_on_after(self._budget) as scope:
                lookup, source = await self.resolver.addresses(report.server.host)
                walk.looked_up(i, lookup, source)
            if scope.cancelled_caught:
                walk.lookup_lost(i)
            spent[i] = report.elapsed = trio.current_time() - t0
        for i, ok in enumerate(walk.eligibility()):
            if not ok:
                continue
            report = walk.reports[i]
            t0 = trio.current_time()
            try:
                with trio.move_on_after(self._budget - spent[i]) as scope:
                    for address in report.addresses:
                        result, source = await self.prober.probe(address, self.port, report.server.name)
                        if walk.probed(i, result, source):
                            return
            finally:
                report.elapsed = spent[i] + trio.current_time() - t0
            report.timed_out = report.timed_out or scope.cancelled_caught
