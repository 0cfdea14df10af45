"""The policy decision as a table: MX lookups, this host's place, probe outcomes."""

from __future__ import annotations

import ipaddress
import math

import pytest
import trio

from smtpdcheck.core import CoreSettings, build_core
from smtpdcheck.cache import Source
from smtpdcheck.policy import (
    MAX_STOP_SETS,
    Action,
    Cache,
    Decision,
    DomainError,
    Kind,
    Policy,
    Verdict,
    mx_servers,
    recipient_domain,
    verdict_for_check,
    verdict_for_mx,
)
from smtpdcheck.check import CheckResult, ServerReport
from smtpdcheck.resolver import MXKind, MXLookup
from smtpdcheck.stoprule import StopSet, eligibility
from testbeds.virtual import SILENT, Peer, VirtualDNS, VirtualNet


@pytest.mark.parametrize(
    ("recipient", "domain"),
    [
        ("user@example.com", "example.com"),
        ("User@Example.COM.", "example.com"),
        ("john doe@example.com", "example.com"),
        ('"a@b"@example.org', "example.org"),
        ("user@bücher.example", "xn--bcher-kva.example"),
        ("user@BÜCHER.example", "xn--bcher-kva.example"),
        ("", None),
        ("postmaster", None),
        ("user@", None),
        ("user@.", None),
        ("user@[192.0.2.1]", None),
        ("user@[IPv6:2001:db8::1]", None),
    ],
)
def test_recipient_domain(recipient: str, domain: str | None) -> None:
    assert recipient_domain(recipient) == domain


@pytest.mark.parametrize(
    "recipient",
    [
        "user@exa mple.com",
        "user@example.com\r\nX",
        "user@exa=mple.com",
        "user@\udcfcexample.com",  # a raw non-UTF-8 byte kept by surrogateescape
        "user@" + "a" * 64 + ".com",
        "user@ex\x00ample.com",
    ],
)
def test_recipient_domain_rejects(recipient: str) -> None:
    with pytest.raises(DomainError):
        recipient_domain(recipient)


@pytest.mark.parametrize(
    ("lookup", "kind"),
    [
        (MXLookup("a.example", MXKind.NXDOMAIN, error="NXDOMAIN"), "nxdomain"),
        (MXLookup("a.example", MXKind.NULL), "null mx"),
        (MXLookup("a.example", MXKind.FAILURE, error="SERVFAIL"), "dns failure"),
        (MXLookup("a.example", MXKind.FAILURE, error="timeout"), "dns failure"),
    ],
)
def test_mx_outcomes_that_decide_alone(lookup: MXLookup, kind: str) -> None:
    verdict = verdict_for_mx(lookup)
    assert verdict is not None
    assert verdict.action is Action.DUNNO
    assert verdict.kind.value == kind
    reasons = {"nxdomain": "domain does not exist", "null mx": "null MX", "dns failure": f"dns failure: {lookup.error}"}
    assert verdict.reason == reasons[kind]  # the decision line's reason


def test_dns_failure_is_never_no_records() -> None:
    verdict = verdict_for_mx(MXLookup("a.example", MXKind.FAILURE, error="SERVFAIL"))
    assert verdict is not None and "SERVFAIL" in verdict.reason
    assert verdict_for_mx(MXLookup("a.example", MXKind.IMPLICIT, hosts=((0, "a.example"),))) is None


def _result(mx: list[tuple[int, str]], this_host: set[str], up: set[str], timed_out: set[str] = frozenset()) -> CheckResult:
    """Build what the checker would report, using the real stop rule."""
    lookup = MXLookup("d.example", MXKind.LIST, hosts=tuple(mx))
    servers = mx_servers(lookup)
    stop = StopSet.build(this_host)
    matches = [stop.matches_name(s) for s in servers]
    allowed = {i for i, ok in enumerate(eligibility(servers, matches)) if ok}
    reports = []
    winner = None
    for i, server in enumerate(servers):
        report = ServerReport(server, is_stop=matches[i], eligible=i in allowed)
        if i in allowed:
            report.available = server.host in up
            report.timed_out = server.host in timed_out
            if report.available and winner is None:
                winner = server
        reports.append(report)
    return CheckResult(winner, reports, 0.0)


