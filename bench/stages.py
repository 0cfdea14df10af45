"""What one cached RCPT costs, stage by stage: ``python -m bench.stages [--total]``.

The throughput benchmark says how far the daemon is from the ceiling; this
says where the difference goes.  Each stage of the daemon's hot path is run
in-process on its own, with the daemon's own code, on one full Postfix 3.7
RCPT request whose answer is memoised, and timed per call:

* read and split: ``recv`` of one request waiting on a loopback TCP socket,
  and the parser's framing (``receive_data``, ``next_request``);
* parse: what the hot path reads of the request (is it an RCPT, the
  recipient, the queue id, the server address) beyond the framing;
* memo lookup: the memo key and the memo's lookup;
* decision line: building the line, queueing it, and its share of the
  flusher's batched write (50 lines to a file per write);
* metrics: counting the request;
* reply write: sending the reply over loopback TCP (the kernel's delivery
  to the peer included, as it is billed to the sender);
* trio: one task switch with 50 tasks runnable, as the scheduler does it
  for every ``await`` that yields.

With ``--total`` the daemon (this tree, and the previous release beside it)
is also run as a subprocess at C = 50 on the cached path, and its CPU time
per request is given: what the stages above do not explain is trio's
scheduling around them (task switches, epoll registration, the socket
wrappers' checkpoints) and the connection loop.

Figures are minimums over a few repeats (the least disturbed by other
work on the machine); the total is the median of a few rounds.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Final

import trio

from policyd import decisionlog
from policyd.config import Config
from policyd.metrics import Metrics
from policyd.protocol import NEED_DATA, PolicyParser, PolicyRequest
from policyd.responder import Responder
from smtpdcheck.core import build_core
from smtpdcheck.policy import Action, Cache, Decision, Kind, Verdict

from .workload import RequestTemplate

ROUNDS: Final = 7
CALLS: Final = 4000
BATCH: Final = 50  # decision lines per flusher write, as under load at C = 50


def _timer_overhead() -> int:
    clock = time.perf_counter_ns
    best = math.inf
    for _ in range(5):
        total = 0
        for _ in range(CALLS):
            t0 = clock()
            total += clock() - t0
        best = min(best, total)
    return int(best)


def _measure(setup: Callable[[], None], timed: Callable[[], object], overhead: int) -> float:
    """Microseconds per ``timed()`` call, ``setup()`` run untimed before each."""
    clock = time.perf_counter_ns
    best = math.inf
    for _ in range(ROUNDS):
        total = 0
        for _ in range(CALLS):
            setup()
            t0 = clock()
            timed()
            total += clock() - t0
        best = min(best, total - overhead)
    return max(best, 0) / CALLS / 1000


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server.setblocking(False)
    return client, server


def stage_table(overhead: int) -> list[tuple[str, float]]:
    """Each stage in microseconds per cached RCPT."""
    return trio.run(_stages, overhead)


async def _stages(overhead: int) -> list[tuple[str, float]]:
    from policyd.responder import core_settings

    config = Config()
    wire = RequestTemplate().render("user@d1.example")
    rows: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        core = build_core(nursery, core_settings(config))
        with tempfile.TemporaryFile() as logfile:
            sink = decisionlog.LineSink(decisionlog.StreamTarget(logfile.fileno()))
            responder = Responder(config, core, Metrics(), sink=sink)
            request = _parse(wire)
            verdict = Verdict(Action.DEFER_IF_PERMIT, Kind.PRIMARY_LIVE, "primary mx1.d1.example live", "mx1.d1.example")
            decision = Decision(verdict, "d1.example", Cache.HIT, trio.current_time() + 3600)
            responder_memo(responder, request, decision)
            now = trio.current_time()
            assert responder.answer_now(request, now) is not None
            rows += _io_stages(wire, responder, overhead)
            rows += _logic_stages(wire, responder, sink, overhead)
            rows.append(("trio: one task switch, 50 tasks runnable", await _task_switch()))
            sink.close()
        nursery.cancel_scope.cancel()
    return rows


def _parse(wire: bytes) -> PolicyRequest:
    parser = PolicyParser()
    parser.receive_data(wire)
    request = parser.next_request()
    assert isinstance(request, PolicyRequest)
    return request


def responder_memo(responder: Responder, request: PolicyRequest, decision: Decision) -> None:
    """Memoise ``decision`` for ``request`` as the responder does after a cached decision."""
    from policyd.responder import Answer, _memo_key, _middle

    answer = Answer(responder._reply(decision), decision, line=_middle(decision))
    key = _memo_key(request.recipient, request.server_address)
    assert key is not None
    responder.answers.put(key, answer, 3600)


def _io_stages(wire: bytes, responder: Responder, overhead: int) -> list[tuple[str, float]]:
    client, server = _tcp_pair()
    parser = PolicyParser()
    try:
        def send_request() -> None:
            client.sendall(wire)  # loopback delivers before sendall returns

        def read_and_split() -> object:
            parser.receive_data(server.recv(65536))
            request = parser.next_request()
            parser.next_request()
            return request

        read = _measure(send_request, read_and_split, overhead)
        reply = responder.answer_now(_parse(wire), trio.current_time())
        assert reply is not None
        data = reply.reply
        client.setblocking(False)

        def drain() -> None:
            try:
                while client.recv(65536):
                    pass
            except BlockingIOError:
                pass

        write = _measure(drain, lambda: server.send(data), overhead)
    finally:
        client.close()
        server.close()
    return [("read and split", read), ("reply write", write)]


def _logic_stages(wire: bytes, responder: Responder, sink: decisionlog.LineSink, overhead: int) -> list[tuple[str, float]]:
    from policyd.responder import _memo_key

    request = _parse(wire)
    now = trio.current_time()
    key = _memo_key(request.recipient, request.server_address)
    assert key is not None
    answer = responder.answers.get(key, now)
    assert answer is not None
    noop = lambda: None  # noqa: E731
    parse = _measure(noop, lambda: (request.is_smtpd_rcpt, request.queue_id, request.recipient), overhead)
    memo = _measure(noop, lambda: responder.answers.get(_memo_key(request.recipient, request.server_address), now),  # type: ignore[arg-type]
                    overhead)
    middle = answer.line
    count = 0

    def line() -> None:
        nonlocal count
        sink.decision(request.queue_id, request.recipient, middle, 0.0000123)
        count += 1
        if count % BATCH == 0:
            sink._send_some()

    log = _measure(noop, line, overhead)
    metrics = responder.metrics
    verdict = answer.decision.verdict
    count_it = _measure(noop, lambda: metrics.observe_request(verdict.action.value, verdict.kind.value, 0.0000123), overhead)
    return [("parse", parse), ("memo lookup", memo), ("decision line", log), ("metrics", count_it)]


async def _task_switch() -> float:
    """Microseconds per yield when 50 tasks take turns."""
    tasks, switches = 50, 200
    best = math.inf
    for _ in range(3):
        async def spin() -> None:
            for _ in range(switches):
                await trio.lowlevel.cancel_shielded_checkpoint()

        t0 = time.perf_counter_ns()
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(spin)
        best = min(best, time.perf_counter_ns() - t0)
    return best / (tasks * switches) / 1000


async def _total(rounds: int, duration: float) -> dict[str, list[float]]:
    """Daemon CPU microseconds per request at C = 50, this tree and the previous release, alternating."""
    from .policyenv import policy_env
    from .previous import PREVIOUS_RELEASE, THIS, ReleaseUnavailable
    from .procs import run_loadgen

    figures: dict[str, list[float]] = {}
    releases = [THIS, PREVIOUS_RELEASE]
    for k in range(rounds):
        for release in releases if k % 2 == 0 else releases[::-1]:
            try:
                async with policy_env(lifetime=duration + 60, log="file", release=release) as env:
                    await run_loadgen(env.job(mode="count", connections=10, count=100, domain_count=100, time_limit=30))
                    run = await run_loadgen(env.job(mode="duration", connections=50, duration=duration, warmup=0.3,
                                                    domain_count=100, time_limit=duration + 30))
            except ReleaseUnavailable:
                continue
            figures.setdefault(release.label, []).append(run["server_cpu_s"] / max(run["counted"], 1) * 1e6)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stages", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--total", action="store_true", help="also run the daemon at C=50 for its CPU time per request")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --total (default 3)")
    args = parser.parse_args(argv)
    gc.collect()
    overhead = _timer_overhead()
    rows = stage_table(overhead)
    print(f"CPU microseconds per cached RCPT, by stage (pid {os.getpid()}, load {os.getloadavg()[0]:.2f})")
    width = max(len(name) for name, _ in rows)
    for name, us in rows:
        print(f"  {name:<{width}}  {us:6.2f}")
    stages = sum(us for name, us in rows if not name.startswith("trio"))
    print(f"  {'sum of the stages above trio':<{width}}  {stages:6.2f}")
    if args.total:
        figures = trio.run(_total, args.rounds, 1.5)
        for label, values in figures.items():
            median = statistics.median(values)
            print(f"daemon at C=50, {label}: {median:.1f} us CPU per request (rounds: "
                  + ", ".join(f"{v:.1f}" for v in values) + f"); not in the stages: {median - stages:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
