"""The Postfix policy delegation protocol, without I/O.

Postfix (``check_policy_service``) sends a request as ``name=value`` lines
separated by a bare LF and ended by an empty line; the server answers with
one ``action=...`` line, also ended by an empty line, on the same persistent
connection.  This module turns bytes into :class:`PolicyRequest` objects
(defined in :mod:`policyd.request`) and replies into bytes.  It knows
nothing about sockets, trio or clocks, so the framing rules can be tested
exhaustively with plain function calls, in the style of h11: the caller feeds whatever it read with
:meth:`PolicyParser.receive_data` and pulls requests out with
:meth:`PolicyParser.next_request` until it says :data:`NEED_DATA`.

This is the server's side only; the client's (encoding requests, reading
replies, as tests, benchmarks and tooling need) is :mod:`policyd.client`.

Reading is tolerant and writing is strict.  Postfix never sends CR, NUL or
non-UTF-8 attribute names, but values are raw bytes from the SMTP dialogue
(an 8-bit ``RCPT TO`` passes through untouched), so values are decoded with
``surrogateescape`` and nothing is lost.  Replies, on the other hand, are
built only from a fixed set of action words and sanitised printable ASCII:
an empty action makes Postfix PERMIT the mail, an unknown word is a
"server configuration error", and a CRLF reply makes Postfix wait for its
timeout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, NoReturn, final

from .request import PolicyRequest

__all__ = [
    "ALLOWED_ACTIONS",
    "CLOSED",
    "DUNNO_REPLY",
    "MAX_ATTRIBUTES",
    "MAX_LINE_BYTES",
    "MAX_REPLY_TEXT_CHARS",
    "MAX_REQUEST_BYTES",
    "NEED_DATA",
    "PolicyParser",
    "PolicyRequest",
    "ProtocolError",
    "format_reply",
    "sanitize_text",
]

#: One ``name=value`` line, not counting its LF.  Postfix reads SMTP commands
#: with ``line_length_limit`` (2048 by default), so the longest real value is
#: well below this.
MAX_LINE_BYTES: Final = 4096
#: One whole request on the wire, terminating empty line included.  A real
#: Postfix 3.7 request is a few hundred bytes.
MAX_REQUEST_BYTES: Final = 64 * 1024
#: Attribute lines per request, duplicates included.  Postfix 3.7 sends 29,
#: the 3.12 snapshot 32.
MAX_ATTRIBUTES: Final = 256

#: Reply text cap.  Postfix itself truncates and sanitises the SMTP reply,
#: but a short text survives its ``<rcpt>: Recipient address rejected:``
#: prefix intact.
MAX_REPLY_TEXT_CHARS: Final = 400

#: The access(5) words this server sends.  Anything else is refused by
#: :func:`format_reply`, because Postfix treats an empty action as PERMIT and
#: an unknown one as a configuration error that tempfails the recipient.
ALLOWED_ACTIONS: Final[frozenset[str]] = frozenset({"DUNNO", "DEFER_IF_PERMIT", "WARN"})

# Replies are built on every request; encode the fixed parts once.
_ACTION_PREFIXES: Final[Mapping[str, bytes]] = MappingProxyType(
    {action: b"action=" + action.encode("ascii") for action in ALLOWED_ACTIONS}
)
_BARE_REPLIES: Final[Mapping[str, bytes]] = MappingProxyType(
    {action: prefix + b"\n\n" for action, prefix in _ACTION_PREFIXES.items()}
)
#: The neutral answer, ready to write: "no opinion, go on with the next
#: restriction".
DUNNO_REPLY: Final[bytes] = _BARE_REPLIES["DUNNO"]

_NOT_PRINTABLE_ASCII: Final = re.compile(r"[^\x20-\x7e]")
_ELLIPSIS: Final = "..."

_ENCODING: Final = "utf-8"
_ERRORS: Final = "surrogateescape"
_LF: Final = 0x0A
_CR: Final = 0x0D
_EQ: Final = 0x3D
_ALL_BUT_FRAMING: Final = bytes(b for b in range(256) if b not in (_LF, _EQ, _CR, 0))
_EMPTY_LINE: Final = re.compile(b"\n\n")
_EMPTY_NAME: Final = re.compile(b"\n=")
#: The skeleton of a request of up to MAX_ATTRIBUTES lines with one "=" each is a prefix of this.
_ONE_EQ_PER_LINE: Final = b"=\n" * MAX_ATTRIBUTES + b"="


class ProtocolError(Exception):
    """The peer broke the policy protocol; drop this connection only.

    ``reason`` is short, fixed and meant for log fields and metric labels;
    ``str(exc)`` adds detail for humans.  Reasons raised by the parser:
    ``"line too long"``, ``"request too large"``, ``"too many attributes"``,
    ``"line without '='"``, ``"attribute name empty"``, ``"NUL byte"``,
    ``"connection closed mid-request"``.  :func:`policyd.client.parse_reply`
    adds its own for replies.

    Postfix's advice for a server in trouble is to log and disconnect
    without replying; it then retries and applies its default action.
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message if message is not None else reason)
        self.reason: Final[str] = reason
        self.message: Final[str] = message if message is not None else reason


