"""Each greeter mode must put on the wire exactly what probe tests assume it does."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from testbeds.greeters import RECEIVED_CAP, Greeter, Mode, start_farm, start_greeters, unused_port

STEP = 2.0
"""Upper bound for any single exchange that is expected to succeed."""


class Client:
    """A minimal SMTP client side that keeps a receive buffer across reads."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.eof = False

    async def _fill(self) -> None:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            self.eof = True
        self.buffer += chunk

    async def line(self) -> bytes:
        with trio.fail_after(STEP):
            while b"\n" not in self.buffer:
                assert not self.eof, f"EOF with {bytes(self.buffer)!r} pending"
                await self._fill()
        end = self.buffer.index(b"\n") + 1
        line = bytes(self.buffer[:end])
        del self.buffer[:end]
        return line

    async def reply(self) -> bytes:
        """Read one complete, possibly multi-line, SMTP reply."""
        lines = [await self.line()]
        for _ in range(100):
            if lines[-1][3:4] != b"-":
                break
            lines.append(await self.line())
        return b"".join(lines)

    async def rest(self) -> bytes:
        """Everything until the server closes."""
        with trio.fail_after(STEP):
            while not self.eof:
                await self._fill()
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def nothing_for(self, seconds: float) -> None:
        """Assert the server sends nothing (and does not close) for a while."""
        with trio.move_on_after(seconds):
            await self._fill()
            raise AssertionError(f"unexpected {bytes(self.buffer)!r} eof={self.eof}")

    async def send(self, data: bytes) -> None:
        with trio.fail_after(STEP):
            await self.stream.send_all(data)


@asynccontextmanager
async def connect(greeter: Greeter) -> AsyncIterator[Client]:
    """Connect to ``greeter``; the connection is closed on exit, whatever happened."""
    with trio.fail_after(STEP):
        stream = await trio.open_tcp_stream(greeter.host, greeter.port)
    async with stream:
        yield Client(stream)


async def start(nursery: trio.Nursery, greeter: Greeter) -> Greeter:
    with trio.fail_after(STEP):
        await nursery.start(greeter.serve)
    return greeter


async def settled(greeter: Greeter, connections: int = 1) -> None:
    """Wait until the greeter has finished with all of its connections."""
    with trio.fail_after(STEP):
        await greeter.wait_until(lambda: greeter.connections >= connections and greeter.active == 0)


# ------------------------------------------------------------- happy paths


async def test_ok_conversation(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter())
    async with connect(greeter) as client:
        assert await client.reply() == b"220 mx.test ESMTP ready\r\n"
        await client.send(b"EHLO probe.test\r\n")
        assert await client.reply() == b"250 mx.test\r\n"
        await client.send(b"NOOP\r\n")
        assert (await client.reply()).startswith(b"250 ")
        await client.send(b"VRFY x\r\n")
        assert (await client.reply()).startswith(b"502 ")
        await client.send(b"QUIT\r\n")
        assert await client.reply() == b"221 bye\r\n"
        assert await client.rest() == b""
    await settled(greeter)
    assert greeter.received == [b"EHLO probe.test\r\nNOOP\r\nVRFY x\r\nQUIT\r\n"]
    assert greeter.pregreet == [b""]
    assert greeter.closed_by_client == 0


async def test_multiline_greeting(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter(Mode.MULTILINE, banner_name="mx1.example.com"))
    async with connect(greeter) as client:
        assert await client.reply() == b"220-mx1.example.com ESMTP\r\n220-more\r\n220 ready\r\n"
        await client.send(b"QUIT\r\n")
        assert await client.reply() == b"221 bye\r\n"
    await settled(greeter)
    assert greeter.received == [b"QUIT\r\n"]


async def test_paused_multiline_waits_and_records_early_talkers(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter(Mode.PAUSED_MULTILINE, pause=0.4))

    # A patient client: nothing before the greeting is complete.
    async with connect(greeter) as client:
        started = trio.current_time()
        assert await client.line() == b"220-mx.test ESMTP\r\n"
        assert await client.line() == b"220 ready\r\n"
        assert trio.current_time() - started >= 0.35
        await client.send(b"QUIT\r\n")
        assert await client.reply() == b"221 bye\r\n"

    # An impatient one talks during the pause, as postscreen's pregreet test catches.
    async with connect(greeter) as client:
        assert await client.line() == b"220-mx.test ESMTP\r\n"
        await client.send(b"EHLO early\r\n")
        assert await client.line() == b"220 ready\r\n"
        assert await client.reply() == b"250 mx.test\r\n"  # answered after the greeting
        await client.send(b"QUIT\r\n")
        assert await client.reply() == b"221 bye\r\n"

    await settled(greeter, 2)
    assert greeter.pregreet == [b"", b"EHLO early\r\n"]
    assert greeter.received == [b"QUIT\r\n", b"EHLO early\r\nQUIT\r\n"]


