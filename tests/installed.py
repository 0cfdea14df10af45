"""Running the installed commands, as a package or pip would put them, for tests.

``SMTPDCHECK_BINDIR`` names the directory holding ``smtpdcheck`` and
``smtpdcheck-policyd`` (``/usr/bin`` for the Debian package, see
.ci/debian); by default it is the one next to the test's interpreter, where
the virtual environment's console scripts live.  Tests that use it prove
the entry points and the installed modules rather than the source tree.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import fields, replace
from functools import partial
from pathlib import Path

import trio

from policyd.config import OPTIONS, Config
from testbeds.greeters import unused_port

BINDIR_ENV = "SMTPDCHECK_BINDIR"


def bindir() -> Path:
    return Path(os.environ.get(BINDIR_ENV) or Path(sys.executable).parent)


def installed_daemon_requested() -> bool:
    """True when the end-to-end tests must run the installed daemon, not the in-process one."""
    return bool(os.environ.get(BINDIR_ENV))


def command(name: str) -> str:
    return str(bindir() / name)


def config_flags(config: Config) -> list[str]:
    """The flags that give ``config`` on the command line (only those that differ from the defaults)."""
    default = Config()
    assert {o.name for o in OPTIONS} == {f.name for f in fields(Config)}
    flags: list[str] = []
    for option in OPTIONS:
        value = getattr(config, option.name)
        if value == getattr(default, option.name):
            continue
        values = value if option.repeatable else (value,)
        for one in values:
            flags += [option.flag, f"{one:o}" if option.name == "socket_mode" else str(one)]
    return flags


# As systemd starts a socket-activated service: the socket at fd 3,
# LISTEN_FDS=1 and LISTEN_PID = the service's pid, known only after fork.
_ACTIVATE = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_FDS'] = '1'; "
    "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[2], sys.argv[2:])"
)


async def start_daemon(nursery: trio.Nursery, config: Config, *, activate: socket.socket | None = None) -> str:
    """Run the installed ``smtpdcheck-policyd`` with ``config``; return its first endpoint.

    An ``inet:...:0`` endpoint is replaced by a free port (the command line
    wants a real one).  ``activate`` hands the daemon a listening socket as
    systemd's socket activation does.  Returns once the daemon logs that it
    listens; its log is echoed to our stderr, which pytest shows on failure.
    The process is stopped (SIGTERM) when ``nursery`` is cancelled.
    """
    listen = tuple(
        f"inet:127.0.0.1:{unused_port()}" if endpoint == "inet:127.0.0.1:0" else endpoint for endpoint in config.listen
    )
    # --config '': whatever /etc/smtpdcheck/policyd.toml the machine has, the test does not read it.
    argv = [command("smtpdcheck-policyd"), "--config", "", *config_flags(replace(config, listen=listen))]
    pass_fds: tuple[int, ...] = ()
    if activate is not None:
        argv = [sys.executable, "-c", _ACTIVATE, str(activate.fileno()), *argv]
        pass_fds = (activate.fileno(),)
    process: trio.Process = await nursery.start(
        partial(trio.run_process, argv, stderr=subprocess.PIPE, check=False, pass_fds=pass_fds)
    )
    assert process.stderr is not None
    ready = trio.Event()
    listening = False

    async def echo_log() -> None:
        nonlocal listening
        assert process.stderr is not None
        seen = b""
        async for chunk in process.stderr:
            sys.stderr.write(chunk.decode(errors="replace"))
            seen = (seen + chunk)[-4096:]
            if b"listening on" in seen and not listening:
                listening = True
                ready.set()
        ready.set()  # EOF: the daemon exited

    nursery.start_soon(echo_log)
    with trio.fail_after(20):
        await ready.wait()
    if not listening:
        raise RuntimeError(f"{' '.join(argv)} exited without listening; its log is above")
    return listen[0]
