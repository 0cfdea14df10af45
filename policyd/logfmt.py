"""One decision, one log line, safe to grep.

Values in the line come from Postfix requests (raw SMTP bytes) and from DNS,
so every value is escaped to printable ASCII: a CR/LF in a recipient must not
forge a second log line.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Final

_SAFE: Final = frozenset(chr(c) for c in range(0x21, 0x7F)) - {'"', "\\", "="}
# Values that come out unchanged, recognised by one C-level match instead
# of a Python loop: almost every recipient, queue id, domain and reason.
# ``{0,256}`` is the default limit; other limits take the long way.
_PLAIN: Final = re.compile(r'[!#-<>-\[\]-~]{0,256}')
_PLAIN_TEXT: Final = re.compile(r'[ !#-<>-\[\]-~]{0,256}')


def escape(value: str, limit: int = 256) -> str:
    """Printable ASCII with ``\\xNN`` escapes; raw bytes from surrogateescape shown as bytes."""
    if limit == 256 and _PLAIN.fullmatch(value) is not None:
        return value
    out: list[str] = []
    for ch in value[:limit]:
        if ch in _SAFE:
            out.append(ch)
        elif ch == " ":
            out.append("\\x20")
        else:
            code = ord(ch)
            if 0xDC80 <= code <= 0xDCFF:  # a raw byte kept by surrogateescape
                code -= 0xDC00
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    if len(value) > limit:
        out.append("...")
    return "".join(out)


def quoted(value: str, limit: int = 256) -> str:
    """A free-text value (a reason) in double quotes, escaped likewise."""
    if limit == 256 and _PLAIN_TEXT.fullmatch(value) is not None:
        return f'"{value}"'
    text = escape(value, limit).replace("\\x20", " ")
    return f'"{text}"'


class ThrottledWarning:
    """A warning logged at most once per ``interval`` seconds, with how many were not logged.

    For events that may come thousands of times a second (refused clients,
    a limit reached under load): one line a minute says so without flooding
    the log.  ``now`` is trio time, so the interval runs on a test's clock.
    """

    __slots__ = ("interval", "logger", "_next", "_unlogged")

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self.logger = logger
        self.interval = interval
        self._next = -math.inf
        self._unlogged = 0

    def warn(self, now: float, message: str, *args: object) -> None:
        if now < self._next:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more since the last such line)" if self._unlogged else ""
        self._unlogged = 0
        self._next = now + self.interval
        self.logger.warning(message + "%s", *args, more)
