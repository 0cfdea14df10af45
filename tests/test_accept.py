"""Accepting connections in batches: a reconnect storm after a restart is served at once."""

from __future__ import annotations

import errno
import logging
import os
import socket

import pytest
import trio
import trio.testing

from policyd.client import encode_request
from policyd.config import Config
from policyd.server import _accept_waiting, accept_loop
from policyd.responder import Responder, core_settings
from smtpdcheck.core import build_core
from policyd.watchdog import Watchdog
from smtpdcheck.stoprule import StopSet
from testbeds.postfix_request import POSTFIX_37_RCPT_ATTRS


class CountingListener:
    """A SocketListener that counts awaited accepts (trio's take one connection per scheduler pass)."""

    def __init__(self, listener: trio.SocketListener) -> None:
        self.listener = listener
        self.socket = listener.socket
        self.awaited = 0

    async def accept(self) -> trio.SocketStream:
        self.awaited += 1
        return await self.listener.accept()


async def test_waiting_connections_are_accepted_together_within_the_limit(caplog: pytest.LogCaptureFixture) -> None:
    (base,) = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=64)
    listener = CountingListener(base)
    port = listener.socket.getsockname()[1]
    clients = []
    try:
        for _ in range(30):  # the kernel completes these handshakes into the backlog
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            clients.append(client)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                service = Responder(Config(nameserver=("127.0.0.1:9",)), build_core(nursery, core_settings(Config(nameserver=("127.0.0.1:9",)))))
                slots = trio.Semaphore(25)
                nursery.start_soon(accept_loop, listener, service,  # type: ignore[arg-type]
                                    nursery, slots, Watchdog())
                await trio.testing.wait_all_tasks_blocked()
                # 25 accepted (the limit) after one awaited accept, the rest
                # left waiting in the backlog.
                assert service.metrics.connections_total == 25
                assert service.metrics.connections_open == 25
                assert slots.value == 0
                assert listener.awaited == 1
                # A slot freed: the next waiting peer gets it.
                clients[0].close()
                while service.metrics.connections_total < 26:
                    await trio.sleep(0.01)
                await trio.testing.wait_all_tasks_blocked()
                assert service.metrics.connections_open == 25
                # The limit reached is a warning, logged once however often it is reached in a minute.
                limit = [r for r in caplog.records if "connection limit reached" in r.getMessage()]
                assert [(r.levelno, r.getMessage()) for r in limit] == [(
                    logging.WARNING,
                    "connection limit reached (--max-connections 1000): new connections wait in the listen queue",
                )]
                nursery.cancel_scope.cancel()
    finally:
        for client in clients:
            client.close()
        listener.socket.close()


class FailingTwin:
    """The non-blocking twin of a listening socket, whose accept() first fails
    with each of ``errors``, as Linux's can for a connection a firewall rule
    refused or a peer reset while it waited, then accepts for real."""

    def __init__(self, sock: socket.socket, errors: list[int]) -> None:
        self.sock = sock
        self.errors = list(errors)

    def accept(self) -> tuple[socket.socket, object]:
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, os.strerror(code))
        return self.sock.accept()


@pytest.mark.parametrize("code", [errno.EPERM, errno.ECONNRESET, errno.ENETDOWN, errno.EHOSTUNREACH, errno.ETIMEDOUT])
async def test_accept_errors_of_one_connection_skip_it_and_serving_goes_on(code: int) -> None:
    """trio's own accept loop skips these; the batch accept must too, not end the daemon."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=8)
    port = listener.socket.getsockname()[1]
    twin = socket.socket(fileno=os.dup(listener.socket.fileno()))
    twin.setblocking(False)
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    request = encode_request({**POSTFIX_37_RCPT_ATTRS, "protocol_state": "DATA"})
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                config = Config(nameserver=("127.0.0.1:9",))
                service = Responder(config, build_core(nursery, core_settings(config)))
                slots = trio.Semaphore(10)
                _accept_waiting(FailingTwin(twin, [code, code]), service,  # type: ignore[arg-type]
                                nursery, slots, Watchdog())
                assert slots.value == 8  # both waiting connections taken, past the failures
                for client in clients:
                    client.sendall(request)
                    reply = await trio.to_thread.run_sync(client.recv, 100)
                    assert reply == b"action=DUNNO\n\n"
                assert slots.value == 8  # the failed accepts gave their slots back
                nursery.cancel_scope.cancel()
    finally:
        for client in clients:
            client.close()
        twin.close()
        listener.socket.close()
