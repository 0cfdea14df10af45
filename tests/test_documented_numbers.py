"""Every number the documents state about a default or a limit is the constant's.

The README's prose is written by hand, so a default changed in
:mod:`smtpdcheck.defaults` (or a limit in its own module) would leave it
saying the old value.  Every document a user reads (README.md outside its
Performance section, both manual pages, the example configuration and the
``--help`` of both commands) is scanned for numbers stated the way defaults
and limits are stated ("10 s", "at most 3", "default 10", "4 KiB",
"twice"); each one must lie in a phrase of :data:`RULES`, where it must
equal the constant the phrase names, or of :data:`NOT_DEFAULTS`, the
explicit list of numbers that are something else (examples, Postfix's own
settings, RFCs, measurements).  A number in neither fails: a new sentence
that states a number must say where the number comes from.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import pytest

from policyd import cli as daemon_cli
from policyd.cli import SHUTDOWN_GRACE_S
from policyd.config import OPTIONS, Config, default_text
from policyd.decisionlog import BUFFER_LIMIT, SYNC_FLUSH_S
from policyd.metrics import EVIDENCE_AGE_BUCKETS_S
from policyd.protocol import MAX_ATTRIBUTES, MAX_LINE_BYTES, MAX_REQUEST_BYTES
from policyd.watchdog import MAX_TICK_S
from smtpdcheck import cli as check_cli
from smtpdcheck import defaults as D
from smtpdcheck.belief import CONFIRM_MARGIN_S, GREETING_FACTOR
from smtpdcheck.probe import GREETING_TIMEOUT_S, PROBE_REFRESH_FLOOR_S, QUIT_GRACE_S
from smtpdcheck.refresh import MIN_RETRY_AFTER_S, background_slots
from smtpdcheck.resolver import DNS_FETCHES_PER_USE, MAX_ADDRESSES_PER_HOST, MAX_MX_HOSTS, MIN_DNS_REFRESH_FLOOR_S

ROOT = Path(__file__).resolve().parent.parent
N = r"(\d[\d,]*(?:\.\d+)?)"

#: How the documents state a default or a limit; group 1 is the number.
CLAIMS: tuple[str, ...] = (
    rf"(?<![\w.:-]){N} ?(?:s|seconds?|ms|minutes?|KiB|MiB|MB|GB)\b",
    rf"\bat (?:most|least|the least|the earliest) {N}\b",
    rf"\bdefault:? {N}\b",
    rf"\b{N} (?:attributes|MX hosts|addresses per host|background fetches|such fetches|more|a minute|a day)\b",
    r"\b(twice|three)\b",
    r"\b((?:once a|every) second)\b",
    rf"\bport {N}\b",
)
WORDS = {"twice": 2.0, "three": 3.0, "every second": 1.0, "once a second": 1.0}


@dataclass(frozen=True)
class OneOf:
    """An expected number that may be any of several (the histogram's buckets)."""

    values: Collection[float]


Expected = float | str | OneOf


@dataclass(frozen=True)
class Rule:
    """A regular expression whose groups are numbers, and per group the value it must have."""

    pattern: str
    expected: tuple[Expected, ...]

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern)


def phrase(text: str) -> str:
    """A phrase with ``N`` for each number (an N next to a capital letter is a letter: DUNNO)."""
    return re.sub(r"(?<![A-Z])N(?![A-Z])", lambda _: N, text)


def rule(text: str, *expected: Expected) -> Rule:
    return Rule(phrase(text), expected)


