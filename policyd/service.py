"""From one policy request to one reply: the daemon's decision path.

Everything that can go wrong here -- DNS, probes, the deadline, a bug --
turns into the configured failure action (fail-open ``DUNNO`` by default)
and a log line.  The caller always gets bytes to send, within the deadline.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

import trio

from smtpdcheck.check import Checker, CheckResult
from smtpdcheck.decision import (
    Action,
    DomainError,
    Verdict,
    mx_servers,
    recipient_domain,
    verdict_for_check,
    verdict_for_mx,
)
from smtpdcheck.cache import TTLCache
from smtpdcheck.explain import explain_lines
from smtpdcheck.probe import Prober
from smtpdcheck.resolver import MXLookup, Resolver
from smtpdcheck.stoprule import StopSet

from . import decisionlog
from .config import Config
from .metrics import Metrics
from .protocol import DUNNO_REPLY, PolicyRequest, format_reply

log = logging.getLogger("smtpdcheck.policyd")


@dataclass(frozen=True, slots=True)
class Answer:
    """What one request came to: the reply bytes and what the log line says."""

    reply: bytes
    action: str
    kind: str  # a short fixed label for metrics: "primary live", "dns failure", ...
    reason: str  # the log's free text
    domain: str = ""
    cached: bool = False
    checked: bool = True  # False for requests that are not RCPT (not logged)
    # What the decision was made from, for --check explanations.
    mx: MXLookup | None = field(default=None, compare=False, repr=False)
    result: CheckResult | None = field(default=None, compare=False, repr=False)
    verdict: Verdict | None = field(default=None, compare=False, repr=False)
    # The log line's part that depends only on the answer, built once for a memoised one.
    line: str = field(default="", compare=False, repr=False)


def _memo_key(request: PolicyRequest) -> tuple[str, str]:
    """Answers depend only on the recipient's domain part and the server address."""
    return (request.recipient.rpartition("@")[2], request.server_address)


#: Answer kinds that mean "could not decide", as opposed to a decision.
FAILURE_KINDS = frozenset({"dns failure", "deadline", "internal error"})


@dataclass(frozen=True, slots=True)
class Explanation:
    text: str
    defers: bool
    failure: str | None = None  # why no real decision could be made (DNS, deadline, bug)


