"""The fake nameserver must behave exactly as documented, or tests built on it lie.

Everything here goes over real loopback sockets through dnspython's own
transport code, the same path the policy server uses.
"""

from __future__ import annotations

import socket

import dns.asyncbackend
import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpdcheck.compat import dns_backend, use_nameservers
from testbeds.dnsserver import (
    MAX_CNAME_CHAIN,
    SOA_TEXT,
    Behavior,
    FakeDNSServer,
    Slow,
    Zone,
    backup_mx_zone,
    nameserver_arg,
)

BACKEND = dns.asyncbackend.get_backend("trio")
"""For single exchanges: what the server sends, datagram by datagram."""
RESOLVER_BACKEND = dns_backend()
"""For resolver lookups: the policy server's own, so they behave as its lookups do."""
STEP = 2.0
"""Upper bound for any single exchange that is expected to succeed."""
BULK = 10.0
"""Bound for exchanges of thousands of records, whose parsing and rendering
take a sizeable part of a second on a loaded machine."""


def make_resolver(server: FakeDNSServer, lifetime: float = STEP) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    use_nameservers(resolver, [(server.host, server.port)])
    resolver.timeout = lifetime
    resolver.lifetime = lifetime
    resolver.cache = None
    return resolver


async def resolve(server: FakeDNSServer, name: str, rdtype: str, lifetime: float = STEP) -> dns.resolver.Answer:
    with trio.fail_after(lifetime + STEP):
        return await make_resolver(server, lifetime).resolve(name, rdtype, backend=RESOLVER_BACKEND)


async def udp(server: FakeDNSServer, query: dns.message.Message, timeout: float = STEP) -> dns.message.Message:
    with trio.fail_after(timeout + STEP):
        return await dns.asyncquery.udp(query, server.host, timeout=timeout, port=server.port, backend=BACKEND)


async def tcp(server: FakeDNSServer, query: dns.message.Message, timeout: float = STEP) -> dns.message.Message:
    with trio.fail_after(timeout + STEP):
        return await dns.asyncquery.tcp(query, server.host, timeout=timeout, port=server.port, backend=BACKEND)


def texts(answer: dns.resolver.Answer) -> list[str]:
    return sorted(rdata.to_text() for rdata in answer)


async def start(nursery: trio.Nursery, server: FakeDNSServer) -> FakeDNSServer:
    with trio.fail_after(STEP):
        await nursery.start(server.serve)
    return server


async def tcp_exchange(server: FakeDNSServer, wires: list[bytes], replies: int) -> list[dns.message.Message]:
    """Send several framed queries on one connection and read ``replies`` answers."""
    with trio.fail_after(STEP):
        stream = await trio.open_tcp_stream(server.host, server.port)
        async with stream:
            await stream.send_all(b"".join(len(w).to_bytes(2, "big") + w for w in wires))
            buffer = bytearray()
            messages: list[dns.message.Message] = []
            while len(messages) < replies:
                chunk = await stream.receive_some(65536)
                assert chunk, "server closed the connection early"
                buffer += chunk
                while len(buffer) >= 2 and len(buffer) >= 2 + int.from_bytes(buffer[:2], "big"):
                    length = int.from_bytes(buffer[:2], "big")
                    messages.append(dns.message.from_wire(bytes(buffer[2 : 2 + length])))
                    del buffer[: 2 + length]
            return messages


ZONE: Zone = {
    ("example.com", "MX"): ["10 mx1.example.com.", "20 mx2.example.com."],
    ("mx1.example.com", "A"): ["127.0.0.1"],
    ("mx1.example.com", "AAAA"): ["::1"],
    ("mx2.example.com.", "a"): ["127.0.0.2"],
}


@pytest.fixture
async def server(nursery: trio.Nursery) -> FakeDNSServer:
    return await start(nursery, FakeDNSServer(dict(ZONE)))


# ---------------------------------------------------------------- plain data


