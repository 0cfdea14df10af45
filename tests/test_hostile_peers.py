"""Hostile and broken peers: every probe and lookup ends by its deadline.

Each test points the core at an SMTP or DNS peer that misbehaves on purpose
(trickling, flooding, resetting, never reading, never answering, lying) and
checks three things: the call returns by its deadline, the connection is
closed afterwards (the greeter's ``active`` count drops to 0, the probe
limiter is free), and the next check works as if nothing had happened.
"""

from __future__ import annotations

import ipaddress
import string
import struct
from collections.abc import Callable

import pytest
import trio

from smtpdcheck.check import Checker, CheckResult
from smtpdcheck.core import CoreSettings, build_core
from smtpdcheck.policy import mx_servers
from smtpdcheck.greeting import MAX_GREETING_BYTES
from smtpdcheck.probe import RECEIVE_CHUNK, Outcome, Prober
from smtpdcheck.resolver import MAX_MX_HOSTS, MXKind
from smtpdcheck.servers import is_valid_hostname, parse_servers
from smtpdcheck.stoprule import StopSet
from tests.conftest import Core, Farm, zone_with_hosts
from testbeds.dnsserver import Behavior, FakeDNSServer, Slow, Zone
from testbeds.greeters import Greeter, Mode

STOP_NONE = StopSet()
QUIT_GRACE = 0.5  # what make_core gives its Prober
# Scheduling slack on top of the quit grace, for the quit-grace tests only;
# every other rule of time is checked on virtual time (test_virtual_time).
SLACK = 0.4


async def closed(greeter: Greeter, limit: float = 3.0) -> None:
    """Wait (bounded) until the greeter has no open connection left."""
    with trio.fail_after(limit):
        await greeter.wait_until(lambda: greeter.active == 0)


async def probes_finished(prober: Prober, limit: float) -> float:
    """Wait (bounded) until no probe task holds a limiter slot; return the wait."""
    start = trio.current_time()
    with trio.fail_after(limit):
        while prober.limiter.borrowed_tokens:
            await trio.sleep(0.01)
    return trio.current_time() - start


async def next_check_works(checker: Checker, host: str = "127.0.0.3") -> None:
    """A well-behaved server checked right after the hostile one is found up."""
    with trio.fail_after(3):
        result = await checker.check(parse_servers([host]), STOP_NONE)
    assert result.winner is not None and result.winner.host == host


async def timed_check(checker: Checker, words: list[str], limit: float) -> tuple[CheckResult, float]:
    start = trio.current_time()
    with trio.fail_after(limit):
        result = await checker.check(parse_servers(words), STOP_NONE)
    return result, trio.current_time() - start


# --------------------------------------------------------------- SMTP peers


async def test_trickled_greeting_gives_up_at_the_deadline(farm: Callable[..., Farm], make_core: Callable[..., Core]) -> None:
    """One byte every 0.5 s: the first line would take ~10 s; the probe stops at 1 s."""
    f = await farm(Mode.TRICKLE, Mode.OK, trickle_interval=0.5)
    core = make_core(f.port, timeout=1.0)
    result, _ = await timed_check(core.checker, ["127.0.0.2"], 3)
    assert result.winner is None
    report = result.reports[0]
    assert report.timed_out or [p.outcome for p in report.probes] == [Outcome.TIMEOUT]
    # When it gives up is proven at exact instants on virtual time (test_virtual_time).
    await closed(f.greeters[0])
    await probes_finished(core.prober, 1.0)
    assert f.greeters[0].pregreet == [b""]
    await next_check_works(core.checker)


async def test_trickled_greeting_that_arrives_in_time_is_available(farm: Callable[..., Farm], make_core: Callable[..., Core]) -> None:
    f = await farm(Mode.TRICKLE, Mode.OK, trickle_interval=0.01)  # ~0.2 s for the whole line
    core = make_core(f.port, timeout=1.5)
    result, _ = await timed_check(core.checker, ["127.0.0.2"], 3)
    assert result.winner is not None
    greeter = f.greeters[0]
    await closed(greeter)
    assert greeter.pregreet == [b""]  # nothing said while the greeting trickled in
    assert greeter.received == [b"QUIT\r\n"]
    await next_check_works(core.checker)


