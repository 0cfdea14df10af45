"""Building the core: resolver, prober and checker in one nursery, and this host.

Both commands, ``--check``, ``--stdio``, the tests and the benchmarks build
the core here and nowhere else, so a new part or a new setting is wired in
once.  Tests that run on virtual time give their own network (``connect``)
and their own DNS (``lookups``) here too, rather than swapping parts of a
built core.  The nursery is where lookups and probes run as shared flights: it
outlives every request, so a requester that gives up does not cancel an
answer others are waiting for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from . import defaults
from .check import Checker
from .probe import QUIT_GRACE_S, Connect, Prober
from .resolver import RESOLV_CONF, DNSConfigError, Lookups, Resolver
from .stophost import StopHostError, resolve_stop
from .stoprule import StopSet


@dataclass(frozen=True, slots=True)
class CoreSettings:
    """Everything the core is built from; the commands map their options onto it.

    ``check_timeout`` bounds one server's whole check (lookup, slot, connect,
    greeting) as a request waits for it; ``probe_timeout`` how long a
    request waits for one probe, ``greeting_timeout`` how long the probe
    itself waits for a greeting (None: as long as ``probe_timeout``).  ``stop`` values are names or
    addresses; names are resolved when the core is opened, falling back to
    the system resolver (``/etc/hosts``) when no nameserver is configured.
    """

    nameservers: Sequence[tuple[str, int]] = ()
    dns_timeout: float = defaults.DNS_TIMEOUT_S
    probe_timeout: float = defaults.PROBE_TIMEOUT_S
    greeting_timeout: float | None = None
    check_timeout: float = defaults.CHECK_TIMEOUT_S
    smtp_port: int = defaults.SMTP_PORT
    up_ttl: float = defaults.UP_TTL_S
    down_ttl: float = defaults.DOWN_TTL_S
    dns_max_ttl: float = defaults.DNS_MAX_TTL_S
    dns_negative_ttl: float = defaults.DNS_NEGATIVE_TTL_S
    dns_failure_ttl: float = defaults.DNS_FAILURE_TTL_S
    cache_size: int = defaults.CACHE_SIZE
    max_probes: int = defaults.MAX_PROBES
    max_dns_queries: int = defaults.MAX_DNS_QUERIES
    quit_grace: float = QUIT_GRACE_S
    refresh_window: float = 0.0
    dns_stale_max: float = 0.0
    stop: Sequence[str] = field(default=())
    # Read for nameservers when none are given; tests name their own file.
    resolv_conf: str = RESOLV_CONF


@dataclass(eq=False)
class Core:
    """The built core.  ``stop`` is this host as configured (without any request's address).

    ``lookups`` is the DNS that checks and decisions go through: the
    resolver, unless the core was built with other lookups (virtual time).
    ``resolver`` is the real one all the same, for ``--stop`` names and its
    statistics.
    """

    resolver: Resolver
    prober: Prober
    checker: Checker
    lookups: Lookups
    stop: StopSet = field(default_factory=StopSet)

    async def resolve_stop(self, values: Sequence[str], *, system_fallback: bool) -> StopSet:
        """Resolve ``--stop`` values with this core's resolver (at start-up and on reload)."""
        return await resolve_stop(list(values), self.resolver, system_fallback=system_fallback)

    async def let_probes_finish(self) -> None:
        """Give probes that have their verdict and are saying QUIT time to finish.

        A one-shot command calls this before it exits (its answer already
        printed), so primaries log a client that left properly, not a lost
        connection or a postscreen HANGUP.  They bound themselves (the
        politeness budget, ``quit_grace``); probes still waiting for a
        greeting are of no use any more and are abandoned.
        """
        with trio.move_on_after(self.prober.quit_grace):
            await self.prober.flights.wait_lingering()


def build_core(
    nursery: trio.Nursery,
    settings: CoreSettings,
    *,
    connect: Connect = trio.open_tcp_stream,
    lookups: Lookups | None = None,
) -> Core:
    """The parts, wired, with flights in ``nursery``; ``stop`` is left unresolved.

    ``connect`` opens probe connections and ``lookups`` answers the checks'
    and decisions' DNS questions (default: the resolver built here).
    """
    resolver = Resolver(
        nursery,
        nameservers=list(settings.nameservers) or None,
        timeout=settings.dns_timeout,
        max_ttl=settings.dns_max_ttl,
        negative_ttl=settings.dns_negative_ttl,
        failure_ttl=settings.dns_failure_ttl,
        max_entries=settings.cache_size,
        max_concurrent=settings.max_dns_queries,
        refresh_window=settings.refresh_window,
        stale_max=settings.dns_stale_max,
        resolv_conf=settings.resolv_conf,
    )
    prober = Prober(
        nursery,
        timeout=settings.probe_timeout,
        greeting_timeout=settings.greeting_timeout,
        up_ttl=settings.up_ttl,
        down_ttl=settings.down_ttl,
        max_entries=settings.cache_size,
        max_concurrent=settings.max_probes,
        quit_grace=settings.quit_grace,
        connect=connect,
        refresh_window=settings.refresh_window,
    )
    dns = resolver if lookups is None else lookups
    checker = Checker(dns, prober, port=settings.smtp_port, timeout=settings.check_timeout)
    return Core(resolver, prober, checker, dns)


@asynccontextmanager
async def open_core(settings: CoreSettings, *, connect: Connect = trio.open_tcp_stream) -> AsyncIterator[Core]:
    """The core for as long as the block runs, with ``stop`` resolved.

    Raises:
        StopHostError: a ``--stop`` value does not resolve; nothing is left running.
        DNSConfigError: no nameserver given and none in the resolver configuration.
        Both are raised as themselves, not inside an exception group, so a
        command can say in one line what is wrong.
    """
    failed: StopHostError | DNSConfigError | None = None
    async with trio.open_nursery() as nursery:
        try:
            core = build_core(nursery, settings, connect=connect)
            core.stop = await core.resolve_stop(settings.stop, system_fallback=not settings.nameservers)
        except (StopHostError, DNSConfigError) as exc:
            failed = exc
            nursery.cancel_scope.cancel()
        else:
            try:
                yield core
            finally:
                nursery.cancel_scope.cancel()
    if failed is not None:
        raise failed

