"""Log targets: syslog facility mail with Postfix-style prefixes."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from policyd import logsetup


@pytest.fixture
def syslog_sink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for /dev/log, named by the environment."""
    path = tmp_path / "log"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(path))
    sink.settimeout(5)
    monkeypatch.setenv(logsetup.SYSLOG_SOCKET_ENV, str(path))
    try:
        yield sink
    finally:
        logsetup.close_logging()
        sink.close()


def test_syslog_target(syslog_sink: socket.socket) -> None:
    logsetup.setup_logging("info", "syslog")
    logging.getLogger("smtpdcheck.policyd").info("NOQUEUE: rcpt=<a@b.example> action=DUNNO")
    logging.getLogger("smtpdcheck.policyd").warning("protocol error")
    logging.getLogger("smtpdcheck.policyd").debug("not shown at info")
    first, second = syslog_sink.recv(4096), syslog_sink.recv(4096)
    # <22> = facility mail (2) * 8 + info (6); <20> = mail + warning (4).
    assert first.startswith(b"<22>smtpdcheck-policyd[") and first.endswith(b"]: NOQUEUE: rcpt=<a@b.example> action=DUNNO\x00")
    assert second.startswith(b"<20>smtpdcheck-policyd[") and b"]: warning: protocol error" in second


def test_syslog_folds_a_traceback_into_one_message(syslog_sink: socket.socket) -> None:
    """One event, one syslog message: the traceback's lines ride in it, newlines escaped."""
    logsetup.setup_logging("info", "syslog")
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        logging.getLogger("smtpdcheck.policyd").exception("internal error deciding a request")
    logging.getLogger("smtpdcheck.policyd").warning("next event")
    first, second = syslog_sink.recv(65536), syslog_sink.recv(65536)
    assert first.startswith(b"<19>smtpdcheck-policyd[")  # mail + error (3)
    assert b"]: error: internal error deciding a request\\x0aTraceback (most recent call last):\\x0a" in first
    assert first.endswith(b"ValueError: bad\\x0avalue\x00")
    assert b"\n" not in first
    assert second.endswith(b"]: warning: next event\x00")


def test_stderr_keeps_a_traceback_readable(capsys: pytest.CaptureFixture[str]) -> None:
    logsetup.setup_logging("info", "stderr")
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("smtpdcheck.policyd").exception("internal error")
    finally:
        logsetup.close_logging()
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: internal error" and err[1] == "Traceback (most recent call last):"
    assert err[-1] == "ValueError: boom"


def test_stderr_target_prefixes(capsys: pytest.CaptureFixture[str]) -> None:
    logsetup.setup_logging("warning", "stderr")
    try:
        logging.getLogger("smtpdcheck.policyd").info("hidden")
        logging.getLogger("smtpdcheck.policyd").error("listen failed")
    finally:
        logsetup.close_logging()
    assert capsys.readouterr().err == "error: listen failed\n"


def test_close_logging_detaches_the_sink(capsys: pytest.CaptureFixture[str]) -> None:
    logsetup.setup_logging("info", "stderr")
    sink = logsetup.current_sink()
    assert sink is not None and sink.decisions
    logsetup.close_logging()
    assert logsetup.current_sink() is None
    assert sink not in logging.getLogger(logsetup.LOGGER_NAME).handlers


def test_reload_keeps_one_sink_and_follows_the_level(capsys: pytest.CaptureFixture[str]) -> None:
    logsetup.setup_logging("info", "stderr")
    try:
        sink = logsetup.current_sink()
        logsetup.setup_logging("warning", "stderr")
        assert logsetup.current_sink() is sink and sink is not None and not sink.decisions
        assert logging.getLogger(logsetup.LOGGER_NAME).handlers == [sink]
    finally:
        logsetup.close_logging()
