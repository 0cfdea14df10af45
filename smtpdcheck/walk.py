"""One walk over a server list: the rules, with no I/O.

A check of a server list (``smtpdcheck``'s, and the policy's of an MX list)
is one algorithm:

* the stop rule (:mod:`smtpdcheck.stoprule`): a server is checked only once
  it is certain not to be this host, nor listed after it, nor of its
  preference; a server's match is known from its name or literal address,
  or from its lookup, and a lookup is made only while some server's fate
  still depends on it;
* a server's addresses are probed; its first "available" makes it up;
* the first server known up ends the walk, and the winner is the earliest
  listed among those known up then; without one, the walk ends once every
  checked server is down or out of time.

:class:`Walk` holds that algorithm and what is known so far, and nothing
else: it never waits, reads a cache or opens a socket.  What it is told
comes from a *lookup source*, a driver in :mod:`smtpdcheck.check`: the
caches alone, synchronously (the daemon's hot path: a lookup or probe with
nothing cached is left open, and a walk that cannot end without it is
incomplete: go to the network), or the network, all at once or one server
after another as Mail Avenger did.  The drivers choose only the order and
the waiting; what is asked, what an answer means and who wins are the
walk's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .cache import Source
from .probe import Outcome, ProbeResult
from .resolver import AddressLookup
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


class Walk:
    """What is known of one server list so far, and what the rules make of it.

    Fed by a driver: :meth:`looked_up` / :meth:`lookup_lost` for lookups,
    :meth:`probed` for probe results.  Asked: :meth:`wants_lookup` (is this
    server's lookup still worth making), :meth:`eligible` (may it be
    probed: None while a lookup could still say no), :attr:`settled`
    (no lookup left can change what is probed), :meth:`winner` (the
    earliest listed server known up, if any) and :meth:`result`.
    """

    __slots__ = ("servers", "stop", "reports", "matches", "settled")

    reports: list[ServerReport]
    matches: list[bool | None]  # per server: is it this host?  None until its lookup says

    def __init__(self, servers: Sequence[Server], stop: StopSet) -> None:
        self.servers = servers
        self.stop = stop
        # A literal address is its own lookup.  (One plain loop: the
        # cheapest way, and this is the hot path.)
        self.reports = reports = []
        self.matches = matches = []
        names, addresses = stop.names, stop.addresses
        for server in servers:
            report = ServerReport(server)
            if server.address is None:
                matches.append(True if server.host in names else None)
            else:
                report.addresses = (server.address,)
                matches.append(server.address in addresses)
            reports.append(report)
        #: Whether the stop rule's verdict on every server is known: no
        #: lookup left can change it.  Once true, it stays true.
        self.settled = self._settled()

    def _settled(self) -> bool:
        # The first server not known to be another host is known to be this
        # one (or there is none): what comes after it is out whatever its
        # lookup says.
        for match in self.matches:
            if match is None:
                return False
            if match:
                return True
        return True

    def wants_lookup(self, i: int) -> bool:
        """Whether server ``i``'s lookup is still worth making: its match is open and matters."""
        return self.matches[i] is None and not self.settled

    def looked_up(self, i: int, lookup: AddressLookup, source: Source) -> None:
        report = self.reports[i]
        report.note(source)
        report.addresses = lookup.addresses
        report.lookup_error = lookup.error
        # Its name is not this host's (it would not have been looked up):
        # one of its addresses must be.
        self.matches[i] = not self.stop.addresses.isdisjoint(lookup.addresses)
        if not self.settled:
            self.settled = self._settled()

    def lookup_lost(self, i: int) -> None:
        """A lookup that ran out of time: its server is taken not to be this host, as Mail Avenger did."""
        self.matches[i] = False
        self.reports[i].timed_out = True
        if not self.settled:
            self.settled = self._settled()

    def eligibility(self) -> list[bool | None]:
        """Per server: check it (True), do not (False), or not known yet (None)."""
        return eligibility(self.servers, self.matches)

    def eligible(self, i: int) -> bool | None:
        return eligibility(self.servers, self.matches)[i]

    def probed(self, i: int, result: ProbeResult, source: Source) -> bool:
        """Record one probe result of server ``i``; True when it makes the server up (the walk is won)."""
        report = self.reports[i]
        report.note(source)
        report.probes.append(result)
        if result.outcome is Outcome.AVAILABLE:
            report.available = True
            return True
        return False

    def winner(self) -> int | None:
        """The index of the earliest listed server known up, if any.

        Only an eligible server is ever probed, so one known up is eligible.
        """
        for i, report in enumerate(self.reports):
            if report.available:
                return i
        return None

    def result(
        self, elapsed: float, valid_until: float = math.inf,
        decided: list[bool | None] | None = None, won: int | None = -1,
    ) -> CheckResult:
        """The walk as it stands, with each report's stop-rule verdict filled in.

        ``decided`` and ``won``: :meth:`eligibility` and :meth:`winner`, if
        the caller has them and nothing was learnt since (the hot path).
        """
        if decided is None:
            decided = eligibility(self.servers, self.matches)
        for report, match, ok in zip(self.reports, self.matches, decided):
            report.is_stop = match
            report.eligible = ok
        if won == -1:
            won = self.winner()
        return CheckResult(None if won is None else self.servers[won], self.reports, elapsed, valid_until)
