"""Benchmark: steady traffic across cache expiries, refresh ahead on and off.

A backup MX exists for the hours when its primary is down, and in exactly
those hours every cache expiry used to make an RCPT wait: a full probe
timeout for a silent primary, the greeting delay for a slow one, a DNS
round trip for a slow nameserver, and every RCPT for the domain arriving
meanwhile waited with it.  Refresh ahead renews what is in use before it
expires and serves the old value while a late renewal runs, so after a
domain's first RCPT nothing should wait on the network.

Two real ``smtpdcheck-policyd`` processes run side by side for the same
time, each against its own DNS server and greeters (the doubles of
``testbeds``): one with ``--refresh-window 0`` (the baseline: no
background refresh, no stale answers) and one with the defaults.  Both get
``--cache-up-ttl 3 --cache-down-ttl 3 --timeout 2`` and three domains:

* (a) ``greets-late.example``: the primary greets after 200 ms (up);
* (b) ``silent.example``: the primary accepts and never speaks (down);
* (c) ``slow-dns.example``: every DNS answer for its names comes after
  300 ms, with a TTL of 2 s; its primary greets at once.

Each domain gets one Postfix-like connection sending one full RCPT request
every 50 ms (the next one at once if a reply was later than that).  The
traffic is light (60 requests/s per daemon) so CPU does not colour the
latencies: what shows is waiting on the network.
"""

from __future__ import annotations

import errno
import math
import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from testbeds.dnsserver import FakeDNSServer, Slow, Zone
from testbeds.greeters import Greeter, Mode, unused_port

from .procs import Child, start_daemon
from .report import BenchResult, Check, Table, fmt_ratio
from .stream import steady_stream

NAME = "refresh"

PERIOD_S: Final = 0.05
CACHE_TTL_S: Final = 3
PROBE_TIMEOUT_S: Final = 2
DNS_TTL_S: Final = 2
LONG_DNS_TTL_S: Final = 300
GREET_DELAY_S: Final = 0.2
DNS_DELAY_S: Final = 0.3
#: With refresh, the slowest answer after a domain's first must stay under this.
TARGET_SLOWEST_S: Final = 0.020
#: Daemon stderr kept for the log counts (about 150 bytes per decision line).
STDERR_LIMIT: Final = 16 << 20

BASE_ARGS: Final = ["--cache-up-ttl", str(CACHE_TTL_S), "--cache-down-ttl", str(CACHE_TTL_S),
                    "--timeout", str(PROBE_TIMEOUT_S), "--log-level", "info"]
MODES: Final[tuple[tuple[str, list[str]], ...]] = (("refresh off", ["--refresh-window", "0"]), ("refresh on", []))


@dataclass(frozen=True)
class Domain:
    key: str
    name: str
    what: str
    primary: str  # the primary's loopback address
    expect: str  # the action every answer must have

    @property
    def names(self) -> tuple[str, str, str]:
        """The domain and its two MX hosts, as the DNS server sees them."""
        return (self.name, f"mx1.{self.name}", f"backup.{self.name}")


DOMAINS: Final = (
    Domain("a", "greets-late.example", f"primary greets after {GREET_DELAY_S * 1000:.0f} ms", "127.0.0.2", "DEFER_IF_PERMIT"),
    Domain("b", "silent.example", "primary silent", "127.0.0.3", "DUNNO"),
    Domain("c", "slow-dns.example", f"DNS answers after {DNS_DELAY_S * 1000:.0f} ms, TTL {DNS_TTL_S} s",
           "127.0.0.4", "DEFER_IF_PERMIT"),
)
SLOW_DNS: Final = DOMAINS[2]


def zone() -> Zone:
    """MX 10 mx1 (the primary), MX 20 backup (127.0.0.1: this host) for each domain."""
    z: Zone = {}
    for d in DOMAINS:
        apex, mx1, backup = d.names
        z[(apex, "MX")] = [f"10 {mx1}.", f"20 {backup}."]
        z[(mx1, "A")] = [d.primary]
        z[(mx1, "AAAA")] = []
        z[(backup, "A")] = ["127.0.0.1"]
        z[(backup, "AAAA")] = []
    for name in SLOW_DNS.names:
        z[(name, "*")] = Slow(DNS_DELAY_S, [])  # name-wide delay, then the per-type data
    return z


@dataclass
class Series:
    """What one domain's connection saw: (sent at, seconds to the reply) and the actions."""

    samples: list[tuple[float, float]] = field(default_factory=list)
    actions: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    @property
    def after_first(self) -> list[float]:
        return sorted(latency for _, latency in self.samples[1:])


