"""DNS and SMTP peers on trio's virtual clock, for timing rules.

The real-socket doubles (``dnsserver``, ``greeters``) prove the wire; these
prove the arithmetic of time -- first live server wins, all silent costs one
timeout, the deadline holds -- at exact virtual instants under
``trio.testing.MockClock(autojump_threshold=0)``, where a real socket or
dnspython's wall-clock lifetime would break the illusion.

:class:`VirtualNet` plugs into the prober's ``connect`` seam, and
:class:`VirtualDNS` replaces the resolver (it implements
:class:`smtpdcheck.resolver.Lookups`).
"""

from __future__ import annotations

import errno
import math
from collections import Counter
from dataclasses import dataclass

import trio
import trio.testing

from smtpdcheck.cache import Source, TTLCache
from smtpdcheck.resolver import AddressLookup, MXKind, MXLookup
from smtpdcheck.servers import parse_address


@dataclass(frozen=True, slots=True)
class Peer:
    """How one SMTP address behaves: greet ``code`` after ``greet_after`` seconds.

    ``greet_after=math.inf`` is a peer that accepts and never greets;
    ``refuse=True`` refuses the connection after ``connect_after`` seconds;
    ``trickle`` > 0 sends the greeting one byte at a time, that many seconds
    apart (the first at once).
    """

    greet_after: float = 0.0
    code: int = 220
    refuse: bool = False
    connect_after: float = 0.0
    #: More than 0: the greeting is a "220-" line, then its last line this
    #: much later (postscreen's teaser and greet wait).
    last_line_after: float = 0.0
    trickle: float = 0.0

    @property
    def greeting(self) -> bytes:
        return f"{self.code} virtual.test ESMTP\r\n".encode()


@dataclass(slots=True)
class Session:
    """What one probe connection did, as a primary's log would tell it.

    ``early`` is what the client sent before the greeting's last line
    (postscreen: PREGREET); ``quit_at`` when it said QUIT; ``closed_at``
    when it closed its side.  ``ended`` is "quit" for a client that said
    QUIT after the whole greeting and read the reply, else "hangup".
    """

    opened: float
    early: bytes = b""
    last_line_at: float = math.nan
    quit_at: float = math.nan
    closed_at: float = math.nan

    @property
    def ended(self) -> str:
        return "quit" if not self.early and self.quit_at >= self.last_line_at else "hangup"


SILENT = Peer(greet_after=math.inf)
REFUSING = Peer(refuse=True)


class VirtualNet:
    """In-memory SMTP peers; ``connect`` has the signature of ``trio.open_tcp_stream``.

    Peer tasks run in ``nursery`` and end when the prober closes its side,
    so a test's nursery can finish.  Addresses without a peer refuse.
    """

    def __init__(self, nursery: trio.Nursery, peers: dict[str, Peer] | None = None) -> None:
        self._nursery = nursery
        self.peers: dict[str, Peer] = dict(peers or {})
        self.connections: Counter[str] = Counter()
        self.attempts: list[tuple[float, str]] = []
        """Every connection attempt: (virtual time, address), in order."""
        self.sessions: list[tuple[str, Session]] = []
        """Every connection made: (address, what happened on it), in order."""

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        peer = self.peers.get(host, REFUSING)
        self.connections[host] += 1
        self.attempts.append((trio.current_time(), host))
        await trio.sleep(peer.connect_after)
        if peer.refuse:
            raise OSError(errno.ECONNREFUSED, "Connection refused")
        client, server = trio.testing.memory_stream_pair()
        session = Session(trio.current_time())
        self.sessions.append((host, session))
        self._nursery.start_soon(self._serve, peer, server, session)
        return client

    @staticmethod
    async def _serve(peer: Peer, stream: trio.abc.Stream, session: Session) -> None:
        try:
            async with stream:
                if not await _until(stream, peer.greet_after, session):
                    return
                if peer.last_line_after > 0:
                    await stream.send_all(f"{peer.code}-virtual.test ESMTP\r\n".encode())
                    if not await _until(stream, peer.last_line_after, session):
                        return
                if peer.trickle > 0:
                    for i, byte in enumerate(peer.greeting):
                        if i:
                            await trio.sleep(peer.trickle)
                        await stream.send_all(bytes([byte]))
                else:
                    await stream.send_all(peer.greeting)
                session.last_line_at = trio.current_time()
                while data := await stream.receive_some(1024):
                    if b"QUIT" in data:
                        session.quit_at = trio.current_time()
                        await stream.send_all(b"221 bye\r\n")
                        break
                # The client closes once it has the reply.
                while await stream.receive_some(1024):
                    pass
                session.closed_at = trio.current_time()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            session.closed_at = trio.current_time()


