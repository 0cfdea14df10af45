"""Shadow mode (``--mode warn``) never defers, whatever happens to a request.

Warn mode exists so that the policy can be tried on live mail without
risk: Postfix logs a ``WARN`` and accepts.  A live primary answers ``WARN``
with the text a ``DEFER_IF_PERMIT`` would carry; so does the failure action
``DEFER_IF_PERMIT`` (DNS failure, the deadline, a bug on the decision path
or in the responder).  Every mode, failure action and outcome is tried, on
virtual time, through the responder that builds the reply bytes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import trio
import trio.testing

from policyd.config import Config
from policyd.request import PolicyRequest
from policyd.responder import Responder
from smtpdcheck.cache import Source
from smtpdcheck.compat import STRICT_EXCEPTION_GROUPS
from smtpdcheck.core import CoreSettings, build_core
from smtpdcheck.resolver import MXKind, MXLookup
from testbeds.postfix_request import POSTFIX_37_RCPT_ATTRS
from testbeds.virtual import SILENT, Peer, VirtualDNS, VirtualNet

REQUEST = PolicyRequest({**POSTFIX_37_RCPT_ATTRS, "recipient": "user@d.test", "server_address": "192.0.2.25"})


class _BrokenDNS(VirtualDNS):
    async def mx(self, domain: str) -> tuple[MXLookup, Source]:
        raise RuntimeError("bug on the decision path")


def _world(dns: VirtualDNS) -> None:
    dns.set_mx("d.test", [(10, "mx1.d.test"), (20, "backup.d.test")])
    dns.set_host("mx1.d.test", ["127.0.0.2"])
    dns.set_host("backup.d.test", ["192.0.2.25"])


def _live(dns: VirtualDNS) -> dict[str, Peer]:
    _world(dns)
    return {"127.0.0.2": Peer(greet_after=0.1)}


def _down(dns: VirtualDNS) -> dict[str, Peer]:
    _world(dns)
    return {"127.0.0.2": Peer(code=421)}


def _dns_failure(dns: VirtualDNS) -> dict[str, Peer]:
    dns.mx_answers["d.test"] = (0.0, MXLookup("d.test", MXKind.FAILURE, error="SERVFAIL", ttl=10))
    return {}


def _deadline(dns: VirtualDNS) -> dict[str, Peer]:
    _world(dns)
    return {"127.0.0.2": SILENT}  # the deadline (3 s) comes before the probe's timeout (5 s)


def _no_answer(dns: VirtualDNS) -> dict[str, Peer]:
    _world(dns)
    dns.mx_answers["d.test"] = (math.inf, dns.mx_answers["d.test"][1])
    return {}


#: Each outcome: how to make it, and the kind the decision must be of (so a
#: case that silently turned into another proves nothing).
OUTCOMES: dict[str, tuple[Callable[[VirtualDNS], dict[str, Peer]], str]] = {
    "primary live": (_live, "primary live"),
    "all down": (_down, "all down"),
    "dns failure": (_dns_failure, "dns failure"),
    "deadline, probing": (_deadline, "deadline"),
    "deadline, dns": (_no_answer, "deadline"),
    "internal error, policy": (_world, "internal error"),  # with _BrokenDNS
    "internal error, responder": (_live, "internal error"),  # with a broken decide_recipient
}


def _answer(mode: str, failure_action: str, outcome: str) -> tuple[bytes, str]:
    """The reply bytes and the decision's kind for one case, on a fresh virtual world."""
    make, _ = OUTCOMES[outcome]
    result: list[tuple[bytes, str]] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            dns: VirtualDNS = _BrokenDNS() if outcome == "internal error, policy" else VirtualDNS()
            net = VirtualNet(nursery, make(dns) or {})
            core = build_core(nursery, CoreSettings(probe_timeout=5.0, check_timeout=7.0), connect=net.connect, lookups=dns)
            config = Config(mode=mode, failure_action=failure_action, deadline=3.0)  # type: ignore[arg-type]
            responder = Responder(config, core)
            if outcome == "internal error, responder":
                async def broken(recipient: str, server_address: str = "") -> object:
                    raise RuntimeError("bug in the responder")
                responder.policy.decide_recipient = broken  # type: ignore[method-assign,assignment]
            answer = await responder.answer(REQUEST)
            result.append((answer.reply, answer.decision.verdict.kind.value))
            # The memo answers the next one without deciding: it must agree.
            again = responder.answer_now(REQUEST, trio.current_time())
            if again is not None:
                assert again.reply == answer.reply
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0), strict_exception_groups=STRICT_EXCEPTION_GROUPS)
    return result[0]


CASES = list(itertools.product(("DUNNO", "DEFER_IF_PERMIT"), OUTCOMES))


@pytest.mark.parametrize(("failure_action", "outcome"), CASES)
def test_warn_mode_never_defers_and_warns_with_the_text_a_defer_would_carry(failure_action: str, outcome: str) -> None:
    """Property over failure actions x outcomes: in warn mode no answer starts
    with DEFER; it is the enforce-mode answer with WARN for DEFER_IF_PERMIT."""
    enforced, kind = _answer("enforce", failure_action, outcome)
    shadowed, shadow_kind = _answer("warn", failure_action, outcome)
    assert kind == shadow_kind == OUTCOMES[outcome][1]
    assert not shadowed.startswith(b"action=DEFER"), shadowed
    assert shadowed == enforced.replace(b"action=DEFER_IF_PERMIT ", b"action=WARN ", 1)


def test_the_cases_cover_every_way_to_defer() -> None:
    """Enforce mode does defer in the cases above that can (else the property proves little)."""
    deferring = {outcome for outcome in OUTCOMES if _answer("enforce", "DEFER_IF_PERMIT", outcome)[0].startswith(b"action=DEFER")}
    assert deferring == set(OUTCOMES) - {"all down"}