async def test_answers_records_over_udp(server: FakeDNSServer) -> None:
    answer = await resolve(server, "example.com", "MX")
    assert texts(answer) == ["10 mx1.example.com.", "20 mx2.example.com."]
    assert answer.rrset is not None and answer.rrset.ttl == 300
    assert texts(await resolve(server, "mx1.example.com", "A")) == ["127.0.0.1"]
    assert texts(await resolve(server, "mx1.example.com", "AAAA")) == ["::1"]
    assert server.queries == [
        ("example.com", "MX", "udp"),
        ("mx1.example.com", "A", "udp"),
        ("mx1.example.com", "AAAA", "udp"),
    ]


async def test_answers_over_tcp_with_aa(server: FakeDNSServer) -> None:
    response = await tcp(server, dns.message.make_query("example.com", "MX"))
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert len(response.answer[0]) == 2
    assert server.queries == [("example.com", "MX", "tcp")]


async def test_names_and_types_are_case_insensitive(server: FakeDNSServer) -> None:
    # The key was written "mx2.example.com." / "a"; ask in another spelling.
    assert texts(await resolve(server, "MX2.Example.COM.", "A")) == ["127.0.0.2"]
    assert server.queries == [("mx2.example.com", "A", "udp")]


async def test_custom_ttl(nursery: trio.Nursery) -> None:
    server = await start(nursery, FakeDNSServer({("t.test", "A"): ["127.0.0.9"]}, ttl=42))
    answer = await resolve(server, "t.test", "A")
    assert answer.rrset is not None and answer.rrset.ttl == 42


async def test_per_name_ttl(nursery: trio.Nursery) -> None:
    zone: Zone = {("short.test", "A"): ["127.0.0.9"], ("long.test", "A"): ["127.0.0.8"]}
    server = await start(nursery, FakeDNSServer(zone, ttl=300, name_ttls={"Short.Test.": 2}))
    answer = await resolve(server, "short.test", "A")
    assert answer.rrset is not None and answer.rrset.ttl == 2
    answer = await resolve(server, "long.test", "A")
    assert answer.rrset is not None and answer.rrset.ttl == 300
    server.name_ttls["long.test"] = 5  # changed while running: the next answer has it
    answer = await resolve(server, "long.test", "A")
    assert answer.rrset is not None and answer.rrset.ttl == 5


async def test_nodata_has_soa_and_noerror(server: FakeDNSServer) -> None:
    response = await udp(server, dns.message.make_query("mx2.example.com", "MX"))
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert response.answer == []
    assert response.authority[0].to_text() == f"test. 300 IN SOA {SOA_TEXT}"
    with pytest.raises(dns.resolver.NoAnswer):
        await resolve(server, "mx2.example.com", "MX")


async def test_explicit_empty_records_is_nodata(nursery: trio.Nursery) -> None:
    server = await start(nursery, FakeDNSServer({("empty.test", "MX"): []}))
    response = await udp(server, dns.message.make_query("empty.test", "MX"))
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == [] and len(response.authority) == 1


async def test_unknown_name_is_nxdomain_with_soa(server: FakeDNSServer) -> None:
    response = await udp(server, dns.message.make_query("nope.example.com", "A"))
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.flags & dns.flags.AA
    assert response.authority[0].rdtype == dns.rdatatype.SOA
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolve(server, "nope.example.com", "A")


async def test_zone_may_change_while_serving(server: FakeDNSServer) -> None:
    assert texts(await resolve(server, "mx1.example.com", "A")) == ["127.0.0.1"]
    server.zone[("mx1.example.com", "A")] = ["127.0.0.5"]
    server.zone[("new.example.com", "A")] = ["127.0.0.6"]
    assert texts(await resolve(server, "mx1.example.com", "A")) == ["127.0.0.5"]
    assert texts(await resolve(server, "new.example.com", "A")) == ["127.0.0.6"]
    del server.zone[("new.example.com", "A")]
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolve(server, "new.example.com", "A")


async def test_query_count_filters(server: FakeDNSServer) -> None:
    await resolve(server, "example.com", "MX")
    await resolve(server, "example.com", "MX")
    await resolve(server, "mx1.example.com", "A")
    assert server.query_count() == 3
    assert server.query_count("Example.com.") == 2
    assert server.query_count(rdtype="a") == 1
    assert server.query_count("mx1.example.com", "AAAA") == 0


