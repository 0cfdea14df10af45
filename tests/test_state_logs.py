"""What an administrator keeps with --log-level warning: state changes and limits reached, not decisions.

On virtual time (trio's MockClock): a limit reached under load is logged at
most once a minute, with how many times it was reached meanwhile.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from policyd.config import Config
from policyd.protocol import PolicyRequest
from policyd.responder import Responder, core_settings
from smtpdcheck.core import build_core
from testbeds.postfix_request import POSTFIX_37_RCPT_ATTRS
from testbeds.virtual import SILENT, VirtualDNS, VirtualNet


def request(recipient: str) -> PolicyRequest:
    return PolicyRequest({**POSTFIX_37_RCPT_ATTRS, "recipient": recipient, "server_address": "192.0.2.25"})


async def test_probe_limit_reached_is_a_throttled_warning(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="smtpdcheck")
    dns = VirtualDNS()
    dns.set_mx("d.test", [(10, "mx1.d.test"), (10, "mx2.d.test"), (20, "backup.d.test")], ttl=86400)
    dns.set_host("mx1.d.test", ["127.0.0.2"], ttl=86400)
    dns.set_host("mx2.d.test", ["127.0.0.3"], ttl=86400)
    dns.set_host("backup.d.test", ["192.0.2.25"], ttl=86400)
    net = VirtualNet(nursery, {"127.0.0.2": SILENT, "127.0.0.3": SILENT})
    config = Config(max_probes=1, timeout=5.0, cache_down_ttl=0, refresh_window=0)
    responder = Responder(config, build_core(nursery, core_settings(config), connect=net.connect, lookups=dns))
    for _ in range(3):  # each RCPT: one probe times out, the other finds no slot
        await responder.answer(request("user@d.test"))
    await trio.sleep(60)
    await responder.answer(request("user@d.test"))
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "limit" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0][0] == lines[1][0] == logging.WARNING
    assert lines[0][1].startswith("probe limit reached (--max-probes 1): mx")
    assert lines[0][1].endswith(" not probed, counted as down")
    assert lines[1][1].endswith(" not probed, counted as down (2 more since the last such line)")
