"""The world the policy-server benchmarks run in: fake DNS, a live primary, the daemon.

The daemon is the real ``smtpdcheck-policyd`` command in its own process,
configured only through its command line (``--nameserver`` pointing at the
fake DNS, ``--smtp-port`` at the greeter's port), so what is measured is
what an administrator would run.  The fakes live in the benchmark process,
whose trio loop keeps serving them while the load generator (a third
process) runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from .fakes import PRIMARY_HOST_N, FakeDNS, GreetMode, Greeter, backup_mx_zone, loopback_address, open_greeters
from .procs import LOOPBACK, Child, start_daemon


@dataclass
class PolicyEnv:
    dns: FakeDNS
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


@asynccontextmanager
async def policy_env(
    *, lifetime: float, zone: dict[str, Any] | None = None, daemon_args: list[str] | None = None, log: str = "quiet",
) -> AsyncIterator[PolicyEnv]:
    """Start the fakes and the daemon; on exit stop the daemon and collect what it said.

    After the block, ``exit_status`` is the daemon's exit status after
    SIGTERM (0 expected) and ``problems`` lists every warning, error or
    traceback line it logged (``log``: see :data:`bench.procs.LOG_MODES`): a benchmark that "passes" while the daemon
    complains is not a pass.
    """
    async with trio.open_nursery() as nursery:
        dns = FakeDNS(wildcard=backup_mx_zone(**(zone or {})))
        dns.bind()
        nursery.start_soon(dns.serve, lifetime)
        smtp_port, (greeter,) = open_greeters([(loopback_address(PRIMARY_HOST_N), GreetMode.GREET)])
        nursery.start_soon(greeter.serve, lifetime)
        daemon, port = await start_daemon(dns.port, smtp_port, daemon_args, lifetime=lifetime, log=log)
        env = PolicyEnv(dns, greeter, daemon, port)
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