async def test_nameserver_arg(server: FakeDNSServer) -> None:
    assert nameserver_arg(server) == f"127.0.0.1:{server.port}"
    assert server.address == ("127.0.0.1", server.port)
    assert server.port > 0


# ------------------------------------------------------------------- CNAMEs


async def test_cname_chain_is_followed(nursery: trio.Nursery) -> None:
    server = await start(
        nursery,
        FakeDNSServer(
            {
                ("alias.test", "CNAME"): ["middle.test."],
                ("middle.test", "CNAME"): ["target.test"],
                ("target.test", "A"): ["127.0.0.7"],
            }
        ),
    )
    response = await udp(server, dns.message.make_query("alias.test", "A"))
    assert [(r.name.to_text(), dns.rdatatype.to_text(r.rdtype)) for r in response.answer] == [
        ("alias.test.", "CNAME"),
        ("middle.test.", "CNAME"),
        ("target.test.", "A"),
    ]
    answer = await resolve(server, "alias.test", "A")
    assert answer.canonical_name == dns.name.from_text("target.test")
    assert texts(answer) == ["127.0.0.7"]
    # Asking for the CNAME itself is a plain lookup.
    assert texts(await resolve(server, "alias.test", "CNAME")) == ["middle.test."]


async def test_cname_to_missing_type_is_nodata(nursery: trio.Nursery) -> None:
    server = await start(
        nursery,
        FakeDNSServer({("alias.test", "CNAME"): ["target.test."], ("target.test", "A"): ["127.0.0.7"]}),
    )
    response = await udp(server, dns.message.make_query("alias.test", "MX"))
    assert response.rcode() == dns.rcode.NOERROR
    assert [r.rdtype for r in response.answer] == [dns.rdatatype.CNAME]
    assert response.authority[0].rdtype == dns.rdatatype.SOA


async def test_dangling_cname_is_nxdomain(nursery: trio.Nursery) -> None:
    server = await start(nursery, FakeDNSServer({("alias.test", "CNAME"): ["gone.test."]}))
    response = await udp(server, dns.message.make_query("alias.test", "A"))
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert [r.rdtype for r in response.answer] == [dns.rdatatype.CNAME]
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolve(server, "alias.test", "A")


async def test_cname_loop_returns_the_cnames(nursery: trio.Nursery) -> None:
    server = await start(
        nursery,
        FakeDNSServer({("a.test", "CNAME"): ["b.test."], ("b.test", "CNAME"): ["a.test."]}),
    )
    response = await udp(server, dns.message.make_query("a.test", "A"))
    assert response.rcode() == dns.rcode.NOERROR
    assert [r.name.to_text() for r in response.answer] == ["a.test.", "b.test."]
    with pytest.raises(dns.exception.DNSException):
        await resolve(server, "a.test", "A")


async def test_long_cname_chain_is_cut(nursery: trio.Nursery) -> None:
    zone: Zone = {(f"c{i}.test", "CNAME"): [f"c{i + 1}.test."] for i in range(MAX_CNAME_CHAIN + 4)}
    server = await start(nursery, FakeDNSServer(zone))
    response = await udp(server, dns.message.make_query("c0.test", "A"))
    assert len(response.answer) == MAX_CNAME_CHAIN


# ---------------------------------------------------------------- behaviours


@pytest.mark.parametrize(
    ("behavior", "rcode"),
    [
        (Behavior.NXDOMAIN, dns.rcode.NXDOMAIN),
        (Behavior.SERVFAIL, dns.rcode.SERVFAIL),
        (Behavior.REFUSED, dns.rcode.REFUSED),
        (Behavior.NOTIMP, dns.rcode.NOTIMP),
    ],
)
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_error_rcodes(nursery: trio.Nursery, behavior: Behavior, rcode: dns.rcode.Rcode, transport: str) -> None:
    server = await start(nursery, FakeDNSServer({("x.test", "A"): behavior, ("x.test", "MX"): ["1 x.test."]}))
    query = dns.message.make_query("x.test", "A")
    response = await (udp(server, query) if transport == "udp" else tcp(server, query))
    assert response.rcode() == rcode
    assert response.answer == []
    if behavior is Behavior.NXDOMAIN:
        assert response.authority[0].rdtype == dns.rdatatype.SOA
    # Other types of the same name are unaffected.
    assert texts(await resolve(server, "x.test", "MX")) == ["1 x.test."]


