"""Benchmark 4: the daemon's memory under an endless stream of new recipient domains.

Every cache in the daemon is bounded (``--cache-size`` entries each, LRU),
so once they are full the resident size must stop growing however many
new domains arrive -- a dictionary attack on a backup MX must not be able
to grow it until the OOM killer steps in.  The benchmark sends one request
for each of many distinct domains and samples the daemon's VmRSS every
tenth of the way.

The fake DNS answers every ``dN.example`` with ``MX 10 <primary>`` and
``MX 20 backup.bench.example`` (this host, the same name for every domain,
as a real backup MX has).  A new domain thus costs one MX query and, when
its primary is new, one address lookup (A + AAAA):

* full run: the primary is ``mx1.gK.example`` with K = N // 5 (five
  domains per primary, as a hoster's customers share its MX).  The MX
  cache is full after ``cache_size`` domains, the address cache after
  ``5 x cache_size``; the second half of the run is all eviction.
* quick run: one primary for all domains, so the address cache stays
  tiny and the run (a fifth as long) still has a flat half after the MX
  cache fills.

Baselines from the same run: RSS right after start (idle), and RSS at the
first sample with every cache full ("all full"); flatness is RSS at the
end over the latter.
"""

from __future__ import annotations

from typing import Any

from smtpdcheck.defaults import CACHE_SIZE

from .loadgen import read_rss_kb, read_status_kb
from .policyenv import PolicyEnv, policy_env
from .previous import PREVIOUS_RELEASE, THIS, Release, ReleaseUnavailable
from .procs import run_loadgen
from .report import BenchResult, Check, Table, fmt_num, fmt_ratio

NAME = "memory"
CONNECTIONS = 50
TARGET_MAX_MB = 100.0
TARGET_FLATNESS = 1.05


