"""Benchmark: the connections a primary sees from this host, per hour, and what they cost its log.

A backup MX probes its primaries for as long as their domains get mail
through it, and for ``--refresh-window`` after.  This counts those
connections with the daemon's own decision core (the ``Responder`` of the
configuration ``scripts/run`` starts), on trio's virtual clock against a
virtual primary that greets in 20 ms, so an hour of traffic is counted
exactly and at once:

* steady: one RCPT every 2 s for an hour, then an hour without mail;
* bursts: ten RCPTs at once every 5 minutes for an hour (a spam run that
  comes and goes), with the connections counted and how long the RCPTs of
  each burst waited;
* spawn(8): the steady hour split over N ``--stdio`` processes, each with
  caches of its own, round robin (Postfix hands each smtpd its own).

Each row is set against ``--refresh-window 0`` in the same run, the
baseline of a daemon that probes only when an RCPT needs it.  The log
lines per connection of each real server (measured by the tests against
them: tests/test_real_postscreen.py and the Debian roots' exim and
OpenSMTPD) turn connections into lines.

    python -m bench.probe_volume
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Final

import trio
import trio.testing

from policyd.config import Config
from policyd.request import PolicyRequest
from policyd.responder import Responder, core_settings
from smtpdcheck.core import build_core
from testbeds.postfix_request import POSTFIX_37_RCPT_ATTRS
from testbeds.virtual import Peer, VirtualDNS, VirtualNet

from .report import Table

PRIMARY: Final = "127.0.0.2"
HOUR_S: Final = 3600.0
STEADY_PERIOD_S: Final = 2.0
BURST_EVERY_S: Final = 300.0
BURST_SIZE: Final = 10
WINDOWS: Final = (600.0, 300.0, 120.0, 60.0, 0.0)
SPAWNED: Final = (1, 4, 16)

#: Log lines one probe connection leaves, by server, as the real servers logged them.
LINES_PER_CONNECTION: Final = (
    ("Postfix smtpd", 2),  # connect from, disconnect from ... quit=1 commands=1
    ("Postfix postscreen, deep tests on", 2),  # CONNECT, DISCONNECT (the greeting test passed is remembered)
    ("Postfix postscreen, greeting test only", 4),  # CONNECT, PASS OLD, smtpd's connect and disconnect
    ("exim4 (Debian's log selector)", 0),  # a clean QUIT is not logged
    ("exim4 (+smtp_connection)", 2),  # SMTP connection from ..., ... closed by QUIT
    ("exim4 (+all)", 3),  # and no MAIL in SMTP connection from ... C=QUIT
    ("OpenSMTPD", 2),  # smtp connected, smtp disconnected reason=quit
)


def request(k: int) -> PolicyRequest:
    return PolicyRequest({**POSTFIX_37_RCPT_ATTRS, "recipient": f"user{k}@d.test", "server_address": "192.0.2.25"})


def daemon(nursery: trio.Nursery, net: VirtualNet, config: Config) -> Responder:
    """The daemon's responder on ``config``, with d.test's MX 10 the virtual primary and MX 20 this host."""
    dns = VirtualDNS()
    dns.set_mx("d.test", [(10, "mx1.d.test"), (20, "backup.d.test")], ttl=86400)
    dns.set_host("mx1.d.test", [PRIMARY], ttl=86400)
    dns.set_host("backup.d.test", ["192.0.2.25"], ttl=86400)
    return Responder(config, build_core(nursery, core_settings(config), connect=net.connect, lookups=dns))


async def ask(responder: Responder, k: int) -> float:
    """One RCPT as the daemon's loop answers it; how long it waited."""
    start = trio.current_time()
    if responder.answer_now(request(k), start) is None:
        await responder.answer(request(k))
    return trio.current_time() - start


def per_hour(net: VirtualNet, start: float) -> tuple[int, int]:
    """Connections to the primary in the hour of mail and in the hour after."""
    times = [t - start for t, host in net.attempts if host == PRIMARY]
    return sum(t < HOUR_S for t in times), sum(HOUR_S <= t < 2 * HOUR_S for t in times)