class PolicyService:
    """The decision path, with the shared core (resolver, prober, checker).

    The core's caches live as long as this object: a reload that changes
    only policy options keeps them warm.
    """

    def __init__(self, config: Config, stop: StopSet, nursery: trio.Nursery, metrics: Metrics | None = None) -> None:
        self.nursery = nursery
        self.metrics = metrics or Metrics()
        self.resolver = Resolver(
            nursery,
            nameservers=config.nameservers or None,
            timeout=config.dns_timeout,
            max_ttl=config.dns_max_ttl,
            negative_ttl=config.dns_negative_ttl,
            failure_ttl=config.dns_failure_ttl,
            max_entries=config.cache_size,
            max_concurrent=config.max_dns_queries,
        )
        self.prober = Prober(
            nursery,
            timeout=config.timeout,
            up_ttl=config.cache_up_ttl,
            down_ttl=config.cache_down_ttl,
            max_entries=config.cache_size,
            max_concurrent=config.max_probes,
        )
        self.checker = Checker(self.resolver, self.prober, port=config.smtp_port, timeout=config.timeout + config.dns_timeout)
        self.config = config
        self.stop = stop
        self._stop_by_server: dict[str, StopSet] = {}
        # Whole answers, keyed by the recipient's raw domain part and the
        # server address, valid exactly as long as every cached input they
        # were computed from: the hot path then skips even the decision.
        self.answers: TTLCache[tuple[str, str], Answer] = TTLCache(config.cache_size)

    def reconfigure(self, config: Config, stop: StopSet) -> None:
        """Apply a reloaded configuration; caches and connections stay."""
        self.config = config
        self.stop = stop
        self._stop_by_server.clear()
        self.answers.clear()
        self.prober.timeout = config.timeout
        self.prober.up_ttl = config.cache_up_ttl
        self.prober.down_ttl = config.cache_down_ttl
        self.checker.port = config.smtp_port
        self.checker.timeout = config.timeout + config.dns_timeout

    def _stop_for(self, server_address: str) -> StopSet:
        """This host for one request: --stop plus the address Postfix was reached on.

        Memoised because a Postfix has only a handful of listening addresses.
        """
        stop = self._stop_by_server.get(server_address)
        if stop is None:
            stop = self.stop.with_address(server_address)
            if len(self._stop_by_server) < 1024:
                self._stop_by_server[server_address] = stop
        return stop

    def _reply(self, verdict: Verdict, domain: str) -> bytes:
        if verdict.action is Action.DUNNO:
            return DUNNO_REPLY
        assert verdict.mx is not None
        return format_reply(verdict.action.value, self.config.defer_message(verdict.mx, domain))

    def _failure(self, kind: str, reason: str, domain: str) -> Answer:
        action = self.config.failure_action
        if action == "DUNNO":
            return Answer(DUNNO_REPLY, "DUNNO", kind, reason, domain)
        text = f"cannot check the primary MX of {domain or 'this domain'} now; try again later"
        return Answer(format_reply(action, text), action, kind, reason, domain)

    def answer_now(self, request: PolicyRequest, now: float) -> Answer | None:
        """The answer if it needs no I/O at all (a memoised one), else None.

        Synchronous on purpose: the daemon's loop calls this first, so the
        common case costs no coroutine and no cancel scope.  ``now`` is the
        caller's :func:`trio.current_time`, which it needs anyway: the clock
        is read once less per request.
        """
        try:
            answer = self._answer_from_memo(request, now)
        except Exception:  # never let the shortcut fail a request: take the long way
            log.exception("internal error in the cached path")
            return None
        if answer is not None:
            self._finish(request, answer, trio.current_time() - now)
        return answer

    async def answer(self, request: PolicyRequest) -> Answer:
        """Decide one request; never raises except for cancellation from outside."""
        start = trio.current_time()
        try:
            outcome = await self._decide(request)
        except Exception as exc:  # a bug must cost one DUNNO, not the connection
            log.exception("internal error deciding a request")
            outcome = self._failure("internal error", f"internal error: {type(exc).__name__}", "")
        self._finish(request, outcome, trio.current_time() - start)
        return outcome

    def _finish(self, request: PolicyRequest, outcome: Answer, elapsed: float) -> None:
        """Count and log one answered request."""
        self.metrics.observe_request(outcome.action, outcome.kind, elapsed)
        if not outcome.checked:
            return
        sink = decisionlog.current()
        if sink is None:  # logging not set up (embedded, tests): a plain record
            if log.isEnabledFor(logging.INFO):
                middle = decisionlog.decision_middle(outcome.domain, outcome.action, outcome.reason,
                                                     "hit" if outcome.cached else "miss")
                log.info("%s", decisionlog.decision_line(request.queue_id, request.recipient, middle, elapsed))
        elif sink.decisions:
            middle = outcome.line or decisionlog.decision_middle(
                outcome.domain, outcome.action, outcome.reason, "hit" if outcome.cached else "miss"
            )
            sink.decision(request.queue_id, request.recipient, middle, elapsed)

    async def _decide(self, request: PolicyRequest) -> Answer:
        if not request.is_smtpd_rcpt:
            return Answer(DUNNO_REPLY, "DUNNO", "not rcpt", f"state {request.protocol_state or '?'}", checked=False)
        # The memo was already consulted by answer_now(); looking again here
        # would only count a second miss.
        key = _memo_key(request)
        try:
            domain = recipient_domain(request.recipient)
        except DomainError as exc:
            return Answer(DUNNO_REPLY, "DUNNO", "bad domain", str(exc))
        if domain is None:
            return Answer(DUNNO_REPLY, "DUNNO", "no domain", "no recipient domain")

        fast = self._decide_from_cache(request, domain)
        if fast is not None:
            answer, valid_until = fast
            # Stored without what it was computed from: a memo must stay small.
            line = decisionlog.decision_middle(
                answer.domain, answer.action, answer.reason, "hit" if answer.cached else "miss"
            )
            self.answers.put(
                key, replace(answer, mx=None, result=None, verdict=None, line=line), valid_until - trio.current_time()
            )
            return answer
        deadline = self.config.deadline
        with trio.move_on_after(deadline if deadline > 0 else math.inf):
            mx, mx_cached = await self.resolver.mx(domain)
            verdict = verdict_for_mx(mx)
            result = None
            if verdict is not None and verdict.kind == "dns failure":
                failed = self._failure(verdict.kind, verdict.reason, domain)
                return replace(failed, mx=mx, verdict=verdict)
            if verdict is None:
                result = await self.checker.check(mx_servers(mx), self._stop_for(request.server_address))
                verdict = verdict_for_check(result, warn_only=self.config.mode == "warn")
                mx_cached = mx_cached and result.from_cache
            reply = self._reply(verdict, domain)
            return Answer(
                reply, verdict.action.value, verdict.kind, verdict.reason, domain, mx_cached,
                mx=mx, result=result, verdict=verdict,
            )
        return self._failure("deadline", f"deadline of {deadline:g}s exceeded", domain)

    def _answer_from_memo(self, request: PolicyRequest, now: float) -> Answer | None:
        if not request.is_smtpd_rcpt:
            return None
        return self.answers.get(_memo_key(request), now)

    def _decide_from_cache(self, request: PolicyRequest, domain: str) -> tuple[Answer, float] | None:
        """The answer when everything it needs is cached: no task, no await.

        Same functions as the full path, so the same answer; None sends the
        request down the full path (which also counts the cache misses).
        Also returns when the first of the cached inputs expires.
        """
        mx_cache = self.resolver.mx_flights.cache
        mx = mx_cache.peek(domain)
        if mx is None:
            return None
        valid_until = mx_cache.expires(domain)
        verdict = verdict_for_mx(mx)
        result = None
        if verdict is None:
            result = self.checker.check_cached(mx_servers(mx), self._stop_for(request.server_address))
            if result is None:
                return None
            valid_until = min(valid_until, result.valid_until)
            verdict = verdict_for_check(result, warn_only=self.config.mode == "warn")
        elif verdict.kind == "dns failure":
            return None
        mx_cache.count_hits(1)
        reply = self._reply(verdict, domain)
        answer = Answer(reply, verdict.action.value, verdict.kind, verdict.reason, domain, True, mx=mx, result=result, verdict=verdict)
        return answer, valid_until

    async def explain(self, recipient: str, server_address: str = "") -> Explanation:
        """Decide one RCPT exactly as the server would, and say how."""
        request = PolicyRequest(
            {
                "request": "smtpd_access_policy",
                "protocol_state": "RCPT",
                "recipient": recipient,
                "server_address": server_address,
            }
        )
        outcome = await self.answer(request)
        lines = []
        if outcome.mx is not None and outcome.verdict is not None:
            lines = explain_lines(outcome.mx, outcome.result, outcome.verdict, mx_cached=outcome.cached)
        else:
            lines = [f"verdict: {outcome.action} ({outcome.reason})"]
        lines.append(outcome.reply.decode("ascii").rstrip("\n"))
        failed = outcome.reason if outcome.kind in FAILURE_KINDS else None
        return Explanation("\n".join(lines) + "\n", outcome.action != "DUNNO" and failed is None, failed)
