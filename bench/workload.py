"""What the load generator sends: Postfix 3.7 RCPT requests, built fast.

The request is the full 29-attribute one a Debian 12 Postfix (3.7.11)
sends, because parse cost grows with the attribute count and a benchmark
with a three-line request would flatter the parser.  It is encoded once with
the project's own :func:`policyd.client.encode_request` and then only the
recipient is spliced in, so a hundred thousand distinct requests cost the
load generator next to nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from policyd.client import encode_request

_MARK: Final = "\x01RCPT\x01"

#: Attribute order and values of a real RCPT request (Postfix 3.7.11, see the
#: project's postfix-policy reference §1.2); only recipient and
#: server_address vary in the benchmarks.
POSTFIX_37_RCPT: Final[tuple[tuple[str, str], ...]] = (
    ("request", "smtpd_access_policy"),
    ("protocol_state", "RCPT"),
    ("protocol_name", "ESMTP"),
    ("client_address", "192.0.2.25"),
    ("client_name", "unknown"),
    ("client_port", "43350"),
    ("reverse_client_name", "unknown"),
    ("server_address", "127.0.0.1"),
    ("server_port", "25"),
    ("helo_name", "client.bench.example"),
    ("sender", "sender@sender.bench.example"),
    ("recipient", _MARK),
    ("recipient_count", "0"),
    ("queue_id", ""),
    ("instance", "267f.6b06f7a0.dbbc.0"),
    ("size", "0"),
    ("etrn_domain", ""),
    ("stress", ""),
    ("sasl_method", ""),
    ("sasl_username", ""),
    ("sasl_sender", ""),
    ("ccert_subject", ""),
    ("ccert_issuer", ""),
    ("ccert_fingerprint", ""),
    ("ccert_pubkey_fingerprint", ""),
    ("encryption_protocol", ""),
    ("encryption_cipher", ""),
    ("encryption_keysize", "0"),
    ("policy_context", ""),
)
assert len(POSTFIX_37_RCPT) == 29


class RequestTemplate:
    """``render(recipient)`` gives the wire bytes of one RCPT request."""

    def __init__(self, server_address: str = "127.0.0.1", attrs: Sequence[tuple[str, str]] = POSTFIX_37_RCPT) -> None:
        pairs = [(k, server_address if k == "server_address" else v) for k, v in attrs]
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