UP_GRACE = D.UP_TTL_S + CONFIRM_MARGIN_S
#: Phrases that state a default or a limit, and the constant each number must equal.
RULES: tuple[Rule, ...] = (
    # the caches and the confirm grace
    rule(r"--cache-up-ttl, N s", D.UP_TTL_S),
    rule(r"--cache-down-ttl, N s", D.DOWN_TTL_S),
    rule(r"--cache-down-ttl \(N s\)", D.DOWN_TTL_S),
    rule(r"one probe per N s per address", D.UP_TTL_S),
    rule(r"(twice) the (?:address's )?last greeting time plus N s", GREETING_FACTOR, CONFIRM_MARGIN_S),
    rule(r"at most --greeting-timeout; N s for a primary that greets at once", CONFIRM_MARGIN_S),
    rule(r"\(N s with the defaults", UP_GRACE),
    rule(r"both \(the defaults\): up to N s", UP_GRACE),
    rule(r"--cache-up-ttl 120\) cuts only the part after expiry: up to N s", 120 + CONFIRM_MARGIN_S),
    rule(r"buckets at N, N, N and N s", *[OneOf(EVIDENCE_AGE_BUCKETS_S)] * 4),
    # budgets
    rule(r"--deadline, N s", D.DEADLINE_S),
    rule(r"deadline of Ns exceeded", D.DEADLINE_S),
    rule(r"the daemon's N s --deadline", D.DEADLINE_S),
    rule(r"for up to N s more", QUIT_GRACE_S),
    rule(r"within N s of the first line", QUIT_GRACE_S),
    rule(r"--cache-up-ttl \(N s\) while it is up", D.UP_TTL_S),
    rule(r"--greeting-timeout, N s, for the first line, and N s more for the last", GREETING_TIMEOUT_S, QUIT_GRACE_S),
    rule(r"up to N s after their greeting's first line", QUIT_GRACE_S),
    rule(r"A request waits for a probe at most --timeout \(N s\)", D.PROBE_TIMEOUT_S),
    rule(r"--greeting-timeout \(N s\)", GREETING_TIMEOUT_S),
    # keeping answers fresh, and what it costs
    rule(r"--refresh-window \(N s\)", D.REFRESH_WINDOW_S),
    rule(r"--refresh-window \(N s; N under --stdio\)", D.REFRESH_WINDOW_S, D.SPAWN_REFRESH_WINDOW_S),
    rule(r"to N s on these counts", D.REFRESH_WINDOW_S),
    rule(r"probed every N s around the clock", D.UP_TTL_S),
    rule(r"\| every N s / every burst \|", D.UP_TTL_S),
    rule(r"for N minutes after", D.REFRESH_WINDOW_S / 60),
    rule(r"--dns-stale-max \(N s\)", D.DNS_STALE_MAX_S),
    rule(r"--dns-timeout \(N s; N s at the least\)", D.DNS_TIMEOUT_S, MIN_DNS_REFRESH_FLOOR_S),
    rule(r"--dns-timeout \(N s at the least\)", MIN_DNS_REFRESH_FLOOR_S),
    rule(r"--dns-failure-ttl \(N s at the least\)", MIN_RETRY_AFTER_S),
    rule(r"--dns-failure-ttl \(at least (every second), never more often", MIN_RETRY_AFTER_S),
    rule(r"at most N (?:such|background) fetches", DNS_FETCHES_PER_USE),
    rule(r"costs at most N more MX queries \(and N more A and AAAA", DNS_FETCHES_PER_USE, DNS_FETCHES_PER_USE),
    rule(r"spread over about N s", DNS_FETCHES_PER_USE * max(D.DNS_TIMEOUT_S, MIN_DNS_REFRESH_FLOOR_S)),
    rule(r"costs at most (three) more lookups", DNS_FETCHES_PER_USE),
    rule(r"at most N per use for mx", DNS_FETCHES_PER_USE),
    rule(r"no two within N s", PROBE_REFRESH_FLOOR_S),
    rule(r"share one primary \| N s \|", PROBE_REFRESH_FLOOR_S),
    rule(r"half of them \(at least N\)", background_slots(1)),
    rule(r"of --max-probes \(at least N\)", background_slots(1)),
    # limits
    rule(r"[Aa]t most N MX hosts", MAX_MX_HOSTS),
    rule(r"N addresses per host", MAX_ADDRESSES_PER_HOST),
    rule(r"at most N probes", MAX_MX_HOSTS * MAX_ADDRESSES_PER_HOST),
    rule(r"over-long line \(N KiB\), an over-large request \(N KiB\), more than N attributes",
         MAX_LINE_BYTES >> 10, MAX_REQUEST_BYTES >> 10, MAX_ATTRIBUTES),
    rule(r"\(N KiB per line, N KiB and N attributes in all\)", MAX_LINE_BYTES >> 10, MAX_REQUEST_BYTES >> 10, MAX_ATTRIBUTES),
    rule(r"N MiB buffer", BUFFER_LIMIT >> 20),
    rule(r"waiting at most N s for a blocked target", SYNC_FLUSH_S),
    rule(r"up to N s, then close every connection", SHUTDOWN_GRACE_S),
    rule(r"--request-timeout, at most N s\)", MAX_TICK_S),
    rule(r"\(at most (once a second)\), so they may", MAX_TICK_S),
    # the smtpdcheck command: Mail Avenger's defaults
    rule(r"--timeout \(default N, 0 = none\)", D.MAIL_AVENGER_TIMEOUT_S),
    rule(r"own --timeout \(default N s per server", D.MAIL_AVENGER_TIMEOUT_S),
    rule(r"lookup, connect and greeting \(default N; 0 = no limit\)", D.MAIL_AVENGER_TIMEOUT_S),
    rule(r"SMTP port to probe \(default N\)", D.SMTP_PORT),
    rule(r"connect to port N of (?:every address|the addresses)", D.SMTP_PORT),
    rule(r"--socket-mode \(default N, never world-writable", f"{Config().socket_mode:04o}"),
    # the daemon's options, as --help and the manual page append their defaults
    rule(r"--socket-mode \(default N\)", f"{Config().socket_mode:04o}"),
    # (a default of its own under --stdio follows in parentheses, checked by test_config)
    *(Rule(rf"{re.escape(' '.join(o.help.split()))} \((?:[^()]*; )?default: {N}(?: \(\w+ with --stdio\))?\)", (default_text(o).split(" (")[0],)) for o in OPTIONS),
    *(Rule(rf"File key {o.name}, (?:allowed: [^;]*; )?default {N}(?: \(\w+ with --stdio\))?\.", (default_text(o).split(" (")[0],)) for o in OPTIONS),
)