async def test_servfail_fails_the_resolver(nursery: trio.Nursery) -> None:
    server = await start(nursery, FakeDNSServer({("x.test", "A"): Behavior.SERVFAIL}))
    with pytest.raises(dns.resolver.NoNameservers):
        await resolve(server, "x.test", "A")


async def test_star_key_applies_to_every_type(nursery: trio.Nursery) -> None:
    server = await start(
        nursery,
        FakeDNSServer({("x.test", "*"): Behavior.REFUSED, ("x.test", "A"): ["127.0.0.1"]}),
    )
    for rdtype in ("A", "MX", "AAAA", "TXT"):
        response = await udp(server, dns.message.make_query("x.test", rdtype))
        assert response.rcode() == dns.rcode.REFUSED, rdtype


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_hang_never_answers(nursery: trio.Nursery, transport: str) -> None:
    server = await start(nursery, FakeDNSServer({("x.test", "A"): Behavior.HANG}))
    query = dns.message.make_query("x.test", "A")
    with pytest.raises(dns.exception.Timeout):
        if transport == "udp":
            await udp(server, query, timeout=0.3)
        else:
            await tcp(server, query, timeout=0.3)
    assert server.queries == [("x.test", "A", transport)]


async def test_hang_times_out_the_resolver(nursery: trio.Nursery) -> None:
    server = await start(nursery, FakeDNSServer({("x.test", "A"): Behavior.HANG}))
    with pytest.raises(dns.resolver.LifetimeTimeout):
        await resolve(server, "x.test", "A", lifetime=0.3)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_garbage_is_not_dns(nursery: trio.Nursery, transport: str) -> None:
    server = await start(nursery, FakeDNSServer({("x.test", "A"): Behavior.GARBAGE}))
    query = dns.message.make_query("x.test", "A")
    with pytest.raises(dns.exception.FormError):
        if transport == "udp":
            await udp(server, query)
        else:
            await tcp(server, query)


async def test_garbage_is_skipped_by_the_resolver(nursery: trio.Nursery) -> None:
    # dnspython's resolver ignores unparsable datagrams and keeps waiting.
    server = await start(nursery, FakeDNSServer({("x.test", "A"): Behavior.GARBAGE}))
    with pytest.raises(dns.resolver.LifetimeTimeout):
        await resolve(server, "x.test", "A", lifetime=0.3)


async def test_truncate_under_star_key(nursery: trio.Nursery) -> None:
    server = await start(
        nursery,
        FakeDNSServer({("big.test", "*"): Behavior.TRUNCATE, ("big.test", "MX"): ["10 mx.big.test."]}),
    )
    query = dns.message.make_query("big.test", "MX")
    over_udp = await udp(server, query)
    assert over_udp.flags & dns.flags.TC
    assert over_udp.answer == []
    over_tcp = await tcp(server, query)
    assert not over_tcp.flags & dns.flags.TC
    assert over_tcp.answer[0].to_text() == "big.test. 300 IN MX 10 mx.big.test."
    # The resolver falls back to TCP by itself.
    server.queries.clear()
    assert texts(await resolve(server, "big.test", "MX")) == ["10 mx.big.test."]
    assert server.queries == [("big.test", "MX", "udp"), ("big.test", "MX", "tcp")]