@pytest.mark.parametrize(
    ("mx", "this_host", "up", "action", "kind", "mx_named"),
    [
        # Backup at 20, primary at 10 up -> defer naming the primary.
        ([(10, "mx1"), (20, "backup")], {"backup"}, {"mx1"}, Action.DEFER_IF_PERMIT, "primary live", "mx1"),
        # Primary down -> accept.
        ([(10, "mx1"), (20, "backup")], {"backup"}, set(), Action.DUNNO, "all down", None),
        # Same preference as the backup: never more preferred.
        ([(10, "mx1"), (10, "backup")], {"backup"}, {"mx1"}, Action.DUNNO, "no better mx", None),
        # This host is the primary.
        ([(10, "backup"), (20, "mx2")], {"backup"}, {"mx2"}, Action.DUNNO, "no better mx", None),
        # Two primaries, the second up.
        ([(5, "a"), (10, "b"), (20, "backup")], {"backup"}, {"b"}, Action.DEFER_IF_PERMIT, "primary live", "b"),
        # Worse MXes than this host are never probed.
        ([(10, "mx1"), (20, "backup"), (30, "mx3")], {"backup"}, {"mx3"}, Action.DUNNO, "all down", None),
        # This host not listed: every MX is probed, as smtpdcheck does.
        ([(10, "mx1"), (20, "mx2")], {"backup"}, {"mx2"}, Action.DEFER_IF_PERMIT, "primary live", "mx2"),
        ([(10, "mx1"), (20, "mx2")], {"backup"}, set(), Action.DUNNO, "all down", None),
        # Implicit MX (no MX records): the domain itself at preference 0.
        ([(0, "d.example")], {"backup"}, {"d.example"}, Action.DEFER_IF_PERMIT, "primary live", "d.example"),
    ],
)
def test_decision_table(
    mx: list[tuple[int, str]], this_host: set[str], up: set[str], action: Action, kind: str, mx_named: str | None
) -> None:
    verdict = verdict_for_check(_result(mx, this_host, up))
    assert (verdict.action, verdict.kind.value, verdict.mx) == (action, kind, mx_named)


def test_warn_mode_uses_warn() -> None:
    verdict = verdict_for_check(_result([(10, "mx1"), (20, "b")], {"b"}, {"mx1"}), warn_only=True)
    assert verdict.action is Action.WARN and verdict.mx == "mx1"


def test_reason_counts_down_mxes_and_timeouts() -> None:
    result = _result([(10, "a"), (10, "c"), (20, "b")], {"b"}, set(), timed_out={"c"})
    verdict = verdict_for_check(result)
    assert verdict.reason == "all 2 more-preferred MXes down, 1 timed out"
    single = verdict_for_check(_result([(10, "a"), (20, "b")], {"b"}, set()))
    assert single.reason == "all 1 more-preferred MX down"


# -- undecided requests and failures, through Policy --------------------------


def _policy(nursery: trio.Nursery, failure_action: Action = Action.DUNNO) -> tuple[Policy, VirtualDNS]:
    """A Policy on virtual DNS and a virtual network (these tests never reach it)."""
    dns = VirtualDNS()
    core = build_core(nursery, CoreSettings(), connect=VirtualNet(nursery).connect, lookups=dns)
    return Policy(core.lookups, core.checker, StopSet(), failure_action=failure_action), dns


@pytest.mark.parametrize(
    ("recipient", "kind", "reason"),
    [
        ("", Kind.NO_DOMAIN, "no recipient domain"),
        ("postmaster", Kind.NO_DOMAIN, "no recipient domain"),
        ("user@[192.0.2.1]", Kind.NO_DOMAIN, "no recipient domain"),
        ("user@exa mple.com", Kind.BAD_DOMAIN, "not a valid domain name"),
        ("user@\udcfcexample.com", Kind.BAD_DOMAIN, "bad international domain: InvalidCodepoint"),
    ],
)
async def test_a_recipient_without_a_usable_domain_is_undecided_and_says_why(
    nursery: trio.Nursery, recipient: str, kind: Kind, reason: str
) -> None:
    """Kind and reason feed the decision line and the metrics; there is no domain to log."""
    policy, dns = _policy(nursery, failure_action=Action.DEFER_IF_PERMIT)
    decision = await policy.decide_recipient(recipient, "192.0.2.25")
    assert decision == Decision(Verdict(Action.DUNNO, kind, reason), "")
    assert decision.cache is Cache.MISS and decision.valid_until == -math.inf
    assert not kind.failed  # DUNNO whatever the failure action: not a failure
    assert not dns.queries


