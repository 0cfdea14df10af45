"""The installed commands: entry points, --help and a real decision over loopback.

These run whatever ``tests.installed.bindir()`` holds: the virtual
environment's console scripts in the normal suite, ``/usr/bin`` when
.ci/debian runs them inside a Debian 13 root against the package.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest
import trio

from tests.conftest import Farm
from tests.installed import command
from testbeds.dnsserver import FakeDNSServer
from testbeds.greeters import Mode
from tests.test_policyd_server import backup_zone


async def _run(*argv: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True, check=False)


@pytest.mark.parametrize(("name", "expected"), [
    ("smtpdcheck", "stop rule:"),
    ("smtpdcheck-policyd", "--deadline SECONDS"),
])
async def test_help(name: str, expected: str) -> None:
    result = await _run(command(name), "--help")
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert out.startswith(f"usage: {name}") and expected in out, out


@pytest.mark.parametrize(("domain", "status"), [("up.example.com", 1), ("busy.example.com", 0)])
async def test_policyd_check_decides_over_loopback(
    dns_server: FakeDNSServer, farm: Callable[..., Farm], domain: str, status: int
) -> None:
    f = await farm(Mode.OK, Mode.CODE_421)
    dns_server.zone.update(backup_zone("up.example.com", "127.0.0.2"))
    dns_server.zone.update(backup_zone("busy.example.com", "127.0.0.3"))
    result = await _run(
        command("smtpdcheck-policyd"), "--config", "", "--check", f"user@{domain}", "--server-address", "127.0.0.1",
        "--nameserver", f"127.0.0.1:{dns_server.port}", "--smtp-port", str(f.port), "--timeout", "2",
    )
    out = result.stdout.decode()
    assert result.returncode == status, (out, result.stderr)
    if status == 1:
        assert "DEFER_IF_PERMIT" in out and "mx1.up.example.com" in out, out
    else:
        assert "DUNNO" in out, out


async def test_smtpdcheck_prints_the_live_primary(dns_server: FakeDNSServer, farm: Callable[..., Farm]) -> None:
    f = await farm(Mode.OK, Mode.CODE_421)
    dns_server.zone.update(backup_zone("up.example.com", "127.0.0.2"))
    result = await _run(
        command("smtpdcheck"), "--nameserver", f"127.0.0.1:{dns_server.port}", "--smtp-port", str(f.port),
        "--stop", "127.0.0.1", "10:mx1.up.example.com", "20:backup.up.example.com",
    )
    assert (result.returncode, result.stdout) == (1, b"mx1.up.example.com\n"), result.stderr
