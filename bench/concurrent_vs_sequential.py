"""Benchmark 1: the checker's concurrent probing against Mail Avenger's one-at-a-time.

The ``smtpdcheck`` command's reason to exist: Mail Avenger's smtpdcheck
probed servers in turn, so every dead primary ahead of a live one cost a
whole timeout.  Here one live server stands *last* behind N silent ones
(silent = accepts and never greets, the worst kind of dead: only the
timeout ends the wait), and the same :class:`smtpdcheck.check.Checker` runs
concurrently and with ``sequential=True`` (the code path of
``smtpdcheck --sequential``).

Expected: concurrent ~ one greeting whatever N, sequential ~ N timeouts;
all silent: concurrent ~ one timeout, sequential ~ N timeouts.

Each measurement opens a fresh core (:func:`smtpdcheck.core.open_core`, as
the ``smtpdcheck`` command does), so no cached probe result helps, and
closes it afterwards so leftover probes of silent servers cannot leak into
the next measurement.  Servers are IP literals: no DNS is involved (a
nameserver is configured anyway -- an empty fake on loopback -- so that a
stray query could not leave the machine, and its query count is checked to
be zero).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import trio

from smtpdcheck.compat import TaskStatus
from smtpdcheck.core import CoreSettings, open_core
from smtpdcheck.servers import Server, parse_server
from smtpdcheck.stoprule import StopSet

from testbeds.dnsserver import FakeDNSServer
from testbeds.greeters import Farm, Greeter, Mode, start_farm

from .procs import LOOPBACK
from .report import BenchResult, Check, Table, fmt_ms, fmt_ratio

NAME = "concurrent_vs_sequential"
SILENT_COUNTS = (0, 1, 3, 5)
ALL_SILENT = 5


async def serve_fakes(lifetime: float, *, task_status: TaskStatus[tuple[Farm, FakeDNSServer]]) -> None:
    """The live greeter (127.0.0.2), the silent ones after it, and an empty
    DNS server, until cancelled or ``lifetime`` passes."""
    with trio.move_on_after(lifetime):
        async with trio.open_nursery() as fakes:
            farm = await start_farm(fakes, [Mode.OK] + [Mode.SILENT] * max(SILENT_COUNTS[-1], ALL_SILENT))
            dns = FakeDNSServer({})  # empty: nothing here should ever be asked
            await fakes.start(dns.serve)
            task_status.started((farm, dns))


@dataclass
class Measurement:
    seconds: float
    winner: str | None


async def measure(servers: list[Server], port: int, timeout: float, dns_port: int, *, sequential: bool) -> Measurement:
    """One check with a fresh core, timed on the wall clock."""
    settings = CoreSettings(
        nameservers=[(LOOPBACK, dns_port)], dns_timeout=timeout, probe_timeout=timeout, check_timeout=timeout, smtp_port=port
    )
    async with open_core(settings) as core:
        start = time.perf_counter()
        result = await core.checker.check(servers, StopSet(), sequential=sequential)
        elapsed = time.perf_counter() - start
    return Measurement(elapsed, result.winner.name if result.winner else None)


async def run(quick: bool) -> BenchResult:
    timeout = 0.4 if quick else 1.0
    repeats_fast = 5  # live-server rows: cheap, take a median
    repeats_slow = 1 if quick else 2  # all-silent concurrent: one timeout each
    result = BenchResult(
        NAME,
        "smtpdcheck core: one live server listed LAST behind N silent ones, and all silent; "
        f"Checker concurrent vs sequential=True, probe timeout {timeout:g} s. "
        "Baselines: one live server alone (live rows), one silent server alone (all-silent row).",
    )
    result.data.update(timeout=timeout, rows=[])
    lifetime = 60.0 + 20 * timeout * sum(SILENT_COUNTS)

    async with trio.open_nursery() as nursery:
        farm, dns = await nursery.start(serve_fakes, lifetime)
        dns_port, port = dns.port, farm.port
        live = farm.host(0)
        silent = [g.host for g in farm.greeters[1:]]
        by_host: dict[str, Greeter] = {g.host: g for g in farm.greeters}

        async def med(servers: list[Server], sequential: bool, repeats: int) -> Measurement:
            runs = [await measure(servers, port, timeout, dns_port, sequential=sequential) for _ in range(repeats)]
            winners = {m.winner for m in runs}
            return Measurement(statistics.median(m.seconds for m in runs), winners.pop() if len(winners) == 1 else "inconsistent")

        base_live = await med([parse_server(live)], False, repeats_fast)
        base_silent = await med([parse_server(silent[0])], False, 1)

        table = Table(
            f"wall time per check, ms (median of {repeats_fast} for concurrent live rows; timeout {timeout:g} s)",
            ["servers", "concurrent", "vs baseline", "sequential", "seq/conc", "expected seq", "winner"],
        )
        table.add("baseline: 1 live alone", fmt_ms(base_live.seconds), "1.00x", "-", "-", "-", base_live.winner or "none")
        table.add("baseline: 1 silent alone", fmt_ms(base_silent.seconds), "1.00x", "-", "-", "-", base_silent.winner or "none")
        all_ok = True
        for n in SILENT_COUNTS:
            servers = [parse_server(h) for h in silent[:n]] + [parse_server(live)]
            before = {h: by_host[h].connections for h in silent[:n]}
            conc = await med(servers, False, repeats_fast)
            seq = await measure(servers, port, timeout, dns_port, sequential=True)
            probed = sum(by_host[h].connections - before[h] for h in silent[:n])
            ok = conc.winner == live and seq.winner == live
            all_ok &= ok
            table.add(
                f"{n} silent + live (last)", fmt_ms(conc.seconds), fmt_ratio(conc.seconds, base_live.seconds),
                fmt_ms(seq.seconds), fmt_ratio(seq.seconds, conc.seconds, 0 if seq.seconds > 10 * conc.seconds else 2),
                f"~{fmt_ms(n * timeout)}" if n else "~0", conc.winner if ok else f"WRONG: {conc.winner}/{seq.winner}",
            )
            result.data["rows"].append({
                "silent": n, "live": True, "concurrent_s": conc.seconds, "sequential_s": seq.seconds,
                "seq_over_conc": seq.seconds / conc.seconds, "conc_over_baseline": conc.seconds / base_live.seconds,
                "silent_connections": probed, "winner_ok": ok,
            })
            result.checks.append(Check(
                f"{n} silent + live: concurrent < 0.1 x timeout (no timeout paid), sequential >= 0.9 x {n} timeouts",
                ok and conc.seconds < 0.1 * timeout and seq.seconds >= 0.9 * n * timeout,
                f"conc {fmt_ms(conc.seconds)} ms, seq {fmt_ms(seq.seconds)} ms",
            ))

        servers = [parse_server(h) for h in silent[:ALL_SILENT]]
        conc = await med(servers, False, repeats_slow)
        seq = await measure(servers, port, timeout, dns_port, sequential=True)
        ok = conc.winner is None and seq.winner is None
        table.add(
            f"all {ALL_SILENT} silent", fmt_ms(conc.seconds), fmt_ratio(conc.seconds, base_silent.seconds),
            fmt_ms(seq.seconds), fmt_ratio(seq.seconds, conc.seconds), f"~{fmt_ms(ALL_SILENT * timeout)}",
            "none" if ok else f"WRONG: {conc.winner}/{seq.winner}",
        )
        result.data["rows"].append({
            "silent": ALL_SILENT, "live": False, "concurrent_s": conc.seconds, "sequential_s": seq.seconds,
            "seq_over_conc": seq.seconds / conc.seconds, "conc_over_baseline": conc.seconds / base_silent.seconds,
            "winner_ok": ok,
        })
        result.checks.append(Check(
            f"all {ALL_SILENT} silent: concurrent ~ one timeout (<= 1.3 x baseline), sequential ~ {ALL_SILENT} timeouts",
            ok and conc.seconds <= 1.3 * base_silent.seconds and seq.seconds >= 0.9 * ALL_SILENT * timeout,
            f"conc {fmt_ratio(conc.seconds, base_silent.seconds)} of one silent server, seq/conc {fmt_ratio(seq.seconds, conc.seconds)}",
        ))
        result.tables.append(table)
        result.data.update(
            baseline_live_s=base_live.seconds, baseline_silent_s=base_silent.seconds, dns_queries=len(dns.queries)
        )
        if dns.queries:
            result.notes.append(f"unexpected DNS queries for IP literals: {dns.queries}")
        result.notes.append(
            "'vs baseline' is concurrent time over the one-server baseline: ~1x means extra silent servers cost "
            "nothing; 'seq/conc' is how many times longer the Mail Avenger order takes."
        )
        nursery.cancel_scope.cancel()
    return result
