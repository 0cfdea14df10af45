"""The concurrent checker over real sockets: greeters on loopback, a real DNS server."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
import trio

from smtpdcheck.probe import Outcome
from smtpdcheck.servers import parse_servers
from smtpdcheck.stoprule import StopSet
from tests.conftest import Core, Farm, zone_with_hosts
from testbeds.dnsserver import Behavior, FakeDNSServer
from testbeds.greeters import Mode

STOP_NONE = StopSet()


@pytest.mark.parametrize(
    ("mode", "available", "outcome"),
    [
        (Mode.OK, True, Outcome.AVAILABLE),
        (Mode.MULTILINE, True, Outcome.AVAILABLE),
        (Mode.CODE_421, False, Outcome.DECLINED),
        (Mode.CODE_554, False, Outcome.DECLINED),
        (Mode.CODE_450, False, Outcome.DECLINED),
        (Mode.CLOSE, False, Outcome.CLOSED),
        (Mode.RESET, False, Outcome.CLOSED),
        (Mode.GARBAGE, False, Outcome.BAD_GREETING),
    ],
)
async def test_greeting_outcomes(farm: Callable[..., Farm], make_core: Callable[..., Core], mode: Mode, available: bool, outcome: Outcome) -> None:
    f = await farm(mode)
    core = make_core(f.port)
    with trio.fail_after(5):
        result = await core.checker.check(parse_servers(["10:127.0.0.2"]), STOP_NONE)
    assert (result.winner is not None) is available
    assert [p.outcome for p in result.reports[0].probes] == [outcome]


async def test_refused_and_silent(farm: Callable[..., Farm], make_core: Callable[..., Core]) -> None:
    f = await farm(Mode.SILENT)
    core = make_core(f.port, timeout=0.5)
    with trio.fail_after(5):
        # 127.0.0.9 has no greeter on the farm's port: connection refused.
        result = await core.checker.check(parse_servers(["127.0.0.2", "127.0.0.9"]), STOP_NONE)
    assert result.winner is None
    assert result.reports[0].timed_out
    assert result.reports[1].probes[0].outcome is Outcome.CONNECT_FAILED
    assert "ECONNREFUSED" in result.reports[1].probes[0].detail


async def test_a_greeter_that_stops_listening_is_refused_and_greets_again_on_its_port(
    farm: Callable[..., Farm], make_core: Callable[..., Core]
) -> None:
    f = await farm(Mode.OK)
    greeter = f.greeters[0]
    core = make_core(f.port, timeout=0.5)
    with trio.fail_after(5):
        greeter.mode = Mode.REFUSE
        await greeter.wait_until(lambda: not greeter.listening)
        refused = await core.prober.probe(parse_servers(["127.0.0.2"])[0].address, f.port)  # type: ignore[arg-type]
        assert refused[0].outcome is Outcome.CONNECT_FAILED and "ECONNREFUSED" in refused[0].detail
        greeter.mode = Mode.OK
        await greeter.wait_until(lambda: greeter.listening)
        assert (await core.checker.check(parse_servers(["127.0.0.2"]), STOP_NONE)).winner is None  # still cached down
        core.prober.flights.cache.clear()
        back = await core.checker.check(parse_servers(["127.0.0.2"]), STOP_NONE)
    assert back.winner is not None and greeter.connections == 1


async def test_postscreen_pause_decides_on_first_line_and_never_pregreets(farm: Callable[..., Farm], make_core: Callable[..., Core]) -> None:
    f = await farm(Mode.PAUSED_MULTILINE, pause=3.0)
    core = make_core(f.port, timeout=2.0)
    start = trio.current_time()
    with trio.fail_after(2):
        result = await core.checker.check(parse_servers(["127.0.0.2"]), STOP_NONE)
    assert result.winner is not None
    assert trio.current_time() - start < 1.0  # did not wait for the pause
    greeter = f.greeters[0]
    with trio.fail_after(5):
        await greeter.wait_until(lambda: greeter.active == 0)
    assert greeter.pregreet == [b""]  # nothing sent before the greeting was complete


async def test_quit_after_complete_greeting(farm: Callable[..., Farm], make_core: Callable[..., Core]) -> None:
    f = await farm(Mode.OK)
    core = make_core(f.port)
    with trio.fail_after(5):
        await core.checker.check(parse_servers(["127.0.0.2"]), STOP_NONE)
        greeter = f.greeters[0]
        await greeter.wait_until(lambda: greeter.connections == 1 and greeter.active == 0)
    assert greeter.received == [b"QUIT\r\n"]


async def test_all_servers_probed_at_once(farm: Callable[..., Farm], make_core: Callable[..., Core]) -> None:
    """Three silent primaries and a live one last: one timeout's worth, not four."""
    f = await farm(Mode.SILENT, Mode.SILENT, Mode.SILENT, Mode.OK)
    core = make_core(f.port, timeout=1.5)
    servers = parse_servers(["10:127.0.0.2", "10:127.0.0.3", "20:127.0.0.4", "30:127.0.0.5"])
    with trio.fail_after(1.0):  # sequential would need 4.5 s
        result = await core.checker.check(servers, STOP_NONE)
    assert result.winner is not None and result.winner.host == "127.0.0.5"
    assert all(g.connections == 1 for g in f.greeters)


