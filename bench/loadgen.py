"""A Postfix-like load generator, run in its own process: ``python -m bench.loadgen``.

It reads one JSON job on stdin and writes one JSON result on stdout.

Why not trio here: the generator must cost as little CPU per request as
possible, or on a two-core machine it measures itself instead of the
server.  A single-threaded ``selectors`` (epoll) loop over non-blocking
sockets spends a few microseconds per request, well under what any trio
server needs, so the server under test is the bottleneck.  Like Postfix,
each connection has at most one request outstanding and sends the next one
as soon as the reply is complete.

Modes:

* ``duration``: run ``warmup`` seconds unmeasured, then count replies
  completed during ``duration`` seconds; throughput and latency come from
  that window only.
* ``count``: send exactly ``count`` requests in total, then stop.

Request ``k`` (0-based, in send order) goes to ``user{k}@d{i}.example``
with ``i = domain_start + k % domain_count``.

Every run is bounded by ``time_limit``; a request unanswered for
``stall_limit`` seconds is an error and its connection is replaced; at most
``max_reconnects`` replacements are made.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

from .workload import RequestTemplate, recipient

_NS: Final = 1_000_000_000
_RECV: Final = 65536
_MAX_REPLY: Final = 8192
_TICK_S: Final = 0.05


@dataclass
class Job:
    host: str
    port: int
    connections: int
    mode: str = "duration"  # or "count"
    duration: float = 3.0
    warmup: float = 0.3
    count: int = 0
    domain_start: int = 0
    domain_count: int = 1
    server_address: str = "127.0.0.1"
    expect: str | None = "DEFER_IF_PERMIT"
    server_pid: int = 0  # for CPU time and RSS of the server under test
    rss_every: int = 0  # sample the server's RSS every N completed requests
    time_limit: float = 60.0
    stall_limit: float = 10.0
    connect_timeout: float = 5.0
    max_reconnects: int = 100


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    sent_at: int = 0  # perf_counter_ns of the outstanding request; 0 = idle
    answered: int = 0  # replies received on this connection
    closed: bool = False


def read_status_kb(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` size field (``VmRSS``, ``VmHWM``) in KiB; 0 if unreadable."""
    prefix = key.encode("ascii") + b":"
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(prefix):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def read_rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (0 if it is gone)."""
    return read_status_kb(pid, "VmRSS")


def read_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` in seconds, from /proc (0.0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
        fields = raw[raw.rindex(b")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def read_system_cpu_s() -> tuple[float, float]:
    """Machine-wide (busy, steal) CPU seconds from /proc/stat, all CPUs together.

    Compared with the CPU time of the server and of this process over the
    same window, it shows how much other work competed with the benchmark.
    """
    try:
        with open("/proc/stat", "rb") as fh:
            fields = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    if not sorted_ns:
        return float("nan")
    rank = max(0, min(len(sorted_ns) - 1, int(round(q * len(sorted_ns) + 0.5)) - 1))
    return sorted_ns[rank] / 1e6


class LoadGenerator:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.template = RequestTemplate(job.server_address)
        self.expect = f"action={job.expect}".encode() if job.expect else None
        self.sel = selectors.DefaultSelector()
        self.conns: list[_Conn] = []
        self.next_k = 0
        self.completed = 0
        self.errors: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()
        self.latencies: list[int] = []
        self.first_replies: list[int] = []
        self.measuring = False
        self.window_start_ns = 0
        self.measured = 0
        self.sending = True
        self.reconnects = 0
        self.rss: list[tuple[int, int]] = []

    # -- connections ------------------------------------------------------

    def _connect(self) -> _Conn | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.job.connect_timeout)
        try:
            sock.connect((self.job.host, self.job.port))
        except OSError as exc:
            sock.close()
            self.errors[f"connect: {type(exc).__name__}"] += 1
            return None
        sock.setblocking(False)
        conn = _Conn(sock)
        self.sel.register(sock, selectors.EVENT_READ, conn)
        self.conns.append(conn)
        return conn

    def _drop(self, conn: _Conn, reason: str) -> None:
        """Count an error, close the connection and, within budget, replace it."""
        if conn.closed:
            return
        conn.closed = True
        self.errors[reason] += 1
        self.sel.unregister(conn.sock)
        conn.sock.close()
        self.conns.remove(conn)
        if self.sending and self.reconnects < self.job.max_reconnects:
            self.reconnects += 1
            fresh = self._connect()
            if fresh is not None:
                self._send_next(fresh)

    # -- requests ---------------------------------------------------------

    def _send_next(self, conn: _Conn) -> None:
        job = self.job
        if not self.sending or (job.mode == "count" and self.next_k >= job.count):
            conn.sent_at = 0
            return
        k = self.next_k
        self.next_k += 1
        payload = self.template.render(recipient(k, job.domain_start + k % job.domain_count))
        conn.sent_at = time.perf_counter_ns()
        try:
            sent = conn.sock.send(payload)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._drop(conn, f"send: {type(exc).__name__}")
            return
        if sent < len(payload):  # a full send buffer: rare, so just wait for it
            try:
                conn.sock.settimeout(job.stall_limit)
                conn.sock.sendall(payload[sent:])
                conn.sock.setblocking(False)
            except OSError as exc:
                self._drop(conn, f"send: {type(exc).__name__}")

    def _on_readable(self, conn: _Conn, now: int) -> None:
        if conn.closed:  # dropped earlier in the same batch of events
            return
        try:
            data = conn.sock.recv(_RECV)
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop(conn, f"recv: {type(exc).__name__}")
            return
        if not data:
            self._drop(conn, "closed by server" if conn.sent_at else "closed while idle")
            return
        if not conn.sent_at:
            self._drop(conn, "unsolicited bytes")
            return
        conn.buf += data
        if not conn.buf.endswith(b"\n\n"):
            if len(conn.buf) > _MAX_REPLY:
                self._drop(conn, "reply too long")
            return
        reply = bytes(conn.buf)
        conn.buf.clear()
        if reply.count(b"\n") != 2 or not reply.startswith(b"action="):
            self._drop(conn, "malformed reply")
            return
        self.completed += 1
        if not conn.answered:
            # The first reply on a connection includes waiting to be accepted.
            self.first_replies.append(now - conn.sent_at)
        conn.answered += 1
        word = reply[7:].split(b" ", 1)[0].split(b"\n", 1)[0]
        self.actions[word.decode("ascii", "replace")] += 1
        if self.expect is not None and not reply.startswith(self.expect):
            self.errors["unexpected action"] += 1
        if self.measuring:
            self.measured += 1
            # Latency only of requests sent inside the window: one sent
            # during the warm-up may have waited for its connection to be
            # accepted, which is start-up, not steady state.
            if conn.sent_at >= self.window_start_ns:
                self.latencies.append(now - conn.sent_at)
        if self.job.rss_every and self.completed % self.job.rss_every == 0:
            self.rss.append((self.completed, read_rss_kb(self.job.server_pid)))
        self._send_next(conn)

    def _check_stalls(self, now: int) -> None:
        limit = int(self.job.stall_limit * _NS)
        for conn in list(self.conns):
            if conn.sent_at and now - conn.sent_at > limit:
                self._drop(conn, "no reply within stall limit")

    # -- the run ------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        job = self.job
        t_start = time.perf_counter()
        hard_stop = t_start + job.time_limit
        for _ in range(job.connections):
            if self._connect() is None and self.errors.total() > job.connections:
                break
        connect_s = time.perf_counter() - t_start
        for conn in list(self.conns):
            self._send_next(conn)

        window_start = window_end = 0.0
        cpu0 = cpu1 = 0.0
        sys0 = sys1 = (0.0, 0.0)
        if job.mode == "duration":
            window_start = time.perf_counter() + job.warmup
            window_end = window_start + job.duration
        stopped = "done"
        last_stall_check = time.perf_counter()
        self_cpu0 = self_cpu_end = resource.getrusage(resource.RUSAGE_SELF)
        while True:
            now_s = time.perf_counter()
            if now_s > hard_stop:
                stopped = "time limit"
                break
            if job.mode == "duration":
                if not self.measuring and self.sending and now_s >= window_start:
                    self.measuring = True
                    self.window_start_ns = time.perf_counter_ns()
                    sys0 = read_system_cpu_s()
                    cpu0 = read_cpu_s(job.server_pid) if job.server_pid else 0.0
                    self_cpu0 = resource.getrusage(resource.RUSAGE_SELF)
                elif self.measuring and now_s >= window_end:
                    self.measuring = False
                    self.sending = False
                    cpu1 = read_cpu_s(job.server_pid) if job.server_pid else 0.0
                    sys1 = read_system_cpu_s()
                    self_cpu_end = resource.getrusage(resource.RUSAGE_SELF)
                    window_end = now_s
            if not any(c.sent_at for c in self.conns):
                if job.mode == "count" and self.next_k >= job.count:
                    break
                if not self.sending:
                    break
                if not self.conns:
                    stopped = "all connections lost"
                    break
            for key, _ in self.sel.select(_TICK_S):
                self._on_readable(key.data, time.perf_counter_ns())
            if now_s - last_stall_check > 0.25:
                last_stall_check = now_s
                self._check_stalls(time.perf_counter_ns())
        elapsed = time.perf_counter() - t_start
        if job.mode == "count":
            window_start, window_end = t_start + connect_s, time.perf_counter()
        self_cpu1 = resource.getrusage(resource.RUSAGE_SELF) if job.mode == "count" else self_cpu_end
        for conn in self.conns:
            self.sel.unregister(conn.sock)
            conn.sock.close()
        self.sel.close()
        if job.server_pid and job.rss_every:
            self.rss.append((self.completed, read_rss_kb(job.server_pid)))

        window = max(window_end - window_start, 1e-9)
        loadgen_cpu = (self_cpu1.ru_utime + self_cpu1.ru_stime) - (self_cpu0.ru_utime + self_cpu0.ru_stime)
        counted = self.measured if job.mode == "duration" else self.completed
        lat = sorted(self.latencies)
        return {
            "mode": job.mode,
            "connections": job.connections,
            "connected": len(self.conns) + self.reconnects,
            "connect_s": connect_s,
            "elapsed_s": elapsed,
            "window_s": window,
            "sent": self.next_k,
            "completed": self.completed,
            "counted": counted,
            "rps": counted / window,
            "p50_ms": _percentile(lat, 0.50),
            "p90_ms": _percentile(lat, 0.90),
            "p99_ms": _percentile(lat, 0.99),
            "max_ms": lat[-1] / 1e6 if lat else float("nan"),
            "first_reply_max_ms": max(self.first_replies) / 1e6 if self.first_replies else float("nan"),
            "errors": dict(self.errors),
            "error_total": self.errors.total(),
            "actions": dict(self.actions),
            "server_cpu_s": (cpu1 - cpu0) if job.mode == "duration" else 0.0,
            "loadgen_cpu_s": loadgen_cpu,
            # CPU used during the window by everything but the server and
            # this process (other programs, the benchmark's own fakes), and
            # time stolen by a hypervisor: the noise in the figures.
            "other_cpu_s": max(0.0, (sys1[0] - sys0[0]) - (cpu1 - cpu0) - loadgen_cpu) if job.mode == "duration" else 0.0,
            "steal_s": sys1[1] - sys0[1] if job.mode == "duration" else 0.0,
            "rss": self.rss,
            "stopped": stopped,
        }


def main() -> int:
    job = Job(**json.loads(sys.stdin.read()))
    if job.mode not in ("duration", "count"):
        print(json.dumps({"fatal": f"unknown mode {job.mode!r}"}))
        return 2
    gen = LoadGenerator(job)
    # In count mode every request is measured; in duration mode only the window.
    gen.measuring = job.mode == "count"
    print(json.dumps(gen.run()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
