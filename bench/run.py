"""Entry point: ``python -m bench.run [--quick] [--only NAME[,NAME]] [--json out.json]``.

Prints the machine, then one block of tables per benchmark as it
finishes.  Targets are reported PASS/FAIL but never fail the run: a
benchmark is a measurement, and a slow CI machine is not a bug.  The exit
status is 1 only when a benchmark could not run at all (a harness or
daemon start-up error), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final

import trio

from smtpdcheck.compat import STRICT_EXCEPTION_GROUPS

from . import cached_throughput, concurrent_vs_sequential, memory, outage, primary_load, refresh
from .report import BenchResult, machine_info, render_machine

Bench = Callable[[bool], Awaitable[BenchResult]]

BENCHMARKS: Final[dict[str, Bench]] = {
    concurrent_vs_sequential.NAME: concurrent_vs_sequential.run,
    cached_throughput.NAME: cached_throughput.run,
    primary_load.NAME: primary_load.run,
    memory.NAME: memory.run,
    refresh.NAME: refresh.run,
    outage.NAME: outage.run,
}

#: Hard wall-clock cap per benchmark (full, quick): whatever goes wrong, the
#: run ends.  Well above the expected durations on two cores (full: about
#: 17, 150, 3, 2 x 160 (its own time limit, for this tree and the previous
#: release), 61 and 135 s; quick: about 7, 40, 1-2, 2 x 31, 16 and 40 s).
TIME_CAPS_S: Final[dict[str, tuple[float, float]]] = {
    concurrent_vs_sequential.NAME: (90.0, 45.0),
    cached_throughput.NAME: (360.0, 120.0),
    primary_load.NAME: (120.0, 60.0),
    memory.NAME: (420.0, 120.0),
    refresh.NAME: (150.0, 60.0),
    outage.NAME: (270.0, 120.0),
}


def run_one(name: str, quick: bool) -> BenchResult:
    """One benchmark in its own trio run, so a failure cannot leak into the next."""
    cap = TIME_CAPS_S[name][1 if quick else 0]

    async def capped() -> BenchResult:
        with trio.fail_after(cap):
            return await BENCHMARKS[name](quick)

    start = time.perf_counter()
    try:
        result = trio.run(capped, strict_exception_groups=STRICT_EXCEPTION_GROUPS)
    except Exception as exc:  # report and go on with the next benchmark
        result = BenchResult(name, "failed to run")
        if isinstance(exc, trio.TooSlowError):
            result.error = f"over its {cap:g} s time cap"
        else:
            result.error = f"{type(exc).__name__}: {exc}"
            result.notes.append(traceback.format_exc(limit=8))
    result.elapsed_s = time.perf_counter() - start
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs for a smoke check (about 2 minutes in all)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help=f"run only these benchmarks (repeatable or comma-separated): {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write all results as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")

    info = machine_info()
    print(render_machine(info))
    print(f"mode: {'quick' if args.quick else 'full'}; benchmarks: {', '.join(names)}\n", flush=True)
    started = time.perf_counter()
    results: list[BenchResult] = []
    for name in names:
        result = run_one(name, args.quick)
        results.append(result)
        print(result.render(), flush=True)

    total = time.perf_counter() - started
    failed_targets = [(r.name, c.what) for r in results for c in r.checks if not c.passed]
    errors = [r.name for r in results if r.error]
    print(f"total {total:.1f} s; targets: {sum(len(r.checks) for r in results) - len(failed_targets)} pass, "
          f"{len(failed_targets)} fail; benchmarks that could not run: {', '.join(errors) or 'none'}")
    for bench, what in failed_targets:
        print(f"  FAIL {bench}: {what}")
    if args.json:
        doc = {"machine": info, "mode": "quick" if args.quick else "full", "total_s": total,
               "results": [r.to_json() for r in results]}
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
