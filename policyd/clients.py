"""Who may ask: the clients allowed to connect, and the group of a unix socket.

A policy query makes this host look up the recipient's domain and connect
to port 25 of every address its MX hosts name.  An endpoint that other
hosts can reach, answering anyone, lets them point this host at any
address they can put in DNS.  So an inet endpoint answers only the
networks of ``--allow-client``, and one on an address other than loopback
is refused at start-up without them.  The check is made when a connection
is accepted, on the address accept() returned, before a byte is read: a
refused peer is closed unanswered and costs one dictionary lookup once its
address has been seen.
"""

from __future__ import annotations

import grp
import ipaddress
import logging
from collections.abc import Iterable
from typing import Final

from .logfmt import ThrottledWarning

log = logging.getLogger("smtpdcheck.policyd")

#: Addresses whose verdict is remembered; the dictionary is emptied when full (peers are few: smtpd hosts).
KNOWN_PEERS: Final = 1024
#: At most one line about refused connections per this many seconds (trio time).
REFUSAL_LOG_INTERVAL_S: Final = 60.0

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def check_network(value: object) -> str:
    """A network in CIDR notation or a single address, as the configuration keeps it (normalised)."""
    text = str(value).strip()
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except ValueError as exc:
        raise ValueError(f"not a network or address: {text!r} ({exc})") from None


def check_group(value: object) -> str:
    """A group that exists now: a typo must stop start-up, not surface as a socket nobody can use."""
    name = str(value)
    if name:
        try:
            grp.getgrnam(name)
        except KeyError:
            raise ValueError(f"no such group: {name!r}") from None
    return name


class AllowList:
    """The networks whose clients are answered; one lookup per peer address after its first.

    Addresses are compared as written by accept() (``127.0.0.2``, ``::1``),
    an IPv4 address mapped into IPv6 (``::ffff:192.0.2.1``, what a dual-stack
    socket reports) as the IPv4 address it is.
    """

    __slots__ = ("networks", "_known")

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in networks)
        self._known: dict[str, bool] = {}

    def allows(self, host: str) -> bool:
        verdict = self._known.get(host)
        if verdict is None:
            verdict = self._decide(host)
            if len(self._known) >= KNOWN_PEERS:
                self._known.clear()
            self._known[host] = verdict
        return verdict

    def _decide(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False  # not an IP peer: nothing to match it against
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


def exposed_endpoint(endpoints: Iterable[str]) -> str | None:
    """The first inet endpoint on an address other than loopback (a wildcard included), or None.

    Such an endpoint needs ``--allow-client``: other hosts may reach it.
    ``localhost`` is loopback; unix sockets are guarded by their mode.
    """
    for endpoint in endpoints:
        if not endpoint.startswith("inet:"):
            continue
        host = endpoint.partition(":")[2].rpartition(":")[0].strip("[]")
        if host == "localhost":
            continue
        try:
            if ipaddress.ip_address(host.partition("%")[0]).is_loopback:
                continue
        except ValueError:
            pass
        return endpoint
    return None


class RefusalLog(ThrottledWarning):
    """Refused connections: a scan may knock thousands of times a second, so one line a minute."""

    __slots__ = ()

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL_S) -> None:
        super().__init__(log, interval)

    def refused(self, peer: str, endpoint: str, now: float) -> None:
        self.warn(now, "refused a connection from %s to %s: not in --allow-client", peer, endpoint)
