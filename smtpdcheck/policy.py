"""The decision for one recipient domain: every step, in order.

The algorithm, as the policy server runs it on every RCPT and as
``smtpdcheck --mx`` and ``smtpdcheck-policyd --check`` explain it:

1. the recipient's domain (:func:`recipient_domain`);
2. its MX list (RFC 5321 §5.1, RFC 7505), which alone decides for
   NXDOMAIN, a null MX or a DNS failure;
3. this host -- the stop set plus the address Postfix was reached on --
   and the stop rule on the preference-sorted list, which is what Postfix's
   own SMTP client does with ``smtp_truncate_self``: only MXes with a
   strictly lower preference than this host's are "more preferred";
4. those MXes, and every address of each, probed at once;
5. a verdict; anything that goes wrong on the way (DNS, the deadline, a
   bug) gives the failure action, fail-open ``DUNNO`` unless configured.

:class:`Policy` runs it in full (:meth:`Policy.decide`) or from caches only
(:meth:`Policy.decide_cached`, no task, no await: the daemon's hot path).
Those are two drivers of one decision: each only fetches the MX list and
runs the check of step 4 (:mod:`smtpdcheck.walk`, fed from the caches or
the network by :mod:`smtpdcheck.check`), and :meth:`Policy._conclude`, which
does no I/O, makes the decision from what they found.  So both give the same
action and kind.  They may differ in what they name: from partial caches a
primary known up is named at once, where probing may find one listed earlier
up too, and a reason says "this host is not an MX" only when every lookup is
known.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass, field

import idna
import trio

from .cache import Source
from .check import Checker, CheckResult
from .probe import Outcome, printable
from .resolver import Lookups, MXKind, MXLookup
from .servers import Server, is_valid_hostname
from .stoprule import StopSet

log = logging.getLogger("smtpdcheck.policy")

#: How many distinct server addresses get a memoised stop set.  A Postfix
#: listens on a handful; a peer inventing addresses must not grow memory.
MAX_STOP_SETS = 1024


class Action(enum.Enum):
    DUNNO = "DUNNO"
    DEFER_IF_PERMIT = "DEFER_IF_PERMIT"
    WARN = "WARN"


class Kind(enum.Enum):
    """Why a verdict was reached: a fixed label for metrics and tests."""

    PRIMARY_LIVE = "primary live"
    ALL_DOWN = "all down"
    # A more-preferred MX was up, but its confirming probe is overdue: when in doubt, accept.
    UNCONFIRMED = "unconfirmed"
    NO_BETTER_MX = "no better mx"
    NXDOMAIN = "nxdomain"
    NULL_MX = "null mx"
    NO_DOMAIN = "no domain"
    BAD_DOMAIN = "bad domain"
    NOT_RCPT = "not rcpt"  # the daemon's: a request this policy does not decide
    DNS_FAILURE = "dns failure"
    DEADLINE = "deadline"
    INTERNAL_ERROR = "internal error"

    @property
    def failed(self) -> bool:
        """No real decision could be made; the failure action was answered."""
        return self in _FAILURES


_FAILURES = frozenset({Kind.DNS_FAILURE, Kind.DEADLINE, Kind.INTERNAL_ERROR})


class Cache(enum.Enum):
    """Where a decision's inputs came from, for the log line."""

    HIT = "hit"  # every input from a cache
    MISS = "miss"  # something went to the network
    STALE = "stale"  # from caches, at least one input expired and being refreshed


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
    """The MX list as a server list for the checker, most preferred first."""
    return [Server(name=host, host=host, prio=pref) for pref, host in mx.hosts]


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    kind: Kind
    reason: str  # free text for the log
    mx: str | None = None  # the live more-preferred MX, when deferring

    @property
    def defers(self) -> bool:
        return self.action is not Action.DUNNO


def verdict_for_mx(mx: MXLookup) -> Verdict | None:
    """The verdict when the MX lookup alone decides, else None (go and probe).

    A DNS failure comes back as a ``DUNNO`` verdict of kind
    :attr:`Kind.DNS_FAILURE`; :class:`Policy` turns it into the failure action.
    """
    if mx.kind is MXKind.NXDOMAIN:
        return Verdict(Action.DUNNO, Kind.NXDOMAIN, "domain does not exist")
    if mx.kind is MXKind.NULL:
        return Verdict(Action.DUNNO, Kind.NULL_MX, "null MX")
    if mx.kind is MXKind.FAILURE:
        return Verdict(Action.DUNNO, Kind.DNS_FAILURE, f"dns failure: {mx.error}")
    return None


