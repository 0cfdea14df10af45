"""Loopback stand-ins for the network the benchmarks need: SMTP greeters and DNS.

The numbers must come from the code under test, not from a real network, so
the MX hosts are tiny trio servers on 127.0.0.N addresses and the MX lists
come from a tiny authoritative DNS server on 127.0.0.1.  Both count what
they see (connections, queries), because "how many times did the primary
get probed" and "how many MX queries went out" are results in themselves.

Every server here has a lifetime cap and stops by itself when it is reached,
and every connection handler has its own time cap: a benchmark that goes
wrong must not leave anything listening.
"""

from __future__ import annotations

import enum
import errno
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rrset
import trio

LOOPBACK: Final = "127.0.0.1"
_BIND_ATTEMPTS: Final = 32
_MAX_COMMANDS: Final = 16
_LINE_LIMIT: Final = 4096


def loopback_address(n: int) -> str:
    """``127.0.0.N``: on Linux the whole 127/8 answers locally without set-up."""
    if not 1 <= n <= 254:
        raise ValueError(f"loopback host number out of range: {n}")
    return f"127.0.0.{n}"


# -- SMTP greeters ----------------------------------------------------------


class GreetMode(enum.Enum):
    GREET = "220"  # "220 ... ESMTP", then answer QUIT politely
    SILENT = "silent"  # accept, never say a word: the probe has to time out


@dataclass(eq=False)
class Greeter:
    """One fake MX host: a listening socket on ``host:port`` and a behaviour.

    ``connections`` counts accepted connections; it is what tells whether
    the policy server's single-flight and caches really spare the primary.
    """

    host: str
    port: int
    mode: GreetMode
    listener: trio.socket.SocketType
    hold_limit: float = 30.0  # a silent greeter lets a client hang this long at most
    connections: int = 0
    commands: Counter[str] = field(default_factory=Counter)

    async def serve(self, lifetime: float) -> None:
        """Accept until cancelled or until ``lifetime`` seconds have passed."""
        with self.listener, trio.move_on_after(lifetime):
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await self.listener.accept()
                    self.connections += 1
                    nursery.start_soon(self._handle, conn)

    async def _handle(self, conn: trio.socket.SocketType) -> None:
        with conn, trio.move_on_after(self.hold_limit):
            try:
                if self.mode is GreetMode.SILENT:
                    # Read (and drop) until the client gives up and closes.
                    while await conn.recv(_LINE_LIMIT):
                        pass
                    return
                await conn.send(b"220 greeter.bench.example ESMTP ready\r\n")
                buf = b""
                for _ in range(_MAX_COMMANDS):
                    while b"\n" not in buf:
                        data = await conn.recv(_LINE_LIMIT)
                        if not data or len(buf) > _LINE_LIMIT:
                            return
                        buf += data
                    line, _, buf = buf.partition(b"\n")
                    verb = line.strip().upper()[:4].decode("ascii", "replace")
                    self.commands[verb] += 1
                    if verb == "QUIT":
                        await conn.send(b"221 2.0.0 bye\r\n")
                        return
                    await conn.send(b"250 2.0.0 ok\r\n")
            except OSError:
                return


