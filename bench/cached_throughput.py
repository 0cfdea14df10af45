"""Benchmark 2: the daemon's throughput and latency when every answer comes from cache.

Under a spam run a backup MX sees the same few recipient domains over and
over; then the MX list, the host addresses and the primary's probe result
are all cached and the daemon's cost is pure overhead: parsing, deciding,
replying.  That overhead is measured against a ceiling taken in the same
run -- a do-nothing trio server (:mod:`bench.ceiling`) on the same stack --
so the ratio says how much of what trio and Python could give the daemon
uses, independently of the machine.

Load: C connections (C = 1, 10, 50, 100), each sending full Postfix 3.7
RCPT requests back to back with one outstanding, like Postfix's smtpd
processes; recipients cycle over ``DOMAINS`` domains, all warmed first
with one request each.  Latency is measured by the load generator, so it
includes queueing behind the other C-1 connections.  Server CPU time per
request (from /proc) is given as well: unlike throughput, it does not
depend on whether the load generator or the server saturated first.

A shared two-core machine drifts in speed by tens of percent between two
runs a few seconds apart, so each point is measured in three rounds of
ceiling and daemon, the order alternating, and the round with the median
ratio is reported (all rounds' ratios are listed in a note).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from contextlib import AsyncExitStack
from typing import Any

import trio

from policyd.config import Config

from .policyenv import PolicyEnv, policy_env
from .previous import PREVIOUS_RELEASE, ReleaseUnavailable
from .procs import LOOPBACK, Child, free_port, run_loadgen, start_ceiling, wait_for_port
from .report import BenchResult, Check, Table, fmt_num, fmt_ratio

NAME = "cached_throughput"
DOMAINS = 100
CONNECTIONS = (1, 10, 50, 100)
TARGET_C = 50
#: Daemon configurations, measured at TARGET_C (the first at every C): log
#: mode (bench.procs.LOG_MODES), label, target throughput ratio.
CONFIGS: tuple[tuple[str, str, float], ...] = (
    ("file", "defaults: decision lines, stderr to a file", 0.60),
    ("pipe", "defaults: decision lines, stderr to a drained pipe", 0.60),
    ("syslog", "--log-target syslog (datagram socket)", 0.50),
    ("quiet", "--log-level warning (no decision lines)", 0.75),
)
TARGET_P99_MS = 5.0
#: The daemon's default --cache-up-ttl: how often a primary in use is probed again.
UP_TTL = Config().cache_up_ttl
#: Throughput over postgrey's, when it is installed.
TARGET_VS_POSTGREY = 10.0
#: The slowest first reply on 100 fresh connections, against the ceiling's.
TARGET_FIRST_REPLY = 1.5
#: Ceiling/server pairs per point (the table shows the median one).
ROUNDS = 3
POSTGREY = "/usr/sbin/postgrey"
_DROPPED = re.compile(r"^warning: (\d+) log lines dropped", re.MULTILINE)


def _ratio(pol: dict[str, Any], ceil: dict[str, Any]) -> float:
    return float(pol["rps"]) / float(ceil["rps"]) if ceil["rps"] else 0.0


def _cpu_us(run: dict[str, Any]) -> float:
    return run["server_cpu_s"] / run["counted"] * 1e6 if run["counted"] else math.nan


async def _point(jobs: dict[str, dict[str, Any]], rounds: int) -> dict[str, Any]:
    """The ceiling and each server in ``rounds`` rounds, in rotating order.

    ``jobs`` holds "ceiling", "policyd" and optionally "previous" (the
    previous release).  The result's "ceiling" and "policyd" are the round
    with the median policyd/ceiling ratio; "previous" and "previous_ceiling"
    the round with the previous release's median ratio; "rounds" all of them.
    """
    names = list(jobs)
    pairs: list[dict[str, dict[str, Any]]] = []
    for k in range(rounds):
        # Rotate who goes first, so a drift in the machine's speed during a
        # point favours no one.
        order = names[k % len(names):] + names[: k % len(names)]
        pairs.append({who: await run_loadgen(jobs[who]) for who in order})
    by_policyd = sorted(pairs, key=lambda pair: _ratio(pair["policyd"], pair["ceiling"]))
    median = by_policyd[len(pairs) // 2]
    point: dict[str, Any] = {"ceiling": median["ceiling"], "policyd": median["policyd"], "rounds": by_policyd}
    if "previous" in jobs:
        by_previous = sorted(pairs, key=lambda pair: _ratio(pair["previous"], pair["ceiling"]))
        point["previous"] = by_previous[len(pairs) // 2]["previous"]
        point["previous_ceiling"] = by_previous[len(pairs) // 2]["ceiling"]
    return point


async def _postgrey(ceiling_job: dict[str, Any], common: dict[str, Any], rounds: int, lifetime: float) -> dict[str, Any]:
    """Debian's postgrey under the same load: a peer, greylisting every new triplet."""
    dbdir = tempfile.mkdtemp(prefix="bench-postgrey-")
    try:
        if os.geteuid() == 0:
            shutil.chown(dbdir, "postgrey", "postgrey")  # it drops to that user
        port = free_port()
        child = Child([POSTGREY, f"--inet={LOOPBACK}:{port}", f"--dbdir={dbdir}", "--delay=300"],
                      lifetime=lifetime, name="postgrey")
        try:
            await wait_for_port(port, child, timeout=15.0)
            job = {"host": LOOPBACK, "port": port, "server_pid": child.pid, "expect": None, **common}
            return await _point({"ceiling": ceiling_job, "policyd": job}, rounds)
        finally:
            await child.stop()
            child.close()
    finally:
        shutil.rmtree(dbdir, ignore_errors=True)