def verdict_for_check(result: CheckResult, *, warn_only: bool = False) -> Verdict:
    """The verdict once the more-preferred MXes have been probed."""
    this_host_listed = any(r.is_stop for r in result.reports)
    if result.winner is not None:
        # Only say so when it is known: a winner may end the run before
        # every lookup is in.
        not_listed = all(r.is_stop is False for r in result.reports)
        where = " (this host is not an MX of the domain)" if not_listed else ""
        action = Action.WARN if warn_only else Action.DEFER_IF_PERMIT
        return Verdict(action, Kind.PRIMARY_LIVE, f"primary {result.winner.name} live{where}", result.winner.name)
    checked = [r for r in result.reports if r.eligible]
    if not checked:
        return Verdict(Action.DUNNO, Kind.NO_BETTER_MX, "no more-preferred MX")
    for report in checked:
        doubt = next((p for p in report.probes if p.outcome is Outcome.UNCONFIRMED), None)
        if doubt is not None:
            return Verdict(Action.DUNNO, Kind.UNCONFIRMED, f"primary {report.server.name} unconfirmed ({doubt.detail})")
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
    return Verdict(Action.DUNNO, Kind.ALL_DOWN, reason)


@dataclass(frozen=True, slots=True)
class Decision:
    """A verdict and what it was made from.

    ``valid_until`` (trio time) is when the first cached input it was
    computed from expires: a caller may reuse the decision until then.  It
    is ``-inf`` for decisions that must not be reused (failures, a full
    run whose inputs are only now landing in the caches).
    """

    verdict: Verdict
    domain: str = ""
    cache: Cache = Cache.MISS
    valid_until: float = -math.inf
    # For a DEFER: when the live MX last greeted (trio time), the evidence's age is now minus this.
    confirmed_at: float = field(default=math.nan, compare=False)
    mx: MXLookup | None = field(default=None, compare=False, repr=False)
    result: CheckResult | None = field(default=None, compare=False, repr=False)

    def explain(self) -> list[str]:
        """The decision step by step, for an admin at a terminal."""
        mx, result, verdict = self.mx, self.result, self.verdict
        if mx is None:
            return [f"verdict: {verdict.action.value} ({verdict.reason})"]
        cached = " [cached]" if self.cache is Cache.HIT else ""
        lines = [f"domain {mx.domain}: {mx.kind.value}" + (f" ({mx.error})" if mx.error else "") + cached]
        for name in mx.ignored:
            lines.append(f"  ignored unusable MX target {printable(name)}")
        if result is not None:
            width = max((len(r.server.name) for r in result.reports), default=0)
            for report in result.reports:
                prio = report.server.prio if report.server.prio is not None else "-"
                addrs = ",".join(str(a) for a in report.addresses) or "-"
                if report.eligible:
                    probes = "; ".join(p.describe() + f" {p.elapsed * 1000:.1f} ms" for p in report.probes)
                    state = "UP" if report.available else "down"
                    detail = probes or report.summary()
                    if report.cached and report.probes:
                        detail += " [cached]"
                    lines.append(f"  {prio:>5} {report.server.name:<{width}} [{addrs}] probed: {state}: {detail}")
                else:
                    lines.append(f"  {prio:>5} {report.server.name:<{width}} [{addrs}] {report.summary()}")
            lines.append(f"checked in {result.elapsed * 1000:.1f} ms")
        lines.append(f"verdict: {verdict.action.value} ({verdict.reason})")
        return lines


