"""The benchmark harness still runs, end to end, on its one deterministic benchmark.

Throughput and latency figures depend on the machine and are not tested
here; the primary-load benchmark's targets do not (a burst of RCPTs for
one domain must reach the primary exactly once, through the real daemon,
the fake DNS and the load generator), so a change that breaks the harness
or single-flight fails this test rather than the next person's benchmark.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_primary_load_benchmark_runs_and_meets_its_targets(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--only", "primary_load", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (bench,) = json.loads(out.read_text())["results"]
    assert bench["name"] == "primary_load" and bench["error"] is None
    assert len(bench["checks"]) >= 4
    failed = [c for c in bench["checks"] if not c["passed"]]
    assert not failed, failed
