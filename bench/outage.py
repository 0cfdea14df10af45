"""Benchmark: a primary fails under steady traffic; and one-off names with nothing to pay for their refreshes.

A backup MX exists for the minutes after its primary fails.  A daemon that
still says "primary is up" then sends every sender back to a primary that
has just failed them, and they retry on their own schedule: minutes to half
an hour later.  This measures, with the default configuration, how long
that lasts, how soon deferring resumes once the primary is back, what it
costs the primary in probes, and how much background DNS work names asked
once cause.

In one run, against the previous release and this tree side by side (each
daemon with its own fake DNS server and greeters from ``testbeds``):

* outage: two domains, one RCPT every 250 ms each on its own Postfix-like
  connection; after a warm-up both primaries go down at the same instant,
  ``hang.example``'s by accepting and never greeting, ``refuse.example``'s
  by closing its port (a SYN gets RST); later both come back; then the
  traffic stops and the probes that still come are counted.  Besides the
  two releases at their defaults, two alternatives run the same traffic:
  the previous release with only a short up TTL (``--cache-up-ttl 10``),
  and this tree with the previous up TTL (``--cache-up-ttl 120``), which
  has only the confirm rule.
* names: 100 one-off domains whose DNS answers have TTL 1 and 100 whose MX
  lookups answer SERVFAIL, each asked once; then the DNS queries that
  follow are counted per name.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import AsyncIterator
import importlib.util
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from smtpdcheck import defaults
from smtpdcheck.belief import CONFIRM_MARGIN_S
from testbeds.dnsserver import Behavior, FakeDNSServer, Zone
from testbeds.greeters import Farm, Mode, start_farm

from .previous import PREVIOUS_RELEASE, THIS, Release, ReleaseUnavailable
from .procs import LOOPBACK, Child, free_port, start_daemon
from .stream import REPLY_LIMIT_S, action_of, read_reply, steady_stream
from .report import BenchResult, Check, Table
from .workload import RequestTemplate

NAME = "outage"

PERIOD_S: Final = 0.25
#: The defaults this benchmark is about (smtpdcheck/defaults.py), for the design worst cases.
UP_TTL_S: Final = defaults.UP_TTL_S
PREVIOUS_UP_TTL_S: Final = 120.0
DOWN_TTL_S: Final = defaults.DOWN_TTL_S
TIMEOUT_S: Final = 5.0  # the previous release's --timeout: how long it served an expired "up"
CONFIRM_GRACE_S: Final = CONFIRM_MARGIN_S  # a primary that greets at once: twice ~0 plus the margin
#: Targets, with the defaults.
TARGET_WINDOW_S: Final = 15.0
TARGET_RECOVERY_S: Final = 65.0
TARGET_SLOWEST_S: Final = 0.020
TARGET_WAIT_S: Final = 1.0
#: An answer slower than this waited on the network (a probe, a lookup); below
#: it, a busy machine's scheduling is all it can be.
WAITED_S: Final = 0.100
TARGET_PROBE_PERIOD_S: Final = 10.0
TARGET_FETCHES_PER_USE: Final = 3
STDERR_LIMIT: Final = 16 << 20
ONE_OFF: Final = 100
FAILING: Final = 100
DNS_CONNECTIONS: Final = 10


@dataclass(frozen=True)
class Phases:
    warm: float  # primaries greet
    down: float  # primaries down
    up: float  # back, traffic still flowing (recovery must show within it)
    after: float  # traffic stopped, probes still counted
    names: float  # from the end of the traffic: DNS queries for the one-off and failing names counted

    @property
    def went_down(self) -> float:
        return self.warm

    @property
    def came_back(self) -> float:
        return self.warm + self.down

    @property
    def traffic_end(self) -> float:
        return self.warm + self.down + self.up

    @property
    def end(self) -> float:
        return self.traffic_end + self.after

    @property
    def total(self) -> float:
        return self.traffic_end + max(self.after, self.names)


FULL: Final = Phases(warm=15.0, down=30.0, up=67.0, after=20.0, names=30.0)
QUICK: Final = Phases(warm=5.0, down=15.0, up=12.0, after=5.0, names=10.0)


@dataclass(frozen=True)
class Variant:
    label: str
    release: Release
    extra: tuple[str, ...]
    up_ttl: float
    grace: float  # how long past expiry an unconfirmed "up" is still served (by design)
    main: bool = False  # a release at its defaults (the targets are this tree's)

    def worst_window(self, refused: bool) -> float:
        """The design's worst false-defer window: a TTL after the last greeting, plus the
        grace while a probe hangs (a refused probe fails at once)."""
        return self.up_ttl + (0.0 if refused else self.grace)


VARIANTS: Final = (
    Variant(PREVIOUS_RELEASE.label, PREVIOUS_RELEASE, (), PREVIOUS_UP_TTL_S, TIMEOUT_S, main=True),
    Variant("previous, --cache-up-ttl 10", PREVIOUS_RELEASE, ("--cache-up-ttl", f"{UP_TTL_S:g}"), UP_TTL_S, TIMEOUT_S),
    Variant("this tree, --cache-up-ttl 120", THIS, ("--cache-up-ttl", f"{PREVIOUS_UP_TTL_S:g}"), PREVIOUS_UP_TTL_S, CONFIRM_GRACE_S),
    Variant(THIS.label, THIS, (), UP_TTL_S, CONFIRM_GRACE_S, main=True),
)


@dataclass(frozen=True)
class Primary:
    key: str
    domain: str
    index: int  # greeter i of the farm, on 127.0.0.(i+2)
    down_mode: Mode
    what: str


PRIMARIES: Final = (
    Primary("hang", "hang.example", 0, Mode.SILENT, "hangs after accept"),
    Primary("refuse", "refuse.example", 1, Mode.REFUSE, "refuses (RST)"),
)


@dataclass
class Series:
    """One domain's connection: (sent, latency, action) per RCPT, run-relative times."""

    samples: list[tuple[float, float, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def first(self, action: str, since: float, until: float = math.inf) -> float | None:
        return next((t for t, _, a in self.samples if since <= t < until and a == action), None)


@dataclass
class OutageWorld:
    variant: Variant
    dns: FakeDNSServer
    farm: Farm
    daemon: Child | None = None
    port: int = 0
    metrics_port: int = 0
    start: float = 0.0
    series: dict[str, Series] = field(default_factory=lambda: {p.key: Series() for p in PRIMARIES})
    stderr: str = ""
    metrics_text: str = ""
    problems: list[str] = field(default_factory=list)


@dataclass
class NamesWorld:
    variant: Variant
    dns: FakeDNSServer
    daemon: Child | None = None
    port: int = 0
    answered: Counter[str] = field(default_factory=Counter)
    first_queries: int = 0  # how many queries the 200 RCPTs themselves caused
    queries: list[tuple[str, str, str]] = field(default_factory=list)
    span: float = 0.0
    problems: list[str] = field(default_factory=list)


def outage_zone() -> Zone:
    """MX 10 mx1.<domain> (the primary), MX 20 backup.<domain> (127.0.0.1, this host), long TTLs."""
    z: Zone = {}
    for p in PRIMARIES:
        z[(p.domain, "MX")] = [f"10 mx1.{p.domain}.", f"20 backup.{p.domain}."]
        z[(f"mx1.{p.domain}", "A")] = [f"127.0.0.{p.index + 2}"]
        z[(f"mx1.{p.domain}", "AAAA")] = []
        z[(f"backup.{p.domain}", "A")] = ["127.0.0.1"]
        z[(f"backup.{p.domain}", "AAAA")] = []
    return z


def one_off(i: int) -> str:
    return f"o{i}.example"


def failing(i: int) -> str:
    return f"f{i}.example"


_ONE_OFF_NAME: Final = re.compile(r"(?:mx\.)?o\d+\.example")


def names_zone() -> Zone:
    """Failing names: SERVFAIL for every type (the one-off names come from the wildcard)."""
    return {(failing(i), "*"): Behavior.SERVFAIL for i in range(FAILING)}


def names_wildcard(name: str, rdtype: str) -> list[str] | None:
    """``oN.example``: MX 10 mx.oN.example, whose address is this host (so nothing is probed)."""
    if not _ONE_OFF_NAME.fullmatch(name):
        return None
    if name.startswith("mx."):
        return ["127.0.0.1"] if rdtype == "A" else []
    return [f"10 mx.{name}."] if rdtype == "MX" else []


def _trouble(text: str) -> list[str]:
    """Warnings and errors, but for the primaries' state changes: logged at warning, and what this benchmark makes happen."""
    return [
        line for line in text.splitlines()
        if line.startswith(("warning:", "error:", "fatal:", "Traceback")) and not _STATE_CHANGE.search(line)
    ]


async def _stop(daemon: Child | None) -> tuple[str, list[str]]:
    if daemon is None:
        return "", ["the daemon did not start"]
    with trio.CancelScope(shield=True):
        alive = daemon.alive()
        status = await daemon.stop()
        text = daemon.stderr_text(STDERR_LIMIT)
        daemon.close()
    problems = [] if alive else [f"daemon died during the benchmark (status {status})"]
    serving = text.partition("stopping on SIGTERM")[0]
    return text, problems + _trouble(serving)[:10]


@asynccontextmanager
async def outage_world(variant: Variant, lifetime: float) -> AsyncIterator[OutageWorld]:
    async with trio.open_nursery() as nursery:
        dns = FakeDNSServer(outage_zone(), ttl=3600)
        await nursery.start(dns.serve)
        farm = await start_farm(nursery, [Mode.OK] * len(PRIMARIES))
        w = OutageWorld(variant, dns, farm)
        extra = list(variant.extra)
        if importlib.util.find_spec("prometheus_client") is not None:
            w.metrics_port = free_port()
            extra += ["--metrics", f"inet:{LOOPBACK}:{w.metrics_port}"]
        w.daemon, w.port = await start_daemon(dns.port, farm.port, extra, lifetime=lifetime, log="file",
                                              release=variant.release)
        try:
            yield w
        finally:
            w.stderr, w.problems = await _stop(w.daemon)
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def names_world(variant: Variant, lifetime: float) -> AsyncIterator[NamesWorld]:
    async with trio.open_nursery() as nursery:
        dns = FakeDNSServer(names_zone(), ttl=1, wildcard=names_wildcard)
        await nursery.start(dns.serve)
        w = NamesWorld(variant, dns)
        w.daemon, w.port = await start_daemon(dns.port, 9, list(variant.extra), lifetime=lifetime,
                                              release=variant.release)
        try:
            yield w
        finally:
            _, w.problems = await _stop(w.daemon)
            nursery.cancel_scope.cancel()


async def drive(w: OutageWorld, p: Primary, until: float) -> None:
    """One Postfix-like connection: an RCPT every PERIOD_S, one outstanding, until ``until`` (run time)."""
    series = w.series[p.key]

    def record(k: int, sent: float, latency: float, action: str) -> None:
        series.samples.append((sent - w.start, latency, action))

    await steady_stream(w.port, p.domain, period=PERIOD_S, start=w.start, until=until,
                        record=record, errors=series.errors)


async def scrape(port: int) -> str:
    """The daemon's /metrics text ("" if it cannot be had)."""
    try:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(LOOPBACK, port)
            async with stream:
                await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
                body = b""
                for _ in range(1000):
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    body += chunk
    except (OSError, trio.TooSlowError, trio.BrokenResourceError):
        return ""
    return body.decode("utf-8", "replace")


async def run_outages(worlds: list[OutageWorld], phases: Phases) -> None:
    """All outage worlds on one clock: traffic, down, back, quiet."""
    start = trio.current_time()
    for w in worlds:
        w.start = start
    async with trio.open_nursery() as nursery:
        for w in worlds:
            for p in PRIMARIES:
                nursery.start_soon(drive, w, p, phases.traffic_end)
        await trio.sleep_until(start + phases.went_down)
        for w in worlds:
            for p in PRIMARIES:
                w.farm.greeters[p.index].mode = p.down_mode
        await trio.sleep_until(start + phases.came_back)
        for w in worlds:
            for p in PRIMARIES:
                w.farm.greeters[p.index].mode = Mode.OK
        await trio.sleep_until(start + phases.end)
    for w in worlds:
        if w.metrics_port:
            w.metrics_text = await scrape(w.metrics_port)


async def ask_once(w: NamesWorld, names: list[str]) -> None:
    """One RCPT per name over a few connections, each answered before the next goes."""
    template = RequestTemplate()

    async def connection(part: list[str]) -> None:
        buffer = bytearray()
        stream = await trio.open_tcp_stream(LOOPBACK, w.port)
        async with stream:
            for name in part:
                with trio.fail_after(REPLY_LIMIT_S):
                    await stream.send_all(template.render(f"user@{name}"))
                    reply = await read_reply(stream, buffer)
                w.answered[action_of(reply)] += 1

    async with trio.open_nursery() as nursery:
        for c in range(DNS_CONNECTIONS):
            nursery.start_soon(connection, names[c::DNS_CONNECTIONS])


async def run_names(w: NamesWorld, phases: Phases, at: float) -> None:
    """Ask every name once at ``at`` (when the outage traffic has stopped: the
    previous release's refreshes of them would load the machine), then count."""
    names = [one_off(i) for i in range(ONE_OFF)] + [failing(i) for i in range(FAILING)]
    await trio.sleep_until(at)
    start = trio.current_time()
    await ask_once(w, names)
    w.first_queries = len(w.dns.queries)
    await trio.sleep_until(start + phases.names)
    w.queries = list(w.dns.queries)
    w.span = trio.current_time() - start


# -- reading the results --------------------------------------------------------


def accepted(w: OutageWorld, p: Primary, a: float, b: float) -> int:
    """Probes the primary accepted between run times a and b."""
    return sum(1 for t in w.farm.greeters[p.index].accepted_at if a <= t - w.start < b)


@dataclass
class OutageFigures:
    window: float | None  # down -> first DUNNO
    defers_after: int  # DEFERs after the first DUNNO while down
    recovery: float | None  # back -> first DEFER
    slowest: float  # after the domain's first answer
    slowest_holding: float  # outside the state changes
    over_target: int  # answers slower than TARGET_SLOWEST_S after the first
    waited: int  # answers slower than WAITED_S after the first
    over_wait: int  # answers slower than TARGET_WAIT_S after the first
    waited_per_10s: float  # answers over WAITED_S per 10 s of traffic (the first excluded)
    daemon_slowest: float  # the slowest after the first as the daemon timed it (its decision line's ms=)
    up_probe_rate: float  # per minute while up and traffic flows (the first probe excluded)
    after_probe_rate: float  # per minute after traffic stops
    answers: int
    actions: Counter[str]


def figures(w: OutageWorld, p: Primary, phases: Phases) -> OutageFigures:
    s = w.series[p.key]
    window_at = s.first("DUNNO", phases.went_down, phases.came_back)
    window = None if window_at is None else window_at - phases.went_down
    defers_after = 0 if window_at is None else sum(
        1 for t, _, a in s.samples if window_at < t < phases.came_back and a != "DUNNO")
    # Recovery only means something after deferring stopped.
    back_at = None if window_at is None else s.first("DEFER_IF_PERMIT", phases.came_back)
    recovery = None if back_at is None else back_at - phases.came_back
    after = s.samples[1:]
    changes = [(phases.went_down, (window_at if window_at is not None else phases.came_back) + 1.0),
               (phases.came_back, (back_at if back_at is not None else phases.traffic_end) + 1.0)]
    holding = [lat for t, lat, _ in after if not any(a <= t < b for a, b in changes)]
    span = (s.samples[-1][0] - s.samples[0][0]) if len(s.samples) > 1 else math.nan
    waited = sum(1 for _, lat, _ in after if lat > WAITED_S)
    # While up and traffic flows: the warm-up (after the first probe) and from recovery to the end.
    first_probe = min((t - w.start for t in w.farm.greeters[p.index].accepted_at), default=0.0)
    up_spans = [(first_probe + 1e-6, phases.went_down)]
    if back_at is not None:
        up_spans.append((back_at, phases.traffic_end))
    up_time = sum(b - a for a, b in up_spans if b > a)
    up_probes = sum(accepted(w, p, a, b) for a, b in up_spans if b > a)
    return OutageFigures(
        window=window,
        defers_after=defers_after,
        recovery=recovery,
        slowest=max((lat for _, lat, _ in after), default=math.nan),
        slowest_holding=max(holding, default=math.nan),
        over_target=sum(1 for _, lat, _ in after if lat > TARGET_SLOWEST_S),
        waited=waited,
        over_wait=sum(1 for _, lat, _ in after if lat > TARGET_WAIT_S),
        waited_per_10s=waited / (span / 10.0) if span == span and span > 0 else math.nan,
        up_probe_rate=up_probes / up_time * 60.0 if up_time > 0 else math.nan,
        after_probe_rate=accepted(w, p, phases.traffic_end, phases.end) / phases.after * 60.0,
        answers=len(s.samples),
        actions=Counter(a for _, _, a in s.samples),
        daemon_slowest=daemon_slowest(w.stderr, p.domain),
    )


_DECISION: Final = re.compile(r" domain=(\S+) .* ms=([0-9.]+)(?: age=[0-9.]+s)?$")  # a DEFER also says its greeting's age


def daemon_slowest(stderr: str, domain: str) -> float:
    """The slowest decision after the domain's first, as the daemon timed it (seconds)."""
    times = [float(m.group(2)) / 1000 for line in stderr.splitlines()
             if (m := _DECISION.search(line)) and m.group(1) == domain]
    return max(times[1:], default=math.nan)


def secs(value: float | None, bound: float) -> str:
    return f"> {bound:g} (none)" if value is None else f"{value:.2f}"


def recovery_text(f: OutageFigures, phases: Phases) -> str:
    return "- (never stopped)" if f.window is None else secs(f.recovery, phases.up)


def ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.1f}" if seconds < 1 else f"{seconds * 1000:,.0f}"


_STATE_CHANGE: Final = re.compile(r"\[[^\]]+\](:\d+)? (up|down) -> (up|down)\b.*")
_UNCONFIRMED: Final = re.compile(r" action=DUNNO reason=\"primary \S+ unconfirmed")


def state_lines(stderr: str) -> list[str]:
    return [m.group(0) for line in stderr.splitlines() if (m := _STATE_CHANGE.search(line))]


def evidence_worst(metrics_text: str) -> str:
    """The highest bucket bound of smtpdcheck_defer_evidence_age_seconds that holds a DEFER."""
    buckets: list[tuple[float, float]] = []
    for line in metrics_text.splitlines():
        m = re.match(r'smtpdcheck_defer_evidence_age_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)', line)
        if m:
            buckets.append((math.inf if m.group(1) == "+Inf" else float(m.group(1)), float(m.group(2))))
    if not buckets:
        return "-"
    total = buckets[-1][1]
    worst = next(bound for bound, count in buckets if count >= total)
    return f"<= {worst:g} s ({total:.0f} DEFERs)"


@dataclass
class NameFigures:
    mx_per_one_off: float
    mx_max_one_off: int
    address_per_one_off: float
    address_max_one_off: int
    mx_per_failing: float
    mx_max_failing: int
    background_queries: int


def name_figures(w: NamesWorld) -> NameFigures:
    """Fetches after the first answers, per name: MX for the domain, A (with its AAAA) for its host."""
    later = w.queries[w.first_queries:]
    mx = Counter(q for q, t, _ in later if t == "MX")
    a = Counter(q for q, t, _ in later if t == "A")
    one_mx = [mx.get(one_off(i), 0) for i in range(ONE_OFF)]
    one_a = [a.get(f"mx.{one_off(i)}", 0) for i in range(ONE_OFF)]
    fail_mx = [mx.get(failing(i), 0) for i in range(FAILING)]
    return NameFigures(
        sum(one_mx) / ONE_OFF, max(one_mx), sum(one_a) / ONE_OFF, max(one_a),
        sum(fail_mx) / FAILING, max(fail_mx), len(later),
    )


async def run(quick: bool) -> BenchResult:
    phases = QUICK if quick else FULL
    result = BenchResult(
        NAME,
        f"a primary fails under one RCPT per {PERIOD_S * 1000:.0f} ms, defaults: greets for {phases.warm:g} s, "
        f"then hangs after accept (hang.example) or refuses with RST (refuse.example) for {phases.down:g} s, "
        f"greets again for {phases.up:g} s of traffic, then {phases.after:g} s without traffic; "
        f"then {ONE_OFF} one-off names (DNS TTL 1) and {FAILING} SERVFAIL names asked once, queries counted for "
        f"{phases.names:g} s; the previous release against this tree, plus two alternatives, side by side.",
    )
    variants = list(VARIANTS)
    try:
        PREVIOUS_RELEASE.tree()
    except ReleaseUnavailable as exc:
        variants = [v for v in variants if v.release is not PREVIOUS_RELEASE]
        result.notes.append(f"previous release not measured: {exc}")
    lifetime = phases.total + 90.0
    outage_worlds: list[OutageWorld] = []
    names_worlds: list[NamesWorld] = []
    async with AsyncExitStack() as stack:
        outage_worlds, names_worlds = await _open_all(stack, variants, lifetime)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_outages, outage_worlds, phases)
            for nw in names_worlds:
                nursery.start_soon(run_names, nw, phases, start + phases.traffic_end)

    _report_outage(result, outage_worlds, phases, quick)
    _report_names(result, names_worlds, phases)
    problems = [f"{w.variant.label}: {p}" for w in outage_worlds for p in w.problems]
    problems += [f"{w.variant.label} (names): {p}" for w in names_worlds for p in w.problems]
    errors = [f"{w.variant.label} {k}: {e}" for w in outage_worlds for k, s in w.series.items() for e in s.errors]
    result.checks.append(Check("no daemon died, logged a warning or error, or left a request unanswered",
                               not problems and not errors, "; ".join((problems + errors)[:3]) or "clean"))
    return result


