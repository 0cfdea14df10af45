"""Resolving ``--stop`` names: this host's identity, fixed at start-up.

A ``--stop`` name that does not resolve is fatal (the man page: exit 2 at
once): with an incomplete idea of "this host", the backup MX could find
itself in the MX list, judge itself "up" and defer every message.
"""

from __future__ import annotations

import socket

import trio

from .resolver import Resolver
from .servers import IPAddress, is_valid_hostname, parse_address
from .stoprule import StopSet


class StopHostError(Exception):
    """A ``--stop`` value that is neither an address nor a resolvable name."""


async def _system_addresses(name: str) -> list[IPAddress]:
    """getaddrinfo, as Mail Avenger's gethostbyname: /etc/hosts counts."""
    try:
        infos = await trio.socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    found: list[IPAddress] = []
    for info in infos:
        address = parse_address(str(info[4][0]).partition("%")[0])
        if address is not None:
            found.append(address)
    return found


async def resolve_stop(values: list[str], resolver: Resolver, *, system_fallback: bool) -> StopSet:
    """Build the StopSet for ``--stop`` values; raise StopHostError on failure."""
    names: list[str] = []
    addresses: list[IPAddress] = []
    for value in values:
        address = parse_address(value)
        if address is not None:
            addresses.append(address)
            continue
        if not is_valid_hostname(value):
            raise StopHostError(f"--stop {value!r}: not a host name or IP address")
        lookup, _ = await resolver.addresses(value)
        found = list(lookup.addresses)
        if not found and system_fallback:
            found = await _system_addresses(value)
        if not found:
            raise StopHostError(f"--stop {value}: cannot resolve ({lookup.error or 'no addresses'})")
        names.append(value)
        addresses.extend(found)
    return StopSet.build(names, addresses)