async def test_sequential_walks_in_order(farm: Callable[..., Farm], make_core: Callable[..., Core]) -> None:
    f = await farm(Mode.SILENT, Mode.OK, Mode.OK)
    core = make_core(f.port, timeout=0.3)
    servers = parse_servers(["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    with trio.fail_after(5):
        result = await core.checker.check(servers, STOP_NONE, sequential=True)
    assert result.winner is not None and result.winner.host == "127.0.0.3"
    assert result.elapsed >= 0.3  # waited for the silent first server
    assert f.greeters[2].connections == 0  # stopped at the first available


async def test_earliest_available_is_reported(farm: Callable[..., Farm], make_core: Callable[..., Core]) -> None:
    f = await farm(Mode.OK, Mode.OK)
    core = make_core(f.port)
    servers = parse_servers(["127.0.0.3", "127.0.0.2"])
    with trio.fail_after(5):
        await core.checker.check(servers, STOP_NONE)  # both cached available now
        result = await core.checker.check(servers, STOP_NONE)
    assert result.from_cache
    assert result.winner is not None and result.winner.host == "127.0.0.3"


async def test_stop_rule_man_page_examples(farm: Callable[..., Farm], make_core: Callable[..., Core], dns_server: FakeDNSServer) -> None:
    """The recovered man-page examples, with s1 up and s2 being this host."""
    f = await farm(Mode.OK, Mode.OK, Mode.OK)
    dns_server.zone.update(
        zone_with_hosts({"s1.domain.com": ["127.0.0.2"], "s2.domain.com": ["127.0.0.3"], "s3.domain.com": ["127.0.0.4"]})
    )
    core = make_core(f.port)
    stop = StopSet.build(["s2.domain.com"], [ipaddress.ip_address("127.0.0.3")])
    with trio.fail_after(5):
        same = await core.checker.check(parse_servers(["10:s1.domain.com", "10:s2.domain.com", "20:s3.domain.com"]), stop)
        worse = await core.checker.check(parse_servers(["10:s1.domain.com", "20:s2.domain.com", "20:s3.domain.com"]), stop)
    assert same.winner is None
    assert worse.winner is not None and worse.winner.name == "s1.domain.com"
    # Nothing at or after this host's preference was ever contacted.
    assert f.greeters[1].connections == 0 and f.greeters[2].connections == 0


async def test_stop_by_resolved_address(farm: Callable[..., Farm], make_core: Callable[..., Core], dns_server: FakeDNSServer) -> None:
    f = await farm(Mode.OK, Mode.OK)
    dns_server.zone.update(zone_with_hosts({"mx1.d.example": ["127.0.0.2"], "backup.d.example": ["::1", "127.0.0.3"]}))
    core = make_core(f.port)
    stop = StopSet.build(addresses=[ipaddress.ip_address("127.0.0.3")])
    with trio.fail_after(5):
        result = await core.checker.check(parse_servers(["10:backup.d.example", "20:mx1.d.example"]), stop)
    assert result.winner is None
    assert result.reports[0].is_stop and result.reports[1].eligible is False
    assert f.greeters[0].connections == 0


async def test_host_with_several_addresses(farm: Callable[..., Farm], make_core: Callable[..., Core], dns_server: FakeDNSServer) -> None:
    """Available if any address greets; all addresses probed at once."""
    f = await farm(Mode.SILENT, Mode.CODE_421, Mode.OK)
    dns_server.zone.update(zone_with_hosts({"mx.d.example": ["127.0.0.2", "127.0.0.3", "127.0.0.4"]}))
    core = make_core(f.port, timeout=3.0)
    with trio.fail_after(1.5):
        result = await core.checker.check(parse_servers(["10:mx.d.example"]), STOP_NONE)
    assert result.winner is not None
    assert set(result.reports[0].addresses) == {ipaddress.ip_address(f"127.0.0.{i}") for i in (2, 3, 4)}


async def test_unresolvable_server_is_just_unavailable(farm: Callable[..., Farm], make_core: Callable[..., Core], dns_server: FakeDNSServer) -> None:
    f = await farm(Mode.OK)
    dns_server.zone.update({("broken.example", "*"): Behavior.SERVFAIL})
    core = make_core(f.port)
    with trio.fail_after(5):
        result = await core.checker.check(parse_servers(["nonexistent.example", "broken.example"]), STOP_NONE)
    assert result.winner is None
    assert result.reports[0].lookup_error == "NXDOMAIN"
    assert result.reports[1].lookup_error == "SERVFAIL"


async def test_dns_that_never_answers_is_bounded(farm: Callable[..., Farm], make_core: Callable[..., Core], dns_server: FakeDNSServer) -> None:
    """A hung lookup costs the server's timeout, and the live server still wins."""
    f = await farm(Mode.OK)
    dns_server.zone.update({("hang.example", "*"): Behavior.HANG, **zone_with_hosts({"up.example": ["127.0.0.2"]})})
    core = make_core(f.port, timeout=1.5, dns_timeout=0.5)
    with trio.fail_after(4):
        hung = await core.checker.check(parse_servers(["hang.example"]), STOP_NONE)
        mixed = await core.checker.check(parse_servers(["10:hang.example", "20:up.example"]), STOP_NONE)
    assert hung.winner is None and hung.reports[0].lookup_error == "timeout"
    assert mixed.winner is not None and mixed.winner.name == "up.example"


async def test_single_flight_and_cache(farm: Callable[..., Farm], make_core: Callable[..., Core]) -> None:
    """Fifty concurrent checks of one server make one connection."""
    f = await farm(Mode.PAUSED_MULTILINE, pause=0.2)
    core = make_core(f.port)
    servers = parse_servers(["127.0.0.2"])
    winners = []

    async def one() -> None:
        result = await core.checker.check(servers, STOP_NONE)
        winners.append(result.winner)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)
        again = await core.checker.check(servers, STOP_NONE)
    assert len(winners) == 50 and all(w is not None for w in winners)
    assert again.from_cache
    assert f.greeters[0].connections == 1
    assert core.prober.flights.started == 1 and core.prober.flights.joined == 49


async def test_down_results_are_cached_too(farm: Callable[..., Farm], make_core: Callable[..., Core]) -> None:
    f = await farm(Mode.CODE_421)
    core = make_core(f.port)
    with trio.fail_after(5):
        for _ in range(3):
            result = await core.checker.check(parse_servers(["127.0.0.2"]), STOP_NONE)
            assert result.winner is None
    assert f.greeters[0].connections == 1


async def test_global_probe_limit(farm: Callable[..., Farm], make_core: Callable[..., Core]) -> None:
    """Never more probes at once than the limit; a probe that cannot start
    in time is 'not probed' and not cached as 'down'."""
    f = await farm(Mode.SILENT, Mode.SILENT, Mode.SILENT)
    core = make_core(f.port, timeout=0.3, max_probes=1)
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, sum(g.active for g in f.greeters))
            await trio.sleep(0.01)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            result = await core.checker.check(parse_servers(["127.0.0.2", "127.0.0.3", "127.0.0.4"]), STOP_NONE)
            while core.prober.flights.inflight:
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    assert result.winner is None
    assert most == 1
    connections = sum(g.connections for g in f.greeters)
    overloaded = core.prober.outcomes[Outcome.OVERLOADED]
    assert overloaded >= 1 and connections + overloaded == 3
    assert core.prober.outcomes[Outcome.TIMEOUT] == connections
    assert len(core.prober.flights.cache) == connections  # unprobed ones are not remembered


