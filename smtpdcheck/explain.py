"""Explaining a decision to an admin: the MX list, the probes, the verdict.

Used by ``smtpdcheck --mx`` and ``smtpdcheck-policyd --check``; both print
exactly what the policy server would decide, because they run the same
functions on the same core.
"""

from __future__ import annotations

from .check import CheckResult
from .decision import Verdict
from .probe import printable
from .resolver import MXLookup


def explain_lines(mx: MXLookup, result: CheckResult | None, verdict: Verdict, *, mx_cached: bool = False) -> list[str]:
    lines = [f"domain {mx.domain}: {mx.kind.value}" + (f" ({mx.error})" if mx.error else "") + (" [cached]" if mx_cached else "")]
    for name in mx.ignored:
        lines.append(f"  ignored unusable MX target {printable(name)}")
    if result is not None:
        width = max((len(r.server.name) for r in result.reports), default=0)
        for report in result.reports:
            prio = report.server.prio if report.server.prio is not None else "-"
            addrs = ",".join(str(a) for a in report.addresses) or "-"
            if report.eligible:
                probes = "; ".join(p.describe() + f" {p.elapsed * 1000:.1f} ms" for p in report.probes)
                state = "UP" if report.available else "down"
                detail = probes or report.summary()
                if report.cached and report.probes:
                    detail += " [cached]"
                lines.append(f"  {prio:>5} {report.server.name:<{width}} [{addrs}] probed: {state}: {detail}")
            else:
                lines.append(f"  {prio:>5} {report.server.name:<{width}} [{addrs}] {report.summary()}")
        lines.append(f"checked in {result.elapsed * 1000:.1f} ms")
    lines.append(f"verdict: {verdict.action.value} ({verdict.reason})")
    return lines
