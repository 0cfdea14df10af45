"""Logging set-up: stderr for journald and foreground runs, or syslog.

Decision lines are INFO; trouble is WARNING or ERROR and carries a
Postfix-style ``warning:`` / ``error:`` prefix so a grep for those words
finds it.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import Final

LOGGER_NAME: Final = "smtpdcheck"
SYSLOG_SOCKET = "/dev/log"
_PREFIX: Final = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "fatal: "}


class _PostfixStyle(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        # Tracebacks stay readable on stderr but must not break the
        # one-line-per-event rule in syslog.
        return _PREFIX.get(record.levelno, "") + text


def setup_logging(level: str, target: str, *, ident: str = "smtpdcheck-policyd") -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    handler: logging.Handler
    if target == "syslog":
        address = SYSLOG_SOCKET if os.path.exists(SYSLOG_SOCKET) else ("localhost", 514)
        handler = logging.handlers.SysLogHandler(address=address, facility=logging.handlers.SysLogHandler.LOG_MAIL)
        handler.ident = f"{ident}[{os.getpid()}]: "
        formatter: logging.Formatter = _PostfixStyle("%(message)s")
    elif target == "none":
        handler = logging.NullHandler()
        formatter = _PostfixStyle("%(message)s")
    else:
        handler = logging.StreamHandler(sys.stderr)
        formatter = _PostfixStyle("%(message)s")
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger
