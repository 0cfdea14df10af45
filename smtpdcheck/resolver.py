"""DNS for smtpdcheck: host addresses and MX lists, cached, bounded, fail-safe.

dnspython's async resolver does the protocol work.  Around it:

* every lookup runs under our own trio deadline: dnspython measures its
  ``lifetime`` on the wall clock and has been seen to overrun it, and a
  policy server must answer Postfix on time whatever a nameserver does;
* results are cached by us, with capped TTLs (dnspython's own cache would
  keep a negative answer without SOA for 2**32 seconds), and looked up with
  single-flight so a burst of RCPTs makes one query;
* every failure is a value (``error`` set), never an exception: a SERVFAIL
  must not be confused with "no such domain" or "no MX records".
"""

from __future__ import annotations

import enum
import ipaddress
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Final, Protocol

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver
import trio

from . import defaults, values
from .cache import Producer, SingleFlight, Source, TTLCache
from .compat import dns_backend, use_nameservers
from .refresh import MIN_RETRY_AFTER_S, RefreshRules, background_slots
from .servers import IPAddress, is_valid_hostname, normalize_hostname

#: The system's resolver configuration, read when no nameserver is given.
RESOLV_CONF: Final = "/etc/resolv.conf"
MAX_MX_HOSTS: Final = 10
MAX_ADDRESSES_PER_HOST: Final = 8

#: One use of a DNS answer pays for this many background fetches of it
#: (refreshes and retries): a name asked once costs at most this many
#: queries more (twice as many for addresses: A and AAAA), whatever its TTL.
DNS_FETCHES_PER_USE: Final = 3

#: No DNS answer is fetched in the background more often than this, nor
#: more often than its stale grace (``--dns-timeout``): the longest floor
#: at which an answer in steady use is still refreshed before it may no
#: longer be served.
MIN_DNS_REFRESH_FLOOR_S: Final = 1.0

#: dnspython's time for one query to one nameserver: shorter than the
#: lookup's budget, so a second nameserver is asked while there is time.
DNS_TRY_TIMEOUT_S: Final = 2.0


class DNSConfigError(ValueError):
    """A nameserver argument or resolver configuration that cannot be used."""