async def run(quick: bool) -> BenchResult:
    domains = 20_000 if quick else 100_000
    group: int | None = None if quick else 5
    every = domains // 10
    time_limit = 40.0 if quick else 160.0
    mx_full = CACHE_SIZE
    all_full = CACHE_SIZE * (group or 1)
    result = BenchResult(
        NAME,
        f"smtpdcheck-policyd --cache-size {CACHE_SIZE} fed {domains:,} distinct recipient domains "
        f"({CONNECTIONS} connections, one request per domain, cold caches); VmRSS sampled every {every:,} domains. "
        + (f"{group} domains share each primary MX host: the MX cache is full after {mx_full:,} domains, "
           f"the address cache after {all_full:,}." if group else
           f"One primary MX host for all domains: every cache is full after {mx_full:,} domains."),
    )
    async def feed(release: Release) -> tuple[PolicyEnv, dict[str, Any], int, int]:
        """One daemon fed every domain: its env, the load's result, idle and peak RSS."""
        async with policy_env(
            lifetime=time_limit + 60.0,
            zone={"primary_group": group, "shared_backup": True},
            daemon_args=["--cache-size", str(CACHE_SIZE)],
            release=release,
        ) as env:
            idle_kb = read_rss_kb(env.daemon.pid)
            run_ = await run_loadgen(env.job(
                mode="count", connections=CONNECTIONS, count=domains, domain_start=0, domain_count=domains,
                expect="DEFER_IF_PERMIT", rss_every=every, time_limit=time_limit,
            ))
            peak_kb = read_status_kb(env.daemon.pid, "VmHWM")
        return env, run_, idle_kb, peak_kb

    env, run_, idle_kb, peak_kb = await feed(THIS)
    queries = dict(env.dns.queries_by_type)
    probes = env.greeter.connections
    previous: tuple[PolicyEnv, dict[str, Any], int, int] | None = None
    try:
        PREVIOUS_RELEASE.tree()
    except ReleaseUnavailable as exc:
        result.notes.append(f"previous release not measured: {exc}")
    else:
        previous = await feed(PREVIOUS_RELEASE)

    samples: list[tuple[int, int]] = [(0, idle_kb)]
    for done, kb in run_["rss"]:
        if done != samples[-1][0] and kb:
            samples.append((done, kb))
    full = next(((d, kb) for d, kb in samples if d >= all_full), None)
    end = samples[-1]
    max_kb = max([peak_kb] + [kb for _, kb in samples])

    table = Table("daemon resident size (VmRSS) as domains go by",
                  ["domains", "RSS MB", "vs idle", "vs all full", "note"])
    for done, kb in samples:
        notes = []
        if done == 0:
            notes.append("idle, before any request")
        if done == mx_full:
            notes.append("MX cache full")
        if full and done == full[0]:
            notes.append("all caches full (baseline)")
        table.add(f"{done:,}", f"{kb / 1024:.1f}", fmt_ratio(kb, idle_kb), fmt_ratio(kb, full[1]) if full else "n/a",
                  ", ".join(notes))
    table.add("peak (VmHWM)", f"{peak_kb / 1024:.1f}", fmt_ratio(peak_kb, idle_kb),
              fmt_ratio(peak_kb, full[1]) if full else "n/a", "")
    result.tables.append(table)

    total_q = sum(queries.values())
    speed = Table("the run", ["domains answered", "domains/s", "DNS queries", "queries/domain", "primary conns",
                              "p50 ms", "p99 ms", "errors", "stopped"])
    speed.add(f"{run_['completed']:,}", fmt_num(run_["rps"]), f"{total_q:,}",
              f"{total_q / max(run_['completed'], 1):.2f}", probes, f"{run_['p50_ms']:.1f}", f"{run_['p99_ms']:.1f}",
              run_["error_total"] or "0", run_["stopped"])
    result.tables.append(speed)

    if full is not None and end[0] > full[0]:
        flat = end[1] / full[1]
        result.checks.append(Check(
            f"flat once every cache is full: RSS at the end <= {TARGET_FLATNESS:.2f} x RSS when all were full",
            flat <= TARGET_FLATNESS,
            f"{full[1] / 1024:.1f} MB at {full[0]:,} -> {end[1] / 1024:.1f} MB at {end[0]:,} domains = {flat:.3f}x",
        ))
        # MX entries, plus address entries (primaries and the one backup name).
        entries = min(full[0], CACHE_SIZE) + (min(full[0] // group, CACHE_SIZE) if group else 1) + 1
        result.notes.append(
            f"cost of the full caches: {(full[1] - idle_kb) / 1024:.1f} MB over idle for about {entries:,} MX and "
            f"address entries, {(full[1] - idle_kb) * 1024 / entries:,.0f} bytes each"
        )
    else:
        result.checks.append(Check("flat once every cache is full", False, "the run never got past the point where all caches are full"))
    result.checks.append(Check(f"max RSS <= {TARGET_MAX_MB:g} MB", max_kb / 1024 <= TARGET_MAX_MB,
                               f"{max_kb / 1024:.1f} MB = {fmt_ratio(max_kb, idle_kb)} idle"))
    if previous is not None:
        prev_env, prev_run, prev_idle, prev_peak = previous
        # Compared at the last sample both reached (a time limit may stop one earlier).
        ours = {done: kb for done, kb in samples}
        theirs = {done: kb for done, kb in prev_run["rss"] if kb}
        at = max((done for done in ours if done in theirs and done), default=0)
        mine, prev_kb = ours.get(at, 0), theirs.get(at, 0)
        both = Table(f"this tree and {PREVIOUS_RELEASE.label}, fed the same domains one after the other",
                     ["daemon", "idle MB", f"after {at:,} domains MB", "peak (VmHWM) MB", "domains answered",
                      "domains/s", "errors"])
        both.add("this tree", f"{idle_kb / 1024:.1f}", f"{mine / 1024:.1f}", f"{peak_kb / 1024:.1f}",
                 f"{run_['completed']:,}", fmt_num(run_["rps"]), run_["error_total"] or "0")
        both.add(PREVIOUS_RELEASE.label, f"{prev_idle / 1024:.1f}", f"{prev_kb / 1024:.1f}", f"{prev_peak / 1024:.1f}",
                 f"{prev_run['completed']:,}", fmt_num(prev_run["rps"]), prev_run["error_total"] or "0")
        result.tables.append(both)
        result.checks.append(Check(
            f"RSS after {at:,} domains <= the previous release's after as many, measured in the same run",
            0 < mine <= prev_kb,
            f"{mine / 1024:.1f} MB vs {prev_kb / 1024:.1f} MB = {fmt_ratio(mine, prev_kb, 3)}"))
        if prev_env.problems:
            result.notes.append("previous release's problems: " + " | ".join(prev_env.problems))
    result.checks.append(Check(f"all {domains:,} domains answered DEFER_IF_PERMIT within {time_limit:g} s, zero errors",
                               run_["completed"] == domains and run_["error_total"] == 0
                               and run_["actions"].get("DEFER_IF_PERMIT", 0) == domains,
                               f"{run_['completed']:,} answered, answers {run_['actions']}, errors {run_['errors'] or 0}"))
    result.checks.append(Check("the daemon logged no warning or error and exited 0 on SIGTERM",
                               not env.problems, "; ".join(env.problems[:3]) or "clean"))
    if env.problems:
        result.notes.append("daemon problems: " + " | ".join(env.problems))
    result.data.update(domains=domains, cache_size=CACHE_SIZE, primary_group=group, idle_kb=idle_kb, peak_kb=peak_kb,
                       samples=samples, all_full=full, run=run_, dns_queries=queries, primary_connections=probes,
                       daemon_exit=env.exit_status, daemon_problems=env.problems)
    return result
