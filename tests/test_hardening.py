"""Hostile input and hostile peers against the running policy server.

Each test reproduces one fault over real sockets and then shows the server
still answering correctly: it answers within its deadline, or closes only
the offending connection, and serves the next request.
"""

from __future__ import annotations

import re
import resource
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyd.client import encode_request, parse_reply
from smtpdcheck.compat import STRICT_EXCEPTION_GROUPS
from tests.conftest import Farm, start_farm
from tests.policyd_helpers import BASE_REQUEST, RunningPolicyd, policyd_config, rcpt, read_replies, start_policyd
from testbeds.dnsserver import FakeDNSServer
from testbeds.greeters import Mode, unused_port
from tests.test_policyd_server import backup_zone

REPLY_RE = re.compile(rb"action=(DUNNO|DEFER_IF_PERMIT)( [\x20-\x7e]{1,400})?\n\n")
EXPECTED = {"up.example": "DEFER_IF_PERMIT", "down.example": "DUNNO"}


# -- a policy server running in a background thread, for hypothesis ------------


@dataclass
class World:
    port: int
    token: trio.lowlevel.TrioToken
    running: RunningPolicyd
    farm: Farm


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    """DNS, greeters and the policy server in their own trio loop in a thread,
    so that synchronous hypothesis examples can hammer it over sockets."""
    ready: list[World] = []
    started = threading.Event()
    stop = threading.Event()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            dns = FakeDNSServer({})
            await nursery.start(dns.serve)
            farm = await start_farm(nursery, [Mode.OK, Mode.CODE_421])
            dns.zone.update(backup_zone("up.example", "127.0.0.2"))
            dns.zone.update(backup_zone("down.example", "127.0.0.3"))
            running = await start_policyd(nursery, policyd_config(dns.port, farm.port, request_timeout=2.0))
            ready.append(World(running.port, trio.lowlevel.current_trio_token(), running, farm))
            started.set()
            await trio.to_thread.run_sync(stop.wait)
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(main,), kwargs={"strict_exception_groups": STRICT_EXCEPTION_GROUPS}, daemon=True)
    thread.start()
    assert started.wait(15), "policy server did not start"
    yield ready[0]
    stop.set()
    thread.join(15)


