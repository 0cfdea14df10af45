"""The validators of smtpdcheck-policyd's options, and the errors they raise.

Each turns a value from the command line (always text) or the TOML file
into the option's type, or refuses it with a message that names what is
wrong; the allowed values they hold (:class:`Number`'s range,
:class:`Choice`'s words) are what ``--help``, the manual page, the README
and the example file say, so these cannot disagree.  The table of options
that uses them is :mod:`policyd.config`.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import get_args

from smtpdcheck import values
from smtpdcheck.probe import PROBE_REFRESH_FLOOR_S
from smtpdcheck.resolver import DNSConfigError, parse_nameserver
from smtpdcheck.servers import is_valid_hostname, parse_address


class ConfigError(ValueError):
    """An option value that cannot be used; the message names the option."""


class ConflictingOptions(ConfigError):
    """Values each valid on their own that cannot work together; the message names every option involved."""


class Number:
    """A validator of a number with its allowed range, stated once where the option is declared.

    The refusal messages and the documented range (``--help``, the manual
    page, the README, the example file) are all written from ``range``, so
    they cannot say different things.
    """

    def __init__(self, parse: Callable[[object, values.Range], float | int], within: values.Range) -> None:
        self.parse = parse
        self.range = within

    def __call__(self, value: object) -> float | int:
        try:
            return self.parse(value, self.range)
        except values.BadValueError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def allowed(self) -> str:
        return str(self.range)


seconds = Number(values.seconds, values.ZERO_OR_MORE)
positive_seconds = Number(values.seconds, values.MORE_THAN_ZERO)
port = Number(values.port, values.PORTS)
count = Number(values.whole, values.ONE_OR_MORE)
# An "up" is confirmed by a probe at most once per PROBE_REFRESH_FLOOR_S; a
# shorter TTL expires before its confirmation can come, and RCPTs to a live
# primary would get DUNNO ("unconfirmed").  0 still means "not cached".
up_ttl = Number(values.seconds, values.Range(PROBE_REFRESH_FLOOR_S, or_zero=True))


def mode_bits(value: object) -> int:
    """A file mode: a TOML integer is the bits as written, text is octal.

    TOML hands ``0o660`` over as the integer 432, so an integer must never
    be read again as octal digits: that turned 0o660 into mode 0432.  That
    an integer in a file was written in octal at all is checked where the
    file's text is still at hand (:func:`load_file`).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= 0o777:
            hint = f" (write 0o{value} or \"0{value}\")" if set(str(value)) <= set("01234567") else ""
            raise ConfigError(f"not a file mode: {value}{hint}")
        return value
    if not isinstance(value, str):
        raise ConfigError('must be a TOML integer such as 0o660 or a string such as "0660"')
    digits = value.removeprefix("0o")
    if not digits or not set(digits) <= set("01234567"):
        raise ConfigError(f"not an octal file mode: {value!r}")
    bits = int(digits, 8)
    if bits > 0o777:
        raise ConfigError(f"not a file mode: {value!r}")
    return bits


class Choice:
    """A validator for one of the words of a ``Literal`` type.

    Upper-case choices (Postfix actions) are matched in upper case, the
    others in lower case, so ``Warn`` and ``dunno`` are understood.  The
    words are listed in ``--help`` and the documents from here.
    """

    def __init__(self, choices: object) -> None:
        self.words: tuple[str, ...] = get_args(choices)

    def __call__(self, value: object) -> str:
        text = str(value).lower() if self.words[0].islower() else str(value).upper()
        if text not in self.words:
            raise ConfigError(f"must be one of {', '.join(self.words)}: {value!r}")
        return text

    @property
    def allowed(self) -> str:
        return "one of " + ", ".join(self.words)


def choice(choices: object) -> Choice:
    return Choice(choices)


def check_listen(value: object) -> str:
    text = str(value)
    kind, _, rest = text.partition(":")
    if kind == "unix":
        if not rest.startswith("/"):
            raise ConfigError(f"unix socket path must be absolute: {text!r}")
        return text
    if kind == "inet":
        host, _, number = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if parse_address(host) is None and host != "localhost":
            raise ConfigError(f"bad listen address {text!r} (want inet:IP:PORT, inet:[IPv6]:PORT or unix:/path)")
        port(number)
        return text
    raise ConfigError(f"bad listen address {text!r} (want inet:IP:PORT, inet:[IPv6]:PORT or unix:/path)")


def stop_value(value: object) -> str:
    text = str(value)
    if parse_address(text) is None and not is_valid_hostname(text):
        raise ConfigError(f"not a host name or IP address: {text!r}")
    return text


def nameserver(value: object) -> str:
    try:
        parse_nameserver(str(value))
    except DNSConfigError as exc:
        raise ConfigError(str(exc)) from None
    return str(value)


def defer_text(value: object) -> str:
    text = str(value)
    fields_used = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    unknown = fields_used - {"mx", "domain"}
    if unknown:
        raise ConfigError(f"unknown placeholder {{{sorted(unknown)[0]}}} (known: {{mx}}, {{domain}})")
    try:
        text.format(mx="mx.example", domain="example")
    except (ValueError, IndexError) as exc:
        raise ConfigError(f"bad template: {exc}") from None
    if any(ord(c) < 0x20 or ord(c) > 0x7E for c in text):
        raise ConfigError("must be printable ASCII")
    return text


def metrics_endpoint(value: object) -> str:
    text = str(value)
    if text and not text.startswith("inet:"):
        raise ConfigError(f"want inet:IP:PORT: {text!r}")
    return check_listen(text) if text else text
