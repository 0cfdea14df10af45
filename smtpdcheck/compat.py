"""What the oldest supported library versions lack, in one place.

The project runs on the versions Debian 12 ships (trio 0.22, dnspython 2.3,
idna 3.3, prometheus-client 0.16; the minimums in ``pyproject.toml``) and on
every later release.  Where an old release lacks something, the code uses
what every supported release has; where a default changed between
releases, the behaviour is pinned here instead of left to the default.
Each shim names the release that needs it, so it can go when the minimum
passes that release.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar

import dns._asyncbackend
import dns.asyncbackend
import dns.exception
import dns.inet
import dns.message
import dns.resolver
import dns.version
import trio

_DNSPYTHON = (dns.version.MAJOR, dns.version.MINOR)
_TRIO = tuple(int(part) for part in metadata.version("trio").split(".")[:2])
_T = TypeVar("_T")

# trio < 0.25 defaults to strict_exception_groups=False (0.25 made True the
# default).  The code is written for strict groups, so every trio.run of the
# commands, the benchmarks and the tests passes STRICT_EXCEPTION_GROUPS
# rather than relying on the default; nurseries inherit it from the run.
STRICT_EXCEPTION_GROUPS = True


# trio < 0.23 ships no types and no trio.TaskStatus: type checkers read
# trio's types from the trio-typing stubs, which name it trio_typing's.
# Only annotations use it, and they are never evaluated.
if TYPE_CHECKING:
    try:
        from trio import TaskStatus as TaskStatus  # type: ignore[attr-defined, unused-ignore]
    except ImportError:
        from trio_typing import TaskStatus as TaskStatus  # type: ignore[import-not-found, no-redef, unused-ignore]
else:
    TaskStatus = getattr(trio, "TaskStatus", Any)


async def run_sync_in_thread_abandoning(fn: Callable[..., _T], *args: Any) -> _T:
    """``trio.to_thread.run_sync`` whose wait ends when cancelled, leaving the thread to finish.

    trio < 0.23 calls that ``cancellable=True``; 0.23 renamed it
    ``abandon_on_cancel=True`` and warns about the old name.
    """
    abandon: dict[str, Any] = {"cancellable" if _TRIO < (0, 23) else "abandon_on_cancel": True}
    result: _T = await trio.to_thread.run_sync(fn, *args, **abandon)
    return result


def use_nameservers(resolver: dns.resolver.BaseResolver, servers: Sequence[tuple[str, int]]) -> None:
    """Make ``resolver`` ask exactly ``servers``, ``(ip, port)`` pairs, in order.

    dnspython < 2.4 has no ``dns.nameserver.Do53Nameserver``: there a
    nameserver is an address, and its port comes from ``nameserver_ports``.
    Every later release still reads ``nameserver_ports`` for a nameserver
    given as an address, so one form serves all.  It holds one port per
    address, so the same address with two ports is refused on every release
    rather than silently asked on one of them.
    """
    ports: dict[str, int] = {}
    for host, port in servers:
        if ports.setdefault(host, port) != port:
            raise ValueError(f"nameserver {host} given with two ports, {ports[host]} and {port}")
    resolver.nameserver_ports = ports
    resolver.nameservers = list(ports)


def dns_backend() -> dns._asyncbackend.Backend:
    """dnspython's trio backend, waiting out stray UDP datagrams on every release.

    dnspython >= 2.4 ignores a UDP datagram that is not the answer to its
    query (unparsable, another ID or question, another source) and keeps
    waiting for the answer.  dnspython < 2.4 fails the query at the first
    such datagram, so one garbled or forged packet would turn a lookup into
    a failure at once.  Below 2.4 the backend's UDP sockets drop those
    datagrams before dnspython sees them.
    """
    backend = dns.asyncbackend.get_backend("trio")
    if _DNSPYTHON < (2, 4):
        return _PatientBackend(backend)
    return backend


class _PatientBackend(dns._asyncbackend.Backend):
    """The trio backend with :class:`_PatientDatagramSocket` for UDP (dnspython < 2.4)."""

    def __init__(self, inner: dns._asyncbackend.Backend) -> None:
        self._inner: Any = inner  # typed differently by each dnspython release

    def name(self) -> str:
        return str(self._inner.name())

    async def make_socket(self, af: int, socktype: int, *args: Any, **kwargs: Any) -> Any:
        sock = await self._inner.make_socket(af, socktype, *args, **kwargs)
        if isinstance(sock, dns._asyncbackend.DatagramSocket):
            return _PatientDatagramSocket(sock)
        return sock

    def datagram_connection_required(self) -> bool:
        return bool(self._inner.datagram_connection_required())

    async def sleep(self, interval: float) -> None:
        await self._inner.sleep(interval)


class _PatientDatagramSocket(dns._asyncbackend.DatagramSocket):
    """Hands dnspython only the datagram that answers the query last sent."""

    def __init__(self, inner: Any) -> None:
        # Not super().__init__: its arguments differ between dnspython releases.
        self.family = inner.family
        self.type = socket.SOCK_DGRAM
        self._inner = inner
        self._query: dns.message.Message | None = None
        self._peer: Any = None

    async def sendto(self, what: bytes, destination: Any, timeout: float | None) -> Any:
        self._query = dns.message.from_wire(what)
        self._peer = destination
        return await self._inner.sendto(what, destination, timeout)

    async def recvfrom(self, size: int, timeout: float | None) -> tuple[bytes, Any]:
        with trio.move_on_after(timeout if timeout is not None else math.inf):
            while True:
                wire, source = await self._inner.recvfrom(size, None)
                if self._answers(wire, source):
                    return wire, source
        raise dns.exception.Timeout

    def _answers(self, wire: bytes, source: Any) -> bool:
        if self._peer is not None and not _same_peer(self.family, source, self._peer):
            return False
        if self._query is None:
            return True
        try:
            response = dns.message.from_wire(wire, raise_on_truncation=True)
        except dns.message.Truncated as exc:  # dnspython retries over TCP: if it is ours
            return bool(self._query.is_response(exc.kwargs["message"]))
        except Exception:  # any parse failure: garbage, not an answer
            return False
        return bool(self._query.is_response(response))

    async def close(self) -> None:
        await self._inner.close()

    async def getpeername(self) -> Any:
        return await self._inner.getpeername()

    async def getsockname(self) -> Any:
        return await self._inner.getsockname()


def _same_peer(family: int, a: Any, b: Any) -> bool:
    """Whether two socket addresses name the same host and port."""
    try:
        return bool(dns.inet.inet_pton(family, a[0]) == dns.inet.inet_pton(family, b[0]) and a[1:] == b[1:])
    except (ValueError, TypeError, IndexError, OSError):
        return False