async def test_greet_delay_holds_the_greeting_and_records_early_talkers(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter(greet_delay=0.3))
    async with connect(greeter) as client:
        started = trio.current_time()
        await client.send(b"NOOP\r\n")  # before any greeting: the delay is still running
        assert await client.reply() == b"220 mx.test ESMTP ready\r\n"
        assert trio.current_time() - started >= 0.3  # a sleep never ends early
        assert await client.reply() == b"250 2.0.0 Ok\r\n"
        await client.send(b"QUIT\r\n")
        assert await client.reply() == b"221 bye\r\n"
    await settled(greeter)
    assert greeter.pregreet == [b"NOOP\r\n"]

    greeter.greet_delay = 0.0  # applies from the next connection
    async with connect(greeter) as client:
        assert await client.reply() == b"220 mx.test ESMTP ready\r\n"
        await client.send(b"QUIT\r\n")
        assert await client.reply() == b"221 bye\r\n"
    await settled(greeter, 2)
    assert greeter.pregreet[1] == b""


async def test_client_closing_during_pause_is_counted(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter(Mode.PAUSED_MULTILINE, pause=30))
    async with connect(greeter) as client:
        assert await client.line() == b"220-mx.test ESMTP\r\n"
        await client.send(b"QUIT\r\n")
    await settled(greeter)
    assert greeter.closed_by_client == 1
    assert greeter.pregreet == [b"QUIT\r\n"]


# ------------------------------------------------------------ refusals


async def test_code_421_closes(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter(Mode.CODE_421))
    async with connect(greeter) as client:
        assert await client.rest() == b"421 4.3.2 Service shutting down\r\n"
    await settled(greeter)
    assert greeter.closed_by_client == 0


@pytest.mark.parametrize(
    ("mode", "greeting"),
    [
        (Mode.CODE_554, b"554 5.3.2 No SMTP service here\r\n"),
        (Mode.CODE_450, b"450 4.3.2 Try again later\r\n"),
    ],
)
async def test_refusal_then_waits_for_quit(nursery: trio.Nursery, mode: Mode, greeting: bytes) -> None:
    greeter = await start(nursery, Greeter(mode))
    async with connect(greeter) as client:
        assert await client.reply() == greeting
        await client.send(b"EHLO probe.test\r\n")
        assert (await client.reply()).startswith(b"503 ")
        await client.send(b"QUIT\r\n")
        assert await client.reply() == b"221 bye\r\n"
        assert await client.rest() == b""
    await settled(greeter)
    assert greeter.received == [b"EHLO probe.test\r\nQUIT\r\n"]


# ------------------------------------------------------- broken servers


async def test_silent_holds_until_client_closes(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter(Mode.SILENT))
    async with connect(greeter) as client:
        await client.nothing_for(0.3)
    await settled(greeter)
    assert greeter.closed_by_client == 1
    assert greeter.received == [b""]


async def test_close_is_clean_eof(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter(Mode.CLOSE))
    async with connect(greeter) as client:
        assert await client.rest() == b""
    await settled(greeter)
    assert greeter.closed_by_client == 0


async def test_reset_is_econnreset(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter(Mode.RESET))
    async with connect(greeter) as client:
        with pytest.raises(trio.BrokenResourceError) as info:
            await client.rest()
        assert isinstance(info.value.__cause__, ConnectionResetError)
    await settled(greeter)


async def test_reset_mid_greeting(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter(Mode.RESET_MID))
    async with connect(greeter) as client:
        with pytest.raises(trio.BrokenResourceError) as info:
            await client.rest()
        assert isinstance(info.value.__cause__, ConnectionResetError)
        assert bytes(client.buffer) == b"220-mx.te"
    await settled(greeter)


async def test_garbage_then_close(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter(Mode.GARBAGE))
    async with connect(greeter) as client:
        assert await client.rest() == b"\x00\xffHELLO NOT SMTP\r\n"


async def test_trickle_sends_one_byte_at_a_time(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter(Mode.TRICKLE, trickle_interval=0.02))
    async with connect(greeter) as client:
        started = trio.current_time()
        with trio.fail_after(STEP):
            first = await client.stream.receive_some(65536)
        assert first == b"2"
        client.buffer += first
        assert await client.line() == b"220 mx.test ESMTP\r\n"
        assert trio.current_time() - started >= 0.02 * (len(b"220 mx.test ESMTP\r\n") - 1) * 0.9
        await client.send(b"QUIT\r\n")
        assert await client.reply() == b"221 bye\r\n"
    await settled(greeter)
    assert greeter.pregreet == [b""]


async def test_flood_is_bounded_and_has_no_newline(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter(Mode.FLOOD, flood_bytes=1 << 20))
    async with connect(greeter) as client:
        with trio.fail_after(STEP):
            while len(client.buffer) < 1 << 20:
                await client._fill()
                assert not client.eof
        assert bytes(client.buffer) == b"A" * (1 << 20)
        await client.nothing_for(0.2)
    await settled(greeter)
    assert greeter.closed_by_client == 1