async def _open_all(
    stack: AsyncExitStack, variants: list[Variant], lifetime: float
) -> tuple[list[OutageWorld], list[NamesWorld]]:
    """An outage world for every variant, a names world for each release at its defaults."""
    outages: list[OutageWorld] = []
    names: list[NamesWorld] = []
    for variant in variants:
        outages.append(await stack.enter_async_context(outage_world(variant, lifetime)))
        if variant.main:
            names.append(await stack.enter_async_context(names_world(variant, lifetime)))
    return outages, names


def _report_outage(result: BenchResult, worlds: list[OutageWorld], phases: Phases, quick: bool) -> None:
    outage = Table(
        f"false-defer window (down -> first DUNNO) and recovery (back -> first DEFER), seconds; "
        f"one RCPT per {PERIOD_S * 1000:.0f} ms",
        ["daemon", "primary", "window s", "design worst s", "DEFERs after it", "recovery s", "unconfirmed answers",
         "evidence age (/metrics)"],
    )
    latency = Table(
        "answers after each domain's first, ms (around a change: from going down or back to 1 s after the first "
        "answer that shows it)",
        ["daemon", "primary", "answers", "slowest", "slowest while state holds", "daemon's slowest",
         f"> {TARGET_SLOWEST_S * 1000:.0f} ms", f"> {WAITED_S * 1000:.0f} ms", f"> {TARGET_WAIT_S:g} s", "actions"],
    )
    probes = Table("probes per primary address per minute (connections its greeter accepted)",
                   ["daemon", "primary", "while up, traffic flowing", "after traffic stops"])
    data: list[dict[str, Any]] = []
    for w in worlds:
        unconfirmed = Counter(
            p.domain for line in w.stderr.splitlines() if _UNCONFIRMED.search(line)
            for p in PRIMARIES if f" domain={p.domain} " in line)
        for p in PRIMARIES:
            f = figures(w, p, phases)
            outage.add(w.variant.label, f"{p.domain} ({p.what})", secs(f.window, phases.down),
                       f"{w.variant.worst_window(p.down_mode is Mode.REFUSE):g}", f.defers_after, recovery_text(f, phases),
                       unconfirmed.get(p.domain, 0), evidence_worst(w.metrics_text))
            latency.add(w.variant.label, p.domain, f.answers, ms(f.slowest), ms(f.slowest_holding),
                        ms(f.daemon_slowest), f.over_target, f.waited, f.over_wait,
                        ", ".join(f"{k} {v}" for k, v in sorted(f.actions.items())))
            probes.add(w.variant.label, f"{p.domain} 127.0.0.{p.index + 2}", f"{f.up_probe_rate:.1f}",
                       f"{f.after_probe_rate:.1f}")
            data.append({"daemon": w.variant.label, "primary": p.domain, **{
                k: v for k, v in vars(f).items() if k != "actions"}, "actions": dict(f.actions),
                "state_lines": state_lines(w.stderr)})
            if w.variant.release is THIS and w.variant.main:
                _check_outage(result, p, f, phases, quick)
    result.tables += [outage, latency, probes]
    result.data["outage"] = data
    for w in worlds:
        lines = state_lines(w.stderr)
        if w.variant.main and lines:
            result.notes.append(f"{w.variant.label} logged: " + " | ".join(lines[:6]))


