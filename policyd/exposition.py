"""The Prometheus endpoint: our counters in the text exposition format.

prometheus-client provides the metric families and the exposition format;
its own HTTP server runs in a thread, so the endpoint here is a minimal
HTTP/1.0 responder on trio.  Values are read from the daemon's plain
counters at scrape time, so nothing on the request path touches the
library.  The request read is bounded in size and time: the endpoint is
one more socket that hostile peers can reach.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio

from smtpdcheck.cache import REASONS
from smtpdcheck.compat import TaskStatus

from .metrics import EVIDENCE_AGE_BUCKETS_S, LATENCY_BUCKETS_S

if TYPE_CHECKING:
    from .responder import Responder

log = logging.getLogger("smtpdcheck.policyd")

MAX_HTTP_REQUEST_BYTES = 8192
HTTP_TIMEOUT_S = 5.0


class MetricsUnavailable(RuntimeError):
    """--metrics was asked for but prometheus-client is not installed."""


def make_registry(responder: Responder) -> object:
    try:
        from prometheus_client.core import (
            CollectorRegistry,
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
    except ImportError as exc:
        raise MetricsUnavailable("--metrics needs prometheus-client: pip install 'smtpdcheck[metrics]'") from exc

    class Collector:
        def collect(self) -> Iterator[object]:
            m = responder.metrics
            requests = CounterMetricFamily(
                "smtpdcheck_policy_requests", "Policy requests answered, by action and reason", labels=["action", "reason"]
            )
            for (action, kind), value in sorted(m.requests.items()):
                requests.add_metric([action, kind], value)
            yield requests
            yield HistogramMetricFamily(
                "smtpdcheck_policy_decision_seconds", "Time to answer a policy request",
                buckets=_cumulative(LATENCY_BUCKETS_S, m.latency_counts), sum_value=m.latency_sum,
            )
            yield HistogramMetricFamily(
                "smtpdcheck_defer_evidence_age_seconds",
                "Age of the primary's greeting (the 'up' evidence) when each DEFER was answered",
                buckets=_cumulative(EVIDENCE_AGE_BUCKETS_S, m.evidence_counts), sum_value=m.evidence_sum,
            )
            probes = CounterMetricFamily("smtpdcheck_probes", "SMTP greeting probes made, by outcome", labels=["outcome"])
            for outcome, value in responder.core.prober.outcomes.items():
                probes.add_metric([outcome.value], value)
            yield probes
            hits = CounterMetricFamily("smtpdcheck_cache_hits", "Cache hits", labels=["cache"])
            misses = CounterMetricFamily("smtpdcheck_cache_misses", "Cache misses", labels=["cache"])
            size = GaugeMetricFamily("smtpdcheck_cache_entries", "Entries in each cache", labels=["cache"])
            for name, cache in (
                ("answer", responder.answers),
                ("probe", responder.core.prober.flights.cache),
                ("mx", responder.core.resolver.mx_flights.cache),
                ("address", responder.core.resolver.address_flights.cache),
            ):
                hits.add_metric([name], cache.hits)
                misses.add_metric([name], cache.misses)
                size.add_metric([name], len(cache))
            yield hits
            yield misses
            yield size
            refreshes = CounterMetricFamily(
                "smtpdcheck_refreshes", "Background refreshes of cached entries, by outcome", labels=["cache", "outcome"]
            )
            stale = CounterMetricFamily("smtpdcheck_stale_answers", "Expired entries served while being refreshed", labels=["cache"])
            fresh = GaugeMetricFamily("smtpdcheck_cache_kept_fresh", "Entries used recently enough to be kept fresh", labels=["cache"])
            background = CounterMetricFamily(
                "smtpdcheck_background_fetches",
                "Fetches no request waited for (DNS queries, probes), by cache and why they were started",
                labels=["cache", "reason"],
            )
            for name, flights in (
                ("probe", responder.core.prober.flights),
                ("mx", responder.core.resolver.mx_flights),
                ("address", responder.core.resolver.address_flights),
            ):
                for how in ("ok", "failed"):
                    refreshes.add_metric([name, how], flights.refreshes[how])
                stale.add_metric([name], flights.stale_served)
                fresh.add_metric([name], flights.kept_fresh())
                for reason in REASONS:
                    background.add_metric([name, reason], flights.background[reason])
            yield refreshes
            yield stale
            yield fresh
            yield background
            yield CounterMetricFamily("smtpdcheck_dns_failures", "DNS queries that failed or timed out", value=responder.core.resolver.failures)
            yield GaugeMetricFamily("smtpdcheck_connections_open", "Postfix connections open", value=m.connections_open)
            yield CounterMetricFamily("smtpdcheck_connections", "Postfix connections accepted", value=m.connections_total)
            yield CounterMetricFamily(
                "smtpdcheck_accept_errors", "accept() failures for lack of resources (EMFILE, ...)", value=m.accept_errors
            )
            yield CounterMetricFamily(
                "smtpdcheck_clients_refused", "Connections closed unanswered: the client is not in --allow-client",
                value=m.clients_refused,
            )
            yield CounterMetricFamily(
                "smtpdcheck_idle_closes", "Postfix connections closed after --idle-timeout of silence", value=m.idle_closes
            )
            sink = responder.sink
            yield CounterMetricFamily(
                "smtpdcheck_log_lines_dropped", "Log lines dropped: the log target did not keep up, or writing to it failed",
                value=sink.dropped if sink is not None else 0,
            )
            errors = CounterMetricFamily("smtpdcheck_protocol_errors", "Connections closed for protocol errors", labels=["reason"])
            for reason, value in sorted(m.protocol_errors.items()):
                errors.add_metric([reason], value)
            yield errors

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())  # type: ignore[arg-type]
    return registry


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (the last one +Inf) as Prometheus's cumulative buckets."""
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(bounds, counts):
        running += count
        buckets.append((repr(bound), running))
    buckets.append(("+Inf", running + counts[-1]))
    return buckets


def render(registry: object) -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(registry)  # type: ignore[arg-type]


async def _serve_one(stream: trio.SocketStream, registry: object) -> None:
    try:
        request = b""
        with trio.move_on_after(HTTP_TIMEOUT_S):
            while b"\r\n\r\n" not in request and b"\n\n" not in request and len(request) < MAX_HTTP_REQUEST_BYTES:
                data = await stream.receive_some(4096)
                if not data:
                    break
                request += data
        line = request.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
        parts = line.split()
        if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] in (b"/metrics", b"/"):
            try:
                body = render(registry)
                head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
            except Exception as exc:  # a bug in a collector must not stop the daemon; the scraper sees 500
                log.exception("rendering /metrics failed (%s); answered 500", type(exc).__name__)
                body = b"metrics unavailable\n"
                head = b"HTTP/1.0 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
        else:
            body = b"not found\n"
            head = b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
        with trio.move_on_after(HTTP_TIMEOUT_S):
            await stream.send_all(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def serve_metrics(
    listeners: list[trio.SocketListener], registry: object, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await _serve_one(stream, registry)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(trio.serve_listeners, handler, [listener])
        task_status.started()