async def test_cache_fast_path_falls_back_when_anything_is_missing(farm: Callable[..., Farm], make_core: Callable[..., Core]) -> None:
    f = await farm(Mode.CODE_421, Mode.OK)
    core = make_core(f.port)
    with trio.fail_after(5):
        first = await core.checker.check(parse_servers(["10:127.0.0.2"]), STOP_NONE)
        assert first.winner is None
        # .2 is cached down, .3 is not cached: the network is asked for .3 only.
        assert core.checker.check_cached(parse_servers(["10:127.0.0.2", "20:127.0.0.3"]), STOP_NONE) is None
        second = await core.checker.check(parse_servers(["10:127.0.0.2", "20:127.0.0.3"]), STOP_NONE)
        third = await core.checker.check(parse_servers(["10:127.0.0.2", "20:127.0.0.3"]), STOP_NONE)
    assert second.winner is not None and not second.from_cache
    assert third.winner is not None and third.from_cache
    assert [g.connections for g in f.greeters] == [1, 1]


async def test_mx_host_names_shared_by_domains_are_held_once(
    dns_server: FakeDNSServer, make_core: Callable[..., Core]
) -> None:
    """A hoster's MX names serve many domains: cached MX lists of different
    domains hold one copy of each name, not one per domain."""
    for name in ("a.example", "b.example"):
        dns_server.zone[(name, "MX")] = ["10 mx1.hoster.example.", "20 backup.hoster.example."]
    core = make_core()
    with trio.fail_after(5):
        a, _ = await core.resolver.mx("a.example")
        b, _ = await core.resolver.mx("b.example")
    assert a.hosts == b.hosts == ((10, "mx1.hoster.example"), (20, "backup.hoster.example"))
    assert all(x[1] is y[1] for x, y in zip(a.hosts, b.hosts))