def _check_outage(result: BenchResult, p: Primary, f: OutageFigures, phases: Phases, quick: bool) -> None:
    name = f"this tree, {p.domain} ({p.what})"
    result.checks.append(Check(f"{name}: first DUNNO within {TARGET_WINDOW_S:g} s of going down",
                               f.window is not None and f.window <= TARGET_WINDOW_S, secs(f.window, phases.down)))
    result.checks.append(Check(f"{name}: no DEFER after the first DUNNO while down", f.window is not None
                               and f.defers_after == 0, f"{f.defers_after}"))
    if quick:
        result.notes.append(f"{name}: recovery not judged in --quick (its {phases.up:g} s of traffic after the "
                            f"primary is back are shorter than a down TTL); measured {secs(f.recovery, phases.up)}")
    else:
        result.checks.append(Check(f"{name}: DEFER again within {TARGET_RECOVERY_S:g} s of greeting again",
                                   f.recovery is not None and f.recovery <= TARGET_RECOVERY_S,
                                   secs(f.recovery, phases.up)))
    result.checks.append(Check(
        f"{name}: while state holds, slowest answer after the first <= {TARGET_SLOWEST_S * 1000:.0f} ms",
        f.slowest_holding <= TARGET_SLOWEST_S, f"{ms(f.slowest_holding)} ms"))
    result.checks.append(Check(
        f"{name}: no answer waits more than {TARGET_WAIT_S:g} s; at most one per 10 s waits at all "
        f"(> {WAITED_S * 1000:.0f} ms)",
        f.over_wait == 0 and f.waited_per_10s <= 1.0,
        f"slowest {ms(f.slowest)} ms; {f.waited} over {WAITED_S * 1000:.0f} ms"))
    result.checks.append(Check(
        f"{name}: at most one probe per {TARGET_PROBE_PERIOD_S:g} s while traffic flows and after it stops",
        f.up_probe_rate <= 60.0 / TARGET_PROBE_PERIOD_S and f.after_probe_rate <= 60.0 / TARGET_PROBE_PERIOD_S,
        f"{f.up_probe_rate:.1f} and {f.after_probe_rate:.1f} per minute"))


