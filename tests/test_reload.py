"""SIGHUP reload: live options apply at once, restart-only ones not at all.

A reload that applied half of an option (the checker's budget taking a new
``dns_timeout`` while the resolver kept the old one) would run a
configuration nobody wrote.  These tests drive the daemon's own reload
over a real file and a real service.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from policyd import cli
from policyd import config as cfg
from policyd.responder import Responder, core_settings
from smtpdcheck.core import build_core


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The reload re-configures the package logger; put it back afterwards."""
    logger = logging.getLogger("smtpdcheck")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for handler in list(logger.handlers):
        if handler not in saved[0]:
            logger.removeHandler(handler)
            handler.close()
    for handler in saved[0]:
        if handler not in logger.handlers:
            logger.addHandler(handler)
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


@pytest.mark.usefixtures("restore_logging")
async def test_reload_applies_dns_timeout_fully_or_not_at_all(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "policyd.toml"
    path.write_text('nameserver = ["127.0.0.1:53"]\ndns_timeout = 2\ntimeout = 5\n')
    args = cli.build_parser().parse_args(["--config", str(path)])
    config = cli.load(args, cli.SystemFiles())
    service = Responder(config, build_core(nursery, core_settings(config)))
    assert service.core.checker.timeout == 5 + 2

    path.write_text('nameserver = ["127.0.0.1:53"]\ndns_timeout = 7\ntimeout = 3\ndeadline = 12\nmode = "warn"\n')
    with caplog.at_level(logging.INFO, logger="smtpdcheck"):
        await cli._reload(service, args, cli.SystemFiles())

    # The live options changed ...
    assert service.config.timeout == 3 and service.core.prober.timeout == 3
    assert service.config.mode == "warn"
    # ... and every part of the service agrees on the one DNS budget it runs with.
    assert service.core.resolver.timeout == 2
    assert service.config.dns_timeout == 2
    assert service.core.checker.timeout == service.core.prober.timeout + service.core.resolver.timeout == 3 + 2
    messages = [r.getMessage() for r in caplog.records]
    assert "reload: dns_timeout changed; takes effect after a restart" in messages
    # Logged after the reload set up logging afresh (to stderr, as configured).
    assert "configuration reloaded" in capsys.readouterr().err


@pytest.mark.usefixtures("restore_logging")
async def test_a_reload_to_a_cache_up_ttl_that_cannot_work_keeps_the_running_configuration(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policyd.toml"
    path.write_text('nameserver = ["127.0.0.1:53"]\ncache_up_ttl = 10\n')
    args = cli.build_parser().parse_args(["--config", str(path)])
    config = cli.load(args, cli.SystemFiles())
    service = Responder(config, build_core(nursery, core_settings(config)))

    path.write_text('nameserver = ["127.0.0.1:53"]\ncache_up_ttl = 0.5\nmode = "warn"\n')
    with caplog.at_level(logging.INFO, logger="smtpdcheck"):
        await cli._reload(service, args, cli.SystemFiles())

    assert service.config is config and service.core.prober.up_ttl == 10
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        f"reload failed, keeping the running configuration: {path}: cache_up_ttl: must be 0, or 1 or more: 0.5"
    ]
