"""Reading an SMTP greeting, without I/O.

RFC 5321 §4.2: a reply is one or more lines ``code "-" text`` ended by
``code SP text`` (or a bare code).  We decide on the *first* line: a
primary behind Postfix's postscreen sends ``220-`` and then deliberately
pauses for seconds to catch clients that talk too early, and waiting for the
rest would cost that pause on every probe.  The rest of the greeting matters
only for politeness: ``QUIT`` may be sent once it is complete, never before
(postscreen counts early bytes as a pregreet violation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MAX_GREETING_BYTES: Final = 4096


class GreetingError(Exception):
    """The peer's bytes are not an SMTP greeting (or too much of one)."""


@dataclass(frozen=True, slots=True)
class FirstLine:
    code: int
    continues: bool
    text: str

    @property
    def available(self) -> bool:
        """Only 220 means "ready"; 421/554 and friends mean "not for you"."""
        return self.code == 220


def _parse_line(raw: bytes) -> FirstLine:
    line = raw[:-1] if raw.endswith(b"\r") else raw
    if len(line) < 3 or not line[:3].isdigit():
        raise GreetingError("not an SMTP reply line")
    if len(line) > 3 and line[3:4] not in (b" ", b"-"):
        raise GreetingError("not an SMTP reply line")
    code = int(line[:3])
    if not 200 <= code <= 599:
        raise GreetingError(f"reply code {code} out of range")
    text = line[4:].decode("ascii", "replace")
    return FirstLine(code, line[3:4] == b"-", text)


class GreetingReader:
    """Feed bytes in; learn the first line as soon as it is there.

    The buffer never holds more than :data:`MAX_GREETING_BYTES`: a peer that
    sends megabytes without a newline is not an SMTP server.
    """

    def __init__(self, limit: int = MAX_GREETING_BYTES) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._scanned = 0
        self._consumed = 0
        self.first: FirstLine | None = None
        self.complete = False
        self.eof = False

    def feed(self, data: bytes | bytearray) -> None:
        """Add bytes; ``b""`` means the peer closed.  May raise GreetingError."""
        if not data:
            self.eof = True
            return
        if self.complete:
            return  # anything after the greeting is not ours to read
        self._buf += data
        while not self.complete:
            nl = self._buf.find(b"\n", self._scanned)
            end = len(self._buf) if nl < 0 else nl + 1
            if self._consumed + end > self._limit:
                raise GreetingError(f"greeting longer than {self._limit} bytes")
            if nl < 0:
                self._scanned = len(self._buf)
                return
            line = _parse_line(bytes(self._buf[:nl]))
            del self._buf[:end]
            self._scanned = 0
            self._consumed += end
            if self.first is None:
                self.first = line
            elif line.code != self.first.code:
                raise GreetingError("reply code changed inside a multi-line greeting")
            self.complete = not line.continues
