"""Server lists in the ``[prio:]server`` form of Mail Avenger's smtpdcheck(1).

The words come from an MX list (``$RECIP_MXES`` in Mail Avenger, an MX lookup
in the policy server) or from a command line typed by an administrator, so a
bad word is a usage error reported to a human, never something to guess at.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final, TypeAlias

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_PRIORITY: Final = 65535
MAX_NAME_OCTETS: Final = 253

# RFC 1123 host names, relaxed to allow "_" (seen in the wild in MX targets
# served by misconfigured zones; harmless for an A/AAAA lookup).  Anything
# else -- spaces, "=", control characters, non-ASCII -- is rejected, which is
# also what keeps hostile DNS data out of replies and log lines.
_LABEL: Final = re.compile(r"\A[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")


class ServerSyntaxError(ValueError):
    """A ``[prio:]server`` word that cannot be understood."""


@dataclass(frozen=True, slots=True)
class Server:
    """One entry of a server list.

    ``name`` is the server as written, without ``prio:``, because that is what
    smtpdcheck prints; ``host`` is the normalised form used for comparisons
    (lower case, no trailing dot, canonical IP text for literals).
    """

    name: str
    host: str
    prio: int | None = None
    address: IPAddress | None = None

    @property
    def is_literal(self) -> bool:
        return self.address is not None


def normalize_hostname(name: str) -> str:
    """Lower-case and drop one trailing dot: names compare case-insensitively."""
    return name[:-1].lower() if name.endswith(".") else name.lower()


def is_valid_hostname(name: str) -> bool:
    """True for a syntactically usable DNS host name (after normalisation)."""
    host = normalize_hostname(name)
    if not host or len(host) > MAX_NAME_OCTETS or not host.isascii():
        return False
    return all(_LABEL.match(label) for label in host.split("."))


def parse_address(text: str) -> IPAddress | None:
    """Parse an IP literal: dotted quad, bare IPv6, or either in brackets."""
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if text.startswith("[") != text.endswith("]"):
        return None
    if candidate.lower().startswith("ipv6:"):
        candidate = candidate[5:]
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return None
    # An IPv4-mapped IPv6 address (::ffff:192.0.2.1, as a dual-stack socket
    # may report a v4 peer) is that IPv4 address: compare it as one.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_server(word: str) -> Server:
    """Parse one ``[prio:]server`` word.

    A whole word that parses as an IPv6 address is a server without prio:
    ``10:2001:db8::1`` is itself a valid IPv6 address, and reading it as
    "prio 10" would silently change which host is meant.  Bracket the
    address (``10:[2001:db8::1]``) to give an IPv6 literal a prio.
    """
    if not word:
        raise ServerSyntaxError("empty server name")
    whole = parse_address(word)
    if whole is not None and not word.startswith("["):
        return Server(name=word, host=str(whole), address=whole)

    prio: int | None = None
    rest = word
    head, sep, tail = word.partition(":")
    if sep and head.isdigit() and head.isascii():
        prio = int(head)
        if prio > MAX_PRIORITY:
            raise ServerSyntaxError(f"priority out of range 0-{MAX_PRIORITY}: {word!r}")
        rest = tail
    elif sep and not word.startswith("["):
        raise ServerSyntaxError(f"bad priority (want a number before ':'): {word!r}")
    if not rest:
        raise ServerSyntaxError(f"missing server name: {word!r}")

    address = parse_address(rest)
    if address is not None:
        return Server(name=rest, host=str(address), prio=prio, address=address)
    if rest.startswith("[") or not is_valid_hostname(rest):
        raise ServerSyntaxError(f"not a host name or IP address: {word!r}")
    return Server(name=rest, host=normalize_hostname(rest), prio=prio)


def parse_servers(words: list[str]) -> list[Server]:
    return [parse_server(word) for word in words]
