"""Serving Postfix connections: accept loops and the per-connection loop.

Postfix keeps one policy connection per smtpd process and reuses it for
many requests, strictly one at a time; it closes idle ones itself.  So a
connection here is long-lived and mostly idle, and the rules are:

* answer every complete request exactly once, in order, with bare LF;
* never send anything unasked (Postfix reads early bytes as a dead peer);
* a peer that breaks the protocol, or starts a request and then stalls,
  loses its own connection and nothing else;
* never let one connection's trouble -- or a bug -- reach another.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket

import trio

from smtpdcheck.compat import TaskStatus

from .clients import AllowList, RefusalLog
from .config import Config
from .listeners import endpoint_of
from .metrics import Metrics
from .protocol import CLOSED, NEED_DATA, PolicyParser, ProtocolError
from .responder import Responder
from .watchdog import Watchdog, tick_for

log = logging.getLogger("smtpdcheck.policyd")

RECEIVE_BYTES = 65536
# accept() errors that mean "out of resources for now": wait and retry
# instead of dying (the list trio's serve_listeners uses).
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# accept() errors that concern only the connection being accepted (the peer
# reset or gave up, a firewall rule refused it, the network under it went
# away): skip it and accept the next.  The list trio's SocketListener.accept
# ignores; the non-blocking accept() of _accept_waiting must ignore them too.
_ACCEPT_IGNORED_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH",
        "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT", "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET",
    )
    if hasattr(errno, name)
)
ACCEPT_RETRY_S = 0.1


class _StreamWire:
    """Any trio stream (stdin and stdout under ``--stdio``): read and written through trio's API."""

    __slots__ = ("stream",)

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def receive(self) -> bytes | bytearray:
        return await self.stream.receive_some(RECEIVE_BYTES)

    def send_now(self, data: bytes) -> bytes | memoryview | None:
        return data  # nothing goes without an await

    async def send(self, data: bytes | memoryview) -> None:
        await self.stream.send_all(data)


class _SocketWire:
    """A connected socket, read and written with one system call where trio's wrappers make several steps.

    Postfix sends a request only after reading the previous reply, so when
    a reply has just been sent the next request is not there yet: reading
    first, as ``receive_some`` does, fails with EAGAIN (an exception) and
    then waits anyway.  Here a read waits for readiness first, which is
    also the connection's one checkpoint per request.  A reply fits the
    socket buffer and is written at once, without the checkpoint (a task
    switch) that ``send_all`` adds; only a peer that stops reading makes
    a write wait, and that wait is a checkpoint.

    Errors are trio's: :class:`trio.BrokenResourceError` for a failed
    connection, :class:`trio.ClosedResourceError` for a closed socket, so
    the connection loop treats both wires alike.
    """

    __slots__ = ("fd", "socket")

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.socket = sock
        self.fd = sock.fileno()

    async def receive(self) -> bytes:
        fd = self.fd
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                return os.read(fd, RECEIVE_BYTES)
            except BlockingIOError:
                continue  # readiness without data (rare): wait again
            except OSError as exc:
                raise _stream_error(exc) from exc

    def send_now(self, data: bytes) -> bytes | memoryview | None:
        """Write what the socket takes now; None when all went, else the rest (for :meth:`send`)."""
        try:
            sent = os.write(self.fd, data)
        except BlockingIOError:
            return data
        except OSError as exc:
            raise _stream_error(exc) from exc
        return None if sent == len(data) else memoryview(data)[sent:]

    async def send(self, data: bytes | memoryview) -> None:
        """Write all of ``data``, waiting while the peer does not read."""
        fd = self.fd
        while True:
            await trio.lowlevel.wait_writable(fd)
            try:
                sent = os.write(fd, data)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise _stream_error(exc) from exc
            if sent == len(data):
                return
            data = memoryview(data)[sent:]


def _stream_error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    """The stream error trio's SocketStream raises for the same failure."""
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


def _wire(stream: trio.abc.Stream) -> _SocketWire | _StreamWire:
    if isinstance(stream, trio.SocketStream):
        return _SocketWire(stream.socket)
    return _StreamWire(stream)


