"""The ``--stop`` rule of smtpdcheck(1), as pure functions.

The man page: stop before checking the first server that is this host; if
that entry has a prio, servers of the same prio are acceptable too, "even if
those servers were first in the list".  Postfix's own SMTP client does the
same with its MX list (``smtp_truncate_self``: this host and everything at
an equal or worse preference are dropped), so the policy server can run the
rule unchanged on a preference-sorted MX list.

Matching needs each server's addresses, and lookups finish in any order.
:func:`eligibility` therefore works on partial knowledge, so a prober can
start on a server as soon as its fate is certain instead of waiting for the
slowest lookup in the list.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .servers import IPAddress, Server, normalize_hostname, parse_address


@dataclass(frozen=True, slots=True)
class StopSet:
    """This host: the names and addresses given with ``--stop``."""

    names: frozenset[str] = field(default_factory=frozenset)
    addresses: frozenset[IPAddress] = field(default_factory=frozenset)

    @classmethod
    def build(cls, names: Iterable[str] = (), addresses: Iterable[IPAddress] = ()) -> StopSet:
        return cls(frozenset(normalize_hostname(n) for n in names), frozenset(addresses))

    def with_address(self, text: str) -> StopSet:
        """Add an address given as text; ignore text that is not an address."""
        address = parse_address(text)
        if address is None or address in self.addresses:
            return self
        return StopSet(self.names, self.addresses | {address})

    def __bool__(self) -> bool:
        return bool(self.names or self.addresses)

    def matches_name(self, server: Server) -> bool:
        """A match decidable without DNS: the name, or the literal address."""
        if server.address is not None:
            return server.address in self.addresses
        return server.host in self.names

    def matches(self, server: Server, addresses: Iterable[IPAddress]) -> bool:
        return self.matches_name(server) or any(a in self.addresses for a in addresses)


def eligibility(servers: Sequence[Server], matches: Sequence[bool | None]) -> list[bool | None]:
    """Which servers the stop rule lets us check, given what is known so far.

    Args:
        servers: the list in the order given.
        matches: per server, True if it is this host, False if it is not,
            None while its lookup is still running.

    Returns:
        Per server: True (check it), False (do not), or None (it depends on a
        lookup still running).  With no None in ``matches`` there is no None
        in the result, and the result is exactly the man page's rule.
    """
    n = len(servers)
    first_open = next((i for i in range(n) if matches[i] is not False), None)
    if first_open is None:
        return [True] * n
    if matches[first_open]:
        stop_prio = servers[first_open].prio
        return [
            i < first_open and (stop_prio is None or servers[i].prio != stop_prio)
            for i in range(n)
        ]
    # The first unknown server may turn out to be this host.  Servers before
    # it are safe unless some later server of the same prio could still be
    # the first match; servers from it on wait.
    # A server after any known match is out whatever the pending lookups
    # say: the first match can only be earlier still.
    known = next((k for k in range(first_open, n) if matches[k]), n)
    result: list[bool | None] = []
    for i in range(n):
        if i > known:
            result.append(False)
            continue
        if i >= first_open:
            result.append(None)
            continue
        prio = servers[i].prio
        undecided_peer = prio is not None and any(
            servers[k].prio == prio and matches[k] is not False for k in range(first_open, n)
        )
        result.append(None if undecided_peer else True)
    return result

