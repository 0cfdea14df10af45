"""The Prometheus endpoint over a real socket: what it serves, and that a
failure while rendering answers 500 without stopping anything."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import trio
from prometheus_client.core import CollectorRegistry, CounterMetricFamily

from policyd.exposition import make_registry, serve_metrics
from tests.conftest import Farm
from tests.policyd_helpers import policyd_config, start_policyd
from testbeds.dnsserver import FakeDNSServer
from testbeds.greeters import Mode


class Flaky:
    """A collector that raises on the scrapes it is told to, then recovers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    def collect(self) -> Iterator[CounterMetricFamily]:
        if self.failures:
            self.failures -= 1
            raise ZeroDivisionError("collector bug")
        yield CounterMetricFamily("flaky_scrapes", "Scrapes that worked", value=1)


async def scrape(port: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        body = b""
        for _ in range(1000):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            body += chunk
        return body


async def serving(nursery: trio.Nursery, registry: object) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(serve_metrics, listeners, registry)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def test_render_failure_answers_500_and_keeps_serving(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Flaky(failures=2))  # type: ignore[arg-type]
    port = await serving(nursery, registry)
    with trio.fail_after(10):
        first = await scrape(port)
        second = await scrape(port)
        third = await scrape(port)
    for failed in (first, second):
        assert failed.startswith(b"HTTP/1.0 500 ")
        assert b"flaky" not in failed  # no partial exposition
    assert third.startswith(b"HTTP/1.0 200 OK")
    assert b"flaky_scrapes_total 1.0" in third
    logged = [r for r in caplog.records if "ZeroDivisionError" in r.getMessage()]
    assert len(logged) == 2  # once per failure, naming the exception type


async def test_unknown_path_is_404(nursery: trio.Nursery) -> None:
    port = await serving(nursery, CollectorRegistry(auto_describe=False))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(10):
        async with stream:
            await stream.send_all(b"GET /other HTTP/1.0\r\n\r\n")
            reply = await stream.receive_some(65536)
    assert reply.startswith(b"HTTP/1.0 404 ")


async def test_idle_closes_and_protocol_errors_are_separate(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]
) -> None:
    f = await farm(Mode.OK)
    running = await start_policyd(nursery, policyd_config(dns_server.port, f.port))
    running.responder.metrics.idle_closes = 3
    running.responder.metrics.protocol_errors["timeout"] = 1
    port = await serving(nursery, make_registry(running.responder))
    with trio.fail_after(10):
        text = (await scrape(port)).decode()
    assert "smtpdcheck_idle_closes_total 3.0" in text
    assert 'smtpdcheck_protocol_errors_total{reason="timeout"} 1.0' in text


async def test_background_fetches_by_cache_and_reason(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]
) -> None:
    f = await farm(Mode.OK)
    running = await start_policyd(nursery, policyd_config(dns_server.port, f.port))
    core = running.responder.core
    core.resolver.mx_flights.background["refresh-ahead"] = 3
    core.prober.flights.background["retry-after-failure"] = 1
    port = await serving(nursery, make_registry(running.responder))
    with trio.fail_after(10):
        text = (await scrape(port)).decode()
    assert 'smtpdcheck_background_fetches_total{cache="mx",reason="refresh-ahead"} 3.0' in text
    assert 'smtpdcheck_background_fetches_total{cache="probe",reason="retry-after-failure"} 1.0' in text
    # Every cache and reason is there from the start, at 0, so rates work from the first scrape.
    lines = [line for line in text.splitlines() if line.startswith("smtpdcheck_background_fetches_total{")]
    assert len(lines) == 3 * 3
    assert 'smtpdcheck_background_fetches_total{cache="address",reason="stale-use"} 0.0' in text


async def test_defer_evidence_age_is_a_histogram_an_operator_reads_the_worst_case_from(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]
) -> None:
    f = await farm(Mode.OK)
    running = await start_policyd(nursery, policyd_config(dns_server.port, f.port))
    for age in (0.2, 3.0, 10.3, 400.0):
        running.responder.metrics.observe_defer_evidence(age)
    port = await serving(nursery, make_registry(running.responder))
    with trio.fail_after(10):
        text = (await scrape(port)).decode()
    assert "# TYPE smtpdcheck_defer_evidence_age_seconds histogram" in text
    assert 'smtpdcheck_defer_evidence_age_seconds_bucket{le="1.0"} 1.0' in text
    assert 'smtpdcheck_defer_evidence_age_seconds_bucket{le="10.0"} 2.0' in text
    assert 'smtpdcheck_defer_evidence_age_seconds_bucket{le="10.5"} 3.0' in text
    assert 'smtpdcheck_defer_evidence_age_seconds_bucket{le="300.0"} 3.0' in text
    assert 'smtpdcheck_defer_evidence_age_seconds_bucket{le="+Inf"} 4.0' in text
    assert "smtpdcheck_defer_evidence_age_seconds_count 4.0" in text
    assert "smtpdcheck_defer_evidence_age_seconds_sum 413.5" in text
