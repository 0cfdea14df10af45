"""A small authoritative DNS server for tests.

The policy server's behaviour depends heavily on what DNS does: slow answers,
SERVFAIL, truncation, CNAME chains, mismatched replies.  A real nameserver
cannot be made to misbehave on demand, and mocking the resolver would not
exercise dnspython's own transport code, so the tests talk to this server over
real loopback sockets instead.

The server answers over UDP and TCP on the same port, like a real one, so
that a resolver's TC -> TCP fallback can be tested against it.  Its data lives
in a plain mutable dict that tests may change while the server is running.

Zone values:

* ``Records`` -- a list of rdata texts answered for that ``(name, type)``.
  An empty list is an explicit NODATA.
* ``Behavior`` -- a failure mode for that ``(name, type)``.
* ``Slow(seconds, then)`` -- wait, then answer with ``then``.

A key ``(name, "*")`` is consulted before the per-type key and applies to
every type of that name.  A ``Behavior`` there overrides the per-type data;
``Records`` there (conventionally ``[]``) mean "answer from the per-type
keys", which makes ``Slow(2.0, [])`` a name-wide delay.

``TRUNCATE`` and ``WRONG_ID`` modify the answer the zone would otherwise give.
Under a ``"*"`` key that is the per-type data, so::

    {("big.test", "*"): Behavior.TRUNCATE, ("big.test", "MX"): ["10 mx.test."]}

truncates over UDP and gives the MX record over TCP.  Under a per-type key
the "otherwise" answer is NODATA.

A ``wildcard(name, type)`` function, consulted for names the zone does not
hold, serves any number of names without building a dict of them (the
benchmarks send a hundred thousand domains): it returns records, ``[]``
for NODATA, or ``None`` for "not here" (NXDOMAIN unless the zone knows the
name).  ``backup_mx_zone`` is the one the policy benchmarks use.

``FakeDNSServer(..., fast=True)`` is for load rather than misbehaviour: UDP
queries are answered in arrival order without a task each (so ``Slow``
holds up everything behind it) and only counted by type, not logged one
by one in ``queries``.
"""

from __future__ import annotations

import enum
import errno
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rrset
import trio

from smtpdcheck.compat import TaskStatus

__all__ = [
    "Behavior",
    "FakeDNSServer",
    "Records",
    "Slow",
    "Wildcard",
    "Zone",
    "ZoneValue",
    "backup_mx_zone",
    "nameserver_arg",
]


class Behavior(enum.Enum):
    """Ways a zone entry can make the server misbehave."""

    NXDOMAIN = enum.auto()
    """Authoritative NXDOMAIN with an SOA, even though the key exists."""
    SERVFAIL = enum.auto()
    REFUSED = enum.auto()
    NOTIMP = enum.auto()
    HANG = enum.auto()
    """Never answer; the client has to time out."""
    GARBAGE = enum.auto()
    """Reply with a few random bytes that can never parse as DNS."""
    TRUNCATE = enum.auto()
    """Over UDP: TC set and no records.  Over TCP: the normal answer."""
    WRONG_ID = enum.auto()
    """The normal answer, but with a message id that does not match the query."""


Records: TypeAlias = list[str]


@dataclass
class Slow:
    """Wait ``seconds`` before answering with ``then``.

    The wait happens per query in its own task, so one slow name does not
    hold up answers for other names, nor other queries on the same TCP
    connection.
    """

    seconds: float
    then: Records | Behavior | Slow


ZoneValue: TypeAlias = Records | Behavior | Slow
Zone: TypeAlias = dict[tuple[str, str], ZoneValue]
Wildcard: TypeAlias = Callable[[str, str], Records | None]

SOA_TEXT = "ns.test. hostmaster.test. 1 3600 600 86400 60"
"""Every negative answer carries this SOA so that resolvers can cache it."""

_SOA = dns.rrset.from_text("test.", 300, dns.rdataclass.IN, dns.rdatatype.SOA, SOA_TEXT)

MAX_CNAME_CHAIN = 8
"""How many CNAME hops are followed; longer chains and loops just stop."""

_MAX_SLOW_NESTING = 16
_RRSET_CACHE_SIZE = 256
_UDP_MIN_PAYLOAD = 512
_TCP_MAX_MESSAGE = 65535
_BIND_ATTEMPTS = 64
_GARBAGE_LENGTH = 7  # shorter than a DNS header, so it can never parse
# Bursts of lookups arrive faster than one Python loop answers them; a
# roomy buffer keeps the kernel from dropping queries (a drop shows up as
# a resolver retry, a latency spike that is the fake's, not the client's).
_UDP_RCVBUF = 4 << 20