class _Sentinel(type):
    """Metaclass for marker values: the class object itself is the value.

    A class gives a value that is unique, has a readable repr, and can be
    spelled as a type (``type[NEED_DATA]``) in annotations.
    """

    def __repr__(cls) -> str:
        return cls.__name__

    def __call__(cls, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError(f"{cls.__name__} is a sentinel; use the class itself")


@final
class NEED_DATA(metaclass=_Sentinel):
    """No complete request is buffered yet: read more and feed it in."""


@final
class CLOSED(metaclass=_Sentinel):
    """The peer closed the connection between requests, which is normal."""


class PolicyParser:
    """Turns a byte stream from Postfix into requests.

    Call :meth:`receive_data` with whatever was read (``b""`` at EOF), then
    :meth:`next_request` until it returns :data:`NEED_DATA` or
    :data:`CLOSED`.  A :class:`ProtocolError` means the peer is broken; the
    parser then refuses all further calls with the same error.

    The work is linear in the bytes received however they are chunked: the
    scan resumes where it stopped instead of starting again at the line
    start, and consumed bytes are dropped from the buffer in bulk.  Limits
    are checked as soon as they can be known, so an endless line is refused
    after ``max_line_bytes + 1`` bytes rather than buffered until its LF.
    ``bytes_scanned`` counts the bytes the framing scan has passed over; it
    never exceeds the bytes received, which lets tests prove the linearity
    without timing anything.

    Framing details, chosen for tolerant reading:

    * one trailing CR is stripped from each line (Postfix never sends one,
      but hand-typed test input often does), and a line that is just CR ends
      the request like an empty line; the CR still counts towards the limits;
    * empty lines before the first attribute of a request are skipped rather
      than producing an empty request, so a stray LF between requests is
      harmless; they do not count towards the next request's size;
    * a name is everything before the first ``=``, so values may contain
      ``=``.
    """

    def __init__(
        self,
        *,
        max_line_bytes: int = MAX_LINE_BYTES,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_attributes: int = MAX_ATTRIBUTES,
    ) -> None:
        for name, value in (
            ("max_line_bytes", max_line_bytes),
            ("max_request_bytes", max_request_bytes),
            ("max_attributes", max_attributes),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        self._max_line_bytes: Final = max_line_bytes
        self._max_request_bytes: Final = max_request_bytes
        self._max_attributes: Final = max_attributes
        self._buf = bytearray()
        # _line_start: first byte of the line being read; everything before
        # it has been parsed and may be deleted.  _scan_pos: first byte not
        # yet searched for LF and NUL (always >= _line_start).
        self._line_start = 0
        self._scan_pos = 0
        self._lines: list[str] = [""]
        self._attr_count = 0
        self._request_bytes = 0
        self._bytes_scanned = 0
        self._eof = False
        self._closed = False
        self._error: ProtocolError | None = None

    @property
    def bytes_scanned(self) -> int:
        """Bytes the framing scan has passed over so far (each exactly once)."""
        return self._bytes_scanned

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet parsed into attributes."""
        return len(self._buf) - self._line_start

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes read from the peer; ``b""`` means the peer closed.

        Only appends: all parsing, and so all limit checks, happen in
        :meth:`next_request`, which the caller is expected to drain before
        reading more.
        """
        self._raise_if_broken()
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("received data after EOF")
        self._buf += data

    def next_request(self) -> PolicyRequest | type[NEED_DATA] | type[CLOSED]:
        """The next complete request, :data:`NEED_DATA`, or :data:`CLOSED`.

        Raises :class:`ProtocolError` when the buffered bytes cannot be the
        start of a valid request, or when EOF arrives inside a request.
        """
        self._raise_if_broken()
        if self._closed:
            return CLOSED
        try:
            return self._parse()
        except ProtocolError as exc:
            self._error = exc
            # Nothing more will be read from it: free the memory now.
            self._buf = bytearray()
            self._line_start = self._scan_pos = 0
            self._lines = [""]
            raise

    def _raise_if_broken(self) -> None:
        if self._error is not None:
            raise ProtocolError(self._error.reason, self._error.message)

    def _parse(self) -> PolicyRequest | type[NEED_DATA] | type[CLOSED]:
        if self._line_start == len(self._buf) and not self._eof:
            # Everything received is parsed (the usual state between two
            # requests): nothing to scan, no limit can have changed.
            self._compact()
            return NEED_DATA
        request = self._parse_whole()
        if request is not None:
            return request
        buf = self._buf
        while True:
            start = self._line_start
            pos = self._scan_pos
            # Never look further than the longest line the limits still
            # allow, plus one byte: without an LF in that window a limit is
            # broken whatever follows.  Bounding the window by both limits
            # also makes the outcome independent of how the bytes were
            # chunked (the same bytes are checked for NUL either way).
            allowed = min(self._max_line_bytes, self._max_request_bytes - self._request_bytes)
            window_end = min(len(buf), start + allowed + 1)
            nl = buf.find(b"\n", pos, window_end)
            stop = window_end if nl < 0 else nl
            if stop > pos:
                nul = buf.find(0, pos, stop)
                if nul >= 0:
                    raise ProtocolError("NUL byte", f"NUL byte at offset {nul - start} of a line")

            if nl < 0:
                self._bytes_scanned += window_end - pos
                self._scan_pos = window_end
                pending = window_end - start
                if pending > self._max_line_bytes:
                    raise ProtocolError(
                        "line too long", f"line longer than {self._max_line_bytes} bytes"
                    )
                if self._request_bytes + pending > self._max_request_bytes:
                    self._raise_too_large()
                if self._eof:
                    if self._attr_count or pending:
                        raise ProtocolError(
                            "connection closed mid-request",
                            f"connection closed mid-request after {self._attr_count} "
                            f"attribute(s) and {pending} byte(s) of an unfinished line",
                        )
                    self._closed = True
                    self._compact()
                    return CLOSED
                self._compact()
                return NEED_DATA

            self._bytes_scanned += nl + 1 - pos
            self._line_start = self._scan_pos = nl + 1
            line_bytes = nl + 1 - start
            end = nl - 1 if nl > start and buf[nl - 1] == _CR else nl

            if end == start:  # empty line (or a lone CR)
                if not self._attr_count:
                    continue  # stray separator between requests
                size = self._request_bytes + line_bytes
                if size > self._max_request_bytes:
                    self._raise_too_large()
                self._lines.append("")
                request = PolicyRequest._from_lines("\n".join(self._lines), size)
                self._lines = [""]
                self._attr_count = 0
                self._request_bytes = 0
                # Amortised: copying the rest is paid for by what is dropped.
                if self._line_start >= len(buf) - self._line_start:
                    self._compact()
                return request

            self._request_bytes += line_bytes
            if self._request_bytes > self._max_request_bytes:
                self._raise_too_large()
            self._attr_count += 1
            if self._attr_count > self._max_attributes:
                raise ProtocolError(
                    "too many attributes",
                    f"more than {self._max_attributes} attributes in one request",
                )
            eq = buf.find(b"=", start, end)
            if eq < 0:
                raise ProtocolError(
                    "line without '='", f"line without '=': {_excerpt(buf, start, end)}"
                )
            if eq == start:
                raise ProtocolError(
                    "attribute name empty", f"attribute name empty: {_excerpt(buf, start, end)}"
                )
            self._lines.append(buf[start:end].decode(_ENCODING, _ERRORS))

    def _parse_whole(self) -> PolicyRequest | None:
        """Fast path: a whole, plain request already in the buffer.

        Postfix writes each request with one write and waits for the reply
        before the next, so a read usually holds exactly one whole request,
        and the buffer then ends with its empty line: that case needs no
        search for the end.  Otherwise (pipelined requests, a request split
        over reads) the first empty line is searched for.  Then a few
        whole-block checks in C and one decode replace the line-by-line
        loop.  Anything unusual -- a CR, a NUL, a limit that might be
        broken, a line without "=", an empty line inside the block -- is
        left to the careful loop, which also produces the error; the fast
        path never decides anything the loop would decide differently.
        """
        start = self._line_start
        if self._attr_count or start != self._scan_pos:
            return None
        buf = self._buf
        end = len(buf) - 2
        if end > start and buf.endswith(b"\n\n"):
            # One request, or several: then the block holds an empty line
            # and _whole refuses it, and the search below finds the first.
            request = self._whole(buf, start, end)
            if request is not None:
                return request
        # A compiled pattern, not bytes.find: see bench/README.md.
        found = _EMPTY_LINE.search(buf, start, start + self._max_request_bytes)
        if found is None:
            return None
        end = found.start()
        if end == start:  # a leading empty line: the loop skips it
            return None
        return self._whole(buf, start, end)

    def _whole(self, buf: bytearray, start: int, end: int) -> PolicyRequest | None:
        """The request in ``buf[start:end]`` (followed by its empty line) if it is plain, else None."""
        size = end + 2 - start
        if size > self._max_request_bytes:
            return None
        block = buf[start:end]
        # Deleting every byte but LF, "=", CR and NUL leaves a short
        # skeleton that answers the framing questions in C, not per line:
        # no CR or NUL, not too many lines, and an "=" on every line (no LF
        # first or last, no two LFs in a row).  Empty names are the one
        # thing the skeleton cannot show.
        skeleton = block.translate(None, _ALL_BUT_FRAMING)
        if _ONE_EQ_PER_LINE.startswith(skeleton) and len(skeleton) % 2:
            # The usual skeleton, "=" and LF taking turns (one "=" per line,
            # no CR, NUL or empty line), needs only the line count checked.
            if len(skeleton) // 2 >= self._max_attributes or block[0] == _EQ or _EMPTY_NAME.search(block) is not None:
                return None
        elif (
            not skeleton
            or skeleton[0] == _LF
            or skeleton[-1] == _LF
            or b"\n\n" in skeleton
            or b"\r" in skeleton
            or b"\0" in skeleton
            or skeleton.count(b"\n") >= self._max_attributes
            or block[0] == _EQ
            or _EMPTY_NAME.search(block) is not None
        ):
            return None
        if size > self._max_line_bytes and any(
            len(line) > self._max_line_bytes for line in block.split(b"\n")
        ):
            return None
        lines = "\n" + block.decode(_ENCODING, _ERRORS) + "\n"
        self._bytes_scanned += size
        self._line_start = self._scan_pos = end + 2
        if self._line_start >= len(buf) - self._line_start:
            self._compact()
        return PolicyRequest._from_lines(lines, size)

    def _raise_too_large(self) -> NoReturn:
        raise ProtocolError(
            "request too large", f"request larger than {self._max_request_bytes} bytes"
        )

    def _compact(self) -> None:
        """Drop parsed bytes.

        Called at most once per :meth:`next_request`, never per line.  When
        it runs at NEED_DATA only a partial line is left to move, and each
        byte is moved at most once that way, so the copying stays linear.
        """
        if self._line_start == len(self._buf):
            self._buf.clear()
            self._line_start = self._scan_pos = 0
        elif self._line_start:
            del self._buf[: self._line_start]
            self._scan_pos -= self._line_start
            self._line_start = 0


def _excerpt(buf: bytearray, start: int, end: int) -> str:
    """The start of a bad line for an error message, short and escaped."""
    return repr(bytes(buf[start : min(end, start + 64)]))


def sanitize_text(text: str, limit: int = MAX_REPLY_TEXT_CHARS) -> str:
    """Make ``text`` safe to put after an action word.

    Every character outside printable ASCII becomes ``?``: an LF would end
    the reply early and let the rest be read as the next reply, CR and NUL
    confuse Postfix, and non-ASCII (including lone surrogates from
    ``surrogateescape``-decoded addresses) is invalid in a plain SMTP reply
    and, when not UTF-8, makes Postfix with ``smtputf8_enable=yes`` discard
    the reply.  Runs of spaces are collapsed, the ends stripped, and text
    longer than ``limit`` is cut with ``...`` inside the limit.
    """
    if limit < len(_ELLIPSIS):
        raise ValueError(f"limit must be at least {len(_ELLIPSIS)}, not {limit}")
    if not (text.isascii() and text.isprintable()):
        text = _NOT_PRINTABLE_ASCII.sub("?", text)
    # Only spaces are left as whitespace; split() also drops the ends.
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - len(_ELLIPSIS)].rstrip(" ") + _ELLIPSIS
    return text


def format_reply(action: str, text: str = "") -> bytes:
    """The bytes of one reply: ``action=ACTION TEXT`` and an empty line.

    Only words in :data:`ALLOWED_ACTIONS`, spelled exactly, are accepted;
    the text goes through :func:`sanitize_text`, so the result has no CR and
    exactly two LFs, both at the end.
    """
    bare = _BARE_REPLIES.get(action)
    if bare is None:
        raise ValueError(f"refusing to send action {action!r}; allowed: {sorted(ALLOWED_ACTIONS)}")
    clean = sanitize_text(text) if text else ""
    if not clean:
        return bare
    return b"".join((_ACTION_PREFIXES[action], b" ", clean.encode("ascii"), b"\n\n"))