def virtual(run: Callable[[trio.Nursery], object]) -> object:
    async def main() -> object:
        async with trio.open_nursery() as nursery:
            result = await run(nursery)  # type: ignore[misc]
            nursery.cancel_scope.cancel()
        return result

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def steady(config: Config, processes: int = 1) -> tuple[int, int, float]:
    """Connections during and after an hour of one RCPT per 2 s, and the longest wait."""
    async def run(nursery: trio.Nursery) -> tuple[int, int, float]:
        net = VirtualNet(nursery, {PRIMARY: Peer(greet_after=0.02)})
        responders = [daemon(nursery, net, config) for _ in range(processes)]
        start = trio.current_time()
        longest = 0.0
        for k in range(int(HOUR_S / STEADY_PERIOD_S)):
            await trio.sleep_until(start + k * STEADY_PERIOD_S)
            longest = max(longest, await ask(responders[k % processes], k))
        await trio.sleep_until(start + 2 * HOUR_S)
        return (*per_hour(net, start), longest)

    return virtual(run)  # type: ignore[return-value]


def bursts(config: Config) -> tuple[int, int, int, float]:
    """Connections during and after an hour of bursts; RCPTs that waited, and the longest wait."""
    async def run(nursery: trio.Nursery) -> tuple[int, int, int, float]:
        net = VirtualNet(nursery, {PRIMARY: Peer(greet_after=0.02)})
        responder = daemon(nursery, net, config)
        start = trio.current_time()
        waits: list[float] = []

        async def one(k: int) -> None:
            waits.append(await ask(responder, k))

        for b in range(int(HOUR_S / BURST_EVERY_S)):
            await trio.sleep_until(start + b * BURST_EVERY_S)
            async with trio.open_nursery() as burst:
                for k in range(BURST_SIZE):
                    burst.start_soon(one, b * BURST_SIZE + k)
        await trio.sleep_until(start + 2 * HOUR_S)
        during, after = per_hour(net, start)
        return during, after, sum(w > 0 for w in waits), max(waits)

    return virtual(run)  # type: ignore[return-value]


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else ("1.00x" if value == 0 else "-")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probe_volume", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    defaults = Config()
    base = replace(defaults, refresh_window=0.0)
    print(f"defaults: --cache-up-ttl {defaults.cache_up_ttl:g}, --refresh-window {defaults.refresh_window:g}\n")

    base_steady = steady(base)
    table = Table(
        "steady: one RCPT per 2 s for an hour, then none for an hour (connections to the primary)",
        ["--refresh-window", "hour of mail", "hour after", "vs window 0", "longest wait ms"],
    )
    for window in WINDOWS:
        during, after, longest = steady(replace(defaults, refresh_window=window))
        mark = " (default)" if window == defaults.refresh_window else ""
        table.add(f"{window:g}{mark}", during, after, ratio(during + after, sum(base_steady[:2])), f"{longest * 1000:.0f}")
    print(table.render(), "\n")

    base_bursts = bursts(base)
    table = Table(
        f"bursts: {BURST_SIZE} RCPTs every {BURST_EVERY_S / 60:g} minutes for an hour, then none",
        ["--refresh-window", "hour of mail", "hour after", "vs window 0", "RCPTs that waited", "longest wait ms"],
    )
    for window in WINDOWS:
        during, after, waited, longest = bursts(replace(defaults, refresh_window=window))
        mark = " (default)" if window == defaults.refresh_window else ""
        table.add(f"{window:g}{mark}", during, after, ratio(during + after, sum(base_bursts[:2])), waited, f"{longest * 1000:.0f}")
    print(table.render(), "\n")

    table = Table(
        "spawn(8): the steady hour over N --stdio processes, each with its own caches",
        ["processes", "--refresh-window", "hour of mail", "hour after", "vs one daemon"],
    )
    one = sum(steady(defaults)[:2])
    for n in SPAWNED:
        for window in sorted({defaults.refresh_window, 0.0}, reverse=True):
            during, after, _ = steady(replace(defaults, refresh_window=window), processes=n)
            table.add(n, f"{window:g}", during, after, ratio(during + after, one))
    print(table.render(), "\n")

    during, after, _ = steady(defaults)
    table = Table("log lines per hour on the primary, steady traffic, defaults", ["server", "per connection", "hour of mail", "hour after"])
    for server, lines in LINES_PER_CONNECTION:
        table.add(server, lines, during * lines, after * lines)
    print(table.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