@dataclass
class World:
    """One daemon and the doubles it talks to."""

    label: str
    dns: FakeDNSServer
    greeters: dict[str, Greeter]  # by domain key
    daemon: Child | None = None
    port: int = 0
    series: dict[str, Series] = field(default_factory=lambda: {d.key: Series() for d in DOMAINS})
    started: float = 0.0
    ended: float = 0.0
    connections: dict[str, int] = field(default_factory=dict)
    queries: Counter[tuple[str, str]] = field(default_factory=Counter)
    exit_status: int | None = None
    stderr: str = ""
    problems: list[str] = field(default_factory=list)
    shutdown_problems: list[str] = field(default_factory=list)


def _trouble(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("warning:", "error:", "fatal:", "Traceback"))]


async def start_greeters(nursery: trio.Nursery) -> dict[str, Greeter]:
    """One greeter per domain on its primary's address, all on one port (the daemon probes one port)."""
    for _attempt in range(20):
        port = unused_port("127.0.0.2")
        greeters: dict[str, Greeter] = {}
        try:
            for d in DOMAINS:
                mode = Mode.SILENT if d.key == "b" else Mode.OK
                delay = GREET_DELAY_S if d.key == "a" else 0.0
                greeter = Greeter(mode, host=d.primary, port=port, greet_delay=delay, banner_name=f"mx1.{d.name}")
                await nursery.start(greeter.serve)
                greeters[d.key] = greeter
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            continue  # the greeters already started keep serving until the nursery ends; harmless
        return greeters
    raise RuntimeError("no common free port for the greeters")


@asynccontextmanager
async def world(label: str, extra: list[str], lifetime: float) -> AsyncIterator[World]:
    """The doubles and one daemon; on exit the daemon is stopped and what it logged collected."""
    async with trio.open_nursery() as nursery:
        dns = FakeDNSServer(zone(), ttl=LONG_DNS_TTL_S, name_ttls={n: DNS_TTL_S for n in SLOW_DNS.names})
        await nursery.start(dns.serve)
        greeters = await start_greeters(nursery)
        w = World(label, dns, greeters)
        smtp_port = greeters["a"].port
        w.daemon, w.port = await start_daemon(dns.port, smtp_port, [*BASE_ARGS, *extra], lifetime=lifetime)
        try:
            yield w
        finally:
            with trio.CancelScope(shield=True):
                alive = w.daemon.alive()
                w.exit_status = await w.daemon.stop()
                w.stderr = w.daemon.stderr_text(STDERR_LIMIT)
                w.daemon.close()
                if not alive:
                    w.problems.append(f"daemon died during the benchmark (status {w.exit_status})")
                elif w.exit_status != 0:
                    w.shutdown_problems.append(f"daemon exited with status {w.exit_status} after SIGTERM")
                # Split at the stop: trouble while serving traffic and trouble
                # while shutting down are different findings.
                serving, _, stopping = w.stderr.partition("stopping on SIGTERM")
                w.problems += _trouble(serving)[:20]
                w.shutdown_problems += _trouble(stopping)[:20]
            nursery.cancel_scope.cancel()


async def drive(w: World, d: Domain, duration: float) -> None:
    """One Postfix-like connection: an RCPT every PERIOD_S, one outstanding, for ``duration``."""
    series = w.series[d.key]

    def record(k: int, sent: float, latency: float, action: str) -> None:
        series.samples.append((sent, latency))
        series.actions[action] += 1

    await steady_stream(w.port, d.name, period=PERIOD_S, start=trio.current_time(), until=duration,
                        record=record, errors=series.errors)


async def measure(w: World, duration: float) -> None:
    """All three domains at once; snapshot the doubles' counts when the traffic stops."""
    w.started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for d in DOMAINS:
            nursery.start_soon(drive, w, d, duration)
    w.ended = trio.current_time()
    w.connections = {key: g.connections for key, g in w.greeters.items()}
    w.queries = Counter((name, rdtype) for name, rdtype, _ in w.dns.queries)


def ttl_limit(span: float, ttl: float) -> int:
    """At most one per TTL plus the first: a run touching n TTL periods (the
    last one perhaps only in part) may hold n refreshes and the first fetch."""
    return math.ceil(span / ttl) + 1


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]


def ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.1f}" if seconds < 1 else f"{seconds * 1000:,.0f}"


def slow_dns_questions() -> list[tuple[str, str]]:
    """What the daemon asks about (c): its MX list, then both address types of each MX host."""
    apex, mx1, backup = SLOW_DNS.names
    return [(apex, "MX"), (mx1, "A"), (mx1, "AAAA"), (backup, "A"), (backup, "AAAA")]


