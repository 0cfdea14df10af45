"""systemd integration without libsystemd: socket activation and readiness.

Both protocols are small and stable (sd_listen_fds(3), sd_notify(3)):
inherited listening sockets start at fd 3, counted by ``LISTEN_FDS`` and
meant for us only if ``LISTEN_PID`` is our pid; readiness is one datagram
to ``NOTIFY_SOCKET``.  The variables are removed after use so that child
processes do not mistake them for their own.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import MutableMapping
from typing import Final

import trio

from .listeners import ListenError

SD_LISTEN_FDS_START: Final = 3


def inherited_sockets(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation, or [].

    Raises:
        ListenError: a passed descriptor is not a socket (or not open).
    """
    env = os.environ if environ is None else environ
    pid = env.get("LISTEN_PID", "")
    count = env.get("LISTEN_FDS", "")
    if not pid or not count:
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        try:
            os.set_inheritable(fd, False)
            sockets.append(socket.socket(fileno=fd))
        except OSError as exc:
            for sock in sockets:
                sock.close()
            raise ListenError(exc.errno or errno.EBADF, f"socket activation: descriptor {fd}: {exc.strerror or exc}") from None
    return sockets


def listeners_from(sockets: list[socket.socket]) -> list[trio.SocketListener]:
    """Listeners for the passed sockets, which must be listening stream sockets.

    A unit that passes a datagram socket (``ListenDatagram=``) or a
    connection (``Accept=yes``) is a configuration error to report, not
    something to serve.

    Raises:
        ListenError: a socket is not a listening stream socket.
    """
    result = []
    for sock in sockets:
        if sock.type != socket.SOCK_STREAM:
            raise ListenError(errno.ESOCKTNOSUPPORT, f"socket activation: descriptor {sock.fileno()} is not a stream socket (want ListenStream=)")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ListenError(errno.EINVAL, f"socket activation: descriptor {sock.fileno()} is not listening (want Accept=no)")
        sock.setblocking(False)
        result.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    return result


def notify(state: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd; False when not under systemd."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode("ascii"))
        except OSError:
            return False
    return True
