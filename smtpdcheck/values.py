"""Values both commands take from people: durations in seconds and TCP ports.

Each is defined once, so ``smtpdcheck --timeout``, the policy server's flags
and configuration file, and the port of a ``--nameserver`` accept and refuse
the same things with the same words.  Callers add where the value came from
(a flag, a file key) when they report the error.
"""

from __future__ import annotations

import math


class BadValueError(ValueError):
    """A value that cannot be used; the message says why and quotes it."""


def seconds(value: object) -> float:
    """A duration of 0 or more seconds, from a number or its text.

    Booleans are refused although Python counts them as integers: in a TOML
    file ``timeout = true`` is a mistake, not one second.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadValueError("must be a number of seconds")
    try:
        number = float(value)
    except ValueError:
        raise BadValueError(f"not a number: {value!r}") from None
    if number < 0 or not math.isfinite(number):
        raise BadValueError(f"must be 0 or more: {value!r}")
    return number


def positive_seconds(value: object) -> float:
    """A duration that must not be 0, where 0 would mean "give up at once"."""
    number = seconds(value)
    if number == 0:
        raise BadValueError(f"must be more than 0: {value!r}")
    return number


def port(value: object) -> int:
    """A TCP or UDP port, 1 to 65535, from an integer or ASCII digits.

    Only ASCII digits: ``str.isdigit`` also says yes to characters such as
    "²" that ``int`` refuses.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)
    else:
        raise BadValueError(f"not a TCP port: {value!r}")
    if not 1 <= number <= 65535:
        raise BadValueError(f"not a TCP port (1 to 65535): {value!r}")
    return number