def test_undecided_is_dunno_with_what_it_is_given() -> None:
    decision = Policy.undecided(Kind.NOT_RCPT, "not an RCPT request", "d.example")
    assert decision == Decision(Verdict(Action.DUNNO, Kind.NOT_RCPT, "not an RCPT request"), "d.example")


@pytest.mark.parametrize("failure_action", [Action.DUNNO, Action.DEFER_IF_PERMIT])
async def test_a_cached_dns_failure_answers_the_failure_action_and_is_never_reused(
    nursery: trio.Nursery, failure_action: Action, autojump_clock: object
) -> None:
    """The cache-only path leaves a cached failure to the full path, which
    answers it from the cache with the configured failure action."""
    policy, dns = _policy(nursery, failure_action)
    dns.mx_cache.put("d.example", MXLookup("d.example", MXKind.FAILURE, error="SERVFAIL", ttl=10), 10)
    assert policy.decide_cached("d.example", StopSet()) is None
    decision = await policy.decide_recipient("u@d.example")
    assert decision.verdict == Verdict(failure_action, Kind.DNS_FAILURE, "dns failure: SERVFAIL")
    assert decision.domain == "d.example" and decision.valid_until == -math.inf
    assert not dns.queries  # answered from the cache


@pytest.mark.parametrize(
    ("lookup", "kind", "reason"),
    [
        (MXLookup("d.example", MXKind.NXDOMAIN, error="NXDOMAIN", ttl=10), Kind.NXDOMAIN, "domain does not exist"),
        (MXLookup("d.example", MXKind.NULL, ttl=10), Kind.NULL_MX, "null MX"),
    ],
)
async def test_a_cached_mx_answer_that_decides_alone_is_a_reusable_cache_hit(
    nursery: trio.Nursery, lookup: MXLookup, kind: Kind, reason: str, autojump_clock: object
) -> None:
    policy, dns = _policy(nursery, Action.DEFER_IF_PERMIT)
    dns.mx_cache.put("d.example", lookup, 10)
    decision = policy.decide_cached("d.example", StopSet())
    assert decision is not None
    assert decision.verdict == Verdict(Action.DUNNO, kind, reason)
    assert (decision.domain, decision.cache, decision.valid_until) == ("d.example", Cache.HIT, 10.0)
    assert dns.mx_cache.hits == 1


@pytest.mark.parametrize(
    ("is_stop", "reason"),
    [
        ([False, False], "primary mx1 live (this host is not an MX of the domain)"),
        ([False, None], "primary mx1 live"),  # a lookup not in yet: no claim
        ([False, True], "primary mx1 live"),
    ],
)
def test_a_live_primary_says_whether_this_host_is_listed_only_when_known(
    is_stop: list[bool | None], reason: str
) -> None:
    servers = mx_servers(MXLookup("d.example", MXKind.LIST, hosts=((10, "mx1"), (20, "mx2"))))
    reports = [ServerReport(s, is_stop=m, eligible=True) for s, m in zip(servers, is_stop)]
    reports[0].available = True
    verdict = verdict_for_check(CheckResult(servers[0], reports, 0.0))
    assert verdict == Verdict(Action.DEFER_IF_PERMIT, Kind.PRIMARY_LIVE, reason, "mx1")


def test_no_more_preferred_mx_reason() -> None:
    verdict = verdict_for_check(_result([(10, "backup"), (20, "mx2")], {"backup"}, {"mx2"}))
    assert verdict == Verdict(Action.DUNNO, Kind.NO_BETTER_MX, "no more-preferred MX")


# -- Policy on a virtual network: the full path, its defaults and its bookkeeping