def exchange(port: int, data: bytes, chunks: list[int], expect: int, timeout: float = 5.0) -> bytes:
    """Send ``data`` in the given chunk sizes and read until ``expect`` replies or close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        pos = 0
        sizes = iter(chunks)
        try:
            while pos < len(data):
                size = max(1, next(sizes, len(data)))
                sock.sendall(data[pos : pos + size])
                pos += size
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = b""
        try:
            while received.count(b"\n\n") < expect:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        return received


def assert_alive(port: int) -> None:
    reply = exchange(port, rcpt("alive@up.example"), [], 1)
    assert parse_reply(reply)[0] == "DEFER_IF_PERMIT"


request_st = st.builds(
    lambda domain, state, extra: encode_request({**BASE_REQUEST, "recipient": f"u@{domain}", "protocol_state": state, **extra}),
    st.sampled_from(sorted(EXPECTED)),
    st.sampled_from(["RCPT", "RCPT", "RCPT", "VRFY", "DATA", "END-OF-MESSAGE"]),
    st.dictionaries(
        st.text("abcxyz_", min_size=1, max_size=8),
        st.text(st.characters(blacklist_characters="\n\r\x00", blacklist_categories=("Cs",)), max_size=50),
        max_size=3,
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(request_st, min_size=1, max_size=8), chunks=st.lists(st.integers(1, 300), max_size=40))
def test_pipelined_valid_requests_get_exactly_one_reply_each_in_order(world: World, requests: list[bytes], chunks: list[int]) -> None:
    data = b"".join(requests)
    received = exchange(world.port, data, chunks, len(requests))
    replies = received.split(b"\n\n")[: len(requests)]
    assert received.count(b"\n\n") == len(requests)
    for request, reply in zip(requests, replies):
        assert REPLY_RE.fullmatch(reply + b"\n\n")
        attrs = dict(line.split(b"=", 1) for line in request.rstrip(b"\n").split(b"\n"))
        # First value wins on duplicates, as the parser documents.
        lines = [line.split(b"=", 1) for line in request.rstrip(b"\n").split(b"\n")]
        first = {}
        for name, value in lines:
            first.setdefault(name, value)
        domain = first[b"recipient"].decode().split("@")[1]
        want = EXPECTED[domain] if first[b"protocol_state"] == b"RCPT" and first[b"request"] == b"smtpd_access_policy" else "DUNNO"
        assert reply.startswith(b"action=" + want.encode()), (attrs, reply)


def _mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, pos, value in ops:
        if not out:
            break
        i = pos % len(out)
        if kind == 0:
            out[i] = value  # flip a byte
        elif kind == 1:
            del out[i : i + value % 64]  # truncate a run
        elif kind == 2:
            out[i:i] = out[i : i + value % 200]  # duplicate a run
        elif kind == 3:
            out[i:i] = bytes([0, 13, 0xFF, 0xC3])[value % 4 : value % 4 + 1] * (1 + value % 3)
        else:
            out[i:i] = b"x" * (value * 40)  # an enormous value
    return bytes(out)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests=st.lists(request_st, min_size=1, max_size=4),
    ops=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    chunks=st.lists(st.integers(1, 500), max_size=30),
)
def test_mutated_requests_never_get_bad_replies_or_kill_the_server(
    world: World, requests: list[bytes], ops: list[tuple[int, int, int]], chunks: list[int]
) -> None:
    data = _mutate(b"".join(requests), ops)
    received = exchange(world.port, data, chunks, data.count(b"\n\n"), timeout=4.0)
    # Whatever came back is a sequence of well-formed replies, no more than
    # the requests that could have been complete.
    assert received.count(b"\n\n") <= data.count(b"\n\n")
    for reply in received.split(b"\n\n")[:-1]:
        assert REPLY_RE.fullmatch(reply + b"\n\n"), received
    assert_alive(world.port)


def test_connection_memory_is_bounded(world: World) -> None:
    """Megabytes without a newline are cut off at the line limit, not buffered.

    The counter is shared with the other tests of this module, so its change
    is what shows that this connection, and no other, was refused.
    """
    errors = world.running.responder.metrics.protocol_errors
    before = errors["line too long"]
    # A complete request, so that a server without the limit would answer it.
    request = rcpt("A" * (4 << 20) + "@up.example")
    with socket.create_connection(("127.0.0.1", world.port), timeout=5.0) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed on us while sending: expected
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # closed with our bytes unread: a reset
        # socket.timeout is not caught: a server that neither answers nor closes fails here.
    assert received == b""  # closed without a reply
    assert errors["line too long"] == before + 1
    assert_alive(world.port)


# -- hostile clients ------------------------------------------------------------


@pytest.fixture
async def policyd(nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]) -> RunningPolicyd:
    f = await farm(Mode.OK, Mode.CODE_421)
    dns_server.zone.update(backup_zone("up.example", "127.0.0.2"))
    dns_server.zone.update(backup_zone("down.example", "127.0.0.3"))
    return await start_policyd(nursery, policyd_config(dns_server.port, f.port, request_timeout=1.0, max_connections=20))


async def test_thousands_of_connections_opened_and_dropped(policyd: RunningPolicyd) -> None:
    async def churn(n: int) -> None:
        for i in range(n):
            stream = await policyd.connect()
            if i % 3 == 0:
                await stream.send_all(b"request=smtpd_access_policy\nprotocol_st")  # half a request
            await stream.aclose()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(churn, 200)
        assert (await policyd.ask(rcpt("a@up.example")))[0] == "DEFER_IF_PERMIT"
        while policyd.responder.metrics.connections_open:
            await trio.sleep(0.01)
    assert policyd.responder.metrics.connections_total >= 2001


async def test_slow_client_is_cut_off_others_unaffected(policyd: RunningPolicyd) -> None:
    """One byte per 0.3 s: the per-request read deadline (1 s here) ends it."""
    with trio.fail_after(10):
        slow = await policyd.connect()
        async with slow:
            start = trio.current_time()
            closed_at = None
            for byte in rcpt("slow@up.example"):
                try:
                    await slow.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    break
                # Meanwhile others are served at once.
                assert (await policyd.ask(rcpt("fast@down.example")))[0] == "DUNNO"
                with trio.move_on_after(0.3):
                    if await slow.receive_some(10) == b"":
                        closed_at = trio.current_time()
                        break
            assert closed_at is not None and 0.9 <= closed_at - start < 2.5


async def test_idle_connections_are_kept(policyd: RunningPolicyd) -> None:
    """Postfix keeps idle policy connections for minutes; we must not close them."""
    with trio.fail_after(10):
        streams = [await policyd.connect() for _ in range(10)]
        await trio.sleep(1.5)  # longer than the request timeout
        for stream in streams:
            assert (await policyd.ask(rcpt("a@up.example"), stream))[0] == "DEFER_IF_PERMIT"
            await stream.aclose()


async def test_connections_beyond_the_limit_wait_their_turn(policyd: RunningPolicyd) -> None:
    with trio.fail_after(10):
        held = [await policyd.connect() for _ in range(20)]  # max_connections = 20
        for stream in held:
            assert (await policyd.ask(rcpt("a@down.example"), stream))[0] == "DUNNO"
        extra = await policyd.connect()  # accepted by the kernel, queued by us
        await extra.send_all(rcpt("b@up.example"))
        with trio.move_on_after(0.5) as waited:
            await extra.receive_some(100)
        assert waited.cancelled_caught  # not served while the limit is reached
        assert (await policyd.ask(rcpt("c@up.example"), held[0]))[0] == "DEFER_IF_PERMIT"  # others unaffected
        await held.pop().aclose()
        assert parse_reply(await read_replies(extra, 1))[0] == "DEFER_IF_PERMIT"
        for stream in [*held, extra]:
            await stream.aclose()


async def test_burst_for_one_domain_makes_one_probe_per_address(nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]) -> None:
    f = await farm(Mode.PAUSED_MULTILINE, Mode.CODE_421, Mode.SILENT, Mode.CODE_554, pause=0.3)
    dns_server.zone.update({
        ("burst.example", "MX"): ["10 mx1.burst.example.", "10 mx2.burst.example.", "20 backup.burst.example."],
        ("mx1.burst.example", "A"): ["127.0.0.2", "127.0.0.3"],
        ("mx2.burst.example", "A"): ["127.0.0.4", "127.0.0.5"],
        ("backup.burst.example", "A"): ["127.0.0.1"],
    })
    running = await start_policyd(nursery, policyd_config(dns_server.port, f.port))

    async def client(n: int) -> None:
        stream = await running.connect()
        async with stream:
            for i in range(n):
                assert (await running.ask(rcpt(f"u{i}@burst.example"), stream))[0] == "DEFER_IF_PERMIT"

    with trio.fail_after(20):
        async with trio.open_nursery() as clients:
            for _ in range(50):
                clients.start_soon(client, 10)
    # 500 RCPTs, 4 addresses: each address was contacted at most once, and
    # the MX list and the addresses were each asked for once.
    assert all(g.connections <= 1 for g in f.greeters)
    assert f.greeters[0].connections == 1
    assert dns_server.query_count("burst.example", "MX") == 1
    assert dns_server.query_count("mx1.burst.example", "A") == 1


def test_fd_exhaustion_is_survived() -> None:
    """With a tiny RLIMIT_NOFILE, accept() fails with EMFILE: logged, retried, recovered."""
    port = unused_port()
    limit = 40

    def lower_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    process = subprocess.Popen(
        [sys.executable, "-m", "policyd.cli", "--config", "", "--listen", f"inet:127.0.0.1:{port}", "--nameserver", f"127.0.0.1:{unused_port()}"],
        stderr=subprocess.PIPE, preexec_fn=lower_limit,
    )
    try:
        deadline = 15.0
        for _ in range(150):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                threading.Event().wait(0.1)
        request = encode_request({**BASE_REQUEST, "protocol_state": "DATA"})
        hogs = []
        for _ in range(limit + 10):
            hogs.append(socket.create_connection(("127.0.0.1", port), timeout=deadline))
        threading.Event().wait(0.5)
        for hog in hogs:
            hog.close()
        threading.Event().wait(0.5)
        reply = exchange(port, request, [], 1)
        assert reply == b"action=DUNNO\n\n"
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=15)
    assert process.returncode == 0
    assert b"accept failed: EMFILE" in err


async def test_peer_that_never_reads_replies_is_cut_off(policyd: RunningPolicyd, caplog: pytest.LogCaptureFixture) -> None:
    """Pipelined requests and no reads: once the socket buffers are full the
    server's send blocks, and request_timeout (1 s here) closes that connection."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", policyd.port))
    stream = trio.SocketStream(sock)
    burst = rcpt("a@up.example") * 500
    sent = 0
    with trio.fail_after(30):
        async with stream:
            with trio.move_on_after(20):
                try:
                    while sent < 200_000:  # bounded: far more than the buffers hold
                        await stream.send_all(burst)
                        sent += 500
                except trio.BrokenResourceError:
                    pass  # the server gave up on us: what this test wants
            # Meanwhile everyone else is served.
            assert (await policyd.ask(rcpt("b@up.example")))[0] == "DEFER_IF_PERMIT"
    assert sent < 200_000
    assert policyd.responder.metrics.protocol_errors["timeout"] >= 1
    assert "reply not read within 1s" in caplog.text


