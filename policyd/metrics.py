"""Counters the daemon keeps for itself, cheap enough for every request.

Plain integers, no locks (one trio thread), no library on the request path.
The Prometheus exposition (:mod:`policyd.exposition`) reads them, and the
core's own counters, only when scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

#: Decision latency buckets, seconds: cached answers sit in the first ones,
#: probes of silent primaries in the last.
LATENCY_BUCKETS_S: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Age of the greeting a DEFER rested on, seconds.  With the defaults it
#: stays under --cache-up-ttl (10 s) plus the confirm grace (about 0.5 s):
#: the buckets are fine there, so the worst case can be read off.
EVIDENCE_AGE_BUCKETS_S: Final = (1.0, 2.5, 5.0, 7.5, 10.0, 10.5, 11.0, 12.5, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class Metrics:
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (action, kind)
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum: float = 0.0
    # How old the "up" was that each DEFER (or WARN) rested on: the false-defer window an operator can read.
    evidence_counts: list[int] = field(default_factory=lambda: [0] * (len(EVIDENCE_AGE_BUCKETS_S) + 1))
    evidence_sum: float = 0.0
    connections_open: int = 0
    requests_in_flight: int = 0
    connections_total: int = 0
    protocol_errors: Counter[str] = field(default_factory=Counter)
    # Connections closed by --idle-timeout: routine, so not a protocol error.
    idle_closes: int = 0
    accept_errors: int = 0
    # Connections closed unanswered: the peer is not in --allow-client.
    clients_refused: int = 0

    def observe(self, labels: tuple[str, str], seconds: float) -> None:
        """Count one request with its (action, kind) labels and its latency."""
        self.requests[labels] += 1
        self.latency_sum += seconds
        # The first bucket whose bound is >= seconds; past the last, the +Inf one.
        self.latency_counts[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1

    def observe_defer_evidence(self, age: float) -> None:
        """One DEFER answered on a greeting ``age`` seconds old."""
        self.evidence_sum += age
        self.evidence_counts[bisect_left(EVIDENCE_AGE_BUCKETS_S, age)] += 1
