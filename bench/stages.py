"""What one cached RCPT costs, stage by stage: ``python -m bench.stages [--total]``.

The throughput benchmark says how far the daemon is from the ceiling; this
says where the difference goes.  Each stage of the daemon's hot path is run
in-process on its own, with the daemon's own code, on one full Postfix 3.7
RCPT request whose answer is memoised, and timed per call:

* read and split: reading one request waiting on a loopback TCP socket
  (one system call), and the parser's framing and checks
  (``receive_data``, ``next_request``); for a release that read through
  trio's ``receive_some``, also the read that finds nothing yet and raises
  before the wait, which that path paid on every request with Postfix's
  lock-step;
* parse: what the hot path reads of the request (is it an RCPT, the
  recipient, the server address, the queue id) beyond the framing;
* memo lookup: the memo key and the memo's lookup;
* decision line: building and queueing the line, and its share of the
  flusher's batched write (50 lines per write, to a file);
* metrics: counting the request;
* reply write: the system call that sends the reply over loopback TCP
  (the kernel's delivery to the peer included, as it is billed to the
  sender);
* trio scheduling and the connection loop: with ``--total``, the daemon's
  CPU time per request under load (a subprocess at C = 50 on the cached
  path, decision lines to a file, CPU from /proc) minus the stages above:
  the task switches and epoll calls around the stages, trio's socket
  wrappers where a release used them, waking the peer, and the loop's own
  bookkeeping.

``--release previous`` measures the previous release's code the same way
(run from its extracted tree, :mod:`bench.previous`), so a before/after
table comes from one machine in one sitting.  Figures are minimums over a
few repeats (the least disturbed by other work on the machine); the total
is the median of a few rounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import trio

from policyd import decisionlog
from policyd.config import Config
from policyd.metrics import Metrics
from policyd.protocol import PolicyParser, PolicyRequest
from policyd.responder import Responder, core_settings
from smtpdcheck.core import build_core
from smtpdcheck.policy import Action, Cache, Decision, Kind, Verdict

from .workload import RequestTemplate

ROUNDS: Final = 7
CALLS: Final = 3000
BATCH: Final = 50  # decision lines per flusher write, as under load at C = 50
STAGES: Final = ("read and split", "parse", "memo lookup", "decision line", "metrics", "reply write")
REST: Final = "trio scheduling and the connection loop"


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


def _measure(setup: Callable[[], object], timed: Callable[[], object], overhead: int) -> float:
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


def _parse(wire: bytes) -> PolicyRequest:
    parser = PolicyParser()
    parser.receive_data(wire)
    request = parser.next_request()
    assert isinstance(request, PolicyRequest)
    return request


def _key(request: PolicyRequest) -> Any:
    """The memo key, as this code computes it (its signature changed between releases)."""
    from policyd import responder

    memo_key: Any = responder._memo_key
    if hasattr(PolicyRequest, "rcpt_fields"):
        return memo_key(request.recipient, request.server_address)
    return memo_key(request)


async def _stages(overhead: int) -> dict[str, float]:
    """Each stage in microseconds per cached RCPT, for the code importable here."""
    from policyd import responder as responder_module

    config = Config()
    wire = RequestTemplate().render("user@d1.example")
    rows: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        core = build_core(nursery, core_settings(config))
        with tempfile.TemporaryFile() as logfile:
            sink = decisionlog.LineSink(decisionlog.StreamTarget(logfile.fileno()))
            responder = Responder(config, core, Metrics(), sink=sink)
            request = _parse(wire)
            verdict = Verdict(Action.DEFER_IF_PERMIT, Kind.PRIMARY_LIVE, "primary mx1.d1.example live", "mx1.d1.example")
            decision = Decision(verdict, "d1.example", Cache.HIT, trio.current_time() + 3600)
            answer = responder_module.Answer(responder._reply(decision), decision, line=responder_module._middle(decision))
            responder.answers.put(_key(request), answer, 3600)
            assert responder.answer_now(request, trio.current_time()) is not None
            rows.update(_io_stages(wire, answer.reply, overhead))
            rows.update(_logic_stages(wire, responder, sink, overhead))
        nursery.cancel_scope.cancel()
    return rows


def _io_stages(wire: bytes, reply: bytes, overhead: int) -> dict[str, float]:
    from policyd import server

    client, sock = _tcp_pair()
    parser = PolicyParser()
    fd = sock.fileno()
    own_wire = hasattr(server, "_SocketWire")  # reads and writes with one system call
    try:
        def split() -> object:
            request = parser.next_request()
            parser.next_request()
            return request

        def nothing_yet() -> None:
            try:
                sock.recv(65536)
            except BlockingIOError:
                pass

        def read_and_split() -> object:
            parser.receive_data(os.read(fd, 65536))
            return split()

        read = _measure(lambda: client.sendall(wire), read_and_split, overhead)
        if not own_wire:
            # receive_some tries first: with Postfix's lock-step the request is
            # not there yet, and the failed read raises before the wait.
            read += _measure(lambda: None, nothing_yet, overhead)
        client.setblocking(False)

        def drain() -> None:
            try:
                while client.recv(65536):
                    pass
            except BlockingIOError:
                pass

        write = _measure(drain, lambda: os.write(fd, reply), overhead)
    finally:
        client.close()
        sock.close()
    return {"read and split": read, "reply write": write}


def _logic_stages(wire: bytes, responder: Responder, sink: decisionlog.LineSink, overhead: int) -> dict[str, float]:
    request = _parse(wire)
    now = trio.current_time()
    answer = responder.answers.get(_key(request), now)
    assert answer is not None
    noop: Callable[[], None] = lambda: None  # noqa: E731
    if hasattr(PolicyRequest, "rcpt_fields"):
        parse = _measure(noop, request.rcpt_fields, overhead)
        fields = request.rcpt_fields()
        assert fields is not None
        from policyd.responder import _memo_key

        memo = _measure(noop, lambda: responder.answers.get(_memo_key(fields[0], fields[1]), now), overhead)  # type: ignore[arg-type]
        counted = answer.counted
        metrics = _measure(noop, lambda: responder.metrics.observe(counted, 0.0000123), overhead)
    else:
        # The memo key read the recipient and the server address; the log
        # line the queue id and the recipient again.
        parse = _measure(noop, lambda: (request.is_smtpd_rcpt, request.queue_id, request.recipient), overhead)
        memo = _measure(noop, lambda: responder.answers.get(_key(request), now), overhead)
        # The previous release's Metrics, which counted through observe_request.
        verdict = answer.decision.verdict
        observe_request = getattr(responder.metrics, "observe_request")
        metrics = _measure(noop, lambda: observe_request(verdict.action.value, verdict.kind.value, 0.0000123), overhead)
    middle = answer.line
    queue_id, recipient = request.queue_id, request.recipient
    count = 0

    def line() -> None:
        nonlocal count
        sink.decision(queue_id, recipient, middle, 0.0000123)
        count += 1
        if count % BATCH == 0:
            sink._send_some()

    # As under the running flusher: decision() only queues, the flusher writes a batch.
    sink._task = trio.lowlevel.current_task()
    try:
        log = _measure(noop, line, overhead)
    finally:
        sink._task = None
    return {"parse": parse, "memo lookup": memo, "decision line": log, "metrics": metrics}


async def _total(release_name: str, rounds: int, duration: float) -> list[float]:
    """Daemon CPU microseconds per request at C = 50 on the cached path, decision lines to a file."""
    from .policyenv import policy_env
    from .previous import PREVIOUS_RELEASE, THIS
    from .procs import run_loadgen

    release = PREVIOUS_RELEASE if release_name == "previous" else THIS
    figures: list[float] = []
    async with policy_env(lifetime=rounds * (duration + 10) + 60, log="file", release=release) as env:
        await run_loadgen(env.job(mode="count", connections=10, count=100, domain_count=100, time_limit=30))
        for _ in range(rounds):
            run = await run_loadgen(env.job(mode="duration", connections=50, duration=duration, warmup=0.3,
                                            domain_count=100, time_limit=duration + 30))
            figures.append(run["server_cpu_s"] / max(run["counted"], 1) * 1e6)
    return figures


async def _ceiling_total(rounds: int, duration: float) -> list[float]:
    """The do-nothing server's CPU microseconds per request, driven the same way."""
    from .procs import LOOPBACK, run_loadgen, start_ceiling

    ceiling, port = await start_ceiling(lifetime=rounds * (duration + 10) + 60)
    try:
        figures = []
        for _ in range(rounds):
            run = await run_loadgen({"host": LOOPBACK, "port": port, "server_pid": ceiling.pid, "expect": "DUNNO",
                                     "connections": 50, "mode": "duration", "duration": duration, "warmup": 0.3,
                                     "domain_count": 100, "time_limit": duration + 30})
            figures.append(run["server_cpu_s"] / max(run["counted"], 1) * 1e6)
        return figures
    finally:
        await ceiling.stop()
        ceiling.close()


