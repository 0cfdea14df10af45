"""A primary that stops greeting, over real sockets, with the default configuration.

The timing rules are tested to the millisecond on virtual time
(test_outage.py); here the daemon runs in-process with nothing but its
ports set, against a real DNS server and real greeters, and a primary that
hangs and one that refuses (RST) must each get their first DUNNO within the
default up TTL plus the confirm grace of going down, with no DEFER after it
and no RCPT waiting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import pytest
import trio

from policyd.config import Config
from smtpdcheck.belief import confirm_grace
from tests.conftest import Farm
from tests.policyd_helpers import start_policyd
from testbeds.dnsserver import FakeDNSServer
from testbeds.greeters import Mode
from tests.test_refresh_wire import SLOW, Stream, backup_zone, describe, steady

PERIOD = 0.25
"""One RCPT every 250 ms per domain."""
DEFAULTS = Config()
#: Real time: the refresh task, the loopback and a busy machine.
SLACK = 0.5


async def test_a_primary_that_hangs_or_refuses_gets_dunno_within_the_bound_with_the_defaults(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smtpdcheck")
    f = await farm(Mode.OK, Mode.OK)
    hangs, refuses = f.greeters
    dns_server.zone.update(backup_zone("hangs.example", f.host(0)))
    dns_server.zone.update(backup_zone("refuses.example", f.host(1)))
    config = Config(listen=("inet:127.0.0.1:0",), nameserver=(f"127.0.0.1:{dns_server.port}",), smtp_port=f.port)
    running = await start_policyd(nursery, config)
    grace = confirm_grace(0.0, DEFAULTS.timeout)  # the greeters greet at once
    streams = {"hangs": Stream(), "refuses": Stream()}
    async with trio.open_nursery() as inner:
        for name, out in streams.items():
            inner.start_soon(partial(steady, running, f"{name}.example", DEFAULTS.cache_up_ttl + grace + 3.0, out, period=PERIOD))
        # Down right after the first probes: their next confirmation is a TTL away (a little less: jitter).
        with trio.fail_after(5):
            await hangs.wait_until(lambda: hangs.connections == 1 and hangs.active == 0)
            await refuses.wait_until(lambda: refuses.connections == 1 and refuses.active == 0)
        went_down = trio.current_time()
        hangs.mode = Mode.SILENT
        refuses.mode = Mode.REFUSE

    bound = {"hangs": DEFAULTS.cache_up_ttl + grace, "refuses": DEFAULTS.cache_up_ttl}
    for name, out in streams.items():
        origin = out.samples[0].sent
        first = out.first("DUNNO", went_down)
        assert first is not None, describe(out.samples, origin)
        assert first.sent - went_down <= bound[name] + PERIOD + SLACK, describe(out.samples, origin)
        assert first.sent - went_down <= 15.0
        assert all(s.action == "DEFER_IF_PERMIT" for s in out.samples if s.sent < first.sent)
        assert {s.action for s in out.samples if s.sent >= first.sent} == {"DUNNO"}, describe(out.samples, origin)
        assert not out.slow(SLOW), describe(out.slow(SLOW), origin)
    decisions = [r.getMessage() for r in caplog.records if "rcpt=<" in r.getMessage()]
    assert any("hangs.example action=DUNNO reason=\"primary mx1.hangs.example unconfirmed" in d for d in decisions)
    assert not any("refuses.example action=DUNNO reason=\"primary mx1.refuses.example unconfirmed" in d for d in decisions)
    # A DEFER never rested on a greeting older than the TTL plus the grace.
    ages = running.responder.metrics.evidence_counts
    assert sum(ages) == sum(1 for out in streams.values() for s in out.samples if s.action == "DEFER_IF_PERMIT")
