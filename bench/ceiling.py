"""The do-nothing policy server: the ceiling the real daemon is compared to.

``python -m bench.ceiling`` listens on an ephemeral 127.0.0.1 port, prints
the port on stdout, and answers every request (bytes up to an empty line)
with ``action=DUNNO`` without parsing anything.  It uses the same stack as
smtpdcheck-policyd -- trio SocketListener, one task per connection,
``receive_some(65536)``, ``send_all`` -- so the gap between the two is the
cost of the daemon's own work (parsing, deciding, logging, metrics), not of
Python, trio or the kernel.

It is started through :mod:`bench.guard`, which bounds its lifetime.
"""

from __future__ import annotations

import sys

import trio

from smtpdcheck.compat import STRICT_EXCEPTION_GROUPS

REPLY = b"action=DUNNO\n\n"


async def handle(stream: trio.SocketStream) -> None:
    buf = bytearray()
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
            while (end := buf.find(b"\n\n")) >= 0:
                del buf[: end + 2]
                await stream.send_all(REPLY)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await trio.aclose_forcefully(stream)


async def main() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(handle, listeners)


if __name__ == "__main__":
    try:
        trio.run(main, strict_exception_groups=STRICT_EXCEPTION_GROUPS)
    except KeyboardInterrupt:
        sys.exit(0)