async def test_flood_without_newline_is_a_bad_greeting_read_in_bounded_bytes(
    farm: Callable[..., Farm], make_core: Callable[..., Core], monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 MiB of 'A' and no newline: rejected after a few KiB, at once."""
    f = await farm(Mode.FLOOD, Mode.OK)
    read_by_probe = 0
    original = trio.SocketStream.receive_some

    async def counting(self: trio.SocketStream, max_bytes: int | None = None) -> bytes | bytearray:
        nonlocal read_by_probe
        try:
            peer = self.socket.getpeername()
        except OSError:
            peer = None
        data = await original(self, max_bytes)
        if peer == ("127.0.0.2", f.port):  # the client side of a connection to the flooder
            read_by_probe += len(data)
        return data

    monkeypatch.setattr(trio.SocketStream, "receive_some", counting)
    core = make_core(f.port, timeout=2.0)
    result, _ = await timed_check(core.checker, ["127.0.0.2"], 3)
    assert result.winner is None
    [probe] = result.reports[0].probes
    assert probe.outcome is Outcome.BAD_GREETING  # not TIMEOUT: it did not wait for the rest
    assert str(MAX_GREETING_BYTES) in probe.detail
    assert 0 < read_by_probe <= MAX_GREETING_BYTES + RECEIVE_CHUNK
    await closed(f.greeters[0])  # our close (with unread data) stops the flood
    await probes_finished(core.prober, 1.0)
    await next_check_works(core.checker)


async def test_reset_in_the_middle_of_the_greeting(farm: Callable[..., Farm], make_core: Callable[..., Core]) -> None:
    f = await farm(Mode.RESET_MID, Mode.OK)
    core = make_core(f.port, timeout=2.0)
    result, _ = await timed_check(core.checker, ["127.0.0.2"], 3)
    assert result.winner is None
    [probe] = result.reports[0].probes
    assert probe.outcome is Outcome.CLOSED  # not TIMEOUT: the reset ended it
    await closed(f.greeters[0])
    await probes_finished(core.prober, 1.0)
    await next_check_works(core.checker)


async def test_server_that_never_reads_is_available_and_let_go_after_the_quit_grace(
    farm: Callable[..., Farm], make_core: Callable[..., Core]
) -> None:
    """Greets, then never reads our QUIT nor answers it: still up; we leave
    after the quit grace, not at the probe timeout."""
    f = await farm(Mode.NO_READ, Mode.OK)
    core = make_core(f.port, timeout=3.0)
    result, elapsed = await timed_check(core.checker, ["127.0.0.2"], 3)
    assert result.winner is not None
    assert [p.outcome for p in result.reports[0].probes] == [Outcome.AVAILABLE]
    assert elapsed < 0.5
    waited = await probes_finished(core.prober, QUIT_GRACE + 1.0)
    assert waited < QUIT_GRACE + SLACK
    greeter = f.greeters[0]
    await closed(greeter)
    assert greeter.pregreet == [b""]
    assert greeter.received == [b"QUIT\r\n"]  # said, after the greeting, and left unanswered
    await next_check_works(core.checker)


async def test_server_that_holds_after_221_is_closed_by_us(farm: Callable[..., Farm], make_core: Callable[..., Core]) -> None:
    """We close as soon as the 221 arrives, without waiting for the peer or the grace."""
    f = await farm(Mode.HOLD_AFTER_QUIT, Mode.OK)
    core = make_core(f.port, timeout=10.0, dns_timeout=1.0, quit_grace=5.0)
    result, _ = await timed_check(core.checker, ["127.0.0.2"], 3)
    assert result.winner is not None
    waited = await probes_finished(core.prober, 2.0)
    assert waited < 1.0  # far below both the 5 s grace and the 10 s timeout
    greeter = f.greeters[0]
    await closed(greeter, 2.0)
    assert greeter.received == [b"QUIT\r\n"]
    assert greeter.closed_by_client == 1  # the greeter held on; we hung up
    await next_check_works(core.checker)


async def test_postscreen_pause_longer_than_the_timeout(farm: Callable[..., Farm], make_core: Callable[..., Core]) -> None:
    """220- then a 3 s pause, probe timeout 1 s: available on the first line,
    nothing sent before the greeting completes, connection dropped after the
    quit grace."""
    f = await farm(Mode.PAUSED_MULTILINE, Mode.OK, pause=3.0)
    core = make_core(f.port, timeout=1.0)
    result, elapsed = await timed_check(core.checker, ["127.0.0.2"], 2)
    assert result.winner is not None
    assert elapsed < 0.5
    waited = await probes_finished(core.prober, QUIT_GRACE + 1.0)
    assert waited < QUIT_GRACE + SLACK
    greeter = f.greeters[0]
    await closed(greeter)
    assert greeter.pregreet == [b""]
    assert greeter.received == [b""]  # the greeting never completed: no QUIT
    await next_check_works(core.checker)


async def test_a_greeting_completed_after_the_probe_timeout_still_gets_its_quit(
    farm: Callable[..., Farm], make_core: Callable[..., Core]
) -> None:
    """postscreen's teaser, then the last line 2 s later, past the 1 s probe
    timeout: the politeness budget counts from the first line, so the probe
    waits for the last line and says QUIT (postscreen logs no HANGUP)."""
    f = await farm(Mode.PAUSED_MULTILINE, Mode.OK, pause=2.0)
    core = make_core(f.port, timeout=1.0, dns_timeout=1.0, quit_grace=3.0)
    result, _ = await timed_check(core.checker, ["127.0.0.2"], 2)
    assert result.winner is not None
    await probes_finished(core.prober, 5.0)
    greeter = f.greeters[0]
    await closed(greeter)
    assert greeter.pregreet == [b""]
    assert greeter.received == [b"QUIT\r\n"]
    await next_check_works(core.checker)


# ---------------------------------------------------------------- DNS peers


async def resolver_is_healthy(core: Core, dns_server: FakeDNSServer) -> None:
    """After a bad lookup: no query slot leaked, and a good name resolves."""
    dns_server.zone.update(zone_with_hosts({"fine.test": ["127.0.0.2"]}))
    with trio.fail_after(2):
        lookup, cached = await core.resolver.addresses("fine.test")
    assert lookup.addresses == (ipaddress.ip_address("127.0.0.2"),) and not cached
    assert core.resolver.limiter.borrowed_tokens == 0


@pytest.mark.parametrize(
    ("zone", "why"),
    [
        pytest.param({("bad.test", "*"): Behavior.HANG}, "never answers", id="hang"),
        pytest.param({("bad.test", "A"): Behavior.HANG, ("bad.test", "AAAA"): ["::1"]}, "one family hangs", id="hang-a-only"),
        pytest.param({("bad.test", "*"): Slow(3.0, []), ("bad.test", "A"): ["127.0.0.2"]}, "answers after the deadline", id="slow"),
        pytest.param({("bad.test", "*"): Behavior.GARBAGE}, "answers with garbage, which is ignored", id="garbage"),
        pytest.param({("bad.test", "*"): Behavior.WRONG_ID, ("bad.test", "A"): ["127.0.0.2"]}, "answers with the wrong id", id="wrong-id"),
    ],
)
async def test_address_lookup_ends_by_the_resolver_timeout(
    make_core: Callable[..., Core], dns_server: FakeDNSServer, zone: Zone, why: str
) -> None:
    dns_server.zone.update(zone)
    core = make_core(timeout=2.0, dns_timeout=0.5)
    with trio.fail_after(2):  # a hang guard: the budget's arithmetic is proven on virtual time
        lookup, cached = await core.resolver.addresses("bad.test")
    assert not cached
    if why == "one family hangs":
        # The family that answered is used; the failure is not cached for long.
        assert lookup.addresses == (ipaddress.ip_address("::1"),)
        assert core.resolver._address_ttl(lookup) <= core.resolver.failure_ttl
    else:
        assert lookup.addresses == () and lookup.error == "timeout", why
    assert dns_server.query_count("bad.test") >= 2  # it was asked: A and AAAA
    await resolver_is_healthy(core, dns_server)


@pytest.mark.parametrize("behavior", [Behavior.HANG, Behavior.GARBAGE, Behavior.WRONG_ID], ids=lambda b: b.name.lower())
async def test_mx_lookup_ends_by_the_resolver_timeout(make_core: Callable[..., Core], dns_server: FakeDNSServer, behavior: Behavior) -> None:
    dns_server.zone.update({("bad.test", "*"): behavior, ("bad.test", "MX"): ["10 mx.bad.test."]})
    core = make_core(dns_timeout=0.5)
    with trio.fail_after(2):  # a hang guard: the budget's arithmetic is proven on virtual time
        mx, _ = await core.resolver.mx("bad.test")
    assert mx.kind is MXKind.FAILURE and mx.error == "timeout" and mx.hosts == ()
    await resolver_is_healthy(core, dns_server)


async def test_truncated_mx_answer_falls_back_to_tcp(make_core: Callable[..., Core], dns_server: FakeDNSServer) -> None:
    names = [f"mx{i}-{'x' * 50}.trunc.test" for i in range(MAX_MX_HOSTS)]  # > 512 octets
    dns_server.zone.update({
        ("trunc.test", "*"): Behavior.TRUNCATE,
        ("trunc.test", "MX"): [f"{(i * 7) % MAX_MX_HOSTS} {name}." for i, name in enumerate(names)],
    })
    core = make_core(dns_timeout=2.0)
    with trio.fail_after(3):
        mx, _ = await core.resolver.mx("trunc.test")
    assert mx.kind is MXKind.LIST and mx.ignored == ()
    assert mx.hosts == tuple(sorted(((i * 7) % MAX_MX_HOSTS, name) for i, name in enumerate(names)))
    transports = [t for q, rdtype, t in dns_server.queries if q == "trunc.test" and rdtype == "MX"]
    assert transports == ["udp", "tcp"]


async def test_cname_loop_for_an_mx_host(farm: Callable[..., Farm], make_core: Callable[..., Core], dns_server: FakeDNSServer) -> None:
    """A looping CNAME makes that MX unavailable, quickly; the next MX still counts."""
    f = await farm(Mode.OK)
    dns_server.zone.update({
        ("loop.test", "MX"): ["10 mx.loop.test.", "15 self.loop.test.", "20 live.loop.test."],
        ("mx.loop.test", "CNAME"): ["mx2.loop.test."],
        ("mx2.loop.test", "CNAME"): ["mx.loop.test."],
        ("self.loop.test", "CNAME"): ["self.loop.test."],
        **zone_with_hosts({"live.loop.test": ["127.0.0.2"]}),
    })
    core = make_core(f.port, dns_timeout=1.0)
    with trio.fail_after(3):
        mx, _ = await core.resolver.mx("loop.test")
        looped, _ = await core.resolver.addresses("mx.loop.test")
        selfish, _ = await core.resolver.addresses("self.loop.test")
        result = await core.checker.check(mx_servers(mx), STOP_NONE)
    assert [h for _, h in mx.hosts] == ["mx.loop.test", "self.loop.test", "live.loop.test"]
    for lookup in (looped, selfish):
        assert lookup.addresses == () and lookup.error not in (None, "timeout")  # an answer, not a timeout
    assert result.winner is not None and result.winner.name == "live.loop.test"
    assert [r.lookup_error is not None for r in result.reports] == [True, True, False]
    await closed(f.greeters[0])


async def test_thousands_of_mx_records_are_capped(make_core: Callable[..., Core], dns_server: FakeDNSServer) -> None:
    """2000 MX records (over TCP): the 10 most preferred are kept, the rest
    reported as ignored; checking the list looks up at most 10 hosts."""
    count = 2000
    prefs = {f"mx{i}.many.test": (i * 7919) % count for i in range(count)}  # all distinct, shuffled
    dns_server.zone.update({("many.test", "MX"): [f"{p} {name}." for name, p in prefs.items()]})
    core = make_core(timeout=1.0, dns_timeout=3.0)
    with trio.fail_after(5):
        mx, _ = await core.resolver.mx("many.test")
    assert mx.kind is MXKind.LIST
    best = sorted((p, name) for name, p in prefs.items())[:MAX_MX_HOSTS]
    assert mx.hosts == tuple(best)
    assert 0 < len(mx.ignored) <= MAX_MX_HOSTS
    assert set(mx.ignored) <= set(prefs) - {name for _, name in best}
    with trio.fail_after(5):
        result = await core.checker.check(mx_servers(mx), STOP_NONE)
    assert result.winner is None and len(result.reports) == MAX_MX_HOSTS
    lookups = {q for q, rdtype, _ in dns_server.queries if rdtype in ("A", "AAAA")}
    assert lookups == {name for _, name in best}


BAD_TARGETS = [
    "bad\\032name.test.",  # a space
    "a=b.test.",
    "cr\\013\\010lf.test.",  # CR LF
    "nul\\000.test.",
    "ctl\\007.test.",
    "\\195\\169t\\195\\169.test.",  # UTF-8 bytes, not an A-label
    "a\\.b.test.",  # a dot inside a label
    "-lead.test.",
    "*.test.",
    "tab\\009.test.",
    "del\\127.test.",
    ".",  # the root, but not a lone null MX
]
LONGEST_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters, 255 octets on the wire


async def test_mx_targets_that_are_not_host_names_are_ignored(make_core: Callable[..., Core], dns_server: FakeDNSServer) -> None:
    assert len(LONGEST_NAME) == 253 and is_valid_hostname(LONGEST_NAME)
    records = [f"{i} {target}" for i, target in enumerate(BAD_TARGETS)]
    records += ["30 ok_1.test.", "31 GOOD.Test.", f"32 {LONGEST_NAME}."]
    dns_server.zone.update({("odd.test", "MX"): records})
    core = make_core(dns_timeout=1.0)
    with trio.fail_after(2):
        mx, _ = await core.resolver.mx("odd.test")
    assert mx.kind is MXKind.LIST
    assert mx.hosts == ((30, "ok_1.test"), (31, "good.test"), (32, LONGEST_NAME))
    assert mx.ignored  # reported, bounded, and safe to log as they are
    assert len(mx.ignored) <= len(BAD_TARGETS)
    printable = set(string.printable) - set("\t\n\r\x0b\x0c")
    assert all(set(text) <= printable for text in mx.ignored)


async def test_mx_with_only_unusable_targets_is_a_failure(make_core: Callable[..., Core], dns_server: FakeDNSServer) -> None:
    dns_server.zone.update({("odd.test", "MX"): [f"{i} {t}" for i, t in enumerate(BAD_TARGETS)]})
    core = make_core(dns_timeout=1.0)
    with trio.fail_after(2):
        mx, _ = await core.resolver.mx("odd.test")
    assert mx.kind is MXKind.FAILURE and mx.hosts == ()
    assert mx.error == "no usable MX host name"


def _mx_reply(query: bytes, labels: int) -> bytes:
    """A hand-made MX answer whose target is ``labels`` labels of 63 octets."""
    end = 12
    while query[end] != 0:
        end += 1 + query[end]
    question = query[12 : end + 5]
    header = query[:2] + b"\x85\x80" + struct.pack("!HHHH", 1, 1, 0, 0)
    target = (b"\x3f" + b"a" * 63) * labels + b"\x00"
    rdata = struct.pack("!H", 10) + target
    answer = b"\xc0\x0c" + struct.pack("!HHIH", 15, 1, 300, len(rdata)) + rdata
    return header + question + answer


async def _raw_mx_server(sock: trio.socket.SocketType, labels: int) -> None:
    while True:
        query, peer = await sock.recvfrom(4096)
        await sock.sendto(_mx_reply(query, labels), peer)


@pytest.mark.parametrize("labels", [3, 5], ids=["193-octets", "321-octets"])
async def test_mx_target_longer_than_255_octets_is_never_returned(nursery: trio.Nursery, labels: int) -> None:
    """dnspython cannot build such a name, so a raw responder sends one.
    With 3 labels (193 octets) the same reply is a valid MX list; with 5
    (321 octets) dnspython refuses the message and the lookup fails by its
    deadline, returning no host."""
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        async with trio.open_nursery() as server:
            server.start_soon(_raw_mx_server, sock, labels)
            resolver = build_core(nursery, CoreSettings(nameservers=[sock.getsockname()], dns_timeout=0.5)).resolver
            with trio.fail_after(2):
                mx, _ = await resolver.mx("long.test")
            server.cancel_scope.cancel()
    if labels == 3:
        assert mx.kind is MXKind.LIST and mx.hosts == ((10, ".".join(["a" * 63] * 3)),)
    else:
        assert mx.kind is MXKind.FAILURE and mx.hosts == () and mx.error == "timeout"


async def _udp_always_truncates(sock: trio.socket.SocketType) -> None:
    while True:
        query, peer = await sock.recvfrom(4096)
        # The query's id and question, QR and TC set, no records.
        await sock.sendto(query[:2] + b"\x82\x00" + query[4:6] + b"\x00" * 6 + query[12:_question_end(query)], peer)


def _question_end(query: bytes) -> int:
    end = 12
    while query[end] != 0:
        end += 1 + query[end]
    return end + 5


async def _tcp_misbehaves(listener: trio.SocketListener, how: str, accepted: list[int]) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        accepted.append(1)
        async with stream:
            if how == "hang":
                await trio.sleep_forever()
            elif how == "short":
                await stream.receive_some(4096)
                await stream.send_all(b"\x00\x40abc")  # promises 64 octets, sends 3, closes
            # "close": hang up at once

    await trio.serve_listeners(handle, [listener])


@pytest.mark.parametrize("how", ["close", "short", "hang"])
async def test_truncated_over_udp_and_broken_over_tcp(nursery: trio.Nursery, how: str) -> None:
    """The TCP fallback meets a peer that hangs up, lies or never answers:
    the lookup still fails cleanly by its deadline."""
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM) as tcp:
        await tcp.bind(("127.0.0.1", 0))
        tcp.listen(8)
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as udp:
            await udp.bind(tcp.getsockname())
            async with trio.SocketListener(tcp) as listener, trio.open_nursery() as server:
                server.start_soon(_udp_always_truncates, udp)
                accepted: list[int] = []
                server.start_soon(_tcp_misbehaves, listener, how, accepted)
                resolver = build_core(nursery, CoreSettings(nameservers=[tcp.getsockname()], dns_timeout=0.5)).resolver
                with trio.fail_after(2):
                    mx, _ = await resolver.mx("t.test")
                    lookup, _ = await resolver.addresses("t.test")
                server.cancel_scope.cancel()
    assert mx.kind is MXKind.FAILURE and mx.hosts == () and mx.error
    assert lookup.addresses == () and lookup.error
    assert accepted  # the fallback to TCP did happen
    assert resolver.limiter.borrowed_tokens == 0


# ------------------------------------------------------ bounded amplification


async def test_burst_makes_one_connection_per_address_then_none(
    farm: Callable[..., Farm], make_core: Callable[..., Core], dns_server: FakeDNSServer
) -> None:
    """200 concurrent checks of one MX list (3 hosts x 2 addresses): one MX
    query, one A and one AAAA query per host, one connection per address.
    A second burst is answered from the caches and touches nobody."""
    modes = [Mode.CODE_421, Mode.CODE_554, Mode.CODE_450, Mode.CLOSE, Mode.CODE_421, Mode.GARBAGE]
    f = await farm(*modes)
    hosts = {f"mx{n}.burst.test": [f"127.0.0.{2 + 2 * n}", f"127.0.0.{3 + 2 * n}"] for n in range(3)}
    dns_server.zone.update({
        ("burst.test", "MX"): [f"{10 * (n + 1)} mx{n}.burst.test." for n in range(3)],
        **zone_with_hosts(hosts),
    })
    core = make_core(f.port, timeout=2.0, dns_timeout=1.0)

    async def burst() -> list[CheckResult]:
        results: list[CheckResult] = []

        async def one() -> None:
            mx, _ = await core.resolver.mx("burst.test")
            results.append(await core.checker.check(mx_servers(mx), STOP_NONE))

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for _ in range(200):
                    nursery.start_soon(one)
        return results

    first = await burst()
    assert len(first) == 200 and all(r.winner is None for r in first)
    for greeter in f.greeters:
        await closed(greeter)
    assert [g.connections for g in f.greeters] == [1] * 6
    assert dns_server.query_count("burst.test", "MX") == 1
    for host in hosts:
        assert dns_server.query_count(host, "A") == 1 and dns_server.query_count(host, "AAAA") == 1
    queries = len(dns_server.queries)

    second = await burst()
    assert len(second) == 200 and all(r.winner is None and r.from_cache for r in second)
    assert [g.connections for g in f.greeters] == [1] * 6
    assert len(dns_server.queries) == queries
