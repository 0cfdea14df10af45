"""Opening the sockets Postfix connects to.

Unix sockets need care a TCP port does not: a socket file left by a crashed
run must be replaced, but a path that is not a socket, or a socket another
live server is answering on, must never be clobbered -- that would silently
take over (or break) someone else's service.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat
from typing import Final

import trio


class ListenError(OSError):
    """An endpoint that cannot be listened on; the message says why."""

    def __str__(self) -> str:
        # The message alone: "[Errno 2]" in front of it tells an admin nothing more.
        return self.strerror or super().__str__()


def split_inet(endpoint: str) -> tuple[str, int]:
    """``inet:IP:PORT`` or ``inet:[IPv6]:PORT`` to ``(host, port)``."""
    rest = endpoint.partition(":")[2]
    host, _, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _check_stale_unix(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: nobody is listening
        return
    except OSError as exc:
        raise ListenError(errno.EEXIST, f"{path}: cannot tell whether it is in use ({exc.strerror}); refusing to replace it") from None
    finally:
        probe.close()
    raise ListenError(errno.EADDRINUSE, f"{path}: another server is listening on it")


# sockaddr_un's sun_path holds 108 bytes on Linux, the terminating NUL included.
MAX_UNIX_PATH: Final = 107


def unix_listen_error(path: str, exc: OSError) -> ListenError:
    """What went wrong with a unix socket path, in one line that names it."""
    directory = os.path.dirname(path) or "/"
    if exc.errno == errno.ENOENT:
        why = f"no such directory: {directory}"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why = f"permission denied (the daemon's user must be able to write {directory})"
    elif exc.errno == errno.EROFS:
        why = f"read-only file system ({directory})"
    else:
        why = exc.strerror or str(exc)
    return ListenError(exc.errno or errno.EINVAL, f"unix:{path}: {why}")


async def open_unix_listener(path: str, mode: int, backlog: int = 128, group: str = "") -> trio.SocketListener:
    """Listen on ``path``, the socket given to ``group`` if named; any failure is a :class:`ListenError` that names the path."""
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise ListenError(errno.ENAMETOOLONG, f"unix:{path}: path too long for a unix socket (at most {MAX_UNIX_PATH} bytes)")
    try:
        _check_stale_unix(path)
    except ListenError:
        raise
    except OSError as exc:
        raise unix_listen_error(path, exc) from None
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Bind under a restrictive umask, then chmod: no window in which the
        # socket is reachable with wider permissions than configured.
        old = os.umask(0o177)
        try:
            await sock.bind(path)
        finally:
            os.umask(old)
        if group:
            _give_to_group(path, group)
        os.chmod(path, mode)
        sock.listen(backlog)
    except ListenError:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)  # ours, just bound: no socket left behind that nobody may use
        raise
    except OSError as exc:
        sock.close()
        raise unix_listen_error(path, exc) from None
    return trio.SocketListener(sock)


def _give_to_group(path: str, group: str) -> None:
    """chown the socket to ``group`` while only its owner can use it (mode 0600 from the umask)."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise ListenError(errno.EINVAL, f"unix:{path}: no such group: {group!r}") from None
    try:
        os.chown(path, -1, gid)
    except OSError as exc:
        raise ListenError(
            exc.errno or errno.EPERM,
            f"unix:{path}: cannot give the socket to group {group} ({exc.strerror}): "
            f"the daemon must run as root or as a member of {group}",
        ) from None


async def open_listeners(
    endpoints: tuple[str, ...], *, socket_mode: int, socket_group: str = ""
) -> list[trio.SocketListener]:
    """Open every endpoint or none: a half-started daemon is worse than none.

    When one fails, those already open are closed and the socket files made
    for them removed.
    """
    opened: list[trio.SocketListener] = []
    made: list[str] = []
    try:
        for endpoint in endpoints:
            if endpoint.startswith("unix:"):
                opened.append(await open_unix_listener(endpoint[5:], socket_mode, group=socket_group))
                made.append(endpoint[5:])
                continue
            host, port = split_inet(endpoint)  # validated by policyd.config
            try:
                opened.extend(await trio.open_tcp_listeners(port, host=host))
            except OSError as exc:
                raise ListenError(exc.errno or errno.EINVAL, f"{endpoint}: {exc.strerror or exc}") from None
    except BaseException:
        for listener in opened:
            await trio.aclose_forcefully(listener)
        for path in made:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    return opened


def unix_paths(endpoints: tuple[str, ...]) -> list[str]:
    return [e[5:] for e in endpoints if e.startswith("unix:")]


def endpoint_of(listener: trio.SocketListener) -> str:
    """A listener's address as an endpoint string (the real port when 0 was asked)."""
    sockname = listener.socket.getsockname()
    if listener.socket.family == socket.AF_UNIX:
        return f"unix:{sockname}"
    host, port = sockname[0], sockname[1]
    return f"inet:[{host}]:{port}" if ":" in host else f"inet:{host}:{port}"
