"""One Postfix-like connection sending a steady stream of RCPTs, for the timing benchmarks.

Postfix keeps a policy connection open and sends one request at a time,
so the latency a sender sees is the time from a request to its reply on
such a connection.  The ``refresh`` and ``outage`` benchmarks both drive
daemons this way and differ only in what they record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import trio

from .procs import LOOPBACK
from .workload import RequestTemplate

#: A reply slower than this is an error of the run, not a latency figure.
REPLY_LIMIT_S: Final = 12.0

#: ``record(k, sent, latency, action)`` for the k-th RCPT (trio times, seconds).
Record = Callable[[int, float, float, str], None]


async def read_reply(stream: trio.SocketStream, buffer: bytearray) -> bytes:
    """One policy reply (up to the empty line); bytes after it stay in ``buffer``."""
    for _ in range(1000):  # a reply is a few dozen bytes; this bounds a misbehaving peer
        end = buffer.find(b"\n\n")
        if end >= 0:
            reply = bytes(buffer[: end + 2])
            del buffer[: end + 2]
            return reply
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError("the daemon closed the connection")
        buffer += chunk
    raise ValueError("no reply terminator in a long answer")


def action_of(reply: bytes) -> str:
    """The reply's action word (``DUNNO``, ``DEFER_IF_PERMIT``, ...), ``?`` if it has none."""
    action = reply.decode("ascii", "replace").partition("action=")[2].split(None, 1)
    return action[0] if action else "?"


async def steady_stream(
    port: int, domain: str, *, period: float, start: float, until: float, record: Record, errors: list[str],
) -> None:
    """An RCPT for ``user{k}@domain`` every ``period`` from ``start`` (trio time) for ``until`` seconds.

    One request outstanding: a slow reply delays the next one, as on a real
    Postfix connection, rather than piling up.  The first failure (no reply
    within :data:`REPLY_LIMIT_S`, a closed connection) ends the stream and is
    appended to ``errors``.
    """
    template = RequestTemplate()
    buffer = bytearray()
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    async with stream:
        next_at = start
        for k in range(int(until / period) + 2):
            if next_at - start >= until:
                break
            await trio.sleep_until(next_at)
            sent = trio.current_time()
            try:
                with trio.fail_after(REPLY_LIMIT_S):
                    await stream.send_all(template.render(f"user{k}@{domain}"))
                    reply = await read_reply(stream, buffer)
            except (trio.TooSlowError, trio.BrokenResourceError, EOFError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            done = trio.current_time()
            record(k, sent, done - sent, action_of(reply))
            next_at = max(next_at + period, done)