async def handle_connection(
    stream: trio.abc.Stream, responder: Responder, watchdog: Watchdog, peer: str = ""
) -> None:
    """Serve one Postfix connection until it closes; never raises.

    One deadline covers the whole connection and is moved for each phase
    (waiting for a request, answering, sending); ``watchdog`` enforces it.
    When it passes, the connection is closed whatever the phase.
    """
    metrics: Metrics = responder.metrics
    parser = PolicyParser()
    wire = _wire(stream)
    metrics.connections_open += 1
    metrics.connections_total += 1
    request_deadline = math.inf
    phase = "idle"
    now = trio.current_time()
    try:
        with watchdog.deadline() as deadline:
            while True:
                request = parser.next_request()
                if request is NEED_DATA:
                    config = responder.config
                    # A request in progress must be complete within
                    # request_timeout of its first byte (a client trickling
                    # one byte a second must not pin us); between requests
                    # Postfix may legitimately stay silent for minutes.
                    if parser.buffered_bytes:
                        if request_deadline == math.inf:
                            request_deadline = trio.current_time() + config.request_timeout
                        deadline.at = request_deadline
                        phase = "request"
                    else:
                        # ``now`` is when the last request was answered,
                        # microseconds ago: close enough for an idle timer.
                        request_deadline = math.inf
                        idle = config.idle_timeout
                        deadline.at = now + idle if idle > 0 else math.inf
                        phase = "idle"
                    parser.receive_data(await wire.receive())
                    continue
                request_deadline = math.inf
                if request is CLOSED:
                    return
                # The answer bounds itself (its deadline, fail-open); the
                # reply must then be taken within request_timeout, so a peer
                # that sends but never reads cannot hold us forever.
                config = responder.config
                phase = "reply"
                now = trio.current_time()
                answer = responder.answer_now(request, now)
                if answer is None:
                    deadline.at = now + config.deadline + config.request_timeout
                    answer = await responder.answer(request)
                    now = trio.current_time()
                deadline.at = now + config.request_timeout
                rest = wire.send_now(answer.reply)
                if rest is not None:
                    await wire.send(rest)
        if deadline.expired:
            config = responder.config
            if phase == "request":
                metrics.protocol_errors["timeout"] += 1
                log.warning("closing connection%s: request incomplete after %gs", peer, config.request_timeout)
            elif phase == "reply":
                metrics.protocol_errors["timeout"] += 1
                log.warning("closing connection%s: reply not read within %gs", peer, config.request_timeout)
            else:
                metrics.idle_closes += 1
                log.info("closing connection%s: idle for %gs", peer, config.idle_timeout)
    except ProtocolError as exc:
        metrics.protocol_errors[exc.reason] += 1
        log.warning("protocol error%s: %s; closing the connection", peer, exc)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        log.debug("connection%s lost", peer)
    except OSError as exc:
        log.debug("connection%s failed: %s", peer, exc)
    except Exception:  # last resort: one connection's bug must not stop the server
        log.exception("unexpected error on a connection%s; closing it", peer)
    finally:
        metrics.connections_open -= 1
        await trio.aclose_forcefully(stream)


def connection_tick(config: Config) -> float:
    """How often the watchdog looks: often enough for the shortest timeout."""
    return tick_for(config.request_timeout, config.idle_timeout)


def start_watchdog(nursery: trio.Nursery, responder: Responder) -> Watchdog:
    """A watchdog for connections, as a task of ``nursery`` (cancel it to stop)."""
    watchdog = Watchdog()
    nursery.start_soon(watchdog.run, lambda: connection_tick(responder.config), name="connection watchdog")
    return watchdog


def _peer_text(stream: trio.SocketStream) -> str:
    try:
        name = stream.socket.getpeername()
    except OSError:
        return ""
    if isinstance(name, tuple) and len(name) >= 2:
        return f" from {name[0]}:{name[1]}"
    return ""


class Gate:
    """The clients one listener answers (``--allow-client``), decided at accept, before any byte is read."""

    __slots__ = ("allow", "endpoint", "log")

    def __init__(self, allow: AllowList, endpoint: str, log: RefusalLog) -> None:
        self.allow = allow
        self.endpoint = endpoint
        self.log = log

    def admits(self, sock: socket.socket | trio.socket.SocketType, peer: object, responder: Responder) -> bool:
        """Whether the peer may be served; a refused one is closed, counted and (rate-limited) logged."""
        host = peer[0] if isinstance(peer, tuple) else ""
        if self.allow.allows(host):
            return True
        sock.close()
        responder.metrics.clients_refused += 1
        self.log.refused(host or "an unknown peer", self.endpoint, trio.current_time())
        return False