#: Numbers stated the same way that are not defaults of this project, and why.
NOT_DEFAULTS: tuple[str, ...] = (
    r"timeout=Ns",  # Postfix's check_policy_service timeout in the snippets (above --deadline: tests/test_wiring.py)
    r"after Ns (?:up|down)", r"last greeting Ns ago",  # example log lines
    r"shutting down\) N ms",  # the -v example line
    r"age=Ns", r"D=Ns",  # example log lines
    # what other servers do, and what bench/probe_volume measured (its own traffic, and the window it replaced)
    r"postscreen sends the last line after its N s greet wait", r"waits out the greet wait \(N s\)",
    r"hung up N s after postscreen's", r"a stock jail \(N in N minutes\)",
    r"one RCPT every N s \|", r"one RCPT every N s for an hour", r"N ms", r"every N minutes \|", r"cut from N s", r"cost the primary N more connections",
    r"RFC 5321 asks for N minutes", r"on purpose wait \d+ to N s",  # other servers' greeting delays
    r"\(N minutes at the earliest for Postfix",  # Postfix's own retry schedule
    r"implicit TLS \(port N\)",
    r"about N GB",  # the Debian build roots
    r"\d+ to N minutes on two cores",  # how long mutation testing takes
    r"a TTL of N s", r"\(N s and N s included",  # example TTLs
    r"an address named (twice) is probed once",
    r"all N more-preferred MXes down",  # an example reason
    # the previous release and measurements, in "What the defaults trade"
    r"one per N minutes before", r"up to N s, and N s measured",
    r"no DUNNO in N s measured", r"measured N s \(hang\) and N s \(refuse\)",
)


def _markdown(text: str) -> str:
    """README.md without markup, and without its Performance section (benchmark figures)."""
    start = text.index("\n## Performance")
    end = text.index("\n## ", start + 1)
    return (text[:start] + text[end:]).replace("`", "").replace("**", "")


def _roff(text: str) -> str:
    lines = [(line.partition(" ")[2] if line.startswith(".") else line) for line in text.splitlines()]
    out = "\n".join(lines)
    for code, plain in (("\\fB", ""), ("\\fI", ""), ("\\fR", ""), ("\\-", "-"), ("\\&", ""), ("\\e", "\\")):
        out = out.replace(code, plain)
    return out


def _toml(text: str) -> str:
    return "\n".join(line.lstrip("#") for line in text.splitlines())


def _help(build: Callable[[], argparse.ArgumentParser]) -> str:
    os.environ["COLUMNS"] = "100000"  # no wrapping: argparse would break flags at their hyphens
    try:
        return build().format_help()
    finally:
        del os.environ["COLUMNS"]


