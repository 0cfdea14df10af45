"""The timing rules of the check and the policy, at exact virtual instants.

Every test here runs on ``MockClock(autojump_threshold=0)`` (pytest-trio's
``autojump_clock``): sleeping costs nothing and a rule like "all silent
costs one timeout" is checked to the exact second.  The wire itself is
proven by the real-socket tests (test_check, test_policyd_server, ...).
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpdcheck.compat import STRICT_EXCEPTION_GROUPS
from smtpdcheck.core import Core, CoreSettings, build_core
from smtpdcheck.policy import Action, Cache, Kind, Policy, Verdict, mx_servers
from smtpdcheck.probe import Outcome, ProbeResult
from smtpdcheck.resolver import AddressLookup, MXKind, MXLookup
from smtpdcheck.servers import parse_address, parse_servers
from smtpdcheck.stoprule import StopSet
from testbeds.virtual import SILENT, Peer, VirtualDNS, VirtualNet

NO_STOP = StopSet()


def virtual_core(nursery: trio.Nursery, net: VirtualNet, dns: VirtualDNS, **changes: object) -> Core:
    """The real prober and checker on virtual peers, with the virtual DNS in front."""
    settings = CoreSettings(probe_timeout=5.0, check_timeout=7.0, quit_grace=0.5, **changes)  # type: ignore[arg-type]
    return build_core(nursery, settings, connect=net.connect, lookups=dns)


async def test_first_live_server_wins_at_its_greeting(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    net = VirtualNet(nursery, {
        "127.0.0.2": SILENT,
        "127.0.0.3": Peer(greet_after=0.7),
        "127.0.0.4": Peer(greet_after=0.3),
    })
    core = virtual_core(nursery, net, VirtualDNS())
    start = trio.current_time()
    result = await core.checker.check(parse_servers(["10:127.0.0.2", "20:127.0.0.3", "30:127.0.0.4"]), NO_STOP)
    assert trio.current_time() - start == pytest.approx(0.3)
    assert result.winner is not None and result.winner.name == "127.0.0.4"


async def test_all_silent_costs_exactly_one_timeout(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    addresses = [f"127.0.0.{i}" for i in range(2, 7)]
    net = VirtualNet(nursery, dict.fromkeys(addresses, SILENT))
    core = virtual_core(nursery, net, VirtualDNS())
    start = trio.current_time()
    result = await core.checker.check(parse_servers(addresses), NO_STOP)
    assert trio.current_time() - start == pytest.approx(5.0)
    assert result.winner is None
    assert [p.outcome for r in result.reports for p in r.probes] == [Outcome.TIMEOUT] * 5


async def test_sequential_costs_one_timeout_per_silent_server(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    net = VirtualNet(nursery, {"127.0.0.2": SILENT, "127.0.0.3": SILENT, "127.0.0.4": Peer(greet_after=0.25)})
    core = virtual_core(nursery, net, VirtualDNS())
    start = trio.current_time()
    result = await core.checker.check(parse_servers(["127.0.0.2", "127.0.0.3", "127.0.0.4"]), NO_STOP, sequential=True)
    assert trio.current_time() - start == pytest.approx(5.0 + 5.0 + 0.25)
    assert result.winner is not None and result.winner.name == "127.0.0.4"


async def test_probe_slot_wait_comes_out_of_the_timeout(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    """With one probe slot, a second silent primary is 'not probed' at the first's timeout, not twice it."""
    net = VirtualNet(nursery, {"127.0.0.2": SILENT, "127.0.0.3": SILENT})
    core = virtual_core(nursery, net, VirtualDNS(), max_probes=1)
    start = trio.current_time()
    result = await core.checker.check(parse_servers(["127.0.0.2", "127.0.0.3"]), NO_STOP)
    assert trio.current_time() - start == pytest.approx(5.0)
    outcomes = sorted(p.outcome.value for r in result.reports for p in r.probes)
    assert outcomes == sorted([Outcome.TIMEOUT.value, Outcome.OVERLOADED.value])
    assert sum(net.connections.values()) == 1


