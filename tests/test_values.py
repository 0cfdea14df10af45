"""The seconds and port validators both commands share."""

from __future__ import annotations

import pytest

from smtpdcheck import values
from smtpdcheck.resolver import DNSConfigError, parse_nameserver


@pytest.mark.parametrize(("value", "expected"), [(0, 0.0), ("0", 0.0), (2, 2.0), ("2.5", 2.5), (0.25, 0.25), (" 3 ", 3.0)])
def test_seconds_accepts_numbers_and_their_text(value: object, expected: float) -> None:
    assert values.seconds(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("soon", "not a number: 'soon'"),
        ("", "not a number: ''"),
        (-1, "must be 0 or more: -1"),
        ("-0.5", "must be 0 or more: '-0.5'"),
        ("nan", "not a number: 'nan'"),
        ("inf", "not a finite number: 'inf'"),
        ("-inf", "not a finite number: '-inf'"),
        (True, "must be a number of seconds"),
        (None, "must be a number of seconds"),
    ],
)
def test_seconds_refuses_with_the_value_quoted(value: object, message: str) -> None:
    with pytest.raises(values.BadValueError) as info:
        values.seconds(value)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


def test_positive_seconds_refuses_zero_only() -> None:
    assert values.positive_seconds("0.001") == 0.001
    with pytest.raises(values.BadValueError, match=r"^must be more than 0: 0$"):
        values.positive_seconds(0)
    # -1 and 0 are refused with the same words: the range, once.
    with pytest.raises(values.BadValueError, match=r"^must be more than 0: -1$"):
        values.positive_seconds(-1)


@pytest.mark.parametrize(("value", "expected"), [(1, 1), ("25", 25), ("65535", 65535), (5353, 5353)])
def test_port_accepts_1_to_65535(value: object, expected: int) -> None:
    assert values.port(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "not a TCP port (1 to 65535): 0"),
        ("0", "not a TCP port (1 to 65535): '0'"),
        (70000, "not a TCP port (1 to 65535): 70000"),
        ("65536", "not a TCP port (1 to 65535): '65536'"),
        ("", "not a TCP port: ''"),
        ("-1", "not a TCP port: '-1'"),
        ("+25", "not a TCP port: '+25'"),
        ("25.0", "not a TCP port: '25.0'"),
        (25.0, "not a TCP port: 25.0"),
        ("\u00b2", "not a TCP port: '\u00b2'"),  # a digit to str.isdigit, not to int()
        (True, "not a TCP port: True"),
    ],
)
def test_port_refuses_with_the_value_quoted(value: object, message: str) -> None:
    with pytest.raises(values.BadValueError) as info:
        values.port(value)
    assert str(info.value) == message


def test_nameserver_ports_are_checked_by_the_same_validator() -> None:
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("[::1]:65535") == ("::1", 65535)
    assert parse_nameserver("192.0.2.1") == ("192.0.2.1", 53)
    for text in ("127.0.0.1:0", "[::1]:65536", "127.0.0.1:\u00b2", "127.0.0.1:"):
        with pytest.raises(DNSConfigError, match=r"^bad port in .*: not a TCP port"):
            parse_nameserver(text)


@pytest.mark.parametrize(
    ("within", "words"),
    [(values.ZERO_OR_MORE, "0 or more"), (values.MORE_THAN_ZERO, "more than 0"), (values.ONE_OR_MORE, "1 or more"),
     (values.PORTS, "1 to 65535")],
)
def test_a_range_says_what_it_holds(within: values.Range, words: str) -> None:
    assert str(within) == words
    low = int(within.low)
    assert (low in within) is not within.open
    assert low + 1 in within and low - 1 not in within


def test_a_range_may_admit_zero_below_its_low_end() -> None:
    """0 means "off" for some options where small values other than 0 cannot work."""
    within = values.Range(1, or_zero=True)
    assert str(within) == "0, or 1 or more"
    assert 0 in within and 1 in within and 7.5 in within
    assert 0.5 not in within and -1 not in within and 1e-9 not in within
    assert str(values.Range(1, open=True, or_zero=True)) == "0, or more than 1"
    with pytest.raises(values.BadValueError, match=r"^must be 0, or 1 or more: '0.5'$"):
        values.seconds("0.5", within)


def test_whole_numbers() -> None:
    assert values.whole("12") == 12 and values.whole(3) == 3
    for bad, message in [("1.5", "not a whole number: '1.5'"), (True, "not a whole number: True"),
                         ("\u0663", "not a whole number: '\u0663'"), ("0", "must be 1 or more: '0'"),
                         (-4, "must be 1 or more: -4")]:
        with pytest.raises(values.BadValueError) as info:
            values.whole(bad)
        assert str(info.value) == message