async def test_truncate_on_type_key_is_nodata_over_tcp(nursery: trio.Nursery) -> None:
    server = await start(nursery, FakeDNSServer({("big.test", "MX"): Behavior.TRUNCATE}))
    query = dns.message.make_query("big.test", "MX")
    assert (await udp(server, query)).flags & dns.flags.TC
    over_tcp = await tcp(server, query)
    assert over_tcp.rcode() == dns.rcode.NOERROR and over_tcp.answer == []


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_wrong_id_is_a_mismatched_reply(nursery: trio.Nursery, transport: str) -> None:
    server = await start(
        nursery,
        FakeDNSServer({("x.test", "*"): Behavior.WRONG_ID, ("x.test", "A"): ["127.0.0.1"]}),
    )
    query = dns.message.make_query("x.test", "A")
    with pytest.raises(dns.query.BadResponse):
        if transport == "udp":
            await udp(server, query)
        else:
            await tcp(server, query)
    # The payload is otherwise a proper answer, only the id is off.
    with trio.fail_after(STEP):
        stream = await trio.open_tcp_stream(server.host, server.port)
        async with stream:
            wire = query.to_wire()
            await stream.send_all(len(wire).to_bytes(2, "big") + wire)
            data = b""
            while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
                chunk = await stream.receive_some(4096)
                assert chunk
                data += chunk
    reply = dns.message.from_wire(data[2:])
    assert reply.id != query.id
    assert reply.answer[0][0].to_text() == "127.0.0.1"


async def test_wrong_id_times_out_the_resolver(nursery: trio.Nursery) -> None:
    server = await start(nursery, FakeDNSServer({("x.test", "A"): Behavior.WRONG_ID}))
    with pytest.raises(dns.resolver.LifetimeTimeout):
        await resolve(server, "x.test", "A", lifetime=0.3)


async def test_slow_answers_late_without_blocking_others(nursery: trio.Nursery) -> None:
    server = await start(
        nursery,
        FakeDNSServer({("slow.test", "A"): Slow(0.5, ["127.0.0.1"]), ("fast.test", "A"): ["127.0.0.2"]}),
    )
    finished: list[str] = []

    async def ask(name: str) -> None:
        await resolve(server, name, "A")
        finished.append(name)

    started = trio.current_time()
    async with trio.open_nursery() as inner:
        inner.start_soon(ask, "slow.test")
        await trio.sleep(0.05)
        inner.start_soon(ask, "fast.test")
    assert finished == ["fast.test", "slow.test"]
    assert trio.current_time() - started >= 0.5


async def test_slow_then_behavior(nursery: trio.Nursery) -> None:
    server = await start(nursery, FakeDNSServer({("x.test", "A"): Slow(0.2, Slow(0.1, Behavior.SERVFAIL))}))
    started = trio.current_time()
    response = await udp(server, dns.message.make_query("x.test", "A"))
    assert response.rcode() == dns.rcode.SERVFAIL
    assert trio.current_time() - started >= 0.3


async def test_slow_star_key_delays_every_type(nursery: trio.Nursery) -> None:
    server = await start(
        nursery,
        FakeDNSServer({("x.test", "*"): Slow(0.2, []), ("x.test", "A"): ["127.0.0.1"]}),
    )
    started = trio.current_time()
    assert texts(await resolve(server, "x.test", "A")) == ["127.0.0.1"]
    with pytest.raises(dns.resolver.NoAnswer):
        await resolve(server, "x.test", "MX")
    assert trio.current_time() - started >= 0.4


async def test_tcp_pipelined_queries_answer_out_of_order(nursery: trio.Nursery) -> None:
    server = await start(
        nursery,
        FakeDNSServer({("slow.test", "A"): Slow(0.3, ["127.0.0.1"]), ("fast.test", "A"): ["127.0.0.2"]}),
    )
    slow = dns.message.make_query("slow.test", "A")
    fast = dns.message.make_query("fast.test", "A")
    replies = await tcp_exchange(server, [slow.to_wire(), fast.to_wire()], 2)
    assert [r.id for r in replies] == [fast.id, slow.id]
    assert server.queries == [("slow.test", "A", "tcp"), ("fast.test", "A", "tcp")]


# ------------------------------------------------------------------- sizes


def many_mx(count: int) -> list[str]:
    return [f"{i % 100} mx{i}.example.net." for i in range(count)]


