"""The walk over a server list, written once, against the three it replaced.

:mod:`tests.support.walk_oracle` keeps the old check (the walk written three
times: from caches, concurrent, sequential) as the oracle.  Hypothesis draws
server lists, stop sets, and for every lookup and probe whether it is
cached (fresh or stale), what it says (up, down, timeout, unconfirmed) and
how long the network takes to say it (or never); both checks run on the
same world in virtual time, in each of the three modes, and must agree.

The differences that were meant, and only those, are allowed:

* a literal address is its own lookup: it is in its report even when it
  is this host (the cache-only and sequential walks left it out), and its
  stop-rule verdict is known even when listed after this host;
* no lookup is made once the stop rule has settled every server (the old
  concurrent and cache-only walks looked up servers listed after this
  host too: a DNS query, and a wait for it, for nothing);
* from the caches, a server's addresses are read until the first one known
  up, as the network walks do (the old cache-only walk read all of them,
  so its result expired with inputs it did not depend on);
* a server found up from the caches once a later one has ended the run
  says whether that "up" was stale (the old concurrent walk did not).

So a report may differ only for a server the stop rule excludes, or in the
probes past the winner's first "up" from the caches; the cache-only walk
counts as many cache hits or fewer, and its result stays valid as long or
longer.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace

import trio
import trio.testing
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from smtpdcheck.cache import Source
from smtpdcheck.check import Checker, CheckResult, ServerReport
from smtpdcheck.compat import STRICT_EXCEPTION_GROUPS
from smtpdcheck.probe import Outcome, ProbeResult
from smtpdcheck.resolver import AddressLookup
from smtpdcheck.servers import IPAddress, Server, parse_address, parse_servers
from smtpdcheck.stoprule import StopSet
from tests.support.walk_oracle import OldChecker

POOL = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "192.0.2.25"]
NAMES = ["a.test", "b.test", "c.test", "d.test"]
BUDGET = 3.0  # the checker's per-server timeout; an answer that takes longer is never seen
MODES = ("cached", "concurrent", "sequential")


@dataclass(frozen=True)
class Known:
    """One lookup's or probe's answer: what it says, whether it is cached (and how), how long the network takes."""

    value: AddressLookup | ProbeResult
    cached: Source | None  # None: not cached; CACHE or STALE
    expires: float
    delay: float  # math.inf: the network never answers
    hops: int = 0  # extra schedule points on the way back, as a real prober's bookkeeping takes


@dataclass(frozen=True)
class World:
    servers: tuple[Server, ...]
    stop: StopSet
    hosts: dict[str, Known]
    probes: dict[str, Known]
    mode: str
    schedule: int  # the seed of trio's choice among tasks woken in the same instant


# No two sums of delays make the budget exactly: an answer in the instant a
# budget runs out is taken or not as the scheduler pleases.
LOOKUP_DELAYS = st.sampled_from([0.0, 0.5, 1.0, math.inf])
PROBE_DELAYS = st.sampled_from([0.1, 0.7, 2.2, math.inf])
CACHED = st.sampled_from([None, None, Source.CACHE, Source.STALE])
EXPIRES = st.sampled_from([50.0, 100.0, 200.0])
OUTCOMES = st.sampled_from([Outcome.AVAILABLE, Outcome.AVAILABLE, Outcome.DECLINED, Outcome.TIMEOUT, Outcome.UNCONFIRMED])


@st.composite
def worlds(draw: st.DrawFn) -> World:
    words = draw(st.lists(st.sampled_from(NAMES + POOL), min_size=1, max_size=5, unique=True))
    prio = draw(st.booleans())
    if prio:
        words = [f"{draw(st.sampled_from([10, 20, 30]))}:{w}" for w in words]
        words.sort(key=lambda w: int(w.split(":")[0]))
    hosts = {}
    for name in NAMES:
        addresses = tuple(
            a for a in (parse_address(x) for x in draw(st.lists(st.sampled_from(POOL), max_size=2, unique=True)))
            if a is not None
        )
        lookup = AddressLookup(name, addresses, ttl=300) if addresses else AddressLookup(name, error="NXDOMAIN", ttl=300)
        hosts[name] = Known(lookup, draw(CACHED), draw(EXPIRES), draw(LOOKUP_DELAYS))
    probes = {}
    for address in POOL:
        outcome = draw(OUTCOMES)
        probes[address] = Known(
            ProbeResult(outcome, address, 25), draw(CACHED), draw(EXPIRES), draw(PROBE_DELAYS), draw(st.integers(0, 3))
        )
    stop = StopSet.build(
        draw(st.lists(st.sampled_from(NAMES), max_size=1)),
        [a for a in (parse_address(x) for x in draw(st.lists(st.sampled_from(POOL), max_size=1))) if a is not None],
    )
    mode = draw(st.sampled_from(MODES))
    return World(tuple(parse_servers(words)), stop, hosts, probes, mode, draw(st.integers(0, 2**32 - 1)))


class FakeLookups:
    """A resolver whose answers are the world's: cached ones at once, others after their delay."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.hits: Counter[str] = Counter()
        self.queries: Counter[str] = Counter()

    def cached_addresses(self, host: str) -> tuple[AddressLookup, float, Source] | None:
        known = self.world.hosts[host]
        if known.cached is None:
            return None
        assert isinstance(known.value, AddressLookup)
        return known.value, known.expires, known.cached

    async def addresses(self, host: str) -> tuple[AddressLookup, Source]:
        known = self.world.hosts[host]
        assert isinstance(known.value, AddressLookup)
        if known.cached is not None:
            await trio.lowlevel.checkpoint()
            return known.value, known.cached
        self.queries[host] += 1
        await trio.sleep(known.delay)
        return known.value, Source.NETWORK

    def count_cache_hits(self, **counts: int) -> None:
        self.hits.update(counts)