async def test_replies_to_a_slow_reader_arrive_whole_and_in_order(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]
) -> None:
    """Pipelined requests read back slowly through small TCP buffers, with
    long replies: the server's socket takes only part of a reply at times,
    and the rest must follow, before the next reply, without a byte lost or
    repeated."""
    from policyd.server import handle_connection, start_watchdog

    f = await farm(Mode.OK, Mode.CODE_421)
    dns_server.zone.update(backup_zone("up.example", "127.0.0.2"))
    dns_server.zone.update(backup_zone("down.example", "127.0.0.3"))
    config = policyd_config(dns_server.port, f.port, request_timeout=5.0, defer_text="x" * 380 + " {mx}")
    policyd = await start_policyd(nursery, config)
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    ours = trio.socket.socket()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await ours.connect(listener.getsockname())
    theirs, _ = await listener.accept()
    listener.close()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    nursery.start_soon(handle_connection, trio.SocketStream(theirs), policyd.responder, start_watchdog(nursery, policyd.responder))
    stream = trio.SocketStream(ours)
    count = 1000
    # Two domains taking turns give two different replies, so a torn or lost one shows.
    domains = ["up.example", "down.example"]
    expected = [("DEFER_IF_PERMIT" if i % 2 == 0 else "DUNNO") for i in range(count)]
    received = b""
    with trio.fail_after(60):
        for domain in domains:  # decided once, so the burst is answered from the memo
            await policyd.ask(rcpt(f"warm@{domain}"))
        async with stream, trio.open_nursery() as inner:

            async def send() -> None:
                for i in range(count):
                    await stream.send_all(rcpt(f"u{i}@{domains[i % 2]}"))

            inner.start_soon(send)
            while received.count(b"\n\n") < count:
                chunk = await stream.receive_some(1000)
                assert chunk, "connection closed early"
                received += chunk
                await trio.sleep(0.0002)  # a slow reader, yet well within request_timeout
    replies = [parse_reply(r + b"\n\n")[0] for r in received.split(b"\n\n")[:-1]]
    assert replies == expected
    assert policyd.responder.metrics.protocol_errors["timeout"] == 0