async def test_large_answer_truncates_over_udp_and_works_over_tcp(nursery: trio.Nursery) -> None:
    server = await start(nursery, FakeDNSServer({("big.test", "MX"): many_mx(2500)}))
    query = dns.message.make_query("big.test", "MX")
    over_udp = await udp(server, query, timeout=BULK)
    assert over_udp.flags & dns.flags.TC and over_udp.answer == []
    server.queries.clear()
    answer = await resolve(server, "big.test", "MX", lifetime=BULK)
    assert len(answer) == 2500
    assert [t for _, _, t in server.queries] == ["udp", "tcp"]


async def test_udp_limit_is_512_without_edns_and_payload_with_it(nursery: trio.Nursery) -> None:
    server = await start(nursery, FakeDNSServer({("mid.test", "MX"): many_mx(40)}))
    plain = await udp(server, dns.message.make_query("mid.test", "MX"))
    assert plain.flags & dns.flags.TC and plain.answer == []
    edns = dns.message.make_query("mid.test", "MX", use_edns=0, payload=4096)
    response = await udp(server, edns)
    assert not response.flags & dns.flags.TC
    assert len(response.answer[0]) == 40
    assert response.edns == 0


async def test_answer_beyond_tcp_framing_is_cut_with_tc(nursery: trio.Nursery) -> None:
    # An RRset is never split, so one that cannot fit in 64 KiB leaves an empty TC answer.
    server = await start(nursery, FakeDNSServer({("huge.test", "MX"): many_mx(6000)}))
    response = await tcp(server, dns.message.make_query("huge.test", "MX"), timeout=BULK)
    assert response.flags & dns.flags.TC
    assert response.answer == []


# -------------------------------------------------------------- robustness


async def test_malformed_packets_are_ignored(server: FakeDNSServer) -> None:
    query_wire = dns.message.make_query("example.com", "MX").to_wire()
    junk = [b"", b"\x00", b"\xff" * 11, b"\x12\x34" + b"\x01\x00" + b"\x00\x01" * 4, query_wire[:-3], b"x" * 700]
    with trio.fail_after(STEP):
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            await sock.connect(server.address)
            for packet in junk:
                await sock.send(packet)
        stream = await trio.open_tcp_stream(server.host, server.port)
        async with stream:
            for packet in junk:
                await stream.send_all(len(packet).to_bytes(2, "big") + packet)
    # A reply to nobody (a response, QR set) is ignored too.
    response_wire = dns.message.make_response(dns.message.make_query("example.com", "MX")).to_wire()
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.connect(server.address)
        await sock.send(response_wire)
    assert texts(await resolve(server, "example.com", "MX")) == ["10 mx1.example.com.", "20 mx2.example.com."]
    assert (await tcp(server, dns.message.make_query("example.com", "MX"))).rcode() == dns.rcode.NOERROR
    assert server.malformed >= 2 * len(junk) - 2  # the truncated query may still parse
    assert server.query_count() == 2


async def test_non_query_opcode_is_notimp(server: FakeDNSServer) -> None:
    query = dns.message.make_query("example.com", "SOA")
    query.set_opcode(dns.opcode.NOTIFY)
    response = await udp(server, query)
    assert response.rcode() == dns.rcode.NOTIMP


async def test_tcp_connection_closes_when_client_does(server: FakeDNSServer) -> None:
    with trio.fail_after(STEP):
        stream = await trio.open_tcp_stream(server.host, server.port)
        async with stream:
            await stream.send_all(b"\x00")  # half a length prefix, then hang up
    # The server keeps serving others.
    assert (await tcp(server, dns.message.make_query("example.com", "MX"))).answer


async def test_bad_zone_data_fails_loudly(nursery: trio.Nursery) -> None:
    server = FakeDNSServer({("x.test", "A"): ["not-an-address"]})
    with pytest.RaisesGroup(pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="bad zone data"))):
        async with trio.open_nursery() as inner:
            await inner.start(server.serve)
            with trio.fail_after(STEP):
                await make_resolver(server).resolve("x.test", "A", backend=RESOLVER_BACKEND)


