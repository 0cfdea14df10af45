"""Log targets: syslog facility mail with Postfix-style prefixes."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from policyd import logsetup


def test_syslog_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "log"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(path))
    sink.settimeout(5)
    monkeypatch.setattr(logsetup, "SYSLOG_SOCKET", str(path))
    logger = logsetup.setup_logging("info", "syslog")
    try:
        logging.getLogger("smtpdcheck.policyd").info("NOQUEUE: rcpt=<a@b.example> action=DUNNO")
        logging.getLogger("smtpdcheck.policyd").warning("protocol error")
        logging.getLogger("smtpdcheck.policyd").debug("not shown at info")
        first, second = sink.recv(4096), sink.recv(4096)
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        sink.close()
    # <22> = facility mail (2) * 8 + info (6); <20> = mail + warning (4).
    assert first.startswith(b"<22>smtpdcheck-policyd[") and first.endswith(b"]: NOQUEUE: rcpt=<a@b.example> action=DUNNO\x00")
    assert second.startswith(b"<20>smtpdcheck-policyd[") and b"]: warning: protocol error" in second


def test_stderr_target_prefixes(capsys: pytest.CaptureFixture[str]) -> None:
    logger = logsetup.setup_logging("warning", "stderr")
    try:
        logging.getLogger("smtpdcheck.policyd").info("hidden")
        logging.getLogger("smtpdcheck.policyd").error("listen failed")
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
    assert capsys.readouterr().err == "error: listen failed\n"
