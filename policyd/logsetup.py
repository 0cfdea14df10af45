"""Logging set-up: stderr for journald and foreground runs, or syslog.

Decision lines are INFO; trouble is WARNING or ERROR and carries a
Postfix-style ``warning:`` / ``error:`` prefix so a grep for those words
finds it.  Every line, whichever its source, goes through one
:class:`~policyd.decisionlog.LineSink`: buffered, written in batches, never
blocking the loop (see :mod:`policyd.decisionlog`).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Final

from . import decisionlog
from .decisionlog import LineSink, NullTarget, StreamTarget, SyslogTarget, TextTarget

LOGGER_NAME: Final = "smtpdcheck"
SYSLOG_SOCKET = "/dev/log"
#: Overrides SYSLOG_SOCKET: a syslog socket elsewhere (a container, a test, a benchmark).
SYSLOG_SOCKET_ENV: Final = "SMTPDCHECK_SYSLOG_SOCKET"
_PREFIX: Final = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "fatal: "}


class _PostfixStyle(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # A traceback stays readable (several lines) on stderr; the syslog
        # target folds it into the one message of its event.
        return _PREFIX.get(record.levelno, "") + super().format(record)


def _target(target: str) -> decisionlog._Target:
    if target == "syslog":
        path = os.environ.get(SYSLOG_SOCKET_ENV) or SYSLOG_SOCKET
        return SyslogTarget(path if os.path.exists(path) else ("localhost", 514))
    if target == "none":
        return NullTarget()
    try:
        return StreamTarget(sys.stderr.fileno())
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is both of the last two
        return TextTarget(sys.stderr)


def current_sink() -> LineSink | None:
    """The sink logging was set up with, if any: the handler of the project's logger.

    The logging configuration is the process's, so this is read from it
    rather than kept a second time; callers that need the sink on a hot
    path (the responder) take it once and keep it.
    """
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        if isinstance(handler, LineSink):
            return handler
    return None


def setup_logging(level: str, target: str, *, ident: str = "smtpdcheck-policyd") -> LineSink:
    """Configure (or, on reload, reconfigure) logging; lines buffered so far go to the old target first."""
    logger = logging.getLogger(LOGGER_NAME)
    sink = current_sink()
    for old in list(logger.handlers):
        if old is not sink:
            logger.removeHandler(old)
            old.close()
    if sink is None:
        sink = LineSink(_target(target), ident=ident)
        sink.setFormatter(_PostfixStyle("%(message)s"))
        logger.addHandler(sink)
    else:
        sink.retarget(_target(target))
    logger.setLevel(level.upper())
    logger.propagate = False
    sink.decisions = target != "none" and logger.isEnabledFor(logging.INFO)
    return sink


def close_logging() -> None:
    """Write what is buffered (waiting a bounded time) and detach the sink."""
    sink = current_sink()
    if sink is None:
        return
    logging.getLogger(LOGGER_NAME).removeHandler(sink)
    sink.close()