async def test_stops_when_cancelled() -> None:
    server = FakeDNSServer(dict(ZONE))
    async with trio.open_nursery() as inner:
        port = await inner.start(server.serve)
        assert texts(await resolve(server, "example.com", "MX"))
        inner.cancel_scope.cancel()
    with pytest.raises(OSError):
        with trio.fail_after(STEP):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.aclose()


def _ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback_available(), reason="no IPv6 loopback")
async def test_ipv6_host(nursery: trio.Nursery) -> None:
    server = await start(nursery, FakeDNSServer(dict(ZONE), host="::1"))
    assert nameserver_arg(server) == f"[::1]:{server.port}"
    assert texts(await resolve(server, "mx1.example.com", "A")) == ["127.0.0.1"]
    response = await tcp(server, dns.message.make_query("example.com", "MX"))
    assert len(response.answer[0]) == 2


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packet=st.binary(max_size=600))
async def test_reply_never_raises_on_arbitrary_input(packet: bytes) -> None:
    """Whatever arrives, the server either answers with DNS or stays silent."""
    server = FakeDNSServer(dict(ZONE))
    for transport in ("udp", "tcp"):
        reply = await server._reply(packet, transport)
        if reply is not None:
            dns.message.from_wire(reply)


_LABEL = st.sampled_from(["example", "com", "mx1", "MX1", "Example", "x", "test", "a", "b", "gone"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    labels=st.lists(_LABEL, min_size=0, max_size=4),
    rdtype=st.one_of(st.sampled_from([1, 2, 5, 6, 15, 16, 28, 41, 250, 251, 252, 255]), st.integers(0, 65535)),
    flags=st.integers(0, 0xFFFF),
    edns=st.sampled_from([-1, 0]),
    payload=st.integers(0, 65535),
)
async def test_reply_to_arbitrary_questions_is_valid_dns(
    labels: list[str], rdtype: int, flags: int, edns: int, payload: int
) -> None:
    """Odd types, names and flags still get a parseable answer or none at all."""
    zone = dict(ZONE)
    zone[("a", "CNAME")] = ["b."]
    zone[("b", "CNAME")] = ["a."]
    zone[("x", "*")] = Behavior.WRONG_ID
    server = FakeDNSServer(zone)
    name = dns.name.from_text(".".join(labels) + ".") if labels else dns.name.root
    query = dns.message.Message()
    query.flags = flags & ~dns.flags.QR  # any opcode and flags, but still a query
    query.find_rrset(
        query.question, name, dns.rdataclass.IN, dns.rdatatype.RdataType.make(rdtype), create=True, force_unique=True
    )
    if edns >= 0:
        query.use_edns(edns, payload=payload)
    for transport in ("udp", "tcp"):
        malformed = server.malformed
        reply = await server._reply(query.to_wire(), transport)
        if reply is None:
            # Only what dnspython itself refuses to parse goes unanswered
            # (an UPDATE whose zone section is not SOA, say).
            assert server.malformed == malformed + 1
            continue
        response = dns.message.from_wire(reply)
        assert response.flags & dns.flags.QR
        if transport == "udp":
            assert len(reply) <= max(512, payload if edns >= 0 else 512)


# ------------------------------------------------------ wildcard and fast mode


def _wildcard(name: str, rdtype: str) -> list[str] | None:
    if name.endswith(".wild.test"):
        return ["127.0.0.9"] if rdtype == "A" else []
    return None


async def test_wildcard_answers_names_the_zone_lacks(nursery: trio.Nursery) -> None:
    server = await start(nursery, FakeDNSServer({("a.wild.test", "A"): ["127.0.0.1"]}, wildcard=_wildcard))
    assert texts(await resolve(server, "a.wild.test", "A")) == ["127.0.0.1"]  # the zone first
    assert texts(await resolve(server, "b.wild.test", "A")) == ["127.0.0.9"]
    nodata = await udp(server, dns.message.make_query("b.wild.test", "MX"))
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer and nodata.authority
    nxdomain = await udp(server, dns.message.make_query("elsewhere.test", "A"))
    assert nxdomain.rcode() == dns.rcode.NXDOMAIN


async def test_fast_mode_answers_in_order_and_only_counts(nursery: trio.Nursery) -> None:
    server = await start(nursery, FakeDNSServer(dict(ZONE), wildcard=_wildcard, fast=True))
    for i in range(20):
        assert texts(await resolve(server, f"h{i}.wild.test", "A")) == ["127.0.0.9"]
    assert texts(await resolve(server, "example.com", "MX")) == ["10 mx1.example.com.", "20 mx2.example.com."]
    assert server.queries == []  # nothing kept per query
    assert server.queries_by_type == {"A": 20, "MX": 1}


async def test_queries_are_counted_by_type_in_every_mode(server: FakeDNSServer) -> None:
    await resolve(server, "example.com", "MX")
    await resolve(server, "mx1.example.com", "AAAA")
    assert server.queries_by_type == {"MX": 1, "AAAA": 1}
    assert len(server.queries) == 2


@pytest.mark.parametrize("mx", [["10 mx1.test", "x.test."], ["ten mx1.test."], ["10 mx1.test. extra"]])
async def test_bad_mx_data_fails_loudly(nursery: trio.Nursery, mx: list[str]) -> None:
    server = FakeDNSServer({("x.test", "MX"): mx})
    with pytest.RaisesGroup(pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="bad zone data"))):
        async with trio.open_nursery() as inner:
            await inner.start(server.serve)
            with trio.fail_after(STEP):
                await make_resolver(server).resolve("x.test", "MX", backend=RESOLVER_BACKEND)


