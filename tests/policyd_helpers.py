"""Running the policy server in-process for tests, and talking to it like Postfix."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import trio

from policyd.config import Config
from policyd.listeners import endpoint_of, open_listeners, split_inet
from policyd.client import encode_request, parse_reply
from policyd.server import PolicyServer
from policyd.service import PolicyService
from smtpdcheck.stoprule import StopSet

# The request Postfix 3.7 sends at RCPT, less the attributes we vary.
BASE_REQUEST: Mapping[str, str] = {
    "request": "smtpd_access_policy",
    "protocol_state": "RCPT",
    "protocol_name": "ESMTP",
    "client_address": "192.0.2.50",
    "client_name": "unknown",
    "client_port": "43350",
    "reverse_client_name": "unknown",
    "server_address": "127.0.0.1",
    "server_port": "25",
    "helo_name": "client.test",
    "sender": "sender@sender.test",
    "recipient": "user@example.com",
    "recipient_count": "0",
    "queue_id": "",
    "instance": "267f.6b06f7a0.dbbc.0",
    "size": "0",
    "etrn_domain": "",
    "stress": "",
    "sasl_method": "",
    "sasl_username": "",
    "sasl_sender": "",
    "ccert_subject": "",
    "ccert_issuer": "",
    "ccert_fingerprint": "",
    "ccert_pubkey_fingerprint": "",
    "encryption_protocol": "",
    "encryption_cipher": "",
    "encryption_keysize": "0",
    "policy_context": "",
}


def rcpt(recipient: str, **extra: str) -> bytes:
    return encode_request({**BASE_REQUEST, "recipient": recipient, **extra})


@dataclass
class RunningPolicyd:
    service: PolicyService
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
) -> RunningPolicyd:
    service = PolicyService(config, stop, nursery)
    listen = tuple(e if not e.startswith("inet:") else e for e in config.listen)
    listeners = await open_listeners(listen, socket_mode=config.socket_mode)
    server = PolicyServer(listeners, service, max_connections=config.max_connections)
    await nursery.start(server.serve)
    return RunningPolicyd(service, server, [endpoint_of(l) for l in listeners])


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