_DECISION = re.compile(r" rcpt=<[^>]*> domain=(\S+) .* cache=(\w+) ms=([0-9.]+)")


def cache_counts(stderr: str) -> dict[str, Counter[str]]:
    """Per domain, how the decision lines say its inputs were found (hit, miss, stale)."""
    counts: dict[str, Counter[str]] = {d.name: Counter() for d in DOMAINS}
    for line in stderr.splitlines():
        m = _DECISION.search(line)
        if m and m.group(1) in counts:
            counts[m.group(1)][m.group(2)] += 1
    return counts


def daemon_slowest(stderr: str) -> dict[str, float]:
    """Per domain, the slowest decision after the first as the daemon timed it (seconds).

    Set against the client's figure it tells waiting inside the daemon from
    time lost outside it (scheduling on a busy machine, the loopback).
    """
    times: dict[str, list[float]] = {d.name: [] for d in DOMAINS}
    for line in stderr.splitlines():
        m = _DECISION.search(line)
        if m and m.group(1) in times:
            times[m.group(1)].append(float(m.group(3)) / 1000)
    return {name: max(t[1:], default=math.nan) for name, t in times.items()}


_STATE_CHANGE = re.compile(r"\[[^\]]+\](:\d+)? (up|down) -> (up|down)\b")


def state_changes(stderr: str) -> int:
    """The daemon's one line per MX address changing state."""
    return sum(1 for line in stderr.splitlines() if _STATE_CHANGE.search(line))