async def test_null_mx_and_relative_targets(nursery: trio.Nursery) -> None:
    server = await start(nursery, FakeDNSServer({("null.test", "MX"): ["0 ."], ("rel.test", "MX"): ["5 mx.rel.test"]}))
    assert texts(await resolve(server, "null.test", "MX")) == ["0 ."]
    assert texts(await resolve(server, "rel.test", "MX")) == ["5 mx.rel.test."]


def test_backup_mx_zone_per_domain_names() -> None:
    zone = backup_mx_zone("127.0.0.2")
    assert zone("d7.example", "MX") == ["10 mx1.d7.example.", "20 backup.d7.example."]
    assert zone("d7.example", "A") == []
    assert zone("mx1.d7.example", "A") == ["127.0.0.2"]
    assert zone("mx1.d7.example", "AAAA") == []
    assert zone("backup.d7.example", "A") == ["127.0.0.1"]
    assert zone("x7.example", "MX") is None and zone("d7.test", "MX") is None and zone("dx.example", "MX") is None


def test_backup_mx_zone_shared_names() -> None:
    grouped = backup_mx_zone("127.0.0.3", backup_address="127.0.0.4", primary_group=5, shared_backup=True)
    assert grouped("d12.example", "MX") == ["10 mx1.g2.example.", "20 backup.bench.example."]
    assert grouped("mx1.g2.example", "A") == ["127.0.0.3"]
    assert grouped("backup.bench.example", "A") == ["127.0.0.4"]
    one = backup_mx_zone("127.0.0.3", primary_group=None)
    assert one("d12.example", "MX") == ["10 mx1.bench.example.", "20 backup.d12.example."]
    with pytest.raises(ValueError):
        backup_mx_zone("127.0.0.3", primary_group=0)


async def test_backup_mx_zone_through_a_resolver(nursery: trio.Nursery) -> None:
    server = await start(nursery, FakeDNSServer(wildcard=backup_mx_zone("127.0.0.2"), fast=True))
    assert texts(await resolve(server, "d3.example", "MX")) == ["10 mx1.d3.example.", "20 backup.d3.example."]
    assert texts(await resolve(server, "mx1.d3.example", "A")) == ["127.0.0.2"]
    with pytest.raises(dns.resolver.NoAnswer):
        await resolve(server, "mx1.d3.example", "AAAA")
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolve(server, "nowhere.example", "MX")