class FakeProber:
    """Probes whose results are the world's, one flight per address shared by its callers (as the real one)."""

    def __init__(self, nursery: trio.Nursery, world: World) -> None:
        self.nursery = nursery
        self.world = world
        self.cache: dict[str, tuple[ProbeResult, float, Source]] = {}
        for address, known in world.probes.items():
            if known.cached is not None:
                assert isinstance(known.value, ProbeResult)
                self.cache[address] = (known.value, known.expires, known.cached)
        self.flights: dict[str, trio.Event] = {}
        self.hits: Counter[str] = Counter()

    def cached(self, address: IPAddress, port: int) -> tuple[ProbeResult, float, Source] | None:
        return self.cache.get(str(address))

    async def probe(self, address: IPAddress, port: int, name: str = "") -> tuple[ProbeResult, Source]:
        key = str(address)
        got = self.cache.get(key)
        if got is None:
            event = self.flights.get(key)
            if event is None:
                event = self.flights[key] = trio.Event()
                self.nursery.start_soon(self._fly, key, event)
            await event.wait()
            got = (self.cache[key][0], 0.0, Source.NETWORK)
        for _ in range(1 + self.world.probes[key].hops):
            await trio.lowlevel.checkpoint()
        return replace(got[0], at=trio.current_time()), got[2]

    async def _fly(self, key: str, event: trio.Event) -> None:
        known = self.world.probes[key]
        await trio.sleep(known.delay)
        assert isinstance(known.value, ProbeResult)
        self.cache[key] = (known.value, trio.current_time() + known.expires, Source.CACHE)
        event.set()

    def count_cache_hits(self, n: int, stale: int = 0) -> None:
        self.hits.update(probes=n, stale_probes=stale)


@dataclass
class Run:
    result: CheckResult | None
    lookup_hits: Counter[str]
    probe_hits: Counter[str]
    queries: Counter[str]


def run(world: World, checker_class: type[Checker] | type[OldChecker]) -> Run:
    async def main() -> Run:
        # Under Hypothesis, trio runs the tasks woken in one instant in an
        # order drawn from this generator (pytest-trio makes it so): seeding
        # it from the world lets the draw try either order of a tie.
        trio._core._run._r.seed(world.schedule)
        async with trio.open_nursery() as nursery:
            lookups = FakeLookups(world)
            prober = FakeProber(nursery, world)
            checker = checker_class(lookups, prober, timeout=BUDGET)  # type: ignore[arg-type]
            result: CheckResult | None
            if world.mode == "cached":
                result = checker.check_cached(world.servers, world.stop)
            else:
                result = await checker.check(world.servers, world.stop, sequential=world.mode == "sequential")
            nursery.cancel_scope.cancel()
        return Run(result, lookups.hits, prober.hits, lookups.queries)

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0), strict_exception_groups=STRICT_EXCEPTION_GROUPS)


def probes_of(result: CheckResult, i: int) -> set[tuple[str, Outcome]]:
    """The probes of report ``i`` that came before the run ended.

    In the instant a winner ends the run, other answers may come too, and
    which of them a report takes is the scheduler's choice (the old walk
    could even record one shared "up" twice).  Without a winner, the run
    ends once every answer is in, and all count.  Virtual time starts at 0.
    """
    end = math.inf if result.winner is None else result.elapsed
    return {(p.address, p.outcome) for p in result.reports[i].probes if p.at < end}


