"""Values both commands take from people: durations in seconds, counts and TCP ports.

Each is defined once, so ``smtpdcheck --timeout``, the policy server's flags
and configuration file, and the port of a ``--nameserver`` accept and refuse
the same things with the same words.  A value's allowed range is a
:class:`Range`, stated where the option is declared; the refusal message is
written from that range, so two values outside it (``-1`` and ``0`` where
only more than 0 will do) get the same words.  Callers add where the value
came from (a flag, a file key) when they report the error.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final


class BadValueError(ValueError):
    """A value that cannot be used; the message says why and quotes it."""


@dataclass(frozen=True, slots=True)
class Range:
    """Where a number may lie: from ``low`` (excluded when ``open``) up to ``high``.

    ``or_zero`` admits 0 as well, below ``low``: for options where 0 means
    "off" but a small value other than 0 cannot work.
    """

    low: float
    open: bool = False
    high: float | None = None
    or_zero: bool = False

    def __contains__(self, number: float) -> bool:
        if self.or_zero and number == 0:
            return True
        above = number > self.low if self.open else number >= self.low
        return above and (self.high is None or number <= self.high)

    def __str__(self) -> str:
        low = _number_text(self.low)
        if self.high is not None:
            words = f"{low} to {_number_text(self.high)}"
        else:
            words = f"more than {low}" if self.open else f"{low} or more"
        return f"0, or {words}" if self.or_zero else words


def _number_text(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


ZERO_OR_MORE: Final = Range(0)
MORE_THAN_ZERO: Final = Range(0, open=True)
ONE_OR_MORE: Final = Range(1)
PORTS: Final = Range(1, high=65535)
_WHOLE: Final = re.compile(r"[+-]?[0-9]+")


def seconds(value: object, within: Range = ZERO_OR_MORE) -> float:
    """A finite duration in seconds within ``within``, from a number or its text.

    Booleans are refused although Python counts them as integers: in a TOML
    file ``timeout = true`` is a mistake, not one second.  ``nan`` and
    ``inf`` are not numbers of seconds, and are called that, not "too small".
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadValueError("must be a number of seconds")
    try:
        number = float(value)
    except ValueError:
        raise BadValueError(f"not a number: {value!r}") from None
    if math.isnan(number):
        raise BadValueError(f"not a number: {value!r}")
    if math.isinf(number):
        raise BadValueError(f"not a finite number: {value!r}")
    if number not in within:
        raise BadValueError(f"must be {within}: {value!r}")
    return number


def positive_seconds(value: object) -> float:
    """A duration that must not be 0, where 0 would mean "give up at once"."""
    return seconds(value, MORE_THAN_ZERO)


def whole(value: object, within: Range = ONE_OR_MORE) -> int:
    """A whole number within ``within``, from an integer or ASCII digits (a sign allowed)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _WHOLE.fullmatch(value.strip()):
        number = int(value)
    else:
        raise BadValueError(f"not a whole number: {value!r}")
    if number not in within:
        raise BadValueError(f"must be {within}: {value!r}")
    return number


def port(value: object, within: Range = PORTS) -> int:
    """A TCP or UDP port (``within`` a narrower range, if given), from an integer or ASCII digits.

    Only ASCII digits: ``str.isdigit`` also says yes to characters such as
    "²" that ``int`` refuses.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)
    else:
        raise BadValueError(f"not a TCP port: {value!r}")
    if number not in within:
        raise BadValueError(f"not a TCP port ({within}): {value!r}")
    return number