class Policy:
    """Decides recipient domains for this host, from DNS, probes and caches.

    Args:
        resolver / checker: the core's (see :mod:`smtpdcheck.core`).
        stop: this host's ``--stop`` names and addresses; each decision adds
            the address Postfix was reached on.
        deadline: every full decision ends within this many seconds
            (0 or inf = no limit); what is still running then is abandoned
            and the failure action answered.
        failure_action: the answer when no decision can be made.
        warn_only: answer ``WARN`` instead of ``DEFER_IF_PERMIT`` (shadow mode),
            for a live primary and for the failure action alike.
        sequential: probe one server after another (``smtpdcheck --sequential``).
    """

    def __init__(
        self,
        resolver: Lookups,
        checker: Checker,
        stop: StopSet,
        *,
        deadline: float = math.inf,
        failure_action: Action = Action.DUNNO,
        warn_only: bool = False,
        sequential: bool = False,
    ) -> None:
        self.resolver = resolver
        self.checker = checker
        self.stop = stop
        self.deadline = deadline if deadline > 0 else math.inf
        self.failure_action = failure_action
        self.warn_only = warn_only
        self.sequential = sequential
        self._stop_by_server: dict[str, StopSet] = {}

    def stop_for(self, server_address: str) -> StopSet:
        """This host for one request: the stop set plus the address Postfix was reached on."""
        stop = self._stop_by_server.get(server_address)
        if stop is None:
            stop = self.stop.with_address(server_address)
            if len(self._stop_by_server) < MAX_STOP_SETS:
                self._stop_by_server[server_address] = stop
        return stop

    def failure(self, kind: Kind, reason: str, domain: str = "") -> Decision:
        """The failure action, for DNS failures, the deadline and bugs.

        In shadow mode (``warn_only``) a failure action of ``DEFER_IF_PERMIT``
        comes out as ``WARN``, as a live primary does: while the policy is
        being tried, nothing is ever deferred.
        """
        action = self.failure_action
        if self.warn_only and action is Action.DEFER_IF_PERMIT:
            action = Action.WARN
        return Decision(Verdict(action, kind, reason), domain)

    @staticmethod
    def undecided(kind: Kind, reason: str, domain: str = "") -> Decision:
        """``DUNNO`` for a request this policy does not apply to."""
        return Decision(Verdict(Action.DUNNO, kind, reason), domain)

    def domain_of(self, recipient: str) -> str | Decision:
        """The recipient's domain, or the decision when there is none to look up."""
        try:
            domain = recipient_domain(recipient)
        except DomainError as exc:
            return self.undecided(Kind.BAD_DOMAIN, str(exc))
        if domain is None:
            return self.undecided(Kind.NO_DOMAIN, "no recipient domain")
        return domain

    async def decide_recipient(self, recipient: str, server_address: str = "") -> Decision:
        """Decide one RCPT: from caches when possible, else in full.  Never raises."""
        domain = self.domain_of(recipient)
        if isinstance(domain, Decision):
            return domain
        stop = self.stop_for(server_address)
        cached = self.decide_cached(domain, stop)
        if cached is not None:
            await trio.lowlevel.checkpoint()
            return cached
        return await self.decide(domain, stop)

    def decide_cached(self, domain: str, stop: StopSet) -> Decision | None:
        """The decision when every input is cached, else None: no task, no await.

        The same steps as :meth:`decide`, fed from the caches (see
        :meth:`_conclude`), so the same action and kind (see the module's
        docstring for what may differ); the decision says how long it stays
        valid.  A cached DNS failure is left to the full path, which answers
        it from the cache too, but it is never reusable.
        """
        entry = self.resolver.cached_mx(domain)
        if entry is None:
            return None
        mx, valid_until, source = entry
        verdict = verdict_for_mx(mx)
        result = None
        if verdict is None:
            result = self.checker.check_cached(mx_servers(mx), stop)
            if result is None:
                return None
            valid_until = min(valid_until, result.valid_until)
        elif verdict.kind is Kind.DNS_FAILURE:
            return None
        self.resolver.count_cache_hits(mx=1, stale_mx=int(source is Source.STALE))
        # A stale input has already expired, so valid_until is past: a
        # decision made from one is never reused.
        return self._conclude(domain, mx, source, verdict, result, valid_until, from_caches=True)

    async def decide(self, domain: str, stop: StopSet) -> Decision:
        """The full decision, within the deadline.  Never raises (but for outside cancellation)."""
        try:
            with trio.move_on_after(self.deadline):
                return await self._decide(domain, stop)
        except Exception as exc:  # a bug must cost one failure action, not the caller
            log.exception("internal error deciding %s", printable(domain))
            return self.failure(Kind.INTERNAL_ERROR, f"internal error: {type(exc).__name__}", domain)
        return self.failure(Kind.DEADLINE, f"deadline of {self.deadline:g}s exceeded", domain)

    async def _decide(self, domain: str, stop: StopSet) -> Decision:
        mx, source = await self.resolver.mx(domain)
        verdict = verdict_for_mx(mx)
        result = None
        if verdict is None:
            result = await self.checker.check(mx_servers(mx), stop, sequential=self.sequential)
        return self._conclude(domain, mx, source, verdict, result, -math.inf, from_caches=False)

    def _conclude(
        self, domain: str, mx: MXLookup, source: Source, verdict: Verdict | None, result: CheckResult | None,
        valid_until: float, *, from_caches: bool,
    ) -> Decision:
        """The decision from what the steps found, however they were fed: no I/O.

        ``verdict`` is :func:`verdict_for_mx`'s; ``result`` the check of the
        MX list when that verdict is None; ``valid_until`` how long the
        inputs hold (``-inf``: the decision is not to be reused);
        ``from_caches``: every input is known to be cached (the hot path,
        spared the question).
        """
        if verdict is not None and verdict.kind is Kind.DNS_FAILURE:
            failed = self.failure(verdict.kind, verdict.reason, domain)
            return Decision(failed.verdict, domain, mx=mx)
        if verdict is None:
            assert result is not None
            verdict = verdict_for_check(result, warn_only=self.warn_only)
        cache = Cache.MISS
        if from_caches or (source is not Source.NETWORK and (result is None or result.from_cache)):
            stale = source is Source.STALE or (result is not None and result.stale)
            cache = Cache.STALE if stale else Cache.HIT
        confirmed_at = result.confirmed_at if result is not None else math.nan
        return Decision(verdict, domain, cache, valid_until, confirmed_at, mx=mx, result=result)