def _world(nursery: trio.Nursery, peers: dict[str, Peer], **policy: object) -> tuple[Policy, VirtualDNS, VirtualNet]:
    """d.example: mx1 (127.0.0.2) and mx2 (127.0.0.3) more preferred than backup (192.0.2.25)."""
    dns = VirtualDNS()
    dns.set_mx("d.example", [(10, "mx1.d.example"), (10, "mx2.d.example"), (20, "backup.d.example")])
    dns.set_host("mx1.d.example", ["127.0.0.2"])
    dns.set_host("mx2.d.example", ["127.0.0.3"])
    dns.set_host("backup.d.example", ["192.0.2.25"])
    net = VirtualNet(nursery, peers)
    core = build_core(nursery, CoreSettings(probe_timeout=5.0, check_timeout=7.0, quit_grace=0.5),
                      connect=net.connect, lookups=dns)
    return Policy(core.lookups, core.checker, StopSet(), **policy), dns, net  # type: ignore[arg-type]


async def test_defaults_defer_concurrently_without_a_deadline(nursery: trio.Nursery, autojump_clock: object) -> None:
    """DEFER_IF_PERMIT (not WARN), all primaries probed at once, and no deadline
    unless one is given (0 is none too)."""
    for policy_args in ({}, {"deadline": 0}):
        policy, dns, _ = _world(nursery, {"127.0.0.2": SILENT, "127.0.0.3": Peer(greet_after=0.5)}, **policy_args)
        dns.mx_answers["d.example"] = (20.0, dns.mx_answers["d.example"][1])  # a slow nameserver
        start = trio.current_time()
        decision = await policy.decide_recipient("u@d.example", "192.0.2.25")
        assert trio.current_time() - start == pytest.approx(20.5)
        assert decision.verdict == Verdict(
            Action.DEFER_IF_PERMIT, Kind.PRIMARY_LIVE, "primary mx2.d.example live", "mx2.d.example"
        )
        assert decision.domain == "d.example" and decision.cache is Cache.MISS


async def test_warn_mode_answers_warn_on_the_full_path(nursery: trio.Nursery, autojump_clock: object) -> None:
    policy, _, _ = _world(nursery, {"127.0.0.2": Peer(greet_after=0.1)}, warn_only=True)
    decision = await policy.decide_recipient("u@d.example", "192.0.2.25")
    assert decision.verdict == Verdict(Action.WARN, Kind.PRIMARY_LIVE, "primary mx1.d.example live", "mx1.d.example")
    cached = policy.decide_cached("d.example", policy.stop_for("192.0.2.25"))
    assert cached is not None and cached.verdict == decision.verdict


async def test_sequential_probes_one_primary_after_another(nursery: trio.Nursery, autojump_clock: object) -> None:
    policy, _, _ = _world(nursery, {"127.0.0.2": SILENT, "127.0.0.3": Peer(greet_after=0.5)}, sequential=True)
    start = trio.current_time()
    decision = await policy.decide_recipient("u@d.example", "192.0.2.25")
    assert trio.current_time() - start == pytest.approx(5.0 + 0.5)  # the silent one's whole timeout first
    assert decision.verdict.mx == "mx2.d.example"


async def test_the_full_path_keeps_what_it_decided_from(nursery: trio.Nursery, autojump_clock: object) -> None:
    """The MX list and the check result go with the decision (``--check`` explains them)."""
    policy, dns, _ = _world(nursery, {"127.0.0.2": Peer(greet_after=0.1)})
    decision = await policy.decide("d.example", policy.stop_for("192.0.2.25"))
    assert decision.mx is not None and decision.mx.hosts[0] == (10, "mx1.d.example")
    assert decision.result is not None and decision.result.winner is not None
    assert decision.cache is Cache.MISS
    # Everything is cached now: the full path says so.
    again = await policy.decide("d.example", policy.stop_for("192.0.2.25"))
    assert again.cache is Cache.HIT and again.verdict == decision.verdict
    assert again.mx is not None and again.result is not None


async def test_a_dns_failure_on_the_full_path_keeps_its_lookup(nursery: trio.Nursery, autojump_clock: object) -> None:
    policy, dns, _ = _world(nursery, {}, failure_action=Action.DEFER_IF_PERMIT)
    failed = MXLookup("d.example", MXKind.FAILURE, error="timeout", ttl=10)
    dns.mx_answers["d.example"] = (0.0, failed)
    decision = await policy.decide("d.example", StopSet())
    assert decision.verdict == Verdict(Action.DEFER_IF_PERMIT, Kind.DNS_FAILURE, "dns failure: timeout")
    assert decision.domain == "d.example" and decision.mx is failed and decision.result is None
    assert decision.valid_until == -math.inf