def _report_names(result: BenchResult, worlds: list[NamesWorld], phases: Phases) -> None:
    table = Table(
        f"background DNS fetches per name in {phases.names:g} s after one RCPT each "
        f"({ONE_OFF} one-off names, TTL 1; {FAILING} SERVFAIL names)",
        ["daemon", "MX per one-off name (max)", "A+AAAA per one-off host (max)", "MX per failing name (max)",
         "queries in all", "answers"],
    )
    for w in worlds:
        n = name_figures(w)
        table.add(w.variant.label, f"{n.mx_per_one_off:.1f} ({n.mx_max_one_off})",
                  f"{n.address_per_one_off:.1f} ({n.address_max_one_off})",
                  f"{n.mx_per_failing:.1f} ({n.mx_max_failing})", n.background_queries,
                  ", ".join(f"{k} {v}" for k, v in sorted(w.answered.items())))
        result.data.setdefault("names", []).append({"daemon": w.variant.label, **vars(n), "span_s": w.span})
        if w.variant.release is THIS:
            worst = max(n.mx_max_one_off, n.address_max_one_off, n.mx_max_failing)
            result.checks.append(Check(
                f"this tree: one use of a name buys at most {TARGET_FETCHES_PER_USE} background fetches "
                f"(TTL 1 and SERVFAIL alike)", worst <= TARGET_FETCHES_PER_USE,
                f"at most {worst} for one entry in {phases.names:g} s"))
    result.tables.append(table)
