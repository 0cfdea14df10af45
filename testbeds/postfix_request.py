"""The request a real Postfix sends at RCPT, written once for tests and benchmarks.

These are the bytes a Debian 12 Postfix 3.7.11 sent for one ``RCPT TO``
(29 attributes, in its order), captured from a real smtpd.  Parse cost
grows with the attribute count, so tests and benchmarks use the full
request rather than the three attributes the decision needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

__all__ = ["POSTFIX_37_RCPT", "POSTFIX_37_RCPT_ATTRS", "POSTFIX_37_RCPT_PAIRS"]

POSTFIX_37_RCPT: Final = (
    b"request=smtpd_access_policy\n"
    b"protocol_state=RCPT\n"
    b"protocol_name=ESMTP\n"
    b"client_address=127.0.0.1\n"
    b"client_name=unknown\n"
    b"client_port=43350\n"
    b"reverse_client_name=unknown\n"
    b"server_address=127.0.0.1\n"
    b"server_port=2525\n"
    b"helo_name=client.test\n"
    b"sender=sender@sender.test\n"
    b"recipient=user@example.com\n"
    b"recipient_count=0\n"
    b"queue_id=\n"
    b"instance=267f.6b06f7a0.dbbc.0\n"
    b"size=0\n"
    b"etrn_domain=\n"
    b"stress=\n"
    b"sasl_method=\n"
    b"sasl_username=\n"
    b"sasl_sender=\n"
    b"ccert_subject=\n"
    b"ccert_issuer=\n"
    b"ccert_fingerprint=\n"
    b"ccert_pubkey_fingerprint=\n"
    b"encryption_protocol=\n"
    b"encryption_cipher=\n"
    b"encryption_keysize=0\n"
    b"policy_context=\n"
    b"\n"
)
"""The wire bytes, ending with the empty line."""

POSTFIX_37_RCPT_PAIRS: Final[tuple[tuple[str, str], ...]] = tuple(
    (name, value)
    for name, _, value in (line.partition("=") for line in POSTFIX_37_RCPT.decode("ascii").split("\n")[:-2])
)
"""The same request as ``(name, value)`` pairs, in wire order."""

POSTFIX_37_RCPT_ATTRS: Final[Mapping[str, str]] = MappingProxyType(dict(POSTFIX_37_RCPT_PAIRS))
"""The same request as a read-only mapping, for ``{**POSTFIX_37_RCPT_ATTRS, ...}``."""

assert len(POSTFIX_37_RCPT_PAIRS) == len(POSTFIX_37_RCPT_ATTRS) == 29
