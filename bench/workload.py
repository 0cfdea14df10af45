"""What the load generator sends: Postfix 3.7 RCPT requests, built fast.

The request is the full 29-attribute one a Debian 12 Postfix (3.7.11)
sends (``testbeds/postfix_request.py``, shared with the tests),
because parse cost grows with the attribute count and a benchmark with a
three-line request would flatter the parser.  It is encoded once with the
project's own :func:`policyd.client.encode_request` and then only the
recipient is spliced in, so a hundred thousand distinct requests cost the
load generator next to nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from policyd.client import encode_request
from testbeds.postfix_request import POSTFIX_37_RCPT_PAIRS

_MARK: Final = "\x01RCPT\x01"


class RequestTemplate:
    """``render(recipient)`` gives the wire bytes of one RCPT request."""

    def __init__(self, server_address: str = "127.0.0.1", attrs: Sequence[tuple[str, str]] = POSTFIX_37_RCPT_PAIRS) -> None:
        changes = {"server_address": server_address, "recipient": _MARK}
        pairs = [(k, changes.get(k, v)) for k, v in attrs]
        wire = encode_request(pairs)
        head, sep, tail = wire.partition(_MARK.encode())
        if not sep:
            raise ValueError("template has no recipient placeholder")
        self._head = head
        self._tail = tail

    def render(self, recipient: str) -> bytes:
        return b"".join((self._head, recipient.encode("utf-8", "surrogateescape"), self._tail))


def domain_name(i: int) -> str:
    """The i-th benchmark domain; the fake DNS answers any of them."""
    return f"d{i}.example"


def recipient(k: int, domain_index: int) -> str:
    return f"user{k}@{domain_name(domain_index)}"