async def test_probing_waits_for_the_lookup_that_could_make_it_this_host(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    """A server is probed only once the slow lookup of one listed before it says it is not this host."""
    dns = VirtualDNS()
    dns.set_host("other.test", ["127.0.0.5"], delay=1.0)  # refuses connections
    dns.set_host("mx1.test", ["127.0.0.2"])
    net = VirtualNet(nursery, {"127.0.0.2": Peer(greet_after=0.2)})
    core = virtual_core(nursery, net, dns)
    stop = StopSet().with_address("192.0.2.25")
    start = trio.current_time()
    # Were other.test this host, mx1.test (listed after it) would not be probed at all.
    result = await core.checker.check(parse_servers(["10:other.test", "20:mx1.test"]), stop)
    assert trio.current_time() - start == pytest.approx(1.2)
    assert result.winner is not None and result.winner.name == "mx1.test"
    assert net.connections["127.0.0.5"] == 1


async def test_of_servers_up_in_the_same_instant_the_earliest_listed_wins(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Two MX hosts share an address; its one probe answers both at 0.1 s.
    The first listed wins, as the cache-only check would say, though the
    second one's task may take the shared answer first."""
    dns = VirtualDNS()
    dns.set_host("a.test", ["127.0.0.2", "127.0.0.3"])
    dns.set_host("b.test", ["127.0.0.2"])
    net = VirtualNet(nursery, {"127.0.0.2": Peer(greet_after=0.1), "127.0.0.3": SILENT})
    core = virtual_core(nursery, net, dns)
    servers = parse_servers(["0:a.test", "0:b.test"])
    result = await core.checker.check(servers, NO_STOP)
    assert result.winner is not None and result.winner.name == "a.test"
    assert result.reports[0].available
    assert net.connections["127.0.0.2"] == 1
    cached = core.checker.check_cached(servers, NO_STOP)
    assert cached is not None and cached.winner == result.winner


def backup_world(dns: VirtualDNS, *, mx_delay: float = 0.0) -> StopSet:
    dns.set_mx("d.test", [(10, "mx1.d.test"), (20, "backup.d.test")], delay=mx_delay, ttl=300)
    dns.set_host("mx1.d.test", ["127.0.0.2"], ttl=200)
    dns.set_host("backup.d.test", ["192.0.2.25"], ttl=100)
    return StopSet().with_address("192.0.2.25")


async def test_deadline_holds_when_dns_never_answers(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    dns = VirtualDNS()
    stop = backup_world(dns, mx_delay=math.inf)
    core = virtual_core(nursery, VirtualNet(nursery), dns)
    policy = Policy(dns, core.checker, stop, deadline=8.0)
    start = trio.current_time()
    decision = await policy.decide("d.test", stop)
    assert trio.current_time() - start == pytest.approx(8.0)
    assert decision.verdict.kind is Kind.DEADLINE and decision.verdict.action is Action.DUNNO
    assert decision.verdict.reason == "deadline of 8s exceeded"


async def test_deadline_cuts_a_silent_primary_short_and_answers_the_failure_action(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    dns = VirtualDNS()
    stop = backup_world(dns)
    core = virtual_core(nursery, VirtualNet(nursery, {"127.0.0.2": SILENT}), dns)
    policy = Policy(dns, core.checker, stop, deadline=2.0, failure_action=Action.DEFER_IF_PERMIT)
    start = trio.current_time()
    decision = await policy.decide("d.test", stop)
    assert trio.current_time() - start == pytest.approx(2.0)
    assert decision.verdict.kind is Kind.DEADLINE and decision.verdict.action is Action.DEFER_IF_PERMIT


async def test_cached_decision_is_valid_until_its_first_input_expires(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    dns = VirtualDNS()
    stop = backup_world(dns)
    core = virtual_core(nursery, VirtualNet(nursery, {"127.0.0.2": Peer(greet_after=0.5)}), dns, up_ttl=120.0)
    policy = Policy(dns, core.checker, stop, deadline=8.0)
    start = trio.current_time()
    full = await policy.decide("d.test", stop)
    assert full.verdict.kind is Kind.PRIMARY_LIVE and trio.current_time() - start == pytest.approx(0.5)
    cached = policy.decide_cached("d.test", stop)
    assert cached is not None and cached.verdict == full.verdict
    # Inputs: MX list (TTL 300 from 0), addresses (200 and 100 from 0), the probe (120 from 0.5).
    assert cached.valid_until - start == pytest.approx(100.0)
    await trio.sleep(100.0)
    # The backup's addresses are gone, but the primary is listed before it
    # and known up: still decided from caches, now until the probe expires.
    later = policy.decide_cached("d.test", stop)
    assert later is not None and later.verdict.kind is Kind.PRIMARY_LIVE
    assert later.valid_until - start == pytest.approx(120.5)
    assert later.verdict.reason == "primary mx1.d.test live"  # this host's place is unknown now: no claim
    await trio.sleep(20.5)
    assert policy.decide_cached("d.test", stop) is None


# -- the cache-only decision agrees with the full one -------------------------

POOL = [f"127.0.0.{i}" for i in range(2, 8)]
NAMES = ["a.test", "b.test", "c.test", "d.test", "e.test"]
OUTCOMES = [Outcome.AVAILABLE, Outcome.DECLINED, Outcome.TIMEOUT, Outcome.CONNECT_FAILED]


@st.composite
def worlds(draw: st.DrawFn) -> dict[str, object]:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    mx = sorted((draw(st.sampled_from([0, 10, 20, 30])), n) for n in names)
    hosts = {n: draw(st.lists(st.sampled_from(POOL), max_size=2, unique=True)) for n in names}
    probes = {a: draw(st.sampled_from(OUTCOMES)) for a in POOL}
    stop_names = draw(st.lists(st.sampled_from(NAMES), max_size=1))
    server_address = draw(st.sampled_from(["", *POOL]))
    cached_hosts = draw(st.sets(st.sampled_from(names)))
    cached_probes = draw(st.sets(st.sampled_from(POOL)))
    everything = draw(st.booleans())
    return {
        "mx": mx, "hosts": hosts, "probes": probes, "stop_names": stop_names,
        "server_address": server_address,
        "cached_hosts": set(names) if everything else cached_hosts,
        "cached_probes": set(POOL) if everything else cached_probes,
        "everything": everything,
    }


PEERS = {
    Outcome.AVAILABLE: Peer(greet_after=0.1),
    Outcome.DECLINED: Peer(greet_after=0.1, code=421),
    Outcome.TIMEOUT: SILENT,
    Outcome.CONNECT_FAILED: Peer(refuse=True, connect_after=0.1),
}


NOT_LISTED = " (this host is not an MX of the domain)"


def assert_same_verdict(cached: Verdict, full: Verdict, world: dict[str, object]) -> None:
    """Same action and kind; the live MX and the reason may differ only as the caches allow.

    With some probe results cached, a primary known up is named at once,
    where probing everything may find one listed earlier up in the same
    instant: both are live, and only with everything cached must they be
    the same.  A winner known from the caches can also be named while some
    lookup is not cached, so whether this host is listed at all is not
    known there and the reason leaves it out.
    """
    assert (cached.action, cached.kind) == (full.action, full.kind), (cached, full)
    if cached.mx != full.mx:
        mx: list[tuple[int, str]] = world["mx"]  # type: ignore[assignment]
        hosts: dict[str, list[str]] = world["hosts"]  # type: ignore[assignment]
        probes: dict[str, Outcome] = world["probes"]  # type: ignore[assignment]
        order = [name for _, name in mx]
        assert not world["everything"] and cached.mx is not None and full.mx is not None, (cached, full)
        assert any(probes[a] is Outcome.AVAILABLE for a in hosts[cached.mx]), (cached, full)
        assert order.index(cached.mx) > order.index(full.mx), (cached, full)
        full = Verdict(full.action, full.kind, full.reason.replace(f"primary {full.mx} ", f"primary {cached.mx} "), cached.mx)
    if cached.reason != full.reason:
        assert cached.kind is Kind.PRIMARY_LIVE and cached.reason + NOT_LISTED == full.reason, (cached, full)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_cache_only_decision_agrees_with_the_full_decision(world: dict[str, object]) -> None:
    """On pre-filled caches the hot path answers exactly what the full path does.

    Caches are filled with the same truth the virtual network and DNS
    answer with, in part or in full.  Whenever the cache-only decision is
    made, a full decision by a second core whose caches are empty (so it
    looks up and probes everything) must match it: the full path on the
    same core would take the cache shortcut and compare the hot path with
    itself.  With everything cached the decision must be made, and the
    full path on the same core must not touch the network.
    """
    mx: list[tuple[int, str]] = world["mx"]  # type: ignore[assignment]
    hosts: dict[str, list[str]] = world["hosts"]  # type: ignore[assignment]
    probes: dict[str, Outcome] = world["probes"]  # type: ignore[assignment]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            def world_dns() -> VirtualDNS:
                dns = VirtualDNS()
                dns.set_mx("x.test", mx)
                for name, addrs in hosts.items():
                    dns.set_host(name, addrs)
                return dns

            dns = world_dns()
            net = VirtualNet(nursery, {a: PEERS[o] for a, o in probes.items()})
            core = virtual_core(nursery, net, dns)
            lookup = MXLookup("x.test", MXKind.LIST, hosts=tuple(mx), ttl=300)
            dns.mx_cache.put("x.test", lookup, 300)
            for name in world["cached_hosts"]:  # type: ignore[attr-defined]
                parsed = tuple(a for a in (parse_address(x) for x in hosts[name]) if a is not None)
                value = AddressLookup(name, parsed, ttl=300) if parsed else AddressLookup(name, error="NXDOMAIN", ttl=300)
                dns.address_cache.put(name, value, 300)
            for address in world["cached_probes"]:  # type: ignore[attr-defined]
                core.prober.flights.cache.put((address, 25), ProbeResult(probes[address], address, 25), 300)
            stop = StopSet.build(world["stop_names"], [])  # type: ignore[arg-type]
            policy = Policy(dns, core.checker, stop, deadline=30.0)
            request_stop = policy.stop_for(world["server_address"])  # type: ignore[arg-type]
            cached = policy.decide_cached("x.test", request_stop)
            if world["everything"]:
                assert cached is not None
            if cached is not None:
                fresh_dns = world_dns()
                fresh_net = VirtualNet(nursery, {a: PEERS[o] for a, o in probes.items()})
                fresh = Policy(fresh_dns, virtual_core(nursery, fresh_net, fresh_dns).checker, stop, deadline=30.0)
                full = await fresh.decide("x.test", fresh.stop_for(world["server_address"]))  # type: ignore[arg-type]
                assert full.cache is Cache.MISS  # it did go to the network
                assert_same_verdict(cached.verdict, full.verdict, world)
            again = await policy.decide("x.test", request_stop)
            if cached is not None:
                assert again.verdict == cached.verdict
            if world["everything"]:
                assert sum(net.connections.values()) == 0 and not dns.queries
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0), strict_exception_groups=STRICT_EXCEPTION_GROUPS)


def test_mx_servers_keeps_order_and_preference() -> None:
    lookup = MXLookup("x.test", MXKind.LIST, hosts=((10, "a.test"), (20, "b.test")))
    assert [(s.prio, s.host) for s in mx_servers(lookup)] == [(10, "a.test"), (20, "b.test")]


async def test_shutdown_drain_waits_for_the_request_being_decided_and_no_longer(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """wait_drained returns the instant the last request in flight is answered."""
    from policyd.config import Config
    from policyd.responder import Responder
    from testbeds.postfix_request import POSTFIX_37_RCPT_ATTRS
    from policyd.request import PolicyRequest

    dns = VirtualDNS()
    backup_world(dns, mx_delay=3.0)
    core = virtual_core(nursery, VirtualNet(nursery, {"127.0.0.2": Peer(greet_after=0.5)}), dns)
    service = Responder(Config(deadline=8.0), core)
    request = PolicyRequest({**POSTFIX_37_RCPT_ATTRS, "recipient": "user@d.test", "server_address": "192.0.2.25"})
    answers: list[str] = []

    async def ask() -> None:
        answers.append((await service.answer(request)).decision.verdict.action.value)

    start = trio.current_time()
    await service.wait_drained()  # nothing in flight: at once
    assert trio.current_time() == start
    nursery.start_soon(ask)
    await trio.sleep(0.1)
    assert service.metrics.requests_in_flight == 1
    await service.wait_drained()
    assert trio.current_time() - start == pytest.approx(3.5)  # MX lookup 3 s, then the greeting 0.5 s
    assert answers == ["DEFER_IF_PERMIT"] and service.metrics.requests_in_flight == 0


async def test_a_primary_going_down_is_seen_within_ttl_plus_timeout_and_nobody_waits(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Up TTL 10 s, --timeout 5: the refresh starts as long before expiry (10.5 s)
    as the last probe took (0.5 s), less a first-store jitter of at most a tenth
    of the TTL; the silent primary costs it the whole timeout, and the old 'up'
    is served meanwhile; 'down' lands between 14 and 15 s."""
    dns = VirtualDNS()
    stop = backup_world(dns)
    net = VirtualNet(nursery, {"127.0.0.2": Peer(greet_after=0.5)})
    core = virtual_core(nursery, net, dns, up_ttl=10.0, down_ttl=10.0, refresh_window=600.0)
    policy = Policy(dns, core.checker, stop, deadline=8.0)
    start = trio.current_time()
    assert (await policy.decide("d.test", stop)).verdict.kind is Kind.PRIMARY_LIVE  # probed 0 -> 0.5
    net.peers["127.0.0.2"] = SILENT  # the primary goes down at 1 s
    seen: list[tuple[float, Kind, object]] = []
    for tick in range(1, 171):  # an RCPT every 0.1 s up to 17 s, each answered from caches
        await trio.sleep_until(start + tick * 0.1)
        decision = policy.decide_cached("d.test", stop)
        assert decision is not None, f"an RCPT at {tick / 10:.1f} s would have waited"
        seen.append((round(trio.current_time() - start, 1), decision.verdict.kind, decision.cache.value))
    first_down = next(t for t, kind, _ in seen if kind is Kind.ALL_DOWN)
    assert 14.0 <= first_down <= 15.0  # refresh started in [9, 10], timed out 5 s later
    assert first_down - 1.0 <= 10.0 + 5.0  # within TTL + timeout of the flip
    assert {c for t, _, c in seen if 10.5 < t < first_down} == {"stale"}  # expired, served while refreshing
    assert {c for t, _, c in seen if t <= 10.4 or t > first_down} == {"hit"}
    assert net.connections["127.0.0.2"] == 2  # one probe per TTL, no more


@pytest.mark.parametrize("refresh_window", [0.0, 600.0])
async def test_answer_memo_lives_until_its_first_input_expires_or_is_refreshed_and_no_longer(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, refresh_window: float
) -> None:
    """A memoised answer is served until the first cached input it was built
    from expires -- here the probe's "up", the shortest -- or, with refresh
    ahead, until that input's refresh is due, whichever is first; never later."""
    from dataclasses import replace

    from policyd.config import Config
    from policyd.request import PolicyRequest
    from policyd.responder import Responder, core_settings
    from testbeds.postfix_request import POSTFIX_37_RCPT_ATTRS

    dns = VirtualDNS()
    backup_world(dns)  # MX list 300 s, addresses 200 s and 100 s
    config = Config(cache_up_ttl=10.0, refresh_window=refresh_window)
    net = VirtualNet(nursery, {"127.0.0.2": Peer(greet_after=0.1)})
    service = Responder(config, build_core(nursery, core_settings(config), connect=net.connect, lookups=dns))

    def rcpt(local: str) -> PolicyRequest:
        return PolicyRequest({**POSTFIX_37_RCPT_ATTRS, "recipient": f"{local}@d.test", "server_address": "192.0.2.25"})

    assert (await service.answer(rcpt("first"))).decision.verdict.action is Action.DEFER_IF_PERMIT  # probes
    assert service.answer_now(rcpt("second"), trio.current_time()) is None  # nothing memoised yet
    assert (await service.answer(rcpt("second"))).decision.cache is Cache.HIT  # from caches: memoised
    probe = service.core.prober.flights.cache.raw(("127.0.0.2", 25))
    assert probe is not None
    ends = min(probe.expires, probe.due)
    assert ends <= probe.expires < trio.current_time() + 10.0 + 1e-9
    [(_, memo)] = service.answers.entries()
    assert memo.expires == ends

    await trio.sleep_until(ends - 0.001)
    assert service.answer_now(rcpt("before"), trio.current_time()) is not None
    await trio.sleep_until(ends)
    assert service.answer_now(rcpt("after"), trio.current_time()) is None
    # A reload's new policy applies at once, memo or not.
    assert (await service.answer(rcpt("again"))).reply.startswith(b"action=DEFER_IF_PERMIT ")
    service.reconfigure(replace(config, mode="warn"), service.core.stop)
    assert (await service.answer(rcpt("warned"))).reply.startswith(b"action=WARN ")


@pytest.mark.parametrize(("trickle", "outcome", "ends"), [
    (0.5, Outcome.TIMEOUT, 1.0),  # the line would take 11 s: the probe gives up at its timeout
    (0.01, Outcome.AVAILABLE, 0.01 * (len(Peer().greeting) - 1)),  # the last byte, then up
])
async def test_a_trickled_greeting_is_read_until_the_probe_timeout_and_no_longer(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, trickle: float, outcome: Outcome, ends: float
) -> None:
    net = VirtualNet(nursery, {"127.0.0.2": Peer(trickle=trickle)})
    core = build_core(nursery, CoreSettings(probe_timeout=1.0, check_timeout=2.0), connect=net.connect, lookups=VirtualDNS())
    start = trio.current_time()
    result = await core.checker.check(parse_servers(["127.0.0.2"]), NO_STOP)
    assert trio.current_time() - start == pytest.approx(ends)
    assert [p.outcome for p in result.reports[0].probes] == [outcome]


async def test_lookups_of_a_nameserver_that_never_answers_end_at_the_dns_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The resolver's budget is a trio timer: against a socket that takes queries
    and never answers, nothing else can wake the loop, so virtual time is exact."""
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as silent:
        await silent.bind(("127.0.0.1", 0))
        resolver = build_core(nursery, CoreSettings(nameservers=[silent.getsockname()], dns_timeout=0.5)).resolver
        start = trio.current_time()
        mx, _ = await resolver.mx("hang.test")
        assert trio.current_time() - start == pytest.approx(0.5)
        assert mx.kind is MXKind.FAILURE and mx.error == "timeout"
        start = trio.current_time()
        lookup, _ = await resolver.addresses("hang.test")
        assert trio.current_time() - start == pytest.approx(0.5)
        assert lookup.addresses == () and lookup.error == "timeout"
