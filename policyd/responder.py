"""From one policy request to reply bytes: memo, decision, metrics, log line.

The decision itself is the core's (:class:`smtpdcheck.policy.Policy`); this
module adds what only the daemon needs: the Postfix reply, a memo of whole
answers for the hot path, counters and the decision log line.  Every
request gets bytes to send, within the deadline.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import trio

from smtpdcheck.cache import TTLCache
from smtpdcheck.core import Core, CoreSettings
from smtpdcheck.check import CheckResult
from smtpdcheck.policy import Action, Decision, Kind, Policy
from smtpdcheck.probe import Outcome
from smtpdcheck.stoprule import StopSet

from . import decisionlog
from .config import Config
from .logfmt import ThrottledWarning
from .metrics import Metrics
from .protocol import DUNNO_REPLY, PolicyRequest, format_reply

log = logging.getLogger("smtpdcheck.policyd")


def core_settings(config: Config) -> CoreSettings:
    """The daemon's options as the core takes them."""
    return CoreSettings(
        nameservers=config.nameservers,
        dns_timeout=config.dns_timeout,
        probe_timeout=config.timeout,
        greeting_timeout=config.greeting_timeout,
        # A server's check is its lookup plus its probe.
        check_timeout=config.timeout + config.dns_timeout,
        smtp_port=config.smtp_port,
        up_ttl=config.cache_up_ttl,
        down_ttl=config.cache_down_ttl,
        dns_max_ttl=config.dns_max_ttl,
        dns_negative_ttl=config.dns_negative_ttl,
        dns_failure_ttl=config.dns_failure_ttl,
        cache_size=config.cache_size,
        max_probes=config.max_probes,
        max_dns_queries=config.max_dns_queries,
        refresh_window=config.refresh_window,
        dns_stale_max=config.dns_stale_max,
        stop=config.stop,
    )


@dataclass(frozen=True, slots=True)
class Answer:
    """What one request came to: the reply bytes and what the log line says."""

    reply: bytes
    decision: Decision
    checked: bool = True  # False for requests that are not RCPT (not logged)
    # The log line's part that depends only on the answer, built once for a memoised one.
    line: str = field(default="", compare=False, repr=False)
    # The request counter's labels (action, kind), read per request without enum lookups.
    counted: tuple[str, str] = field(init=False, compare=False, repr=False)
    # A DEFER (or WARN) that rests on a greeting of known age, for the evidence-age histogram.
    rests_on_a_greeting: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        decision = self.decision
        verdict = decision.verdict
        object.__setattr__(self, "counted", _counted(verdict.action, verdict.kind))
        object.__setattr__(
            self, "rests_on_a_greeting", verdict.kind is Kind.PRIMARY_LIVE and not math.isnan(decision.confirmed_at)
        )


@functools.cache
def _counted(action: Action, kind: Kind) -> tuple[str, str]:
    """One shared label pair per action and kind: memoised answers do not each hold one."""
    return (action.value, kind.value)


_NOT_RCPT = Answer(DUNNO_REPLY, Policy.undecided(Kind.NOT_RCPT, "not an RCPT request"), checked=False)


def _middle(decision: Decision) -> str:
    """The part of the decision line that depends only on the decision: built from the full one, then memoised."""
    verdict = decision.verdict
    mx = ",".join(f"{pref}:{host}" for pref, host in decision.mx.hosts) if decision.mx is not None else ""
    up = ""
    result = decision.result
    if result is not None and result.winner is not None:
        up = next((p.address for r in result.reports if r.server is result.winner for p in r.probes if p.available), "")
    return decisionlog.decision_middle(
        decision.domain, verdict.action.value, verdict.reason, decision.cache.value, mx=mx, up=up
    )


def _memo_key(recipient: str, server_address: str) -> tuple[str, str] | None:
    """The memo key of an RCPT, or None when its answer is never memoised.

    An answer depends only on the recipient from its last ``@`` on and on
    the server address.  The ``@`` is part of the key: a recipient without
    one (``recipient=example.com``) has no domain to check and must not
    share the answer for ``user@example.com``; it takes the long way, which
    decides it as what it is.
    """
    at = recipient.rfind("@")
    if at < 0:
        return None
    return (recipient[at:], server_address)


@dataclass(frozen=True, slots=True)
class Explanation:
    text: str
    defers: bool
    failure: str | None = None  # why no real decision could be made (DNS, deadline, bug)


