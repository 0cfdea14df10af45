"""The benchmark harness still runs, end to end, on its one deterministic benchmark.

Throughput and latency figures depend on the machine and are not tested
here; the primary-load benchmark's targets do not (a burst of RCPTs for
one domain must reach the primary exactly once, through the real daemon,
the fake DNS and the load generator), so a change that breaks the harness
or single-flight fails this test rather than the next person's benchmark.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent


def test_quick_primary_load_benchmark_runs_and_meets_its_targets(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--only", "primary_load", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (bench,) = json.loads(out.read_text())["results"]
    assert bench["name"] == "primary_load" and bench["error"] is None
    assert len(bench["checks"]) >= 4
    failed = [c for c in bench["checks"] if not c["passed"]]
    assert not failed, failed


def test_previous_release_runs_from_its_own_tree() -> None:
    """Comparisons against the previous release must run *its* code, not this tree's.

    ``-m`` puts the working directory first on the path, and the editable
    install of this tree sits behind ``PYTHONPATH``: both must point at the
    extracted release, or a "before" figure silently measures "after".
    """
    from bench import previous, procs

    unmet = previous.unmet_requirements(previous.extract(previous.PREVIOUS) / "pyproject.toml")
    if unmet:
        # The minimum-versions run: the release's daemon cannot run on these
        # libraries, and the harness must say so rather than measure anything.
        with pytest.raises(previous.ReleaseUnavailable, match=re.escape(unmet[0])):
            previous.PREVIOUS_RELEASE.tree()
        return
    tree = previous.PREVIOUS_RELEASE.tree()
    assert tree != previous.REPO_ROOT and (tree / "policyd" / "cli.py").is_file()
    assert procs.daemon_command(previous.PREVIOUS_RELEASE) == [sys.executable, "-m", "policyd.cli"]
    argv = [sys.executable, "-c",
            "import policyd.cli, smtpdcheck.core; print(policyd.cli.__file__); print(smtpdcheck.core.__file__)"]
    out = subprocess.run(argv, cwd=tree, env=procs.child_env(tree), capture_output=True, text=True, timeout=60,
                         check=True).stdout.split()
    assert out == [str(tree / "policyd" / "cli.py"), str(tree / "smtpdcheck" / "core.py")]


async def test_previous_release_daemon_answers() -> None:
    from bench import previous, procs

    if previous.unmet_requirements(previous.extract(previous.PREVIOUS) / "pyproject.toml"):
        with pytest.raises(previous.ReleaseUnavailable):
            await procs.start_daemon(9, 9, lifetime=30, release=previous.PREVIOUS_RELEASE)
        return
    child, port = await procs.start_daemon(9, 9, lifetime=30, release=previous.PREVIOUS_RELEASE)
    try:
        stream = await trio.open_tcp_stream(procs.LOOPBACK, port)
        await stream.send_all(b"request=smtpd_access_policy\nprotocol_state=DATA\n\n")
        reply = b""
        with trio.fail_after(10):
            while not reply.endswith(b"\n\n"):
                reply += await stream.receive_some(4096)
        await stream.aclose()
        assert reply == b"action=DUNNO\n\n"
        # The guard became the daemon (same pid); ``-m`` imports from its working directory.
        assert os.readlink(f"/proc/{child.pid}/cwd") == str(previous.PREVIOUS_RELEASE.tree())
    finally:
        await child.stop()
        child.close()