def _norm_name(name: str) -> str:
    """Normalise a zone key or query name for lookup: case-folded, no final dot."""
    return name.rstrip(".").lower()


def _qname_text(name: dns.name.Name) -> str:
    if name == dns.name.root:
        return ""
    return _norm_name(name.to_text(omit_final_dot=True))


def _is_records(value: object) -> bool:
    return isinstance(value, list)


def nameserver_arg(server: FakeDNSServer) -> str:
    """Return ``"HOST:PORT"`` for command lines and config files under test.

    IPv6 hosts are bracketed (``"[::1]:PORT"``) so the port stays unambiguous.
    """
    host, port = server.address
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class FakeDNSServer:
    """Authoritative test nameserver on one ephemeral UDP+TCP port.

    Run it with ``port = await nursery.start(server.serve)``; it stops when
    the nursery is cancelled and closes every socket it opened.
    """

    def __init__(
        self,
        zone: Zone | None = None,
        *,
        ttl: int = 300,
        host: str = "127.0.0.1",
        wildcard: Wildcard | None = None,
        fast: bool = False,
        name_ttls: dict[str, int] | None = None,
    ) -> None:
        self.zone: Zone = zone if zone is not None else {}
        self.ttl = ttl
        self.name_ttls: dict[str, int] = {_norm_name(n): t for n, t in (name_ttls or {}).items()}
        """Per owner name, a TTL that replaces ``ttl`` for that name's records,
        so one server can hold short-lived and long-lived names side by side.
        Keys are normalised here; tests that change it later use
        lower-case names without the final dot."""
        self.host = host
        self.port = 0
        self.wildcard = wildcard
        self.fast = fast
        self.queries: list[tuple[str, str, str]] = []
        """``(qname, rdtype, "udp"|"tcp")`` in arrival order, for asserting on
        how often and how a client asked (left empty in fast mode)."""
        self.queries_by_type: Counter[str] = Counter()
        """Queries per rdtype, kept in every mode."""
        self.malformed = 0
        """Incoming packets that could not be parsed as a query and were ignored."""
        self._arrived = trio.Event()  # set (and replaced) whenever a query is recorded
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._rrset_cache: dict[tuple[str, str, tuple[str, ...], int], dns.rrset.RRset] = {}

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def query_count(self, name: str | None = None, rdtype: str | None = None) -> int:
        """Count recorded queries, optionally only for one name and/or type."""
        wanted_name = None if name is None else _norm_name(name)
        wanted_type = None if rdtype is None else rdtype.upper()
        return sum(
            1
            for qname, qtype, _ in self.queries
            if (wanted_name is None or qname == wanted_name)
            and (wanted_type is None or qtype == wanted_type)
        )

    async def wait_for_query(self, name: str, rdtype: str | None = None) -> None:
        """Return once a query for ``name`` (of ``rdtype``, if given) has arrived.

        What a test waits on to know a client is now waiting for this
        server, instead of sleeping and hoping (not in fast mode, which
        records no queries).
        """
        while not self.query_count(name, rdtype):
            await self._arrived.wait()

    # ------------------------------------------------------------------ serving

    async def serve(self, *, task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind UDP and TCP on one port, report the port, answer until cancelled."""
        udp, tcp = await self._bind_pair()
        with udp, tcp:
            tcp.listen(64)
            listener = trio.SocketListener(tcp)
            async with listener, trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_udp, udp, nursery)
                nursery.start_soon(self._accept_tcp, listener, nursery)
                task_status.started(self.port)

    async def _bind_pair(self) -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
        """Find a port that is free for both TCP and UDP.

        The kernel only picks a free TCP port; the same number is nearly
        always free for UDP too, and in the rare case it is not we try again.
        """
        last_error: OSError | None = None
        for _ in range(_BIND_ATTEMPTS):
            tcp = trio.socket.socket(self._family, socket.SOCK_STREAM)
            udp = trio.socket.socket(self._family, socket.SOCK_DGRAM)
            try:
                await tcp.bind((self.host, 0))
                port = tcp.getsockname()[1]
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _UDP_RCVBUF)
                await udp.bind((self.host, port))
            except OSError as exc:
                tcp.close()
                udp.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                last_error = exc
                continue
            except BaseException:
                tcp.close()
                udp.close()
                raise
            self.port = port
            return udp, tcp
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP") from last_error

    async def _serve_udp(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        send_lock = trio.Lock()
        while True:
            try:
                wire, peer = await sock.recvfrom(65535)
            except ConnectionError:
                # A stale ICMP error from an earlier reply; the socket is fine.
                continue
            query = self._admit(wire, "udp")
            if query is None:
                continue
            if self.fast:
                await self._answer_udp(sock, send_lock, query, peer)
            else:
                nursery.start_soon(self._answer_udp, sock, send_lock, query, peer)

    async def _answer_udp(
        self,
        sock: trio.socket.SocketType,
        send_lock: trio.Lock,
        query: dns.message.Message,
        peer: Any,
    ) -> None:
        reply = await self._respond(query, "udp")
        if reply is None:
            return
        # Concurrent sendto() on one trio socket can raise BusyResourceError.
        async with send_lock:
            try:
                await sock.sendto(reply, peer)
            except OSError:
                pass  # The client is gone; nothing to do for a test server.

    async def _accept_tcp(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        # serve_listeners retries accept() on EMFILE and friends.
        await trio.serve_listeners(self._serve_tcp, [listener], handler_nursery=nursery)

    async def _serve_tcp(self, stream: trio.SocketStream) -> None:
        """Answer length-prefixed queries until the client closes.

        Queries are answered concurrently, so a slow name does not block the
        rest of a pipelined connection.  Answers still pending when the
        client closes are abandoned.
        """
        send_lock = trio.Lock()
        buffer = bytearray()
        async with stream, trio.open_nursery() as nursery:
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not chunk:
                    break
                buffer += chunk
                while len(buffer) >= 2:
                    length = int.from_bytes(buffer[:2], "big")
                    if len(buffer) < 2 + length:
                        break
                    wire = bytes(buffer[2 : 2 + length])
                    del buffer[: 2 + length]
                    query = self._admit(wire, "tcp")
                    if query is not None:
                        nursery.start_soon(self._answer_tcp, stream, send_lock, query)
            nursery.cancel_scope.cancel()

    async def _answer_tcp(
        self,
        stream: trio.SocketStream,
        send_lock: trio.Lock,
        query: dns.message.Message,
    ) -> None:
        reply = await self._respond(query, "tcp")
        if reply is None:
            return
        async with send_lock:
            try:
                await stream.send_all(len(reply).to_bytes(2, "big") + reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    # ---------------------------------------------------------------- answering

    def _admit(self, wire: bytes, transport: str) -> dns.message.Message | None:
        """Parse an incoming packet and log the question, in arrival order.

        Runs synchronously in the receiving loop, before any per-query task
        is spawned, so ``queries`` reflects the order packets arrived in.
        Returns ``None`` for anything that is not a query; those are dropped.
        """
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            self.malformed += 1
            return None
        if query.flags & dns.flags.QR:
            self.malformed += 1
            return None
        if query.opcode() == dns.opcode.QUERY and len(query.question) == 1:
            question = query.question[0]
            rdtype = dns.rdatatype.to_text(question.rdtype)
            self.queries_by_type[rdtype] += 1
            if not self.fast:
                self.queries.append((_qname_text(question.name), rdtype, transport))
                self._arrived.set()
                self._arrived = trio.Event()
        return query

    async def _reply(self, wire: bytes, transport: str) -> bytes | None:
        """Admit and answer one packet; reply bytes, or ``None`` for silence."""
        query = self._admit(wire, transport)
        if query is None:
            return None
        return await self._respond(query, transport)

    async def _respond(self, query: dns.message.Message, transport: str) -> bytes | None:
        if query.opcode() != dns.opcode.QUERY:
            return self._render(self._error(query, dns.rcode.NOTIMP), query, transport)
        if len(query.question) != 1:
            return self._render(self._error(query, dns.rcode.FORMERR), query, transport)

        question = query.question[0]
        name = _qname_text(question.name)
        rdtype = dns.rdatatype.to_text(question.rdtype)

        modifiers: set[Behavior] = set()
        override = await self._settle(self._lookup(name, "*"))
        if isinstance(override, Behavior):
            if override in (Behavior.TRUNCATE, Behavior.WRONG_ID):
                modifiers.add(override)
            else:
                return self._misbehave(override, query, transport)
        value = await self._settle(self._lookup(name, rdtype))
        if isinstance(value, Behavior):
            if value in (Behavior.TRUNCATE, Behavior.WRONG_ID):
                modifiers.add(value)
                value = []
            else:
                return self._misbehave(value, query, transport)

        if Behavior.TRUNCATE in modifiers and transport == "udp":
            response = self._truncated(query, dns.rcode.NOERROR)
        else:
            response = self._answer(query, name, rdtype, value)
        reply = self._render(response, query, transport)
        if Behavior.WRONG_ID in modifiers:
            wrong_id = (query.id + 0x5A5A) & 0xFFFF
            reply = wrong_id.to_bytes(2, "big") + reply[2:]
        return reply

    def _lookup(self, name: str, rdtype: str) -> ZoneValue | None:
        """Find a zone entry, tolerating case and trailing dots in the keys.

        The dict is scanned on every query because tests mutate it freely;
        test zones are small.
        """
        for (key_name, key_type), value in list(self.zone.items()):
            if key_type.upper() == rdtype and _norm_name(key_name) == name:
                return value
        if self.wildcard is not None and rdtype != "*":
            return self.wildcard(name, rdtype)
        return None

    def _name_exists(self, name: str) -> bool:
        """Whether the name holds data of some type (NODATA, not NXDOMAIN)."""
        return any(_norm_name(key_name) == name for key_name, _ in list(self.zone))

    async def _settle(self, value: ZoneValue | None) -> Records | Behavior | None:
        """Sleep through any ``Slow`` wrappers and return what they wrap."""
        for _ in range(_MAX_SLOW_NESTING):
            if not isinstance(value, Slow):
                return value
            await trio.sleep(value.seconds)
            value = value.then
        raise ValueError(f"Slow nested more than {_MAX_SLOW_NESTING} deep")

    def _rrset(self, name: str, rdtype: str, records: Iterable[str]) -> dns.rrset.RRset:
        """Build (or reuse) the RRset for some zone data.

        Parsing thousands of MX texts costs a noticeable fraction of a second,
        and a UDP->TCP fallback asks for the same data twice, so parsed
        RRsets are kept, keyed by their text.  Responses never modify them.
        """
        key = (name, rdtype, tuple(records), self.name_ttls.get(name, self.ttl))
        cached = self._rrset_cache.get(key)
        if cached is not None:
            return cached
        if len(self._rrset_cache) >= _RRSET_CACHE_SIZE:
            self._rrset_cache.clear()
        self._rrset_cache[key] = rrset = self._parse_rrset(name, rdtype, key[2], key[3])
        return rrset

    def _parse_rrset(self, name: str, rdtype: str, records: tuple[str, ...], ttl: int) -> dns.rrset.RRset:
        if rdtype == "MX":
            return self._parse_mx(name, records, ttl)
        try:
            return dns.rrset.from_text_list(
                dns.name.from_text(name or ".", origin=dns.name.root),
                ttl,
                dns.rdataclass.IN,
                rdtype,
                list(records),
                origin=dns.name.root,
                relativize=False,
            )
        except dns.exception.DNSException as exc:
            raise ValueError(f"bad zone data for ({name!r}, {rdtype!r}): {records!r}") from exc

    def _parse_mx(self, name: str, records: tuple[str, ...], ttl: int) -> dns.rrset.RRset:
        """MX records from their two fields, not through dnspython's generic
        text parser: MX targets differ per domain, so under load (a new
        domain per query) the parse is paid on nearly every answer."""
        rdatas: list[dns.rdata.Rdata] = []
        try:
            for text in records:
                preference, target = text.split()
                rdatas.append(
                    dns.rdtypes.ANY.MX.MX(  # type: ignore[no-untyped-call]
                        dns.rdataclass.IN, dns.rdatatype.MX, int(preference), dns.name.from_text(target, origin=dns.name.root)
                    )
                )
        except (ValueError, dns.exception.DNSException) as exc:
            raise ValueError(f"bad zone data for ({name!r}, 'MX'): {list(records)!r}") from exc
        owner = dns.name.from_text(name or ".", origin=dns.name.root)
        return dns.rrset.from_rdata_list(owner, ttl, rdatas)

    def _answer(
        self,
        query: dns.message.Message,
        name: str,
        rdtype: str,
        records: Records | None,
    ) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if records:
            response.answer.append(self._rrset(name, rdtype, records))
            return response
        if records is not None:
            response.authority.append(_SOA)
            return response

        final = name
        if rdtype != "CNAME":
            reached = self._follow_cnames(response, name, rdtype)
            if reached is None:
                return response
            final = reached
        if not self._name_exists(final):
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(_SOA)
        return response

    def _follow_cnames(self, response: dns.message.Message, name: str, rdtype: str) -> str | None:
        """Add the CNAME chain starting at ``name`` to the answer section.

        Returns ``None`` when the chain ended in data of the wanted type,
        otherwise the last name reached, whose existence decides between
        NODATA and NXDOMAIN.  Loops and overlong chains simply stop.
        """
        current = name
        seen = {name}
        for _ in range(MAX_CNAME_CHAIN):
            cname = self._lookup(current, "CNAME")
            if not isinstance(cname, list) or not cname:
                return current
            rrset = self._rrset(current, "CNAME", cname)
            response.answer.append(rrset)
            target = _qname_text(rrset[0].target)
            data = self._lookup(target, rdtype)
            if isinstance(data, list) and data:
                response.answer.append(self._rrset(target, rdtype, data))
                return None
            if target in seen:
                return target
            seen.add(target)
            current = target
        return current

    def _error(self, query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.set_rcode(rcode)
        return response

    def _truncated(self, query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA | dns.flags.TC
        response.set_rcode(rcode)
        return response

    def _misbehave(self, behavior: Behavior, query: dns.message.Message, transport: str) -> bytes | None:
        if behavior is Behavior.HANG:
            return None
        if behavior is Behavior.GARBAGE:
            return os.urandom(_GARBAGE_LENGTH)
        if behavior is Behavior.NXDOMAIN:
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(_SOA)
            return self._render(response, query, transport)
        rcodes = {
            Behavior.SERVFAIL: dns.rcode.SERVFAIL,
            Behavior.REFUSED: dns.rcode.REFUSED,
            Behavior.NOTIMP: dns.rcode.NOTIMP,
        }
        return self._render(self._error(query, rcodes[behavior]), query, transport)

    def _render(self, response: dns.message.Message, query: dns.message.Message, transport: str) -> bytes:
        """Serialise, truncating the way a real server would when it does not fit.

        Over UDP an oversized answer becomes an empty TC reply so the client
        retries over TCP.  Over TCP only answers beyond the 64 KiB framing
        limit are cut, the same way (an RRset is never split).  Written
        without ``to_wire(prefer_truncation=...)``, which dnspython < 2.4
        lacks.
        """
        limit = _TCP_MAX_MESSAGE
        if transport == "udp":
            limit = _UDP_MIN_PAYLOAD
            if query.edns >= 0:
                limit = min(max(query.payload, _UDP_MIN_PAYLOAD), _TCP_MAX_MESSAGE)
        try:
            wire = response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            wire = b""
        if wire and len(wire) <= limit:
            return wire
        return self._truncated(query, response.rcode()).to_wire()


# -------------------------------------------------------------- benchmark zone

#: ``this host`` for the policy benchmarks: the backup MX, named the same
#: for every domain, as a real backup MX is.
SHARED_BACKUP_NAME = "backup.bench.example"
SHARED_PRIMARY_NAME = "mx1.bench.example"


def backup_mx_zone(
    primary_address: str,
    *,
    backup_address: str = "127.0.0.1",
    primary_group: int | None = 1,
    shared_backup: bool = False,
) -> Wildcard:
    """MX lists for any ``dN.example``: a live primary, then this host.

    With the defaults, ``dN.example`` has ``MX 10 mx1.dN.example`` (A:
    ``primary_address``) and ``MX 20 backup.dN.example`` (A:
    ``backup_address``, the requests' server_address), so a backup MX finds
    itself at the worse preference and defers to the primary.

    ``primary_group=G`` names the primary ``mx1.gK.example`` with
    ``K = N // G`` (G domains share a primary, as a hoster's customers do;
    None: one primary, ``mx1.bench.example``, for all), and
    ``shared_backup`` names this host ``backup.bench.example`` for every
    domain.  Then a new domain costs a resolver about one query instead of
    three, which is what lets the memory benchmark push 100,000 domains
    through in bounded time.  Names outside this scheme are not here.
    """
    if primary_group is not None and primary_group < 1:
        raise ValueError("primary_group must be at least 1 (or None)")

    def primary_of(name: str, n: int) -> str:
        if primary_group is None:
            return SHARED_PRIMARY_NAME
        return f"mx1.{name}" if primary_group == 1 else f"mx1.g{n // primary_group}.example"

    def zone(name: str, rdtype: str) -> Records | None:
        head, _, rest = name.partition(".")
        if rest == "example" and head.startswith("d") and head[1:].isdigit():
            if rdtype != "MX":
                return []
            backup = SHARED_BACKUP_NAME if shared_backup else f"backup.{name}"
            return [f"10 {primary_of(name, int(head[1:]))}.", f"20 {backup}."]
        if head == "mx1" and rest.endswith("example"):
            return [primary_address] if rdtype == "A" else []
        if head == "backup" and rest.endswith("example"):
            return [backup_address] if rdtype == "A" else []
        return None

    return zone
