"""The client's side of the policy protocol, without I/O: what Postfix does.

The server (:mod:`policyd.protocol`) never writes requests nor reads
replies; tests, the benchmarks and tooling do, and they must do it exactly
as Postfix would, so that what they check is what Postfix would see.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .protocol import PolicyParser, ProtocolError
from .request import PolicyRequest, check_attribute

__all__ = ["encode_request", "parse_reply"]

_ENCODING = "utf-8"
_ERRORS = "surrogateescape"


def encode_request(attrs: Mapping[str, str] | Iterable[tuple[str, str]]) -> bytes:
    """Encode a request as Postfix would send it.

    Pairs are written in order, duplicates included, so tests can build
    odd-but-legal input.  Raises ValueError for an empty request and for
    anything :func:`policyd.protocol.check_attribute` refuses: what Postfix
    could not send, or what would not read back unchanged.  Strings must
    encode with UTF-8 plus ``surrogateescape``.
    """
    pairs = attrs.items() if isinstance(attrs, Mapping) else attrs
    out = bytearray()
    for name, value in pairs:
        check_attribute(name, value)
        out += name.encode(_ENCODING, _ERRORS)
        out += b"="
        out += value.encode(_ENCODING, _ERRORS)
        out += b"\n"
    if not out:
        raise ValueError("a request needs at least one attribute")
    out += b"\n"
    return bytes(out)


def parse_reply(data: bytes) -> tuple[str, str]:
    """Read one reply as Postfix would: ``(ACTION, text)``.

    Like Postfix, other attributes around ``action`` are ignored, the word
    ends at the first space or tab and is case-insensitive (returned
    upper-cased), any access(5) word is accepted, and leading blanks of the
    text are skipped.  Stricter than Postfix where Postfix would misbehave,
    raising :class:`~policyd.protocol.ProtocolError` with reason ``"CR in
    reply"`` (Postfix would wait for its timeout), ``"trailing data after
    reply"`` (Postfix would see a broken connection on the next request),
    ``"empty action"`` (Postfix would PERMIT), ``"missing action"`` or
    ``"incomplete reply"``; framing errors keep the parser's reasons.
    """
    if b"\r" in data:
        raise ProtocolError("CR in reply", "reply contains CR; Postfix needs bare LF")
    if data.startswith(b"\n"):
        raise ProtocolError("missing action", "reply starts with an empty line")
    parser = PolicyParser()
    parser.receive_data(data)
    parser.receive_data(b"")
    try:
        reply = parser.next_request()
    except ProtocolError as exc:
        if exc.reason == "connection closed mid-request":
            raise ProtocolError("incomplete reply", "reply not ended by an empty line") from exc
        raise
    if not isinstance(reply, PolicyRequest):
        raise ProtocolError("incomplete reply", "no reply in the data")
    if reply.size_bytes != len(data):
        raise ProtocolError(
            "trailing data after reply",
            f"{len(data) - reply.size_bytes} byte(s) after the reply's empty line",
        )
    value = reply.get("action", "\n")
    if value == "\n":  # no attribute value can hold LF: the marker of "absent"
        raise ProtocolError("missing action", "reply has no action attribute")
    word_end = len(value)
    for sep in (" ", "\t"):
        i = value.find(sep)
        if 0 <= i < word_end:
            word_end = i
    word = value[:word_end]
    if not word:
        raise ProtocolError("empty action", "empty action (Postfix would PERMIT)")
    return word.upper(), value[word_end:].lstrip(" \t")