async def accept_loop(
    listener: trio.SocketListener,
    responder: Responder,
    handlers: trio.Nursery,
    slots: trio.Semaphore,
    watchdog: Watchdog,
    gate: Gate | None = None,
) -> None:
    """Accept while under the connection limit; beyond it, peers wait in the backlog.

    trio's ``accept`` takes one connection per scheduler pass.  When every
    smtpd of a restarted Postfix reconnects at once, the last one would
    wait a hundred passes for its first reply, so each wake-up takes every
    connection already waiting, through a non-blocking twin of the
    listening socket.  With a ``gate``, a peer it does not admit is closed
    at once and its slot given back.
    """
    with _twin(listener) as twin:
        while True:
            if not slots.value:
                responder.connection_limit_warning.warn(
                    trio.current_time(),
                    "connection limit reached (--max-connections %d): new connections wait in the listen queue",
                    responder.config.max_connections,
                )
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                    _accept_failed(responder, exc)
                    await trio.sleep(ACCEPT_RETRY_S)
                    continue
                raise
            except BaseException:
                slots.release()
                raise
            if gate is None or gate.admits(stream.socket, _peer_name(stream.socket), responder):
                handlers.start_soon(_run_handler, stream, responder, slots, watchdog)
            else:
                slots.release()
            _accept_waiting(twin, responder, handlers, slots, watchdog, gate)


def _peer_name(sock: trio.socket.SocketType) -> object:
    try:
        return sock.getpeername()
    except OSError:
        return None  # gone already: not admitted


def _twin(listener: trio.SocketListener) -> socket.socket:
    """A second descriptor for the listening socket, for plain non-blocking accept() calls."""
    twin = socket.socket(fileno=os.dup(listener.socket.fileno()))
    twin.setblocking(False)
    return twin


def _accept_waiting(
    twin: socket.socket, responder: Responder, handlers: trio.Nursery, slots: trio.Semaphore, watchdog: Watchdog,
    gate: Gate | None = None,
) -> None:
    """Start a handler for every connection already waiting, within the limit; never blocks."""
    while True:
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            return
        try:
            sock, peer = twin.accept()
        except BlockingIOError:
            slots.release()
            return
        except OSError as exc:
            slots.release()
            if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                _accept_failed(responder, exc)
                return  # the awaited accept() retries after its pause
            if exc.errno in _ACCEPT_IGNORED_ERRNOS:
                continue  # that one connection failed: next one
            raise
        if gate is not None and not gate.admits(sock, peer, responder):
            slots.release()
            continue
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        handlers.start_soon(_run_handler, stream, responder, slots, watchdog)


def _accept_failed(responder: Responder, exc: OSError) -> None:
    responder.metrics.accept_errors += 1
    log.error("accept failed: %s; retrying in %gs", errno.errorcode.get(exc.errno or 0, exc), ACCEPT_RETRY_S)


async def _run_handler(
    stream: trio.SocketStream, responder: Responder, slots: trio.Semaphore, watchdog: Watchdog
) -> None:
    try:
        await handle_connection(stream, responder, watchdog, _peer_text(stream))
    finally:
        slots.release()


class PolicyServer:
    """Listeners plus handlers, with a shutdown that drains before closing.

    On shutdown the accept loops stop first; requests already being decided
    get up to ``grace`` seconds to be answered, then every connection is
    closed (idle ones too: at once when nothing is being decided).  Postfix then applies its
    own default action to anything after that, which is why the grace is
    short.
    """

    def __init__(self, listeners: list[trio.SocketListener], responder: Responder, *, max_connections: int) -> None:
        self.listeners = listeners
        self.responder = responder
        self.slots = trio.Semaphore(max_connections)
        # --allow-client guards every inet listener; unix sockets are guarded by their mode.
        allowed = responder.config.allow_clients
        self._allow = AllowList(allowed) if allowed else None
        self._refusals = RefusalLog()
        self._accepting = trio.CancelScope()
        self._handlers: trio.Nursery | None = None

    async def serve(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as watching:
                watchdog = start_watchdog(watching, self.responder)
                async with trio.open_nursery() as handlers:
                    self._handlers = handlers
                    with self._accepting:
                        async with trio.open_nursery() as acceptors:
                            for listener in self.listeners:
                                acceptors.start_soon(
                                    accept_loop, listener, self.responder, handlers, self.slots, watchdog,
                                    self._gate(listener),
                                )
                            task_status.started()
                    self._close_listeners()
                    # Accepting has stopped; handlers end when their peers
                    # leave or when shutdown() cancels them.
                watching.cancel_scope.cancel()  # no connection left to watch
        finally:
            self._close_listeners()

    def _gate(self, listener: trio.SocketListener) -> Gate | None:
        if self._allow is None or listener.socket.family == socket.AF_UNIX:
            return None
        return Gate(self._allow, endpoint_of(listener), self._refusals)

    def _close_listeners(self) -> None:
        for listener in self.listeners:
            listener.socket.close()

    async def shutdown(self, grace: float) -> None:
        self._accepting.cancel()
        with trio.move_on_after(grace):
            await self.responder.wait_drained()
        if self._handlers is not None:
            self._handlers.cancel_scope.cancel()
