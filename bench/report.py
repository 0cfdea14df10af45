"""Results and their presentation: plain-text tables, the machine, ratios.

Absolute numbers from a benchmark mean little on their own (another
machine, another load), so every figure is also given as a ratio against a
baseline measured in the same run; the tables put the two side by side.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import dns.version


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def render(self) -> str:
        widths = [len(h) for h in self.headers]
        for row in self.rows:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))
        # First column left-aligned (labels), the rest right-aligned (numbers).
        def line(cells: list[str]) -> str:
            parts = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
            return "  ".join(parts).rstrip()

        out = [self.title, line(self.headers), "  ".join("-" * w for w in widths)]
        out.extend(line(row) for row in self.rows)
        return "\n".join(out)


@dataclass
class Check:
    """A target to compare against: reported as PASS/FAIL, never fatal."""

    what: str
    passed: bool
    detail: str = ""

    def render(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"  [{'PASS' if self.passed else 'FAIL'}] {self.what}{detail}"


@dataclass
class BenchResult:
    name: str
    description: str
    tables: list[Table] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    error: str | None = None

    def render(self) -> str:
        out = [f"== {self.name} ({self.elapsed_s:.1f} s) ==", self.description, ""]
        if self.error:
            out.append(f"ERROR: {self.error}")
        for table in self.tables:
            out += [table.render(), ""]
        if self.checks:
            out.append("targets:")
            out += [c.render() for c in self.checks]
            out.append("")
        for note in self.notes:
            out.append(f"note: {note}")
        return "\n".join(out).rstrip() + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "elapsed_s": self.elapsed_s,
            "error": self.error,
            "checks": [{"what": c.what, "passed": c.passed, "detail": c.detail} for c in self.checks],
            "notes": self.notes,
            "tables": [{"title": t.title, "headers": t.headers, "rows": t.rows} for t in self.tables],
            "data": self.data,
        }


def ratio(value: float, baseline: float) -> float:
    if baseline == 0 or math.isnan(baseline) or math.isnan(value):
        return math.nan
    return value / baseline


def fmt_ratio(value: float, baseline: float, digits: int = 2) -> str:
    r = ratio(value, baseline)
    return "n/a" if math.isnan(r) else f"{r:.{digits}f}x"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def fmt_num(value: float, digits: int = 0) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def code_version() -> str:
    """The commit benchmarked, and whether the product code differed from it.

    Figures are only comparable between runs of the same code, and a
    benchmark is often run on a work tree with changes in progress.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "smtpdcheck", "policyd"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"{head}" + (" + uncommitted changes to smtpdcheck/ or policyd/" if dirty else "")


def machine_info() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        load = os.getloadavg()
    except OSError:
        load = (math.nan, math.nan, math.nan)
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "trio": metadata.version("trio"),
        "dnspython": dns.version.version,
        "loadavg_1m": load[0],
        "code": code_version(),
    }


def render_machine(info: dict[str, Any]) -> str:
    return "\n".join([
        "machine:",
        f"  cpus: {info['cpu_count']} ({info['cpus_usable']} usable), {info['cpu_model']}",
        f"  os: {info['platform']}; load average (1 min) at start: {info['loadavg_1m']:.2f}",
        f"  python {info['python']} ({info['implementation']}), trio {info['trio']}, dnspython {info['dnspython']}",
        f"  code: {info['code']}",
    ])
