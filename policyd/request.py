"""One policy request, held the way it arrived.

Built by the parser (:mod:`policyd.protocol`) from the wire, or from
attributes by tests, tooling and ``--check``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Final, final

__all__ = ["PolicyRequest", "check_attribute"]

_RCPT_HEAD: Final = "\nrequest=smtpd_access_policy\nprotocol_state=RCPT\n"


@final
class PolicyRequest:
    """One request, as Postfix sent it.

    Every attribute is kept, including ones this project does not know
    (Postfix adds attributes in new releases and the README asks servers to
    ignore what they do not need).  Names and values are decoded as UTF-8
    with ``surrogateescape``, so ``value.encode("utf-8", "surrogateescape")``
    gives back the raw bytes.  When a name repeats, the *first* value is
    kept: Postfix's README allows first or last, and first means a peer
    cannot override an attribute by appending another line.  ``size_bytes``
    is the request's length on the wire, for logs.

    The request is held as its lines in one string (LF, the ``name=value``
    lines joined by LF, LF), and an attribute is found by searching for
    ``LF name =``, which can only match the start of that attribute's first
    line.  A cached answer reads four of the 29 attributes Postfix sends,
    so no mapping of them all is built unless ``attrs`` is asked for.

    ``PolicyRequest(attrs)`` builds one from attributes (tests, tooling,
    ``--check``), refusing anything that could not have come off the wire
    (see :func:`check_attribute`).
    """

    __slots__ = ("_attrs", "_lines", "_size")

    def __init__(self, attrs: Mapping[str, str] | Iterable[tuple[str, str]], size_bytes: int = 0) -> None:
        pairs = attrs.items() if isinstance(attrs, Mapping) else attrs
        lines = [""]
        for name, value in pairs:
            check_attribute(name, value)
            lines.append(f"{name}={value}")
        lines.append("")
        self._attrs: Mapping[str, str] | None = None
        self._lines = "\n".join(lines)
        self._size = size_bytes

    @classmethod
    def _from_lines(cls, lines: str, size_bytes: int) -> PolicyRequest:
        """The parser's constructor: ``lines`` is already in the held form,
        every line ``name=value`` with a non-empty name."""
        self = object.__new__(cls)
        self._attrs = None
        self._lines = lines
        self._size = size_bytes
        return self

    @property
    def attrs(self) -> Mapping[str, str]:
        """Every attribute, first value winning; built on first use."""
        if self._attrs is None:
            attrs: dict[str, str] = {}
            for line in self._lines[1:-1].split("\n"):
                name, _, value = line.partition("=")
                if name and name not in attrs:
                    attrs[name] = value
            self._attrs = MappingProxyType(attrs)
        return self._attrs

    @property
    def size_bytes(self) -> int:
        return self._size

    def _find(self, needle: str, default: str) -> str:
        lines = self._lines
        at = lines.find(needle)
        if at < 0:
            return default
        at += len(needle)
        return lines[at : lines.index("\n", at)]

    def get(self, name: str, default: str = "") -> str:
        """An attribute, or ``default``: a missing attribute and an empty one
        mean the same to Postfix ("value unavailable")."""
        if "=" in name or "\n" in name:
            return default  # no attribute name can hold either
        return self._find(f"\n{name}=", default)

    @property
    def is_smtpd_rcpt(self) -> bool:
        """An smtpd access-policy request at the RCPT stage: the one kind
        this server decides.

        Postfix sends ``request`` and ``protocol_state`` as its first two
        lines, so a request that starts that way needs no search.
        """
        if self._lines.startswith(_RCPT_HEAD):
            return True
        return self.request == "smtpd_access_policy" and self.protocol_state == "RCPT"

    @property
    def request(self) -> str:
        """Always ``smtpd_access_policy`` for smtpd; anything else is not ours."""
        return self._find("\nrequest=", "")

    @property
    def protocol_state(self) -> str:
        """The SMTP stage (``RCPT``, ``DATA``...), upper-cased so comparisons
        need no care."""
        return self._find("\nprotocol_state=", "").upper()

    @property
    def recipient(self) -> str:
        """Envelope recipient in Postfix's internal form, without ``<>``."""
        return self._find("\nrecipient=", "")

    @property
    def sender(self) -> str:
        """Envelope sender without ``<>``; empty for the null sender."""
        return self._find("\nsender=", "")

    @property
    def queue_id(self) -> str:
        """Empty at the first RCPT: the queue file does not exist yet."""
        return self._find("\nqueue_id=", "")

    @property
    def server_address(self) -> str:
        """The local address the SMTP client connected to (Postfix 3.2+)."""
        return self._find("\nserver_address=", "")

    @property
    def client_address(self) -> str:
        """The SMTP client's IP address."""
        return self._find("\nclient_address=", "")

    @property
    def instance(self) -> str:
        """Ties together the requests for one message on one connection."""
        return self._find("\ninstance=", "")

    def rcpt_fields(self) -> tuple[str, str, str] | None:
        """``(recipient, server_address, queue_id)`` of an smtpd RCPT request, else None.

        What an answer from the memo reads of a request, in one call: the
        same values as :attr:`is_smtpd_rcpt` and the three properties, for
        the price of their searches alone.
        """
        lines = self._lines
        if not lines.startswith(_RCPT_HEAD) and not self.is_smtpd_rcpt:
            return None
        # Unrolled: this runs for every RCPT.
        at = lines.find("\nrecipient=")
        recipient = "" if at < 0 else lines[at + 11 : lines.index("\n", at + 11)]
        at = lines.find("\nserver_address=")
        server_address = "" if at < 0 else lines[at + 16 : lines.index("\n", at + 16)]
        at = lines.find("\nqueue_id=")
        queue_id = "" if at < 0 else lines[at + 10 : lines.index("\n", at + 10)]
        return recipient, server_address, queue_id

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PolicyRequest):
            return NotImplemented
        return self._size == other._size and dict(self.attrs) == dict(other.attrs)

    __hash__ = None  # type: ignore[assignment]  # compared by content, which is a mapping

    def __repr__(self) -> str:
        return f"PolicyRequest({dict(self.attrs)!r}, size_bytes={self._size})"


def check_attribute(name: str, value: str) -> None:
    """Raise ValueError unless ``name=value`` can be one request line.

    Refused: an empty name, a name holding ``=``, LF or NUL, a value
    holding LF or NUL, and a value ending in CR (it would be read as a CRLF
    line end).  Postfix sends none of these; a request built from
    attributes must read back unchanged.
    """
    if not name:
        raise ValueError("attribute name empty")
    if "=" in name or "\n" in name or "\x00" in name:
        raise ValueError(f"attribute name {name!r} contains '=', LF or NUL")
    if "\n" in value or "\x00" in value:
        raise ValueError(f"value of {name!r} contains LF or NUL")
    if value.endswith("\r"):
        raise ValueError(f"value of {name!r} ends in CR")