def _listen(host: str, port: int) -> trio.socket.SocketType:
    """A listening socket, bound synchronously so that open_greeters can retry at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


def open_greeters(specs: Sequence[tuple[str, GreetMode]], *, hold_limit: float = 30.0) -> tuple[int, list[Greeter]]:
    """Bind one greeter per ``(host, mode)``, all on one port; return ``(port, greeters)``.

    The checker and the daemon probe every MX host on a single SMTP port,
    so the fake hosts differ by address (127.0.0.N) and share the port.  The
    first bind picks an ephemeral port; if another address already has it
    taken, everything is closed and tried again on a new one.
    """
    if not specs:
        raise ValueError("no greeters asked for")
    for _ in range(_BIND_ATTEMPTS):
        socks: list[trio.socket.SocketType] = []
        try:
            first = _listen(specs[0][0], 0)
            socks.append(first)
            port = int(first.getsockname()[1])
            for host, _mode in specs[1:]:
                socks.append(_listen(host, port))
        except OSError as exc:
            for s in socks:
                s.close()
            if exc.errno == errno.EADDRINUSE:
                continue
            raise
        greeters = [Greeter(host, port, mode, s, hold_limit) for (host, mode), s in zip(specs, socks)]
        return port, greeters
    raise OSError(errno.EADDRINUSE, "no common free port for the greeters")


# -- DNS ----------------------------------------------------------------------

#: What a zone lookup gives: rdata texts (an empty list is NODATA), or None
#: for "no such name" (NXDOMAIN).
Answer = list[str] | None
Wildcard = Callable[[str, str], Answer]

_SOA_TEXT: Final = "ns.bench.example. hostmaster.bench.example. 1 3600 600 86400 300"


class FakeDNS:
    """A small authoritative nameserver over UDP on 127.0.0.1, built on dns.message.

    Data comes from ``records`` (``{(name, TYPE): [rdata text, ...]}``)
    first, then from ``wildcard(name, TYPE)``, so a benchmark can serve a
    hundred thousand domains without building a hundred thousand entries.
    A name found nowhere is NXDOMAIN; a name known for other types is
    NODATA.  Negative answers carry an SOA, as a real zone's do, so that the
    resolver's negative caching is exercised the way it is in production.

    Queries are answered one at a time in arrival order: the point is to be
    cheap and predictable, not to be a nameserver.
    """

    def __init__(
        self,
        records: dict[tuple[str, str], list[str]] | None = None,
        wildcard: Wildcard | None = None,
        *,
        ttl: int = 3600,
    ) -> None:
        self.records = {(_norm(n), t.upper()): v for (n, t), v in (records or {}).items()}
        self._names = {n for n, _ in self.records}
        self.wildcard = wildcard
        self.ttl = ttl
        self.port = 0
        self.queries: Counter[str] = Counter()  # by type
        self.by_name: Counter[tuple[str, str]] = Counter()
        self.count_names = False  # per-name counts cost memory; only when asked
        self.malformed = 0
        self._sock: trio.socket.SocketType | None = None
        self._rdata_cache: dict[tuple[str, str], dns.rdata.Rdata] = {}
        self._soa_name = dns.name.from_text("bench.example.")
        self._soa = dns.rrset.from_text(self._soa_name, ttl, "IN", "SOA", _SOA_TEXT)

    @property
    def nameserver_arg(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def bind(self) -> int:
        """Open the UDP socket on an ephemeral port; returns the port."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # Bursts of lookups arrive faster than one Python loop answers
            # them; a roomy buffer keeps the kernel from dropping queries (a
            # drop would show up as a resolver retry, a fake latency spike).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind((LOOPBACK, 0))
        except BaseException:
            sock.close()
            raise
        self._sock = trio.socket.from_stdlib_socket(sock)
        self.port = int(sock.getsockname()[1])
        return self.port

    def lookup(self, name: str, rdtype: str) -> Answer:
        found = self.records.get((name, rdtype))
        if found is not None:
            return found
        if self.wildcard is not None:
            answer = self.wildcard(name, rdtype)
            if answer is not None:
                return answer
        return [] if name in self._names else None

    def respond(self, wire: bytes) -> bytes | None:
        """The reply to one query datagram, or None to drop it."""
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError):
            self.malformed += 1
            return None
        if query.flags & dns.flags.QR or len(query.question) != 1:
            self.malformed += 1
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        qname = question.name
        name = _norm(qname.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries[rdtype] += 1
        if self.count_names:
            self.by_name[(name, rdtype)] += 1
        answer = self.lookup(name, rdtype)
        if answer is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa)
        elif not answer:
            response.authority.append(self._soa)
        else:
            rdatas = [self._rdata(question.rdtype, rdtype, text) for text in answer]
            response.answer.append(dns.rrset.from_rdata_list(qname, self.ttl, rdatas))
        return response.to_wire()

    def _rdata(self, rdtype: dns.rdatatype.RdataType, rdtype_text: str, text: str) -> dns.rdata.Rdata:
        """Rdata from text, without dnspython's generic (slow) text parser where it counts.

        MX targets differ per domain, so they cannot be cached; building
        them from their two fields is several times faster than
        ``from_text``.  Everything else (a handful of A records) is cached.
        """
        if rdtype == dns.rdatatype.MX:
            pref, _, target = text.partition(" ")
            mx: dns.rdata.Rdata = dns.rdtypes.ANY.MX.MX(  # type: ignore[no-untyped-call]
                dns.rdataclass.IN, rdtype, int(pref), dns.name.from_text(target)
            )
            return mx
        key = (rdtype_text, text)
        rdata = self._rdata_cache.get(key)
        if rdata is None:
            if len(self._rdata_cache) > 4096:
                self._rdata_cache.clear()
            rdata = self._rdata_cache[key] = dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)
        return rdata

    async def serve(self, lifetime: float) -> None:
        """Answer until cancelled or until ``lifetime`` seconds have passed."""
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        with self._sock, trio.move_on_after(lifetime):
            while True:
                try:
                    data, peer = await self._sock.recvfrom(4096)
                except OSError:
                    continue  # ICMP errors from an earlier reply's peer; not fatal
                reply = self.respond(data)
                if reply is not None:
                    try:
                        await self._sock.sendto(reply, peer)
                    except OSError:
                        pass  # the resolver's socket is gone: it gave up on us


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