@pytest.mark.parametrize("lookup", [
    MXLookup("d.example", MXKind.NXDOMAIN, error="NXDOMAIN", ttl=10),
    MXLookup("d.example", MXKind.NULL, ttl=10),
])
async def test_an_mx_answer_that_decides_alone_is_a_hit_on_the_full_path_when_cached(
    nursery: trio.Nursery, lookup: MXLookup, autojump_clock: object
) -> None:
    policy, dns, _ = _world(nursery, {})
    dns.mx_answers["d.example"] = (0.0, lookup)
    first = await policy.decide("d.example", StopSet())
    second = await policy.decide("d.example", StopSet())
    assert (first.cache, second.cache) == (Cache.MISS, Cache.HIT)
    assert first.mx is lookup and first.result is None and second.result is None


class _StaleDNS(VirtualDNS):
    """Cached answers say they are stale: expired, served while a refresh runs."""

    def cached_mx(self, domain: str) -> tuple[MXLookup, float, Source] | None:
        entry = super().cached_mx(domain)
        return None if entry is None else (entry[0], entry[1], Source.STALE)

    async def mx(self, domain: str) -> tuple[MXLookup, Source]:
        lookup, source = await super().mx(domain)
        return lookup, Source.STALE if source is Source.CACHE else source


async def test_a_stale_mx_list_makes_a_stale_decision(nursery: trio.Nursery, autojump_clock: object) -> None:
    dns = _StaleDNS()
    lookup = MXLookup("d.example", MXKind.NXDOMAIN, error="NXDOMAIN", ttl=10)
    dns.mx_cache.put("d.example", lookup, 10)
    core = build_core(nursery, CoreSettings(), connect=VirtualNet(nursery).connect, lookups=dns)
    policy = Policy(core.lookups, core.checker, StopSet())
    cached = policy.decide_cached("d.example", StopSet())
    assert cached is not None and cached.cache is Cache.STALE and cached.mx is lookup and cached.result is None
    full = await policy.decide("d.example", StopSet())
    assert full.cache is Cache.STALE


async def test_the_cache_only_path_keeps_what_it_decided_from(nursery: trio.Nursery, autojump_clock: object) -> None:
    policy, dns, _ = _world(nursery, {"127.0.0.2": Peer(greet_after=0.1)})
    stop = policy.stop_for("192.0.2.25")
    await policy.decide("d.example", stop)
    hits = dns.mx_cache.hits
    cached = policy.decide_cached("d.example", stop)
    assert cached is not None and cached.cache is Cache.HIT
    assert cached.mx is not None and cached.result is not None and cached.result.winner is not None
    assert dns.mx_cache.hits == hits + 1  # counted as one MX cache hit


