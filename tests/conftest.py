"""Shared fixtures: real DNS and SMTP peers on loopback, and the core under test.

Every peer here is a real socket server on 127.0.0.0/8 (or ::1) bound to an
ephemeral port, started in pytest-trio's ``nursery`` fixture so it stops
with the test.  Greeters for one test share a port on distinct loopback
addresses (127.0.0.2, 127.0.0.3, ...) because the code under test probes a
single SMTP port on every MX host, as a real backup MX probes port 25.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
import trio

from smtpdcheck.compat import STRICT_EXCEPTION_GROUPS
from smtpdcheck.core import Core, CoreSettings, build_core
from testbeds.dnsserver import FakeDNSServer, Zone
from testbeds.greeters import Farm, Mode, start_farm
from tests.support.pytest_postfix import postfix_factory as _postfix_factory

IN_CI = os.environ.get("CI") == "true"

postfix_factory = pytest.fixture(_postfix_factory)


@pytest.fixture
def farm(nursery: trio.Nursery) -> Callable[..., object]:
    async def make(*modes: Mode, **kwargs: object) -> Farm:
        return await start_farm(nursery, modes, **kwargs)

    return make


@pytest.fixture
async def dns_server(nursery: trio.Nursery) -> AsyncIterator[FakeDNSServer]:
    server = FakeDNSServer({})
    await nursery.start(server.serve)
    yield server


@pytest.fixture
def make_core(nursery: trio.Nursery, dns_server: FakeDNSServer) -> Callable[..., Core]:
    def make(port: int = 25, *, timeout: float = 2.0, dns_timeout: float = 2.0, quit_grace: float = 0.5,
             **settings: object) -> Core:
        return build_core(nursery, CoreSettings(
            nameservers=[dns_server.address], dns_timeout=dns_timeout, probe_timeout=timeout,
            check_timeout=timeout, smtp_port=port, quit_grace=quit_grace, **settings,  # type: ignore[arg-type]
        ))

    return make


def zone_with_hosts(hosts: dict[str, list[str]], ttl_zone: Zone | None = None) -> Zone:
    """A zone of A/AAAA records: ``{"mx1.example": ["127.0.0.2", "::1"]}``."""
    zone: Zone = dict(ttl_zone or {})
    for name, addrs in hosts.items():
        v4 = [a for a in addrs if ":" not in a]
        v6 = [a for a in addrs if ":" in a]
        if v4:
            zone[(name, "A")] = v4
        if v6:
            zone[(name, "AAAA")] = v6
    return zone


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run every trio test with strict exception groups, as the commands run.

    pytest-trio calls ``trio.run`` with trio's default, which is not strict
    before trio 0.25 (see smtpdcheck.compat).  Its first ``trio`` marker
    with a ``run`` wins, and this hook runs before pytest-trio adds its own.
    """
    run = functools.partial(trio.run, strict_exception_groups=STRICT_EXCEPTION_GROUPS)
    for item in items:
        test = getattr(item, "obj", None)
        test = getattr(getattr(test, "hypothesis", None), "inner_test", test)
        if inspect.iscoroutinefunction(test):
            item.add_marker(pytest.mark.trio(run=run))