# -- the zone the policy benchmarks use ----------------------------------------

#: The live primary of every benchmark domain, and "this host" (the backup).
PRIMARY_HOST_N: Final = 2
BACKUP_ADDRESS: Final = LOOPBACK
SHARED_BACKUP_NAME: Final = "backup.bench.example"
SHARED_PRIMARY_NAME: Final = "mx1.bench.example"


def backup_mx_zone(
    *, primary_group: int | None = 1, shared_backup: bool = False, primary_address: str = loopback_address(PRIMARY_HOST_N)
) -> Wildcard:
    """MX lists for any ``dN.example``: a live primary, then this host.

    With the defaults, ``dN.example`` has ``MX 10 mx1.dN.example`` (A: the
    primary greeter) and ``MX 20 backup.dN.example`` (A: 127.0.0.1, the
    server_address of the requests), so the backup finds itself at the worse
    preference and the daemon's answer is DEFER_IF_PERMIT.

    ``primary_group=G`` names the primary ``mx1.gK.example`` with
    ``K = N // G`` (G domains share a primary, as a hoster's customers do;
    None: one primary, ``mx1.bench.example``, for all), and
    ``shared_backup`` names this host ``backup.bench.example`` for every
    domain, as a real backup MX is named.  The memory benchmark uses these
    so that a new domain costs the daemon about one DNS query instead of
    three, which is what lets 100,000 domains go through in bounded time.
    """
    if primary_group is not None and primary_group < 1:
        raise ValueError("primary_group must be at least 1 (or None)")
    backup_target = f"20 {SHARED_BACKUP_NAME}."

    def primary_of(name: str, n: int) -> str:
        if primary_group is None:
            return SHARED_PRIMARY_NAME
        return f"mx1.{name}" if primary_group == 1 else f"mx1.g{n // primary_group}.example"

    def zone(name: str, rdtype: str) -> Answer:
        head, _, rest = name.partition(".")
        if rest == "example" and head.startswith("d") and head[1:].isdigit():
            if rdtype != "MX":
                return []
            return [f"10 {primary_of(name, int(head[1:]))}.", backup_target if shared_backup else f"20 backup.{name}."]
        if head == "mx1" and rest.endswith("example"):
            return [primary_address] if rdtype == "A" else []
        if head == "backup" and rest.endswith("example"):
            return [BACKUP_ADDRESS] if rdtype == "A" else []
        return None

    return zone
