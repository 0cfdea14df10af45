"""What to answer for one RCPT, as pure functions of what DNS and probes said.

RFC 5321 §5.1 and RFC 7505 fix how an MX list is read; Postfix's own SMTP
client (``smtp_truncate_self``) fixes what "more preferred" means: strictly
lower preference than this host's.  The stop rule of the core implements
exactly that on a preference-sorted list, so this module only maps lookup
outcomes to answers and keeps every failure on the fail-open side.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import idna

from .check import CheckResult
from .probe import Outcome
from .resolver import MXKind, MXLookup
from .servers import Server, is_valid_hostname


class Action(enum.Enum):
    DUNNO = "DUNNO"
    DEFER_IF_PERMIT = "DEFER_IF_PERMIT"
    WARN = "WARN"


class DomainError(ValueError):
    """A recipient domain that cannot be looked up."""


def recipient_domain(recipient: str) -> str | None:
    """The recipient's domain as an A-label DNS name, or None when there is none.

    Postfix sends the unquoted internal form (``john doe@example.com``), so
    the domain is after the *last* ``@``.  SMTPUTF8 recipients arrive as
    UTF-8 U-labels and are IDNA-encoded (UTS #46 mapping, as browsers and
    MTAs do); an address literal (``user@[192.0.2.1]``) has no MX to ask.

    Raises:
        DomainError: the domain is present but unusable (bad IDNA, bytes
            that were not UTF-8, not a host name).
    """
    local, at, domain = recipient.rpartition("@")
    if not at or not domain:
        return None
    domain = domain.strip()
    if domain.endswith("."):
        domain = domain[:-1]
    if not domain or domain.startswith("["):
        return None
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError) as exc:
            raise DomainError(f"bad international domain: {type(exc).__name__}") from None
    domain = domain.lower()
    if not is_valid_hostname(domain):
        raise DomainError("not a valid domain name")
    return domain


def mx_servers(mx: MXLookup) -> list[Server]:
    """The MX list as a server list for the core, most preferred first."""
    return [Server(name=host, host=host, prio=pref) for pref, host in mx.hosts]


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    kind: str  # fixed label for metrics
    reason: str  # free text for the log
    mx: str | None = None  # the live more-preferred MX, when deferring

    @property
    def defers(self) -> bool:
        return self.action is not Action.DUNNO


def verdict_for_mx(mx: MXLookup) -> Verdict | None:
    """The answer when the MX lookup alone decides, else None (go and probe)."""
    if mx.kind is MXKind.NXDOMAIN:
        return Verdict(Action.DUNNO, "nxdomain", "domain does not exist")
    if mx.kind is MXKind.NULL:
        return Verdict(Action.DUNNO, "null mx", "null MX")
    if mx.kind is MXKind.FAILURE:
        return Verdict(Action.DUNNO, "dns failure", f"dns failure: {mx.error}")
    return None


def verdict_for_check(result: CheckResult, *, warn_only: bool = False) -> Verdict:
    """The answer once the more-preferred MXes have been probed."""
    this_host_listed = any(r.is_stop for r in result.reports)
    if result.winner is not None:
        where = "" if this_host_listed else " (this host is not an MX of the domain)"
        action = Action.WARN if warn_only else Action.DEFER_IF_PERMIT
        return Verdict(action, "primary live", f"primary {result.winner.name} live{where}", result.winner.name)
    checked = [r for r in result.reports if r.eligible]
    if not checked:
        return Verdict(Action.DUNNO, "no better mx", "no more-preferred MX")
    timed_out = sum(
        1 for r in checked
        if not r.available and (r.timed_out or any(p.outcome is Outcome.TIMEOUT for p in r.probes))
    )
    plural = "MX" if len(checked) == 1 else "MXes"
    if this_host_listed:
        reason = f"all {len(checked)} more-preferred {plural} down"
    else:
        reason = f"all {len(checked)} {plural} down (this host is not an MX of the domain)"
    if timed_out:
        reason += f", {timed_out} timed out"
    return Verdict(Action.DUNNO, "all down", reason)
