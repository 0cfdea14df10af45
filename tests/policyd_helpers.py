"""Running the policy server in-process for tests, and talking to it like Postfix."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import trio

from policyd.client import encode_request, parse_reply
from policyd.config import Config
from policyd.listeners import endpoint_of, open_listeners, split_inet
from policyd.server import PolicyServer
from policyd.responder import Responder, core_settings
from smtpdcheck.core import build_core
from smtpdcheck.stoprule import StopSet
from testbeds.postfix_request import POSTFIX_37_RCPT_ATTRS

#: The request Postfix 3.7 sends at RCPT; tests vary the recipient and more.
BASE_REQUEST: Mapping[str, str] = POSTFIX_37_RCPT_ATTRS


def rcpt(recipient: str, **extra: str) -> bytes:
    return encode_request({**BASE_REQUEST, "recipient": recipient, **extra})


@dataclass
class RunningPolicyd:
    responder: Responder
    server: PolicyServer
    endpoints: list[str]

    @property
    def port(self) -> int:
        return split_inet(next(e for e in self.endpoints if e.startswith("inet:")))[1]

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", self.port)

    async def ask(self, request: bytes, stream: trio.SocketStream | None = None) -> tuple[str, str]:
        """Send one request, read one reply (Postfix's lock-step)."""
        own = stream is None
        s = stream or await self.connect()
        try:
            await s.send_all(request)
            data = await read_replies(s, 1)
            return parse_reply(data)
        finally:
            if own:
                await s.aclose()


async def read_replies(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    data = b""
    while data.count(b"\n\n") < count:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError(f"closed after {data!r}")
        data += chunk
    return data


async def start_policyd(
    nursery: trio.Nursery,
    config: Config,
    *,
    stop: StopSet = StopSet(),
    listeners: list[trio.SocketListener] | None = None,
) -> RunningPolicyd:
    """The server in ``nursery``; ``listeners`` (say, sockets as systemd hands them over) replace ``listen``."""
    core = build_core(nursery, core_settings(config))
    core.stop = stop
    responder = Responder(config, core)
    if listeners is None:
        listeners = await open_listeners(config.listen, socket_mode=config.socket_mode, socket_group=config.socket_group)
    server = PolicyServer(listeners, responder, max_connections=config.max_connections)
    await nursery.start(server.serve)
    return RunningPolicyd(responder, server, [endpoint_of(l) for l in listeners])


def policyd_config(dns_port: int, smtp_port: int, **changes: object) -> Config:
    base = Config(
        listen=("inet:127.0.0.1:0",),
        nameserver=(f"127.0.0.1:{dns_port}",),
        smtp_port=smtp_port,
        timeout=1.0,
        dns_timeout=0.5,
        deadline=2.5,
    )
    return replace(base, **changes)  # type: ignore[arg-type]
