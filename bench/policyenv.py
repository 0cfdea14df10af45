"""The world the policy-server benchmarks run in: fake DNS, a live primary, the daemon.

The daemon is the real ``smtpdcheck-policyd`` command in its own process,
configured only through its command line (``--nameserver`` pointing at the
fake DNS, ``--smtp-port`` at the greeter's port), so what is measured is
what an administrator would run.  The fakes are the test suite's own
(``testbeds``), the DNS server in its fast mode; they live in the
benchmark process, whose trio loop keeps serving them while the load
generator (a third process) runs, and they stop with ``lifetime`` at the
latest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from smtpdcheck.compat import TaskStatus
from testbeds.dnsserver import FakeDNSServer, backup_mx_zone
from testbeds.greeters import Farm, Greeter, Mode, start_farm

from .previous import THIS, Release
from .procs import LOOPBACK, Child, start_daemon

#: Zone TTL: long enough that nothing expires during a benchmark.
DNS_TTL = 3600


@dataclass
class PolicyEnv:
    dns: FakeDNSServer
    greeter: Greeter
    daemon: Child
    port: int
    exit_status: int | None = None
    stderr: str = ""
    problems: list[str] = field(default_factory=list)

    def job(self, **fields: Any) -> dict[str, Any]:
        """A load-generator job against the daemon (fields override the defaults)."""
        base: dict[str, Any] = {"host": LOOPBACK, "port": self.port, "server_pid": self.daemon.pid}
        base.update(fields)
        return base


async def _serve_fakes(
    lifetime: float, zone: dict[str, Any], *, task_status: TaskStatus[tuple[Farm, FakeDNSServer]]
) -> None:
    """The primary's greeter and the DNS server, until cancelled or ``lifetime`` passes."""
    with trio.move_on_after(lifetime):
        async with trio.open_nursery() as fakes:
            farm = await start_farm(fakes, [Mode.OK])
            primary = farm.greeters[0].host
            dns = FakeDNSServer(
                wildcard=backup_mx_zone(primary, backup_address=LOOPBACK, **zone), ttl=DNS_TTL, fast=True
            )
            await fakes.start(dns.serve)
            task_status.started((farm, dns))


@asynccontextmanager
async def policy_env(
    *, lifetime: float, zone: dict[str, Any] | None = None, daemon_args: list[str] | None = None, log: str = "quiet",
    release: Release = THIS,
) -> AsyncIterator[PolicyEnv]:
    """Start the fakes and the daemon; on exit stop the daemon and collect what it said.

    After the block, ``exit_status`` is the daemon's exit status after
    SIGTERM (0 expected) and ``problems`` lists every warning, error or
    traceback line it logged (``log``: see :data:`bench.procs.LOG_MODES`): a benchmark that "passes" while the daemon
    complains is not a pass.  ``release`` picks the daemon's code (:mod:`bench.previous`).
    """
    async with trio.open_nursery() as nursery:
        farm, dns = await nursery.start(_serve_fakes, lifetime, zone or {})
        daemon, port = await start_daemon(dns.port, farm.port, daemon_args, lifetime=lifetime, log=log, release=release)
        env = PolicyEnv(dns, farm.greeters[0], daemon, port)
        try:
            yield env
        finally:
            with trio.CancelScope(shield=True):
                alive = daemon.alive()
                env.exit_status = await daemon.stop()
                env.stderr = daemon.stderr_text()
                env.problems += daemon.problems()
                daemon.close()
                if not alive:
                    env.problems.append(f"daemon died during the benchmark (status {env.exit_status})")
                elif env.exit_status != 0:
                    env.problems.append(f"daemon exited with status {env.exit_status} after SIGTERM")
            nursery.cancel_scope.cancel()
