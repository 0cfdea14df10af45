"""Accepting connections in batches: a reconnect storm after a restart is served at once."""

from __future__ import annotations

import socket

import trio
import trio.testing

from policyd.config import Config
from policyd.server import accept_loop
from policyd.responder import Responder, core_settings
from smtpdcheck.core import build_core
from policyd.watchdog import Watchdog
from smtpdcheck.stoprule import StopSet


class CountingListener:
    """A SocketListener that counts awaited accepts (trio's take one connection per scheduler pass)."""

    def __init__(self, listener: trio.SocketListener) -> None:
        self.listener = listener
        self.socket = listener.socket
        self.awaited = 0

    async def accept(self) -> trio.SocketStream:
        self.awaited += 1
        return await self.listener.accept()


async def test_waiting_connections_are_accepted_together_within_the_limit() -> None:
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
                nursery.cancel_scope.cancel()
    finally:
        for client in clients:
            client.close()
        listener.socket.close()