async def run(quick: bool) -> BenchResult:
    duration = 1.0 if quick else 1.5
    warmup = 0.2 if quick else 0.3
    rounds = 1 if quick else ROUNDS
    result = BenchResult(
        NAME,
        f"smtpdcheck-policyd (subprocess) with warm caches vs a do-nothing trio server (the ceiling); "
        f"{DOMAINS} recipient domains, full 29-attribute RCPT requests, one outstanding per connection; "
        f"per point {rounds} round(s) of ceiling and server, in alternating order, each "
        f"{duration:g} s measured after {warmup:g} s unmeasured; tables show the round with the median ratio. "
        f"The daemon runs as installed, with its default logging (one decision line per RCPT, stderr to a file); "
        f"other log configurations{' and postgrey' if os.path.exists(POSTGREY) else ''} at C={TARGET_C}.",
    )
    points_per_env = [len(CONNECTIONS)] + [1] * (len(CONFIGS) - 1)
    lifetime = 60.0 + (sum(points_per_env) + 1) * rounds * 3 * (duration + warmup + 5) + len(CONFIGS) * 40
    runs: list[dict[str, Any]] = []  # the default configuration, every C
    configs: dict[str, dict[str, Any]] = {}  # every configuration at TARGET_C
    served_from_cache: list[str] = []
    probe_text: list[str] = []
    problems: list[str] = []
    total_errors = 0
    previous_note: str | None = None
    try:
        PREVIOUS_RELEASE.tree()
    except ReleaseUnavailable as exc:
        previous_note = f"previous release not measured: {exc}"
        result.notes.append(previous_note)
    ceiling, ceiling_port = await start_ceiling(lifetime=lifetime)
    try:
        def common(c: int) -> dict[str, Any]:
            return dict(connections=c, mode="duration", duration=duration, warmup=warmup,
                        domain_count=DOMAINS, time_limit=duration + warmup + 30.0)

        def ceiling_job(c: int) -> dict[str, Any]:
            return {"host": LOOPBACK, "port": ceiling_port, "server_pid": ceiling.pid, "expect": "DUNNO", **common(c)}

        for mode, label, _ in CONFIGS:
            env: PolicyEnv
            async with AsyncExitStack() as stack:
                env = await stack.enter_async_context(policy_env(lifetime=lifetime, log=mode))
                prev: PolicyEnv | None = None
                if previous_note is None:
                    prev = await stack.enter_async_context(
                        policy_env(lifetime=lifetime, log=mode, release=PREVIOUS_RELEASE))
                envs = {"this tree": env, **({"previous release": prev} if prev is not None else {})}
                for who, e in envs.items():
                    warm = await run_loadgen(e.job(
                        mode="count", connections=10, count=DOMAINS, domain_count=DOMAINS, expect="DEFER_IF_PERMIT",
                        time_limit=30.0,
                    ))
                    total_errors += warm["error_total"]
                    if warm["error_total"] or warm["actions"].get("DEFER_IF_PERMIT") != DOMAINS:
                        result.notes.append(f"{mode}, {who}: warm-up answers: {warm['actions']}, errors {warm['errors']}")
                probes_warm = env.greeter.connections
                measured_from = trio.current_time()
                queries_warm = sum(env.dns.queries_by_type.values())
                for c in CONNECTIONS if mode == "file" else (TARGET_C,):
                    jobs = {"ceiling": ceiling_job(c), "policyd": env.job(expect="DEFER_IF_PERMIT", **common(c))}
                    if prev is not None and c == TARGET_C:
                        jobs["previous"] = prev.job(expect="DEFER_IF_PERMIT", **common(c))
                    point = await _point(jobs, rounds)
                    point["connections"] = c
                    if mode == "file":
                        runs.append(point)
                    if c == TARGET_C:
                        configs[mode] = point
                probes_after = env.greeter.connections - probes_warm
                # The primary's 'up' is probed again once per --cache-up-ttl
                # while in use (refresh ahead): that is no request waiting.
                refreshes = int((trio.current_time() - measured_from) / UP_TTL) + 1
                probe_text.append(f"{mode}: {probes_after} probes in {trio.current_time() - measured_from:.0f} s")
                queries_after = sum(env.dns.queries_by_type.values()) - queries_warm
                if probes_after > refreshes or queries_after:
                    served_from_cache.append(f"{mode}: {probes_after} probes, {queries_after} DNS queries")
            if prev is not None:
                problems += [f"{mode}, previous release: {p}" for p in prev.problems if _DROPPED.search(p) is None]
                if prev.exit_status != 0:
                    problems.append(f"{mode}, previous release: exit status {prev.exit_status} after SIGTERM")
            # The daemon's own report of lines its log target did not take in
            # time is a measurement (a column), not a fault.
            configs[mode]["log_lines_dropped"] = sum(
                int(m.group(1)) for line in env.problems if (m := _DROPPED.search(line)) is not None
            )
            problems += [f"{mode}: {p}" for p in env.problems if _DROPPED.search(p) is None]
            configs[mode]["exit_status"] = env.exit_status
        postgrey: dict[str, Any] | None = None
        if os.path.exists(POSTGREY):
            postgrey = await _postgrey(ceiling_job(TARGET_C), common(TARGET_C), rounds, lifetime)
        else:
            result.notes.append(f"postgrey row skipped: {POSTGREY} is not installed (Debian package postgrey)")
    finally:
        await ceiling.stop()
        ceiling.close()

    thr = Table("defaults (decision lines on, stderr to a file): throughput (requests/s) and server CPU per request",
                ["C", "ceiling rps", "policyd rps", "policyd/ceiling", "ceiling CPU us/req", "policyd CPU us/req",
                 "CPU ratio", "loadgen CPU %", "other CPU %", "errors"])
    lat = Table("defaults: latency seen by the client, ms (includes queueing behind the other C-1 connections)",
                ["C", "ceiling p50", "ceiling p99", "policyd p50", "policyd p99", "p50 ratio", "p99 ratio", "policyd max",
                "1st reply max: ceiling", "policyd"])
    for r in runs:
        c, ceil, pol = r["connections"], r["ceiling"], r["policyd"]
        errors = ceil["error_total"] + pol["error_total"]
        # Load generator CPU share during the policyd run: near 100% would
        # mean the client, not the server, was the limit.
        thr.add(
            c, fmt_num(ceil["rps"]), fmt_num(pol["rps"]), fmt_ratio(pol["rps"], ceil["rps"]),
            fmt_num(_cpu_us(ceil), 1), fmt_num(_cpu_us(pol), 1), fmt_ratio(_cpu_us(pol), _cpu_us(ceil)),
            f"{100 * ceil['loadgen_cpu_s'] / ceil['window_s']:.0f} / {100 * pol['loadgen_cpu_s'] / pol['window_s']:.0f}",
            f"{_other_pct(ceil):.0f} / {_other_pct(pol):.0f}",
            "0" if not errors else f"{errors} {_error_text(ceil, pol)}",
        )
        lat.add(
            c, f"{ceil['p50_ms']:.2f}", f"{ceil['p99_ms']:.2f}", f"{pol['p50_ms']:.2f}", f"{pol['p99_ms']:.2f}",
            fmt_ratio(pol["p50_ms"], ceil["p50_ms"], 1), fmt_ratio(pol["p99_ms"], ceil["p99_ms"], 1), f"{pol['max_ms']:.1f}",
            f"{ceil['first_reply_max_ms']:.1f}", f"{pol['first_reply_max_ms']:.1f}",
        )
    cfg = Table(f"configurations at C={TARGET_C}, each against the ceiling measured beside it; "
                f"{PREVIOUS_RELEASE.label} beside this tree in the same rounds",
                ["configuration", "rps", "vs ceiling", "p50 ms", "p99 ms", "CPU us/req", "CPU vs ceiling",
                 "previous: vs ceiling", "p99 ms", "CPU us/req", "other CPU %", "lines dropped", "errors"])
    rows = [(label, configs[mode]) for mode, label, _ in CONFIGS]
    if postgrey is not None:
        rows.append(("postgrey (Debian), greylisting every new triplet", postgrey))
    for label, point in rows:
        ceil, pol = point["ceiling"], point["policyd"]
        errors = ceil["error_total"] + pol["error_total"]
        old: dict[str, Any] | None = point.get("previous")
        old_ceil: dict[str, Any] = point.get("previous_ceiling") or {}
        cfg.add(label, fmt_num(pol["rps"]), fmt_ratio(pol["rps"], ceil["rps"]), f"{pol['p50_ms']:.2f}",
                f"{pol['p99_ms']:.2f}", fmt_num(_cpu_us(pol), 1), fmt_ratio(_cpu_us(pol), _cpu_us(ceil)),
                fmt_ratio(old["rps"], old_ceil["rps"]) if old else "-", f"{old['p99_ms']:.2f}" if old else "-",
                fmt_num(_cpu_us(old), 1) if old else "-",
                f"{_other_pct(pol):.0f}", str(point.get("log_lines_dropped", "-")),
                "0" if not errors else f"{errors} {_error_text(ceil, pol)}")
    result.tables += [thr, lat, cfg]
    result.notes.append("latency percentiles are of requests sent inside the measured window; '1st reply max' is "
                        "the slowest first reply on a fresh connection (waiting to be accepted included)")
    result.notes.append("loadgen CPU % is the client's CPU share during the ceiling / policyd run; "
                        "near 100 would mean the client, not the server, limited the throughput")
    measured = runs + [p for m, p in configs.items() if m != "file"] + ([postgrey] if postgrey else [])
    noise = max((max(_other_pct(r["ceiling"]), _other_pct(r["policyd"])) for r in measured), default=0.0)
    result.notes.append(
        "other CPU % is CPU time (in % of one core) used during the window by anything but the server and the "
        "client, hypervisor steal included (a log reader -- the pipe's or the syslog socket's -- counts here)"
        + (f"; up to {noise:.0f}% here: other work competed, so throughput and latency are noisy -- the CPU us/req "
           "columns are the more robust comparison" if noise > 15 else "")
    )
    if rounds > 1:
        result.notes.append("server/ceiling throughput in each round: " + "; ".join(
            [f"C={r['connections']}: " + ", ".join(f"{_ratio(p['policyd'], p['ceiling']):.2f}x" for p in r["rounds"])
             for r in runs]
            + [f"{label.split(':')[0].split(' (')[0]}: " + ", ".join(
                f"{_ratio(p['policyd'], p['ceiling']):.2f}x" for p in point["rounds"]) for label, point in rows[1:]]))

    for point in [*runs, *(p for m, p in configs.items() if m != "file")]:
        total_errors += sum(p["ceiling"]["error_total"] + p["policyd"]["error_total"]
                            + p.get("previous", {}).get("error_total", 0) for p in point["rounds"])
    for mode, label, target in CONFIGS:
        point = configs[mode]
        share = _ratio(point["policyd"], point["ceiling"])
        result.checks.append(Check(f"C={TARGET_C}, {label}: >= {target:.0%} of the ceiling's throughput (median round)",
                                   share >= target,
                                   f"{share:.1%}: {point['policyd']['rps']:,.0f} vs {point['ceiling']['rps']:,.0f} req/s"
                                   + _previous_share(point)))
    worst_p99 = max(p["policyd"]["p99_ms"] for mode in ("file", "pipe") for p in configs[mode]["rounds"])
    worst_prev = max((p["previous"]["p99_ms"] for mode in ("file", "pipe") for p in configs[mode]["rounds"]
                      if "previous" in p), default=math.nan)
    result.checks.append(Check(f"C={TARGET_C}, defaults: p99 <= {TARGET_P99_MS:g} ms (every round, file and pipe)",
                               worst_p99 <= TARGET_P99_MS, f"worst p99 {worst_p99:.2f} ms"
                               + ("" if math.isnan(worst_prev) else f"; previous release {worst_prev:.2f} ms")))
    if postgrey is not None:
        # Each against the ceiling beside it: the two were not measured in the same rounds.
        over = _ratio(configs["file"]["policyd"], configs["file"]["ceiling"]) / max(
            _ratio(postgrey["policyd"], postgrey["ceiling"]), 1e-9)
        prev_over = (_ratio(configs["file"]["previous"], configs["file"]["previous_ceiling"])
                     / max(_ratio(postgrey["policyd"], postgrey["ceiling"]), 1e-9)) if "previous" in configs["file"] else None
        result.checks.append(Check(f"C={TARGET_C}, defaults: >= {TARGET_VS_POSTGREY:g}x postgrey's throughput "
                                   "(each as a share of the ceiling beside it)", over >= TARGET_VS_POSTGREY,
                                   f"{over:.1f}x" + (f"; previous release {prev_over:.1f}x" if prev_over else "")))
    fresh = next((r for r in runs if r["connections"] == max(CONNECTIONS)), None)
    if fresh is not None:
        first = max(p["policyd"]["first_reply_max_ms"] for p in fresh["rounds"])
        first_ceiling = min(p["ceiling"]["first_reply_max_ms"] for p in fresh["rounds"])
        result.checks.append(Check(
            f"C={max(CONNECTIONS)} fresh connections: slowest first reply <= {TARGET_FIRST_REPLY:g}x the ceiling's "
            "(worst round vs best)", first <= TARGET_FIRST_REPLY * first_ceiling,
            f"{first:.1f} ms vs {first_ceiling:.1f} ms"))
    result.checks.append(Check("zero errors (transport, protocol, unexpected answers) in all daemon runs",
                               total_errors == 0, f"{total_errors} errors"))
    result.checks.append(Check(f"the measured runs were served from cache (no DNS query; no probe but the primary's "
                               f"refresh, one per --cache-up-ttl {UP_TTL:g} s)",
                               not served_from_cache, "; ".join(served_from_cache)
                               or "0 DNS queries; " + ", ".join(probe_text)))
    result.checks.append(Check("the daemon logged no warning or error and exited 0 on SIGTERM, in every configuration",
                               not problems and all(p.get("exit_status") == 0 for p in configs.values()),
                               "; ".join(problems[:3]) or "clean"))
    if problems:
        result.notes.append("daemon problems: " + " | ".join(problems))
    result.notes.append(
        "lines dropped: decision lines the daemon dropped, over the whole run, because its log target did not take "
        "them before its 1 MiB buffer filled (it says so in one warning line when writing resumes); a syslog socket "
        f"holds net.unix.max_dgram_qlen = {_dgram_qlen()} messages here, so a reader that falls behind by more than "
        "that makes the daemon wait, then buffer, then drop")
    if postgrey is not None:
        result.notes.append(f"postgrey answers in its median round: {postgrey['policyd']['actions']}")
    result.data.update(domains=DOMAINS, duration_s=duration, warmup_s=warmup, runs=runs, configs=configs,
                       postgrey=postgrey, problems=problems)
    return result


def _previous_share(point: dict[str, Any]) -> str:
    """The previous release's figure for the same target, measured in the same rounds."""
    if "previous" not in point:
        return ""
    return (f"; previous release {_ratio(point['previous'], point['previous_ceiling']):.1%}: "
            f"{point['previous']['rps']:,.0f} vs {point['previous_ceiling']['rps']:,.0f} req/s")


def _dgram_qlen() -> str:
    try:
        with open("/proc/sys/net/unix/max_dgram_qlen", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return "?"


def _error_text(*runs: dict[str, Any]) -> str:
    merged: dict[str, int] = {}
    for r in runs:
        for k, v in r["errors"].items():
            merged[k] = merged.get(k, 0) + v
    return "(" + ", ".join(f"{k}: {v}" for k, v in merged.items()) + ")"


def _other_pct(run: dict[str, Any]) -> float:
    """CPU used by other processes (and stolen) during the window, in % of one core."""
    return 100 * (float(run.get("other_cpu_s", 0.0)) + float(run.get("steal_s", 0.0))) / float(run["window_s"])