async def run(quick: bool) -> BenchResult:
    duration = 15.0 if quick else 60.0
    result = BenchResult(
        NAME,
        f"steady traffic across cache expiries for {duration:g} s: one RCPT per {PERIOD_S * 1000:.0f} ms for each of "
        f"(a) a primary greeting after {GREET_DELAY_S * 1000:.0f} ms, (b) a silent primary, (c) DNS answering after "
        f"{DNS_DELAY_S * 1000:.0f} ms with TTL {DNS_TTL_S} s; cache TTLs {CACHE_TTL_S} s, --timeout {PROBE_TIMEOUT_S}; "
        "two smtpdcheck-policyd side by side, --refresh-window 0 (the baseline) and the defaults.",
    )
    lifetime = duration + 90.0
    worlds: list[World] = []
    async with world(*MODES[0], lifetime=lifetime) as off, world(*MODES[1], lifetime=lifetime) as on:
        worlds = [off, on]
        async with trio.open_nursery() as nursery:
            for w in worlds:
                nursery.start_soon(measure, w, duration)
    off, on = worlds

    latency = Table("answers after each domain's first (the first is a cold miss)",
                    ["mode", "domain", "answers", "p50 ms", "p99 ms", "slowest ms", "> 20 ms", "> 100 ms",
                     "daemon slowest ms", "first ms", "actions", "cache hit/miss/stale"])
    for w in worlds:
        counts = cache_counts(w.stderr)
        inside = daemon_slowest(w.stderr)
        for d in DOMAINS:
            s = w.series[d.key]
            after = s.after_first
            first = s.samples[0][1] if s.samples else math.nan
            c = counts[d.name]
            latency.add(
                w.label, f"({d.key}) {d.what}", len(s.samples), ms(percentile(after, 0.50)), ms(percentile(after, 0.99)),
                ms(after[-1] if after else math.nan), sum(1 for x in after if x > 0.020), sum(1 for x in after if x > 0.100),
                ms(inside[d.name]), ms(first), ", ".join(f"{k} {v}" for k, v in s.actions.items()) or "-",
                f"{c['hit']}/{c['miss']}/{c['stale']}",
            )
    result.tables.append(latency)

    probes = Table(f"probes per address per TTL ({CACHE_TTL_S} s; connections the primary's greeter accepted)",
                   ["mode", "primary", "probes", "run s", "TTLs in run", "probes per TTL", "target (TTL periods + 1)"])
    for w in worlds:
        span = w.ended - w.started
        for d in DOMAINS:
            n = w.connections.get(d.key, 0)
            ttls = span / CACHE_TTL_S
            probes.add(w.label, f"({d.key}) {d.primary}", n, f"{span:.1f}", f"{ttls:.1f}", fmt_ratio(n, ttls), f"<= {ttl_limit(span, CACHE_TTL_S)}")
    result.tables.append(probes)

    queries = Table(f"DNS queries per TTL for (c) (TTL {DNS_TTL_S} s)",
                    ["mode", "name", "type", "queries", "TTLs in run", "queries per TTL"])
    for w in worlds:
        ttls = (w.ended - w.started) / DNS_TTL_S
        for name, rdtype in slow_dns_questions():
            n = w.queries.get((name, rdtype), 0)
            queries.add(w.label, name, rdtype, n, f"{ttls:.1f}", fmt_ratio(n, ttls))
    result.tables.append(queries)

    for d in DOMAINS:
        after = on.series[d.key].after_first
        slowest = after[-1] if after else math.inf
        base = off.series[d.key].after_first
        result.checks.append(Check(
            f"refresh on, ({d.key}) {d.what}: slowest answer after the first <= {TARGET_SLOWEST_S * 1000:.0f} ms",
            slowest <= TARGET_SLOWEST_S and len(after) > 0,
            f"{ms(slowest)} ms (refresh off: {ms(base[-1] if base else math.nan)} ms)",
        ))
    span_on = on.ended - on.started
    for d in DOMAINS:
        n = on.connections.get(d.key, 0)
        limit = ttl_limit(span_on, CACHE_TTL_S)
        result.checks.append(Check(
            f"refresh on, ({d.key}) {d.primary}: at most one probe per TTL plus one",
            n <= limit, f"{n} probes in {span_on:.1f} s; limit {limit}",
        ))
    for name, rdtype in slow_dns_questions():
        n = on.queries.get((name, rdtype), 0)
        limit = ttl_limit(span_on, DNS_TTL_S)
        result.checks.append(Check(
            f"refresh on, {name} {rdtype}: at most one query per TTL plus one",
            n <= limit, f"{n} queries in {span_on:.1f} s; limit {limit}",
        ))
    wrong = [f"{w.label} ({d.key}): {dict(w.series[d.key].actions)}" for w in worlds for d in DOMAINS
             if set(w.series[d.key].actions) != {d.expect}]
    errors = [f"{w.label} ({d.key}): {e}" for w in worlds for d in DOMAINS for e in w.series[d.key].errors]
    result.checks.append(Check("every answer is the expected one (a, c: DEFER_IF_PERMIT; b: DUNNO), zero errors",
                               not wrong and not errors, "; ".join(wrong + errors) or "ok"))
    problems = [f"{w.label}: {p}" for w in worlds for p in w.problems]
    result.checks.append(Check("neither daemon logged a warning or error while serving the traffic",
                               not problems, "; ".join(problems[:3]) or "clean"))
    shutdown = [f"{w.label}: {p}" for w in worlds for p in w.shutdown_problems]
    result.checks.append(Check("both exited 0 on SIGTERM without a warning or error",
                               not shutdown, "; ".join(shutdown[:3]) or "clean"))
    if problems or shutdown:
        result.notes.append("daemon problems: " + " | ".join(problems + shutdown))
    result.notes.append(
        "both daemons ran at the same time against their own doubles; latencies are measured by the benchmark's "
        "client from sending a request to reading its reply, so they include the loopback and the client's loop; "
        "'daemon slowest ms' is the same answer timed inside the daemon (its decision line's ms=)")
    result.notes.append(f"state-change lines logged (up -> down and back): "
                        f"{', '.join(f'{w.label} {state_changes(w.stderr)}' for w in worlds)}")
    result.data.update(
        duration_s=duration, period_s=PERIOD_S, cache_ttl_s=CACHE_TTL_S, dns_ttl_s=DNS_TTL_S,
        runs=[_run_json(w) for w in worlds],
    )
    return result


def _run_json(w: World) -> dict[str, Any]:
    return {
        "mode": w.label,
        "run_s": w.ended - w.started,
        "domains": {
            d.name: {
                "answers": len(w.series[d.key].samples),
                "first_ms": w.series[d.key].samples[0][1] * 1000 if w.series[d.key].samples else None,
                "p50_ms": percentile(w.series[d.key].after_first, 0.50) * 1000,
                "p99_ms": percentile(w.series[d.key].after_first, 0.99) * 1000,
                "slowest_ms": max(w.series[d.key].after_first, default=math.nan) * 1000,
                "actions": dict(w.series[d.key].actions),
                "errors": w.series[d.key].errors,
                "probes": w.connections.get(d.key, 0),
            }
            for d in DOMAINS
        },
        "dns_queries": {f"{n} {t}": c for (n, t), c in sorted(w.queries.items())},
        "cache": {k: dict(v) for k, v in cache_counts(w.stderr).items()},
        "daemon_slowest_ms": {k: v * 1000 for k, v in daemon_slowest(w.stderr).items()},
        "daemon_exit": w.exit_status,
        "problems": w.problems,
        "shutdown_problems": w.shutdown_problems,
    }
