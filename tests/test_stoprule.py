"""The ``--stop`` rule of smtpdcheck(1) as a table of cases."""

from __future__ import annotations

import ipaddress

import pytest

from smtpdcheck.servers import parse_servers
from smtpdcheck.stoprule import StopSet, eligibility

S2 = StopSet.build(["s2.domain.com"])


@pytest.mark.parametrize(
    ("words", "stop", "expected"),
    [
        # The man page's first example: s2 is this host and shares prio 10
        # with s1, so nothing is checked and the command always exits 0.
        (["10:s1.domain.com", "10:s2.domain.com", "20:s3.domain.com"], S2, []),
        # The recovered second example: s1 is more preferred, so it is checked.
        (["10:s1.domain.com", "20:s2.domain.com", "20:s3.domain.com"], S2, ["s1.domain.com"]),
        # No match: every server is checked.
        (["10:a", "20:b", "30:c"], S2, ["a", "b", "c"]),
        (["10:a", "20:b"], StopSet(), ["a", "b"]),
        # The first match stops; later entries are never checked.
        (["a", "s2.domain.com", "c"], S2, ["a"]),
        (["s2.domain.com", "a"], S2, []),
        # Same prio is excluded wherever it stands, even after the match.
        (["10:a", "20:b", "20:s2.domain.com", "10:c", "20:d"], S2, ["a"]),
        # Only the FIRST match's prio counts.
        (["10:a", "10:s2.domain.com", "20:s2.domain.com", "20:b"], S2, []),
        (["20:x", "10:a", "30:s2.domain.com", "30:b"], S2, ["x", "a"]),
        # A match without prio excludes only itself and what follows.
        (["10:a", "s2.domain.com", "10:c"], S2, ["10:a"]),
        # Names compare case-insensitively, trailing dot ignored.
        (["10:a", "10:S2.Domain.COM."], S2, []),
        # Literal addresses match --stop addresses.
        (["10:a", "20:192.0.2.25"], StopSet.build(addresses=[ipaddress.ip_address("192.0.2.25")]), ["a"]),
        (["10:a", "10:[2001:db8::25]"], StopSet.build(addresses=[ipaddress.ip_address("2001:db8::25")]), []),
    ],
)
def test_stop_rule_by_name(words: list[str], stop: StopSet, expected: list[str]) -> None:
    servers = parse_servers(words)
    matches = [stop.matches_name(s) for s in servers]
    chosen = [s for s, ok in zip(servers, eligibility(servers, matches)) if ok]
    wanted = parse_servers(expected)
    assert [s.host for s in chosen] == [s.host for s in wanted]


def test_match_by_resolved_address() -> None:
    stop = StopSet.build(addresses=[ipaddress.ip_address("192.0.2.25")])
    servers = parse_servers(["10:mx1", "20:backup", "30:mx3"])
    resolved = {
        "mx1": [ipaddress.ip_address("198.51.100.1")],
        "backup": [ipaddress.ip_address("2001:db8::9"), ipaddress.ip_address("192.0.2.25")],
        "mx3": [],
    }
    matches = [stop.matches(s, resolved[s.host]) for s in servers]
    assert matches == [False, True, False]
    assert eligibility(servers, matches) == [True, False, False]


@pytest.mark.parametrize(
    ("words", "matches", "expected"),
    [
        # Nothing known: a server waits only on lookups that could exclude it.
        (["10:a", "20:b"], [None, None], [None, None]),
        (["10:a", "20:b"], [False, None], [True, None]),
        (["10:a", "10:b", "20:c"], [False, None, None], [None, None, None]),
        (["10:a", "10:b", "20:c"], [False, False, None], [True, True, None]),
        # A known first match decides everything at once.
        (["10:a", "20:b", "30:c"], [False, True, None], [True, False, False]),
        (["10:a", "20:b", "10:c"], [None, None, None], [None, None, None]),
        # A later known match does not decide while an earlier lookup runs.
        (["10:a", "20:b", "30:c"], [False, None, True], [True, None, None]),
        (["10:a", "20:b", "30:c", "40:d"], [None, True, None, None], [None, None, False, False]),
        (["10:a", "20:b", "10:c"], [False, None, True], [None, None, None]),
        # No prio: only order matters.
        (["a", "b", "c"], [False, None, None], [True, None, None]),
        (["a", "b", "c"], [False, False, False], [True, True, True]),
    ],
)
def test_eligibility_with_pending_lookups(
    words: list[str], matches: list[bool | None], expected: list[bool | None]
) -> None:
    assert eligibility(parse_servers(words), matches) == expected


def test_partial_knowledge_never_contradicts_final() -> None:
    """Whatever is decided early stays decided once every lookup is in."""
    import itertools

    words = ["10:a", "10:b", "20:c", "20:d", "30:e"]
    servers = parse_servers(words)
    for final in itertools.product([False, True], repeat=len(words)):
        full = eligibility(servers, list(final))
        for known in itertools.product([False, True], repeat=len(words)):
            partial = [f if k else None for f, k in zip(final, known)]
            for early, late in zip(eligibility(servers, partial), full):
                assert early is None or early == late


def test_ipv4_mapped_server_address_matches_the_ipv4_stop() -> None:
    stop = StopSet().with_address("::ffff:192.0.2.25")
    servers = parse_servers(["10:mx1", "20:192.0.2.25"])
    assert [stop.matches_name(s) for s in servers] == [False, True]


def test_text_that_is_not_an_address_leaves_the_stop_set_as_it_is() -> None:
    stop = StopSet.build(["backup.example"])
    assert stop.with_address("") is stop and stop.with_address("backup.example") is stop
    added = stop.with_address("192.0.2.25")
    assert added.addresses == frozenset({ipaddress.ip_address("192.0.2.25")})
    assert added.with_address("[192.0.2.25]") is added  # already there