async def test_flood_stops_when_client_hangs_up(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter(Mode.FLOOD))
    async with connect(greeter) as client:
        with trio.fail_after(STEP):
            await client._fill()
        assert client.buffer and set(client.buffer) == {ord("A")}
    await settled(greeter)
    assert greeter.closed_by_client == 1


async def test_no_read_never_answers_quit(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter(Mode.NO_READ))
    async with connect(greeter) as client:
        assert await client.reply() == b"220 mx.test\r\n"
        await client.send(b"QUIT\r\n")
        await client.nothing_for(0.3)
    await settled(greeter)
    assert greeter.closed_by_client == 1
    assert greeter.received == [b"QUIT\r\n"]


async def test_hold_after_quit(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter(Mode.HOLD_AFTER_QUIT))
    async with connect(greeter) as client:
        assert await client.reply() == b"220 mx.test ESMTP ready\r\n"
        await client.send(b"QUIT\r\n")
        assert await client.reply() == b"221 bye\r\n"
        await client.nothing_for(0.3)
        assert greeter.active == 1
    await settled(greeter)
    assert greeter.closed_by_client == 1


# ---------------------------------------------------------------- plumbing


async def test_mode_change_applies_to_next_connection(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter(Mode.OK))
    async with connect(greeter) as first:
        assert (await first.reply()).startswith(b"220 ")
        greeter.mode = Mode.CODE_421
        async with connect(greeter) as second:
            assert (await second.rest()).startswith(b"421 ")
        await first.send(b"QUIT\r\n")  # the first connection still plays OK
        assert await first.reply() == b"221 bye\r\n"
    await settled(greeter, 2)
    assert greeter.connections == 2


async def test_received_is_capped(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter(Mode.SILENT))
    async with connect(greeter) as client:
        await client.send(b"x" * (RECEIVED_CAP + 10_000))
        with trio.fail_after(STEP):
            await greeter.wait_until(lambda: len(greeter.received[0]) >= RECEIVED_CAP)
    await settled(greeter)
    assert len(greeter.received[0]) == RECEIVED_CAP


async def test_unused_port_refuses() -> None:
    port = unused_port()
    with pytest.raises(OSError):
        with trio.fail_after(STEP):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.aclose()


async def test_start_greeters(nursery: trio.Nursery) -> None:
    greeters = await start_greeters(nursery, [Mode.OK, Mode.CODE_554], banner_name="mx.example")
    assert len({g.port for g in greeters}) == 2
    replies = []
    for greeter in greeters:
        async with connect(greeter) as client:
            replies.append(await client.reply())
    assert replies == [b"220 mx.example ESMTP ready\r\n", b"554 5.3.2 No SMTP service here\r\n"]


async def test_stops_when_cancelled_and_can_come_back() -> None:
    greeter = Greeter(Mode.SILENT)
    async with trio.open_nursery() as inner:
        port = await inner.start(greeter.serve)
        async with connect(greeter) as client:  # held open across the stop
            with trio.fail_after(STEP):
                await greeter.wait_until(lambda: greeter.active == 1)
            inner.cancel_scope.cancel()
            with trio.CancelScope(shield=True), trio.fail_after(STEP):
                await greeter.wait_until(lambda: greeter.active == 0)
                assert await client.rest() == b""  # the server side was closed
    with pytest.raises(OSError):
        with trio.fail_after(STEP):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.aclose()

    greeter.mode = Mode.OK
    async with trio.open_nursery() as inner:
        assert await inner.start(greeter.serve) == port
        async with connect(greeter) as client:
            assert (await client.reply()).startswith(b"220 ")
        inner.cancel_scope.cancel()


def _ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback_available(), reason="no IPv6 loopback")
async def test_ipv6_greeter(nursery: trio.Nursery) -> None:
    greeter = await start(nursery, Greeter(host="::1"))
    async with connect(greeter) as client:
        assert (await client.reply()).startswith(b"220 ")
    assert unused_port("::1") > 0


# ------------------------------------------------------------------ farms


async def test_farm_shares_one_port_on_consecutive_addresses(nursery: trio.Nursery) -> None:
    with trio.fail_after(STEP):
        farm = await start_farm(nursery, [Mode.OK, Mode.SILENT, Mode.CODE_421], banner_name="farm.test")
    assert [g.host for g in farm.greeters] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert {g.port for g in farm.greeters} == {farm.port} and farm.host(2) == "127.0.0.4"
    async with connect(farm.greeters[0]) as client:
        assert await client.reply() == b"220 farm.test ESMTP ready\r\n"
    async with connect(farm.greeters[2]) as client:
        assert (await client.reply()).startswith(b"421 ")
    async with connect(farm.greeters[1]) as client:
        await client.nothing_for(0.2)
    assert [g.connections for g in farm.greeters] == [1, 1, 1]