class Responder:
    """Answers requests with the core's policy; keeps the memo and the counters.

    The core (and its caches) outlives reloads: a reload that changes only
    policy options keeps them warm.
    """

    def __init__(
        self, config: Config, core: Core, metrics: Metrics | None = None, *, sink: decisionlog.LineSink | None = None
    ) -> None:
        self.core = core
        self.metrics = metrics or Metrics()
        # Where decision lines go (see policyd.logsetup); without one (tests,
        # embedding) they are plain logging records.
        self.sink = sink
        # Whole answers, keyed by the recipient from its last "@" on and the
        # server address (see _memo_key), valid until the first cached input
        # they were computed from expires or is due for its background
        # refresh, never longer (an answer that fetched anything is not
        # kept): the hot path then skips even the decision.
        self.answers: TTLCache[tuple[str, str], Answer] = TTLCache(config.cache_size)
        self.config = config
        self.policy = self._policy(config, core.stop)
        self._drained: trio.Event | None = None
        # Limits reached are state an administrator must see at --log-level warning, but at most once a minute.
        self.probe_limit_warning = ThrottledWarning(log)
        self.connection_limit_warning = ThrottledWarning(log)

    def _policy(self, config: Config, stop: StopSet) -> Policy:
        return Policy(
            self.core.lookups,
            self.core.checker,
            stop,
            deadline=config.deadline,
            failure_action=Action(config.failure_action),
            warn_only=config.mode == "warn",
        )

    def reconfigure(self, config: Config, stop: StopSet) -> None:
        """Apply a reloaded configuration; caches and connections stay."""
        self.config = config
        self.core.stop = stop
        self.policy = self._policy(config, stop)
        self.answers.clear()
        settings = core_settings(config)
        self.core.prober.reconfigure(
            timeout=settings.probe_timeout, greeting_timeout=config.greeting_timeout,
            up_ttl=settings.up_ttl, down_ttl=settings.down_ttl,
        )
        self.core.checker.port = settings.smtp_port
        self.core.checker.timeout = settings.check_timeout

    def _reply(self, decision: Decision) -> bytes:
        verdict = decision.verdict
        if verdict.action is Action.DUNNO:
            return DUNNO_REPLY
        if verdict.kind.failed:
            text = f"cannot check the primary MX of {decision.domain or 'this domain'} now; try again later"
        else:
            assert verdict.mx is not None
            text = self.config.defer_message(verdict.mx, decision.domain)
        return format_reply(verdict.action.value, text)

    def answer_now(self, request: PolicyRequest, now: float) -> Answer | None:
        """The answer if it needs no I/O at all (a memoised one), else None.

        Synchronous on purpose: the daemon's loop calls this first, so the
        common case costs no coroutine and no cancel scope.  ``now`` is the
        caller's :func:`trio.current_time`, which it needs anyway: the clock
        is read once less per request.
        """
        try:
            fields = request.rcpt_fields()
            if fields is None:
                return None
            key = _memo_key(fields[0], fields[1])
            if key is None:
                return None
            answer = self.answers.get(key, now)
        except Exception:  # never let the shortcut fail a request: take the long way
            log.exception("internal error in the cached path")
            return None
        if answer is not None:
            end = trio.current_time()
            self._finish(request, answer, end - now, end, fields)
        return answer

    async def answer(self, request: PolicyRequest) -> Answer:
        """Decide one request; never raises except for cancellation from outside."""
        start = trio.current_time()
        metrics = self.metrics
        metrics.requests_in_flight += 1
        try:
            outcome = await self._decide(request)
        except Exception as exc:  # a bug must cost one failure action, not the connection
            log.exception("internal error deciding a request")
            decision = self.policy.failure(Kind.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
            outcome = Answer(self._reply(decision), decision)
        finally:
            metrics.requests_in_flight -= 1
            if not metrics.requests_in_flight and self._drained is not None:
                self._drained.set()
        end = trio.current_time()
        if outcome.decision.result is not None:
            self._note_probe_limit(outcome.decision.result, end)
        self._finish(request, outcome, end - start, end)
        return outcome

    def _note_probe_limit(self, result: CheckResult, now: float) -> None:
        """Warn when a probe was not made for want of a slot: --max-probes is too low for the load."""
        for report in result.reports:
            for probe in report.probes:
                if probe.outcome is Outcome.OVERLOADED:
                    self.probe_limit_warning.warn(
                        now, "probe limit reached (--max-probes %d): %s [%s] not probed, counted as down",
                        self.config.max_probes, report.server.name, probe.address,
                    )
                    return

    async def wait_drained(self) -> None:
        """Return once no request is being decided (shutdown bounds it with its grace)."""
        while self.metrics.requests_in_flight:
            self._drained = trio.Event()
            await self._drained.wait()

    async def _decide(self, request: PolicyRequest) -> Answer:
        if not request.is_smtpd_rcpt:
            return _NOT_RCPT
        # The memo was already consulted by answer_now(); looking again here
        # would only count a second miss.
        decision = await self.policy.decide_recipient(request.recipient, request.server_address)
        answer = Answer(self._reply(decision), decision)
        ttl = decision.valid_until - trio.current_time()
        if ttl > 0:
            # Stored without what it was computed from: a memo must stay small.
            key = _memo_key(request.recipient, request.server_address)
            if key is not None:
                small = Decision(decision.verdict, decision.domain, decision.cache, decision.valid_until,
                                 decision.confirmed_at)
                self.answers.put(key, Answer(answer.reply, small, line=_middle(decision)), ttl)
        return answer

    def _finish(
        self, request: PolicyRequest, outcome: Answer, elapsed: float, now: float,
        fields: tuple[str, str, str] | None = None,
    ) -> None:
        """Count and log one answered request, answered at ``now`` (``fields``: its
        :meth:`~PolicyRequest.rcpt_fields`, if read)."""
        self.metrics.observe(outcome.counted, elapsed)
        age = math.nan
        if outcome.rests_on_a_greeting:
            age = now - outcome.decision.confirmed_at
            self.metrics.observe_defer_evidence(age)
        if not outcome.checked:
            return
        sink = self.sink
        if sink is None:  # logging not set up (embedded, tests): a plain record
            if log.isEnabledFor(logging.INFO):
                middle = outcome.line or _middle(outcome.decision)
                log.info("%s", decisionlog.decision_line(request.queue_id, request.recipient, middle, elapsed, age))
        elif sink.decisions:
            middle = outcome.line or _middle(outcome.decision)
            if fields is None:
                sink.decision(request.queue_id, request.recipient, middle, elapsed, age)
            else:
                sink.decision(fields[2], fields[0], middle, elapsed, age)

    async def explain(self, recipient: str, server_address: str = "") -> Explanation:
        """Decide one RCPT as the server would, and say how."""
        decision = await self.policy.decide_recipient(recipient, server_address)
        lines = decision.explain()
        lines.append(self._reply(decision).decode("ascii").rstrip("\n"))
        failed = decision.verdict.reason if decision.verdict.kind.failed else None
        return Explanation("\n".join(lines) + "\n", decision.verdict.defers and failed is None, failed)