def assert_same(world: World, old: Run, new: Run) -> None:
    assert (old.result is None) == (new.result is None), (old.result, new.result)
    if old.result is None or new.result is None:
        return
    a, b = old.result, new.result
    assert a.winner == b.winner
    winner_at = next((i for i, r in enumerate(b.reports) if r.server is b.winner), None)
    differs = False
    for i, (x, y) in enumerate(zip(a.reports, b.reports)):
        assert x.eligible == y.eligible, i
        if x.eligible is False:
            # Excluded by the stop rule: the new walk may know more (a
            # literal) or have looked up less (after this host).
            if (x.is_stop, x.addresses, x.lookup_error) != (y.is_stop, y.addresses, y.lookup_error):
                differs = True
                assert y.is_stop is None or y.server.is_literal or x.is_stop is None, i
            continue
        assert (x.is_stop, x.lookup_error) == (y.is_stop, y.lookup_error), i
        assert x.addresses == y.addresses or (y.server.is_literal and y.is_stop), i
        assert x.timed_out == y.timed_out, i
        assert x.elapsed == y.elapsed, i
        if world.mode == "cached":
            assert x.available == y.available, i
            if b.winner is y.server:
                # From the caches, the winner's addresses are read up to its first "up".
                assert y.probes == x.probes[: len(y.probes)] and y.probes[-1].available, i
                assert y.stale <= x.stale and y.cached == x.cached, i
            else:
                assert (x.probes, x.stale, x.cached) == (y.probes, y.stale, y.cached), i
            continue
        ended = winner_at is not None and i > winner_at
        if not ended:
            assert x.available == y.available, i
        assert probes_of(a, i) == probes_of(b, i), i
        if x.probes == y.probes:
            assert x.cached == y.cached, i
            # Found up from the caches once the run had ended: the new walk
            # says whether that value was stale, the old one did not.
            assert x.stale == y.stale or (y.stale and y.available), i
    if world.mode == "cached":
        assert b.valid_until >= a.valid_until
        assert all(new.lookup_hits[k] <= old.lookup_hits[k] for k in new.lookup_hits)
        assert all(new.probe_hits[k] <= old.probe_hits[k] for k in new.probe_hits)
    else:
        assert b.from_cache == a.from_cache
        if not differs:
            assert b.elapsed == a.elapsed
        else:
            assert b.elapsed <= a.elapsed
        assert all(new.queries[k] <= old.queries[k] for k in new.queries)


def _tie() -> World:
    """Two servers known up from the caches, both free to be probed in the same
    instant (when the lookup listed before them says it is not this host);
    the later one's answer comes back first, and ends the run before the
    earlier one's is taken: the earlier still wins, from the caches."""
    hosts = {n: Known(AddressLookup(n, error="NXDOMAIN", ttl=300), None, 50.0, 0.5) for n in NAMES}
    probes = {
        a: Known(ProbeResult(Outcome.AVAILABLE, a, 25), Source.CACHE, 50.0, 0.1, 2 if a == "127.0.0.2" else 0)
        for a in POOL
    }
    return World(tuple(parse_servers(["c.test", "127.0.0.2", "127.0.0.3"])), StopSet(), hosts, probes, "concurrent", 0)


def _lost_lookup() -> World:
    """One at a time: the first lookup never answers and is given up as not
    this host, so the next server, this host by name, settles the list: the
    one after it is not looked up."""
    hosts = {n: Known(AddressLookup(n, error="NXDOMAIN", ttl=300), None, 50.0, math.inf if n == "a.test" else 0.5)
             for n in NAMES}
    probes = {a: Known(ProbeResult(Outcome.DECLINED, a, 25), None, 50.0, 0.1) for a in POOL}
    servers = tuple(parse_servers(["a.test", "b.test", "c.test"]))
    return World(servers, StopSet.build(["b.test"]), hosts, probes, "sequential", 0)


@example(_tie())
@example(_lost_lookup())
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_the_walk_agrees_with_the_three_it_replaced(world: World) -> None:
    old, new = run(world, OldChecker), run(world, Checker)
    event(f"{world.mode}: " + ("incomplete" if new.result is None else "won" if new.result.winner else "no winner"))
    assert_same(world, old, new)


def test_a_report_summarises_what_happened_to_its_server() -> None:
    """The words of ``smtpdcheck -v`` and of the daemon's explanation, one per state."""
    server = parse_servers(["mx.test"])[0]
    down = ProbeResult(Outcome.DECLINED, "127.0.0.2", 25, "421")
    silent = ProbeResult(Outcome.TIMEOUT, "::1", 25)
    assert ServerReport(server, is_stop=True, eligible=False).summary() == "this host"
    assert ServerReport(server, is_stop=False, eligible=False).summary() == "not checked (stop rule)"
    assert ServerReport(server, eligible=True, available=True, probes=[down]).summary() == "available"
    assert ServerReport(server, eligible=True, lookup_error="NXDOMAIN").summary() == "lookup failed: NXDOMAIN"
    assert ServerReport(server, eligible=True, timed_out=True).summary() == "timeout"
    assert ServerReport(server, eligible=True).summary() == "not probed"
    both = ServerReport(server, eligible=True, timed_out=True, probes=[down, silent])
    assert both.summary() == "127.0.0.2:25 declined (421); [::1]:25 timeout"