def measure_here() -> dict[str, float]:
    """The stages of the code importable in this process."""
    gc.collect()
    return trio.run(_stages, _timer_overhead())


def measure(release: str) -> dict[str, float]:
    """The stages of ``release`` ("this" or "previous"), the previous one in a child from its own tree."""
    if release == "this":
        return measure_here()
    from .previous import PREVIOUS_RELEASE
    from .procs import REPO_ROOT, child_env

    tree = PREVIOUS_RELEASE.tree()
    # The child imports the release's packages from its tree (first on the
    # path; the test suite's fakes from ours) and loads this harness by
    # its file name, as a module of the release's bench package.
    env = child_env(tree)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    code = (
        "import importlib.util, json, sys, bench\n"
        f"spec = importlib.util.spec_from_file_location('bench.stages', {str(Path(__file__))!r})\n"
        "assert spec is not None and spec.loader is not None\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['bench.stages'] = module\n"
        "spec.loader.exec_module(module)\n"
        "print(json.dumps(module.measure_here()))\n"
    )
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=300, check=True).stdout
    figures: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stages", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--release", choices=("this", "previous", "both"), default="both",
                        help="whose code to measure (default both, side by side)")
    parser.add_argument("--total", action="store_true",
                        help="also run the daemon at C=50 for its CPU time per request (the rest is trio's)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --total (default 3)")
    args = parser.parse_args(argv)
    releases = ["previous", "this"] if args.release == "both" else [args.release]
    if "previous" in releases:
        from .previous import PREVIOUS_RELEASE, ReleaseUnavailable

        try:
            PREVIOUS_RELEASE.tree()
        except ReleaseUnavailable as exc:
            print(f"previous release not measured: {exc}")
            releases.remove("previous")
            if not releases:
                return 1
    columns: dict[str, dict[str, float]] = {}
    for _ in range(2):  # alternate, so a change in the machine's load hits both
        for release in releases:
            figures = measure(release)
            if release in columns:
                figures = {k: min(v, columns[release][k]) for k, v in figures.items()}
            columns[release] = figures
    ceiling = math.nan
    if args.total:
        for release in releases:
            columns[release]["total"] = statistics.median(trio.run(_total, release, args.rounds, 1.5))
        ceiling = statistics.median(trio.run(_ceiling_total, args.rounds, 1.5))
    load = os.getloadavg()
    print(f"CPU microseconds per cached RCPT, by stage (load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    width = max(len(REST), 20)
    print(f"  {'stage':<{width}}" + "".join(f"  {name:>9}" for name in releases))
    for stage in STAGES:
        print(f"  {stage:<{width}}" + "".join(f"  {columns[r][stage]:9.2f}" for r in releases))
    sums = {r: sum(columns[r][s] for s in STAGES) for r in releases}
    print(f"  {'sum of the stages':<{width}}" + "".join(f"  {sums[r]:9.2f}" for r in releases))
    if args.total:
        print(f"  {REST:<{width}}" + "".join(f"  {columns[r]['total'] - sums[r]:9.2f}" for r in releases))
        print(f"  {'daemon CPU per request, C=50':<{width}}" + "".join(f"  {columns[r]['total']:9.2f}" for r in releases))
        print(f"the ceiling (bench/ceiling.py) driven the same way: {ceiling:.2f} us CPU per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
