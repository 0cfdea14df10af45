"""Benchmark 3: what a burst of RCPTs for one domain costs the primary MX.

A backup MX that probed the primary once per RCPT would hit it with a
connection per recipient of a spam run -- a denial of service by the very
host meant to help.  With the caches and single-flight the whole burst
should cost the primary one connection per cache TTL (and DNS one query per
record), even when it arrives on a cold daemon with all its connections at
once.

Baseline in the same run: the same burst again on the now warm daemon, so
the cold burst's throughput is read as a fraction of the cached one.
"""

from __future__ import annotations

from typing import Any

from .policyenv import policy_env
from .procs import run_loadgen
from .report import BenchResult, Check, Table, fmt_num, fmt_ratio

NAME = "primary_load"
CONNECTIONS = 50


async def run(quick: bool) -> BenchResult:
    requests = 2_000 if quick else 10_000
    result = BenchResult(
        NAME,
        f"a burst of {requests:,} RCPTs for ONE domain (d0.example) over {CONNECTIONS} connections on a cold "
        "smtpdcheck-policyd, then the same burst warm (the baseline); counts the connections the primary's "
        "greeter received and the DNS queries.",
    )
    time_limit = 30.0 if quick else 90.0
    bursts: list[tuple[str, dict[str, Any], int, dict[str, int]]] = []
    async with policy_env(lifetime=2 * time_limit + 60.0) as env:
        for label in ("cold", "warm"):
            conns0 = env.greeter.connections
            queries0 = dict(env.dns.queries_by_type)
            run_ = await run_loadgen(env.job(
                mode="count", connections=CONNECTIONS, count=requests, domain_start=0, domain_count=1,
                expect="DEFER_IF_PERMIT", time_limit=time_limit,
            ))
            queries = {t: n - queries0.get(t, 0) for t, n in env.dns.queries_by_type.items()}
            bursts.append((label, run_, env.greeter.connections - conns0, queries))

    warm = bursts[1][1]
    table = Table("bursts", ["burst", "answered", "req/s", "vs warm", "p50 ms", "p99 ms", "max ms",
                             "primary conns", "DNS MX/A/AAAA", "answers", "errors"])
    for label, r, conns, queries in bursts:
        table.add(
            label, f"{r['completed']:,}", fmt_num(r["rps"]), fmt_ratio(r["rps"], warm["rps"]),
            f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['max_ms']:.1f}", conns,
            f"{queries.get('MX', 0)}/{queries.get('A', 0)}/{queries.get('AAAA', 0)}",
            ", ".join(f"{k} {v}" for k, v in r["actions"].items()), r["error_total"] or "0",
        )
    result.tables.append(table)
    cold_label, cold, cold_conns, cold_queries = bursts[0]
    result.checks.append(Check("cold burst: the primary got 1 connection (one probe per cache TTL)", cold_conns == 1,
                               f"{cold_conns} connections = {cold_conns:.0f}x the target of 1"))
    result.checks.append(Check("warm burst: the primary got no connection", bursts[1][2] == 0, f"{bursts[1][2]} connections"))
    result.checks.append(Check("cold burst: one MX query and one A and AAAA query per MX host",
                               cold_queries.get("MX", 0) == 1 and cold_queries.get("A", 0) <= 2 and cold_queries.get("AAAA", 0) <= 2,
                               f"{cold_queries}"))
    total_errors = sum(r["error_total"] for _, r, _, _ in bursts)
    all_defer = all(r["actions"].get("DEFER_IF_PERMIT", 0) == requests for _, r, _, _ in bursts)
    result.checks.append(Check("every request answered DEFER_IF_PERMIT, zero errors", all_defer and total_errors == 0,
                               f"{total_errors} errors"))
    result.checks.append(Check("the daemon logged no warning or error and exited 0 on SIGTERM",
                               not env.problems, "; ".join(env.problems[:3]) or "clean"))
    if env.problems:
        result.notes.append("daemon problems: " + " | ".join(env.problems))
    result.notes.append("'vs warm' is the burst's throughput over the warm burst's: what the cold start costs the "
                        "whole burst (its first requests wait for one DNS round and one probe)")
    result.data.update(requests=requests, connections=CONNECTIONS,
                       bursts=[{"label": l, "run": r, "primary_connections": c, "dns_queries": q} for l, r, c, q in bursts],
                       daemon_exit=env.exit_status, daemon_problems=env.problems)
    return result