def documents() -> dict[str, str]:
    """Every document a user reads, as plain text with one space between words."""
    texts = {
        "README.md": _markdown((ROOT / "README.md").read_text()),
        "man/smtpdcheck.1": _roff((ROOT / "man" / "smtpdcheck.1").read_text()),
        "man/smtpdcheck-policyd.8": _roff((ROOT / "man" / "smtpdcheck-policyd.8").read_text()),
        "etc/smtpdcheck-policyd.toml": _toml((ROOT / "etc" / "smtpdcheck-policyd.toml").read_text()),
        "smtpdcheck --help": _help(check_cli.build_parser),
        "smtpdcheck-policyd --help": _help(daemon_cli.build_parser),
    }
    return {name: " ".join(text.split()) for name, text in texts.items()}


def _value(text: str) -> float:
    return WORDS[text] if text in WORDS else float(text.replace(",", ""))


def _agrees(stated: str, expected: Expected) -> bool:
    if isinstance(expected, str):
        return stated == expected
    if isinstance(expected, OneOf):
        return any(math.isclose(_value(stated), v) for v in expected.values)
    return math.isclose(_value(stated), expected)


def _show(expected: Expected) -> str:
    return expected if isinstance(expected, str) else (
        f"one of {sorted(expected.values)}" if isinstance(expected, OneOf) else f"{expected:g}")


def check(text: str, rules: tuple[Rule, ...] = RULES, allowed: tuple[str, ...] = NOT_DEFAULTS) -> tuple[list[str], set[str]]:
    """What ``text`` states wrongly or without a rule, and the phrases of ``rules`` it uses."""
    expected_at: dict[tuple[int, int], tuple[Expected, str]] = {}
    used: set[str] = set()
    for r in rules:
        for match in r.regex.finditer(text):
            used.add(r.pattern)
            for i, value in enumerate(r.expected, start=1):
                expected_at[match.span(i)] = (value, r.pattern)
    excused = {
        match.span(i)
        for allowance in allowed
        for match in re.finditer(phrase(allowance), text)
        for i in range(1, (match.lastindex or 0) + 1)
    }
    problems: list[str] = []
    seen: set[tuple[int, int]] = set()
    for claim in CLAIMS:
        for match in re.finditer(claim, text):
            span, stated = match.span(1), match[1]
            if span in seen:
                continue  # stated in a way two patterns find
            seen.add(span)
            context = text[max(0, match.start() - 50): match.end() + 20]
            if span in expected_at:
                value, where = expected_at[span]
                if not _agrees(stated, value):
                    problems.append(f"states {stated}, the constant is {_show(value)}: ...{context}... ({where!r})")
            elif span not in excused:
                problems.append(f"states {stated} with no rule saying where it comes from: ...{context}...")
    return problems, used


DOCUMENTS = documents()


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_every_number_a_document_states_is_the_constants(name: str) -> None:
    problems, _ = check(DOCUMENTS[name])
    assert problems == []


def test_every_rule_is_still_used() -> None:
    """A rule that no document matches any more guards nothing: reworded prose must take its rule along."""
    used = set().union(*(check(text)[1] for text in DOCUMENTS.values()))
    option_rules = {r.pattern for r in RULES[-2 * len(OPTIONS):]}
    assert [r.pattern for r in RULES if r.pattern not in used and r.pattern not in option_rules] == []
    excused = {p for p in NOT_DEFAULTS if any(re.search(phrase(p), t) for t in DOCUMENTS.values())}
    assert [p for p in NOT_DEFAULTS if p not in excused] == []


def test_the_check_finds_a_wrong_number_and_an_unlisted_one() -> None:
    """The scan itself: a stated default off by one, and a number no rule names, are both reported."""
    wrong = f"cached per address (--cache-up-ttl, {D.UP_TTL_S + 1:g} s; --cache-down-ttl, {D.DOWN_TTL_S:g} s)"
    problems, _ = check(wrong)
    assert len(problems) == 1 and f"states {D.UP_TTL_S + 1:g}, the constant is {D.UP_TTL_S:g}" in problems[0]
    assert check(f"(--cache-up-ttl, {D.UP_TTL_S:g} s; --cache-down-ttl, {D.DOWN_TTL_S:g} s)")[0] == []
    unlisted, _ = check("a lookup waits at most 7 s for its nameserver")
    assert len(unlisted) == 1 and "states 7 with no rule" in unlisted[0]
    assert check("the confirm grace is thrice the last greeting time plus 0.5 s")[0] != []