async def test_a_bug_on_the_decision_path_answers_the_failure_action(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenDNS(VirtualDNS):
        async def mx(self, domain: str) -> tuple[MXLookup, Source]:
            raise RuntimeError("bug")

    dns = BrokenDNS()
    core = build_core(nursery, CoreSettings(), connect=VirtualNet(nursery).connect, lookups=dns)
    policy = Policy(core.lookups, core.checker, StopSet(), failure_action=Action.DEFER_IF_PERMIT)
    decision = await policy.decide("d.example", StopSet())
    assert decision == Decision(Verdict(Action.DEFER_IF_PERMIT, Kind.INTERNAL_ERROR, "internal error: RuntimeError"), "d.example")
    [record] = [r for r in caplog.records if r.name == "smtpdcheck.policy"]
    assert record.getMessage() == "internal error deciding d.example" and record.exc_info is not None


async def test_the_deadline_answers_the_failure_action_for_the_domain(nursery: trio.Nursery, autojump_clock: object) -> None:
    policy, dns, _ = _world(nursery, {}, deadline=3.0, failure_action=Action.DEFER_IF_PERMIT)
    dns.mx_answers["d.example"] = (math.inf, dns.mx_answers["d.example"][1])
    decision = await policy.decide("d.example", StopSet())
    assert decision == Decision(Verdict(Action.DEFER_IF_PERMIT, Kind.DEADLINE, "deadline of 3s exceeded"), "d.example")


def test_failure_without_a_domain_names_none() -> None:
    policy = Policy(VirtualDNS(), None, StopSet(), failure_action=Action.DEFER_IF_PERMIT)  # type: ignore[arg-type]
    assert policy.failure(Kind.INTERNAL_ERROR, "r") == Decision(Verdict(Action.DEFER_IF_PERMIT, Kind.INTERNAL_ERROR, "r"), "")


def test_stop_sets_per_server_address_are_memoised_up_to_a_bound() -> None:
    policy = Policy(VirtualDNS(), None, StopSet.build(["backup.d.example"]))  # type: ignore[arg-type]
    first = policy.stop_for("192.0.2.25")
    assert first == StopSet.build(["backup.d.example"], [ipaddress.ip_address("192.0.2.25")])
    assert policy.stop_for("192.0.2.25") is first
    for i in range(MAX_STOP_SETS - 1):
        policy.stop_for(str(ipaddress.ip_address("10.0.0.0") + i))
    past = "10.255.255.255"
    assert policy.stop_for(past) == policy.stop.with_address(past)
    assert policy.stop_for(past) is not policy.stop_for(past)  # beyond the bound: built each time
    assert policy.stop_for("192.0.2.25") is first


# -- the decision explained (--check) -----------------------------------------


async def test_a_decision_explains_itself_step_by_step(nursery: trio.Nursery, autojump_clock: object) -> None:
    dns = VirtualDNS()
    hosts = ((10, "mx1.d.example"), (10, "mx2.d.example"), (20, "backup.d.example"), (30, "mx3.d.example"))
    dns.mx_answers["d.example"] = (0.0, MXLookup("d.example", MXKind.LIST, hosts=hosts, ignored=("bad name",), ttl=300))
    dns.set_host("mx1.d.example", ["127.0.0.2", "::1"])
    dns.set_host("mx2.d.example", ["127.0.0.3"])
    dns.set_host("backup.d.example", ["192.0.2.25"])
    net = VirtualNet(nursery, {"127.0.0.2": Peer(greet_after=0.1, code=421), "::1": Peer(greet_after=0.25), "127.0.0.3": SILENT})
    core = build_core(nursery, CoreSettings(probe_timeout=5.0, check_timeout=7.0, quit_grace=0.5),
                      connect=net.connect, lookups=dns)
    policy = Policy(core.lookups, core.checker, StopSet())
    mx1 = ("     10 mx1.d.example    [127.0.0.2,::1] probed: UP: 127.0.0.2:25 declined (421 virtual.test ESMTP) 100.0 ms; "
           "[::1]:25 available (220 virtual.test ESMTP) 250.0 ms")
    rest = [
        "     10 mx2.d.example    [127.0.0.3] probed: down: not probed",
        "     20 backup.d.example [192.0.2.25] this host",
        "     30 mx3.d.example    [-] not checked (stop rule)",
    ]
    first = await policy.decide_recipient("u@d.example", "192.0.2.25")
    assert first.explain() == [
        "domain d.example: mx", "  ignored unusable MX target bad name", mx1, *rest,
        "checked in 250.0 ms", "verdict: DEFER_IF_PERMIT (primary mx1.d.example live)",
    ]
    again = await policy.decide_recipient("u@d.example", "192.0.2.25")
    assert again.explain() == [
        "domain d.example: mx [cached]", "  ignored unusable MX target bad name", mx1 + " [cached]", *rest,
        "checked in 0.0 ms", "verdict: DEFER_IF_PERMIT (primary mx1.d.example live)",
    ]


async def test_decisions_without_probes_explain_what_there_is(nursery: trio.Nursery, autojump_clock: object) -> None:
    policy, dns = _policy(nursery, Action.DEFER_IF_PERMIT)
    assert (await policy.decide_recipient("postmaster")).explain() == ["verdict: DUNNO (no recipient domain)"]
    dns.mx_answers["d.example"] = (0.0, MXLookup("d.example", MXKind.FAILURE, error="SERVFAIL", ttl=10))
    assert (await policy.decide_recipient("u@d.example")).explain() == [
        "domain d.example: dns failure (SERVFAIL)", "verdict: DEFER_IF_PERMIT (dns failure: SERVFAIL)",
    ]