async def _until(stream: trio.abc.Stream, wait: float, session: Session) -> bool:
    """Wait ``wait`` seconds, noting what the client sends meanwhile; False if it closed."""
    with trio.move_on_after(wait):
        while data := await stream.receive_some(1024):
            session.early += data
        session.closed_at = trio.current_time()
        return False
    return True


class VirtualDNS:
    """Answers from dicts after a delay, with a TTL cache like the real resolver's.

    ``mx_answers[domain]`` / ``host_answers[host]`` are ``(delay, lookup)``;
    a delay of ``math.inf`` is a nameserver that never answers.  Names not
    listed are NXDOMAIN at once.  Answers are cached for ``lookup.ttl``.
    """

    def __init__(self) -> None:
        self.mx_answers: dict[str, tuple[float, MXLookup]] = {}
        self.host_answers: dict[str, tuple[float, AddressLookup]] = {}
        self.mx_cache: TTLCache[str, MXLookup] = TTLCache(1000)
        self.address_cache: TTLCache[str, AddressLookup] = TTLCache(1000)
        self.queries: Counter[str] = Counter()

    def set_mx(self, domain: str, hosts: list[tuple[int, str]], *, delay: float = 0.0, ttl: float = 300.0) -> None:
        kind = MXKind.LIST if hosts else MXKind.IMPLICIT
        listed = tuple(hosts) if hosts else ((0, domain),)
        self.mx_answers[domain] = (delay, MXLookup(domain, kind, hosts=listed, ttl=ttl))

    def set_host(self, host: str, addresses: list[str], *, delay: float = 0.0, ttl: float = 300.0) -> None:
        parsed = tuple(a for a in (parse_address(x) for x in addresses) if a is not None)
        lookup = AddressLookup(host, parsed, ttl=ttl) if parsed else AddressLookup(host, error="NXDOMAIN", ttl=ttl)
        self.host_answers[host] = (delay, lookup)

    async def mx(self, domain: str) -> tuple[MXLookup, Source]:
        cached = self.mx_cache.get(domain)
        if cached is not None:
            await trio.lowlevel.checkpoint()
            return cached, Source.CACHE
        self.queries[f"MX {domain}"] += 1
        delay, lookup = self.mx_answers.get(domain, (0.0, MXLookup(domain, MXKind.NXDOMAIN, error="NXDOMAIN", ttl=60)))
        await trio.sleep(delay)
        self.mx_cache.put(domain, lookup, lookup.ttl)
        return lookup, Source.NETWORK

    async def addresses(self, host: str) -> tuple[AddressLookup, Source]:
        cached = self.address_cache.get(host)
        if cached is not None:
            await trio.lowlevel.checkpoint()
            return cached, Source.CACHE
        self.queries[f"A/AAAA {host}"] += 1
        delay, lookup = self.host_answers.get(host, (0.0, AddressLookup(host, error="NXDOMAIN", ttl=60)))
        await trio.sleep(delay)
        self.address_cache.put(host, lookup, lookup.ttl)
        return lookup, Source.NETWORK

    def cached_addresses(self, host: str) -> tuple[AddressLookup, float, Source] | None:
        entry = self.address_cache.raw(host)
        if entry is None or entry.expires <= trio.current_time():
            return None
        return entry.value, entry.expires, Source.CACHE

    def cached_mx(self, domain: str) -> tuple[MXLookup, float, Source] | None:
        entry = self.mx_cache.raw(domain)
        if entry is None or entry.expires <= trio.current_time():
            return None
        return entry.value, entry.expires, Source.CACHE

    def count_cache_hits(self, *, mx: int = 0, addresses: int = 0, stale_mx: int = 0, stale_addresses: int = 0) -> None:
        self.mx_cache.count_hits(mx)
        self.address_cache.count_hits(addresses)
