"""The daemon's own counters: a request lands in the histogram bucket Prometheus expects."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from policyd.metrics import EVIDENCE_AGE_BUCKETS_S, LATENCY_BUCKETS_S, Metrics


def expected_bucket(seconds: float) -> int:
    """Prometheus's rule, spelled out: the first bucket whose upper bound is >= the value."""
    for i, bound in enumerate(LATENCY_BUCKETS_S):
        if seconds <= bound:
            return i
    return len(LATENCY_BUCKETS_S)  # +Inf


@given(st.one_of(st.sampled_from(LATENCY_BUCKETS_S), st.floats(min_value=0.0, max_value=60.0)))
def test_a_request_is_counted_in_the_first_bucket_that_holds_it(seconds: float) -> None:
    metrics = Metrics()
    metrics.observe(("DUNNO", "all down"), seconds)
    assert metrics.latency_counts == [int(i == expected_bucket(seconds)) for i in range(len(LATENCY_BUCKETS_S) + 1)]
    assert metrics.requests[("DUNNO", "all down")] == 1 and metrics.latency_sum == seconds


@given(st.one_of(st.sampled_from(EVIDENCE_AGE_BUCKETS_S), st.floats(min_value=0.0, max_value=600.0)))
def test_a_defer_is_counted_in_the_first_evidence_age_bucket_that_holds_it(age: float) -> None:
    metrics = Metrics()
    metrics.observe_defer_evidence(age)
    expected = next((i for i, bound in enumerate(EVIDENCE_AGE_BUCKETS_S) if age <= bound), len(EVIDENCE_AGE_BUCKETS_S))
    assert metrics.evidence_counts == [int(i == expected) for i in range(len(EVIDENCE_AGE_BUCKETS_S) + 1)]
    assert metrics.evidence_sum == age