def parse_nameserver(text: str) -> tuple[str, int]:
    """Parse ``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address."""
    host, port = text, 53
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise DNSConfigError(f"bad nameserver {text!r}")
        host = inner
        if rest:
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = _port(p, text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise DNSConfigError(f"nameserver must be an IP address: {text!r}") from None
    return host, port


def _port(text: str, whole: str) -> int:
    try:
        return values.port(text)
    except values.BadValueError as exc:
        raise DNSConfigError(f"bad port in {whole!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class AddressLookup:
    host: str
    addresses: tuple[IPAddress, ...] = ()
    error: str | None = None
    ttl: float = field(default=0.0, compare=False, repr=False)  # how long it may be reused

    @property
    def ok(self) -> bool:
        return bool(self.addresses)


class MXKind(enum.Enum):
    LIST = "mx"
    IMPLICIT = "implicit mx"  # no MX records: the domain itself (RFC 5321 §5.1)
    NULL = "null mx"  # "0 ." : the domain accepts no mail (RFC 7505)
    NXDOMAIN = "nxdomain"
    FAILURE = "dns failure"


@dataclass(frozen=True, slots=True)
class MXLookup:
    domain: str
    kind: MXKind
    hosts: tuple[tuple[int, str], ...] = ()  # (preference, host), sorted, usable names only
    ignored: tuple[str, ...] = ()  # escaped text of unusable targets, for the log
    error: str | None = None
    ttl: float = field(default=0.0, compare=False, repr=False)


def _failure_text(exc: BaseException) -> str:
    """A short reason for a failed lookup, for logs and metrics."""
    if isinstance(exc, dns.resolver.NoNameservers):
        errors = exc.kwargs.get("errors") or []
        for err in errors:
            answer = err[3] if len(err) > 3 else None
            if isinstance(answer, str) and answer.isalpha():  # an rcode: "SERVFAIL", "REFUSED"
                return answer[:16]
        for err in errors:
            if len(err) > 3 and isinstance(err[3], BaseException):
                return type(err[3]).__name__
        return "no nameserver answered"
    if isinstance(exc, dns.exception.Timeout):
        return "timeout"
    return type(exc).__name__


class Lookups(Protocol):
    """What the checker and the policy need from DNS.

    :class:`Resolver` is the real one; tests that run on virtual time give a
    replacement whose answers take exactly as long as the test says.
    """

    async def addresses(self, host: str) -> tuple[AddressLookup, Source]: ...

    async def mx(self, domain: str) -> tuple[MXLookup, Source]: ...

    def cached_addresses(self, host: str) -> tuple[AddressLookup, float, Source] | None: ...

    def cached_mx(self, domain: str) -> tuple[MXLookup, float, Source] | None: ...

    def count_cache_hits(self, *, mx: int = 0, addresses: int = 0, stale_mx: int = 0, stale_addresses: int = 0) -> None: ...


class Resolver:
    """Address and MX lookups for the checker and the policy server.

    Args:
        nursery: where lookup flights run (must outlive callers).
        nameservers: ``(ip, port)`` pairs; None reads the system configuration.
        timeout: budget for one lookup (both A and AAAA, or one MX query).
        max_ttl / negative_ttl / failure_ttl: caps on how long answers,
            authoritative negatives and failures are reused.
        max_concurrent: queries in flight at once; background fetches
            (refreshes) may hold only :func:`~smtpdcheck.refresh.background_slots`
            of them, the rest is kept for lookups a request waits for.
        refresh_window: answers used within this many seconds are refreshed
            before they expire and served stale (up to ``timeout`` past
            expiry) while the refresh runs; 0 = neither.  Each use pays for
            :data:`DNS_FETCHES_PER_USE` background fetches, at most one per
            ``max(timeout, MIN_DNS_REFRESH_FLOOR_S)``; failed lookups are
            not refreshed.
        stale_max: a refresh that fails keeps the last good answer up to
            this long past its expiry, retried every ``failure_ttl``.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        nameservers: Sequence[tuple[str, int]] | None = None,
        timeout: float = defaults.DNS_TIMEOUT_S,
        max_ttl: float = defaults.DNS_MAX_TTL_S,
        negative_ttl: float = defaults.DNS_NEGATIVE_TTL_S,
        failure_ttl: float = defaults.DNS_FAILURE_TTL_S,
        max_entries: int = defaults.CACHE_SIZE,
        max_concurrent: int = defaults.MAX_DNS_QUERIES,
        max_addresses: int = MAX_ADDRESSES_PER_HOST,
        max_mx_hosts: int = MAX_MX_HOSTS,
        refresh_window: float = 0.0,
        stale_max: float = 0.0,
        resolv_conf: str = RESOLV_CONF,
    ) -> None:
        #: Where the nameservers came from, for an admin: None when they were given.
        self.resolv_conf: str | None = None if nameservers else resolv_conf
        try:
            if nameservers:
                self._dns = dns.asyncresolver.Resolver(configure=False)
                use_nameservers(self._dns, nameservers)
            else:
                self._dns = dns.asyncresolver.Resolver(filename=resolv_conf)
        except ValueError as exc:  # the same address with two ports (see compat.use_nameservers)
            raise DNSConfigError(f"no DNS server to ask: {exc}") from None
        except dns.exception.DNSException:
            # NoResolverConfiguration, whose wording differs between dnspython
            # releases: say in this project's words which of the two it is.
            what = f"{resolv_conf} names no nameserver" if os.access(resolv_conf, os.R_OK) else f"cannot read {resolv_conf}"
            raise DNSConfigError(f"no DNS server to ask: {what} (give --nameserver)") from None
        self._dns.cache = None  # ours is in front, with capped TTLs
        self._dns.timeout = min(DNS_TRY_TIMEOUT_S, timeout) if timeout > 0 else DNS_TRY_TIMEOUT_S
        # A backstop only: our own trio deadline in _query is what counts.
        self._dns.lifetime = timeout + 1.0 if timeout > 0 else 3600.0
        self._backend = dns_backend()
        self.timeout = timeout
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self.failure_ttl = failure_ttl
        self.max_addresses = max_addresses
        self.max_mx_hosts = max_mx_hosts
        self.limiter = trio.CapacityLimiter(max_concurrent)
        # Background fetches take a slot here first, then one of ``limiter``:
        # they never hold more than their share of it.
        self.background_limiter = trio.CapacityLimiter(background_slots(max_concurrent))
        self.failures = 0
        grace = timeout if timeout > 0 else defaults.DNS_TIMEOUT_S
        rules = RefreshRules(
            window=refresh_window, stale_grace=grace,
            failure_stale_max=stale_max, retry_after=max(failure_ttl, MIN_RETRY_AFTER_S),
            fetches_per_use=DNS_FETCHES_PER_USE, floor=max(grace, MIN_DNS_REFRESH_FLOOR_S),
        )
        self.address_flights: SingleFlight[str, AddressLookup] = SingleFlight(
            nursery, TTLCache(max_entries), self._address_ttl,
            lambda exc: AddressLookup("?", error="internal error"), name="address lookup",
            produce_for=self._address_producer,
            refresh_for=lambda host: self._address_producer(host, background=True),
            rules=rules, is_failure=_address_failed, describe=str,
            reason_of=lambda v: v.error or "?",
        )
        self.mx_flights: SingleFlight[str, MXLookup] = SingleFlight(
            nursery, TTLCache(max_entries), self._mx_ttl,
            lambda exc: MXLookup("?", MXKind.FAILURE, error="internal error"), name="mx lookup",
            produce_for=self._mx_producer,
            refresh_for=lambda domain: self._mx_producer(domain, background=True),
            rules=rules, is_failure=lambda v: v.kind is MXKind.FAILURE, describe=str,
            reason_of=lambda v: v.error or "?",
        )

    @property
    def nameservers(self) -> list[str]:
        """The servers this resolver asks, as ``IP:PORT`` (``[IPv6]:PORT``)."""
        out: list[str] = []
        for server in self._dns.nameservers:
            # An address (with its port in nameserver_ports, if not the default)
            # or, from dnspython 2.4 on, a nameserver object.
            address = str(getattr(server, "address", server))
            port = getattr(server, "port", None) or self._dns.nameserver_ports.get(address, self._dns.port)
            out.append(f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
        return out

    def _address_ttl(self, value: AddressLookup) -> float:
        return self.failure_ttl if _address_failed(value) else value.ttl

    def _mx_ttl(self, value: MXLookup) -> float:
        return self.failure_ttl if value.kind is MXKind.FAILURE else value.ttl

    # -- cache-only answers -------------------------------------------------

    def cached_addresses(self, host: str) -> tuple[AddressLookup, float, Source] | None:
        """A usable cached lookup, when it expires and whether it is stale; no I/O."""
        return self.address_flights.cached(normalize_hostname(host))

    def cached_mx(self, domain: str) -> tuple[MXLookup, float, Source] | None:
        """A usable cached MX list, when it expires and whether it is stale; no I/O."""
        return self.mx_flights.cached(normalize_hostname(domain))

    def count_cache_hits(self, *, mx: int = 0, addresses: int = 0, stale_mx: int = 0, stale_addresses: int = 0) -> None:
        """Statistics for answers taken with ``cached_*``, as if each had been a get()."""
        self.mx_flights.count_served(mx, stale_mx)
        self.address_flights.count_served(addresses, stale_addresses)

    # -- raw queries --------------------------------------------------------

    async def _query(
        self, name: str, rdtype: str, *, background: bool = False
    ) -> tuple[dns.resolver.Answer | None, float, str | None]:
        """One query: ``(answer or None, ttl, error)``.  Never raises DNS errors.

        The deadline covers the wait for a slot too; when it passes,
        dnspython's query is cancelled and closes its socket.
        """
        budget = self.timeout if self.timeout > 0 else math.inf
        with trio.move_on_after(budget):
            try:
                async with self.background_limiter if background else nullcontext(), self.limiter:
                    answer = await self._dns.resolve(
                        name, rdtype, raise_on_no_answer=False, search=False, backend=self._backend
                    )
            except dns.resolver.NXDOMAIN:
                return None, self.negative_ttl, "NXDOMAIN"
            except (dns.exception.DNSException, OSError, ValueError, UnicodeError) as exc:
                self.failures += 1
                return None, self.failure_ttl, _failure_text(exc)
            ttl = max(0.0, min(answer.expiration - time.time(), self.max_ttl))
            if answer.rrset is None:
                ttl = min(ttl, self.negative_ttl)
            return answer, ttl, None
        self.failures += 1
        return None, self.failure_ttl, "timeout"

    # -- addresses ----------------------------------------------------------

    async def addresses(self, host: str) -> tuple[AddressLookup, Source]:
        """A and AAAA of ``host``, queried in parallel; ``(lookup, where it came from)``."""
        return await self.address_flights.get(normalize_hostname(host))

    def _address_producer(self, host: str, *, background: bool = False) -> Producer[AddressLookup]:
        """How to look ``host`` up (for a miss, or in the background for a refresh)."""

        async def produce(deliver: Callable[[AddressLookup], None]) -> None:
            results: dict[str, tuple[dns.resolver.Answer | None, float, str | None]] = {}

            async def one(rdtype: str) -> None:
                results[rdtype] = await self._query(host, rdtype, background=background)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, "AAAA")
                nursery.start_soon(one, "A")
            found: list[IPAddress] = []
            ttls: list[float] = []
            errors: list[str] = []
            for rdtype in ("AAAA", "A"):
                answer, ttl, error = results[rdtype]
                if error:
                    errors.append(error)
                ttls.append(ttl)
                if answer is not None and answer.rrset is not None:
                    for rdata in answer.rrset:
                        try:
                            found.append(ipaddress.ip_address(rdata.address))
                        except (AttributeError, ValueError):
                            continue
            # Interleave families so the cap keeps both when both exist.
            v6 = [a for a in found if a.version == 6]
            v4 = [a for a in found if a.version == 4]
            mixed: list[IPAddress] = []
            for pair in zip(v4, v6):
                mixed.extend(pair)
            mixed.extend(v4[len(v6):] if len(v4) > len(v6) else v6[len(v4):])
            addrs = tuple(dict.fromkeys(mixed))[: self.max_addresses]
            ttl = min(ttls)
            if addrs:
                deliver(AddressLookup(host, addrs, ttl=ttl))
            elif errors and all(e == "NXDOMAIN" for e in errors):
                deliver(AddressLookup(host, error="NXDOMAIN", ttl=ttl))
            elif errors:
                deliver(AddressLookup(host, error=next(e for e in errors if e != "NXDOMAIN"), ttl=ttl))
            else:
                deliver(AddressLookup(host, error="no address records", ttl=ttl))

        return produce

    # -- MX -----------------------------------------------------------------

    async def mx(self, domain: str) -> tuple[MXLookup, Source]:
        """The MX list of ``domain`` (an A-label name); ``(lookup, where it came from)``."""
        return await self.mx_flights.get(normalize_hostname(domain))

    def _mx_producer(self, domain: str, *, background: bool = False) -> Producer[MXLookup]:
        """How to look up ``domain``'s MX list (for a miss, or in the background for a refresh)."""

        async def produce(deliver: Callable[[MXLookup], None]) -> None:
            answer, ttl, error = await self._query(domain, "MX", background=background)
            deliver(self._mx_from_answer(domain, answer, error, ttl))

        return produce

    def _mx_from_answer(
        self, domain: str, answer: dns.resolver.Answer | None, error: str | None, ttl: float
    ) -> MXLookup:
        if error == "NXDOMAIN":
            return MXLookup(domain, MXKind.NXDOMAIN, error=error, ttl=ttl)
        if error is not None:
            return MXLookup(domain, MXKind.FAILURE, error=error)
        assert answer is not None
        if answer.rrset is None or len(answer.rrset) == 0:
            return MXLookup(domain, MXKind.IMPLICIT, hosts=((0, domain),), ttl=ttl)
        records: list[tuple[int, dns.name.Name]] = []
        for rdata in answer.rrset:
            pref = getattr(rdata, "preference", None)
            exchange = getattr(rdata, "exchange", None)
            if isinstance(pref, int) and isinstance(exchange, dns.name.Name):
                records.append((pref, exchange))
        if any(x == dns.name.root for _, x in records) and len(records) == 1:
            return MXLookup(domain, MXKind.NULL, ttl=ttl)
        records.sort(key=lambda r: r[0])
        hosts: list[tuple[int, str]] = []
        ignored: list[str] = []
        for pref, exchange in records:
            text = _name_text(exchange)
            if text is None or exchange == dns.name.root:
                ignored.append(exchange.to_text())
                continue
            if len(hosts) < self.max_mx_hosts:
                # Interned: many cached domains name the same hosts (a
                # hoster's MX), and each fresh answer parses its own copy.
                hosts.append((pref, sys.intern(text)))
            else:
                ignored.append(text)
        if not hosts:
            return MXLookup(domain, MXKind.FAILURE, ignored=tuple(ignored[:5]), error="no usable MX host name", ttl=ttl)
        return MXLookup(domain, MXKind.LIST, hosts=tuple(hosts), ignored=tuple(ignored[:5]), ttl=ttl)


def _address_failed(value: AddressLookup) -> bool:
    """A lookup that failed (SERVFAIL, timeout...), as opposed to an answer, even a negative one."""
    return value.error not in (None, "NXDOMAIN", "no address records")


def _name_text(name: dns.name.Name) -> str | None:
    """A DNS name as a plain host name, or None if it is not one.

    ``to_text`` escapes odd bytes (``\\032``), so an escape character in the
    text means the wire name held something no host name may hold.
    """
    try:
        text = name.to_text(omit_final_dot=True)
    except dns.exception.DNSException:
        return None
    if "\\" in text or not is_valid_hostname(text):
        return None
    return text.lower()
