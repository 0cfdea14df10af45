"""Fake SMTP servers ("greeters") on loopback for probing tests.

The probe only cares about the first few hundred bytes of an SMTP conversation,
but real MX hosts get those bytes wrong in many ways: multi-line greetings,
postscreen-style pauses in the middle of the greeting, 4xx/5xx banners,
silence, resets, floods.  Each ``Mode`` reproduces one of those on a real
socket so the probe's timeouts and parsing can be tested end to end.

Every greeter records what each client sent (``received``) and what it sent
before the greeting was complete (``pregreet``), so tests can assert that the
probe never talks first -- postscreen would reject it for that -- and that it
says ``QUIT`` when done.
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from smtpdcheck.compat import TaskStatus

__all__ = ["Farm", "Greeter", "Mode", "start_farm", "start_greeters", "unused_port"]


class Mode(enum.Enum):
    """How a greeter treats each new connection."""

    OK = enum.auto()
    """``220 <banner> ESMTP ready``; answers commands; ``QUIT`` -> ``221 bye`` and close."""
    MULTILINE = enum.auto()
    """A three-line 220 greeting, then as OK."""
    PAUSED_MULTILINE = enum.auto()
    """``220-<banner> ESMTP``, a ``pause``, then ``220 ready``; then as OK (postscreen)."""
    CODE_421 = enum.auto()
    """``421 4.3.2 Service shutting down`` and close."""
    CODE_554 = enum.auto()
    """``554 5.3.2 No SMTP service here``, then wait for QUIT (RFC 5321 3.1)."""
    CODE_450 = enum.auto()
    """``450 4.3.2 Try again later``, then wait for QUIT like CODE_554."""
    SILENT = enum.auto()
    """Accept and never send anything; hold until the client closes."""
    CLOSE = enum.auto()
    """Accept and close at once (clean FIN)."""
    RESET = enum.auto()
    """Accept and reset; the client sees ECONNRESET."""
    RESET_MID = enum.auto()
    """Send the first bytes of a greeting, then reset."""
    GARBAGE = enum.auto()
    """Send a non-SMTP line and close."""
    TRICKLE = enum.auto()
    """Send the greeting one byte per ``trickle_interval``, then as OK."""
    FLOOD = enum.auto()
    """Send up to ``flood_bytes`` of ``A`` with no newline, then hold."""
    NO_READ = enum.auto()
    """Send the greeting and never read again; hold until the client closes."""
    HOLD_AFTER_QUIT = enum.auto()
    """As OK, but after ``221`` keep the connection open until the client closes."""
    REFUSE = enum.auto()
    """Not listening: the port is closed, so the kernel answers a SYN with RST
    (the client sees ECONNREFUSED), and connections open at the switch are
    closed.  Switching to another mode listens on the same port again."""


RECEIVED_CAP = 64 << 10
"""Bytes kept per connection in ``received``; a greeter is not a mail sink."""

MAX_LINE = 4096
MAX_COMMANDS = 1000
"""Commands answered per connection before the greeter gives up on the client."""

_FLOOD_CHUNK = 64 << 10
_CLOSE_POLL_INTERVAL = 0.05
_DRAIN_TIMEOUT = 0.5
_TCP_ESTABLISHED = 1
_FARM_PORT_ATTEMPTS = 20
_MAX_LISTEN_PERIODS = 10_000
"""How many times one greeter may start listening again after Mode.REFUSE."""


def unused_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` where nothing listens, so connects are refused.

    The port is bound and released at once; another process could take it
    in between, but on a test machine's loopback that is vanishingly rare.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


async def start_greeters(
    nursery: trio.Nursery,
    modes: list[Mode],
    **kwargs: Any,
) -> list[Greeter]:
    """Start one greeter per mode in ``nursery`` and return them, all listening."""
    greeters = [Greeter(mode, **kwargs) for mode in modes]
    for greeter in greeters:
        await nursery.start(greeter.serve)
    return greeters


@dataclass
class Farm:
    """Greeters on 127.0.0.{2,3,...} sharing one port.

    The code under test probes a single SMTP port on every MX host, as a
    real backup MX probes port 25, so fake hosts differ by address; Linux
    answers the whole of 127/8 without set-up.
    """

    port: int
    greeters: list[Greeter]

    def host(self, i: int) -> str:
        return self.greeters[i].host


async def start_farm(nursery: trio.Nursery, modes: Sequence[Mode], **kwargs: Any) -> Farm:
    """Start greeter ``i`` on 127.0.0.{i+2}, all on one free port.

    A port free on 127.0.0.2 can be taken on another address; then the
    whole farm is tried again on a new port.
    """
    for _attempt in range(_FARM_PORT_ATTEMPTS):
        port = unused_port("127.0.0.2")
        greeters: list[Greeter] = []
        try:
            for i, mode in enumerate(modes):
                greeter = Greeter(mode, host=f"127.0.0.{i + 2}", port=port, **kwargs)
                await nursery.start(greeter.serve)
                greeters.append(greeter)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        return Farm(port, greeters)
    raise RuntimeError("no common free port for the greeter farm")


def _set_reset_on_close(stream: trio.SocketStream) -> None:
    """Make the next close send RST instead of FIN (SO_LINGER with zero timeout)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _peek_unread(stream: trio.SocketStream) -> bytes:
    """Return bytes the kernel holds for this socket but nobody has read yet.

    Reads from a duplicate descriptor with MSG_PEEK, so nothing is consumed
    and trio's own socket is untouched.
    """
    try:
        dup = socket.socket(fileno=os.dup(stream.socket.fileno()))
    except OSError:
        return b""
    with dup:
        try:
            return dup.recv(RECEIVED_CAP, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            return b""


class Greeter:
    """One fake SMTP server on a loopback port.

    Start it with ``port = await nursery.start(greeter.serve)``; it stops when
    the nursery is cancelled.  ``mode`` may be changed while it runs and
    applies from the next accepted connection on.  Serving again after a stop
    rebinds the same port, to simulate a host coming back.
    """

    def __init__(
        self,
        mode: Mode = Mode.OK,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        pause: float = 30.0,
        trickle_interval: float = 1.0,
        flood_bytes: int = 8 << 20,
        banner_name: str = "mx.test",
        greet_delay: float = 0.0,
    ) -> None:
        self._mode = mode
        self._changed = trio.Event()
        self.greet_delay = greet_delay
        """Seconds every greeting (or refusal) waits after the connection is
        accepted: a primary that is up but slow to say so.  May be changed
        while running; applies from the next connection on."""
        self.host = host
        self.port = port
        self.pause = pause
        self.trickle_interval = trickle_interval
        self.flood_bytes = flood_bytes
        self.banner_name = banner_name
        self.connections = 0
        """Connections accepted so far."""
        self.accepted_at: list[float] = []
        """When each connection was accepted (trio time): how often a prober comes."""
        self.listening = False
        """Whether the port is open (not in Mode.REFUSE, or not yet switched)."""
        self.active = 0
        """Connections currently open on the server side."""
        self.closed_by_client = 0
        """Connections the client closed (or reset) before the greeter did."""
        self.received: list[bytes] = []
        """Per connection, what the client sent (first ``RECEIVED_CAP`` bytes)."""
        self.pregreet: list[bytes] = []
        """Per connection, what the client sent before the greeting was complete.

        For modes that never complete a greeting this is everything received.
        """

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        """Applies from the next connection; to or from REFUSE it closes or reopens the port."""
        self._mode = mode
        self._notify()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Block until ``predicate()`` holds; re-checked whenever state changes.

        Callers bound the wait with ``trio.fail_after``.
        """
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def serve(self, *, task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, report the port, and handle connections until cancelled.

        In Mode.REFUSE the listening socket is closed until the mode changes
        again; the port is bound once first, so that it is known.
        """
        for period in range(_MAX_LISTEN_PERIODS):
            listener = await self._listen()
            try:
                async with listener, trio.open_nursery() as nursery:
                    self.listening = True
                    self._notify()
                    if period == 0:
                        task_status.started(self.port)
                    # serve_listeners retries accept() on EMFILE and friends.
                    nursery.start_soon(partial(trio.serve_listeners, self._handle, [listener], handler_nursery=nursery))
                    await self.wait_until(lambda: self.mode is Mode.REFUSE)
                    nursery.cancel_scope.cancel()
            finally:
                self.listening = False
                self._notify()
            await self.wait_until(lambda: self.mode is not Mode.REFUSE)

    async def _listen(self) -> trio.SocketListener:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            # Lets a restarted greeter rebind its port despite TIME_WAIT leftovers.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await sock.bind((self.host, self.port))
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        return trio.SocketListener(sock)

    async def _handle(self, stream: trio.SocketStream) -> None:
        index = self.connections
        self.connections += 1
        self.accepted_at.append(trio.current_time())
        self.active += 1
        self.received.append(b"")
        self.pregreet.append(b"")
        self._notify()
        conn = _Connection(self, stream, index, self.mode)
        try:
            async with stream:
                await conn.run()
        finally:
            self.active -= 1
            if conn.client_closed:
                self.closed_by_client += 1
            self._notify()

    def _record(self, index: int, data: bytes, *, greeted: bool) -> None:
        room = RECEIVED_CAP - len(self.received[index])
        if room > 0:
            self.received[index] += data[:room]
            if not greeted:
                self.pregreet[index] = self.received[index]
        self._notify()


class _Connection:
    """One accepted connection playing one ``Mode``.

    A reader task consumes everything the client sends from the start, so
    early talkers are recorded and a client hanging up is noticed even while
    the greeter is pausing or trickling; the script task sends the greeting
    and answers complete command lines.
    """

    def __init__(self, greeter: Greeter, stream: trio.SocketStream, index: int, mode: Mode) -> None:
        self.greeter = greeter
        self.stream = stream
        self.index = index
        self.mode = mode
        self.greet_delay = greeter.greet_delay
        self.client_closed = False
        self.greeted = False
        self._closing = False  # the greeter has decided to close; a late EOF is not the client's doing
        self._eof = False
        self._pending = bytearray()
        self._more = trio.Event()
        self._scope: trio.CancelScope | None = None

    async def run(self) -> None:
        mode = self.mode
        if mode is Mode.CLOSE:
            return
        if mode is Mode.RESET:
            _set_reset_on_close(self.stream)
            return
        if mode is Mode.NO_READ:
            await self._no_read()
            return
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            nursery.start_soon(self._reader)
            await self._script(mode)
            nursery.cancel_scope.cancel()

    # ------------------------------------------------------------- plumbing

    async def _reader(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some(RECEIVED_CAP)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._eof = True
                if not self._closing:
                    self.client_closed = True
                    assert self._scope is not None
                    self._scope.cancel()
                self._more.set()
                return
            self.greeter._record(self.index, data, greeted=self.greeted)
            if len(self._pending) < RECEIVED_CAP:
                self._pending += data
            self._more.set()

    async def _send(self, data: bytes) -> bool:
        """Send ``data``; ``False`` if the client has gone away."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if not self._closing:
                self.client_closed = True
            return False
        return True

    def _mark_greeted(self) -> None:
        """Snapshot what arrived before the greeting's last bytes go out.

        Called just before the final send, because once those bytes are on
        the wire a well-behaved client may answer before this task runs
        again.  Bytes still unread in the kernel arrived earlier, so they
        count as pre-greeting too.
        """
        greeter = self.greeter
        unread = _peek_unread(self.stream)
        snapshot = (greeter.received[self.index] + unread)[:RECEIVED_CAP]
        greeter.pregreet[self.index] = snapshot
        self.greeted = True

    async def _send_greeting(self, parts: list[tuple[bytes, float]]) -> bool:
        """Send greeting pieces, sleeping after each by the given delay.

        The greeter's ``greet_delay`` is slept first; the reader task keeps
        recording meanwhile, so a client that talks during it is caught.
        """
        if self.greet_delay > 0:
            await trio.sleep(self.greet_delay)
        for position, (data, delay) in enumerate(parts):
            if position == len(parts) - 1:
                self._mark_greeted()
            if not await self._send(data):
                return False
            if delay > 0 and position < len(parts) - 1:
                await trio.sleep(delay)
        return True

    async def _next_line(self) -> bytes | None:
        """Return the next command line, or ``None`` at end of input."""
        while True:  # each pass either returns or waits for the reader
            newline = self._pending.find(b"\n")
            if newline >= 0:
                line = bytes(self._pending[: newline + 1])
                del self._pending[: newline + 1]
                return line
            if len(self._pending) > MAX_LINE:
                line = bytes(self._pending)
                self._pending.clear()
                return line
            if self._eof:
                return None
            self._more = trio.Event()
            await self._more.wait()

    # -------------------------------------------------------------- scripts

    async def _script(self, mode: Mode) -> None:
        banner = self.greeter.banner_name.encode("ascii")
        if mode in (Mode.OK, Mode.HOLD_AFTER_QUIT):
            if await self._send_greeting([(b"220 " + banner + b" ESMTP ready\r\n", 0)]):
                await self._commands(hold=mode is Mode.HOLD_AFTER_QUIT)
        elif mode is Mode.MULTILINE:
            greeting = b"220-" + banner + b" ESMTP\r\n220-more\r\n220 ready\r\n"
            if await self._send_greeting([(greeting, 0)]):
                await self._commands()
        elif mode is Mode.PAUSED_MULTILINE:
            parts = [(b"220-" + banner + b" ESMTP\r\n", self.greeter.pause), (b"220 ready\r\n", 0.0)]
            if await self._send_greeting(parts):
                await self._commands()
        elif mode is Mode.TRICKLE:
            greeting = b"220 " + banner + b" ESMTP\r\n"
            interval = self.greeter.trickle_interval
            if await self._send_greeting([(greeting[i : i + 1], interval) for i in range(len(greeting))]):
                await self._commands()
        elif mode is Mode.CODE_421:
            self._closing = True
            await self._send_greeting([(b"421 4.3.2 Service shutting down\r\n", 0)])
        elif mode is Mode.CODE_554:
            if await self._send_greeting([(b"554 5.3.2 No SMTP service here\r\n", 0)]):
                await self._commands(refuse=True)
        elif mode is Mode.CODE_450:
            if await self._send_greeting([(b"450 4.3.2 Try again later\r\n", 0)]):
                await self._commands(refuse=True)
        elif mode is Mode.GARBAGE:
            self._closing = True
            await self._send(b"\x00\xffHELLO NOT SMTP\r\n")
        elif mode is Mode.RESET_MID:
            self._closing = True
            await self._send((b"220-" + banner + b" ESMTP\r\n")[:9])
            _set_reset_on_close(self.stream)
        elif mode is Mode.FLOOD:
            await self._flood()
        elif mode is Mode.SILENT:
            await trio.sleep_forever()
        else:
            raise AssertionError(f"unhandled mode {mode}")

    async def _commands(self, *, refuse: bool = False, hold: bool = False) -> None:
        """Answer commands until QUIT; after a 5xx/4xx greeting only QUIT is accepted."""
        banner = self.greeter.banner_name.encode("ascii")
        for _ in range(MAX_COMMANDS):
            line = await self._next_line()
            if line is None:
                return
            verb = line.strip().split(b" ", 1)[0].upper()
            if verb == b"QUIT":
                if not hold:
                    self._closing = True
                if await self._send(b"221 bye\r\n") and hold:
                    await trio.sleep_forever()
                return
            if len(line) > MAX_LINE:
                reply = b"500 5.5.2 Line too long\r\n"
            elif refuse:
                reply = b"503 5.5.1 Bad sequence of commands\r\n"
            elif verb in (b"EHLO", b"HELO"):
                reply = b"250 " + banner + b"\r\n"
            elif verb in (b"NOOP", b"RSET"):
                reply = b"250 2.0.0 Ok\r\n"
            else:
                reply = b"502 5.5.2 Command not recognised\r\n"
            if not await self._send(reply):
                return
        self._closing = True
        await self._send(b"421 4.7.0 Too many commands\r\n")

    async def _flood(self) -> None:
        remaining = self.greeter.flood_bytes
        chunk = b"A" * _FLOOD_CHUNK
        while remaining > 0:
            piece = chunk[: min(remaining, _FLOOD_CHUNK)]
            if not await self._send(piece):
                return
            remaining -= len(piece)
        await trio.sleep_forever()

    async def _no_read(self) -> None:
        """Greet, then never read: the client's QUIT sits unread in the kernel.

        Whether the client has hung up is learned from the TCP state (Linux
        TCP_INFO), polled, because reading would change what is being tested.
        Once it has, whatever it sent is collected for ``received``.
        """
        banner = self.greeter.banner_name.encode("ascii")
        self._mark_greeted()
        if not await self._send(b"220 " + banner + b"\r\n"):
            return
        tcp_info = getattr(socket, "TCP_INFO", None)
        if tcp_info is None:
            await trio.sleep_forever()
        while True:  # one poll per interval until the state leaves ESTABLISHED
            state = self.stream.socket.getsockopt(socket.IPPROTO_TCP, tcp_info, 1)[0]
            if state != _TCP_ESTABLISHED:
                break
            await trio.sleep(_CLOSE_POLL_INTERVAL)
        self.client_closed = True
        with trio.move_on_after(_DRAIN_TIMEOUT):
            for _ in range(RECEIVED_CAP):
                try:
                    data = await self.stream.receive_some(RECEIVED_CAP)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                self.greeter._record(self.index, data, greeted=True)
