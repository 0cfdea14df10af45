"""Parsing ``[prio:]server`` words exactly as smtpdcheck(1) documents them."""

from __future__ import annotations

import ipaddress

import pytest

from smtpdcheck.servers import Server, ServerSyntaxError, is_valid_hostname, parse_address, parse_server


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("mx.example.com", Server("mx.example.com", "mx.example.com")),
        ("10:MX.Example.COM.", Server("MX.Example.COM.", "mx.example.com", 10)),
        ("0:a", Server("a", "a", 0)),
        ("65535:a.b", Server("a.b", "a.b", 65535)),
        ("192.0.2.1", Server("192.0.2.1", "192.0.2.1", None, ipaddress.ip_address("192.0.2.1"))),
        ("20:192.0.2.1", Server("192.0.2.1", "192.0.2.1", 20, ipaddress.ip_address("192.0.2.1"))),
        ("[2001:db8::1]", Server("[2001:db8::1]", "2001:db8::1", None, ipaddress.ip_address("2001:db8::1"))),
        ("5:[2001:DB8::1]", Server("[2001:DB8::1]", "2001:db8::1", 5, ipaddress.ip_address("2001:db8::1"))),
        # A whole word that is an IPv6 address is a server without prio.
        ("2001:db8::1", Server("2001:db8::1", "2001:db8::1", None, ipaddress.ip_address("2001:db8::1"))),
        ("10:2001:db8::1", Server("10:2001:db8::1", "10:2001:db8::1", None, ipaddress.ip_address("10:2001:db8::1"))),
        ("::1", Server("::1", "::1", None, ipaddress.ip_address("::1"))),
        ("_spf-mx.example.com", Server("_spf-mx.example.com", "_spf-mx.example.com")),
    ],
)
def test_parse_server(word: str, expected: Server) -> None:
    assert parse_server(word) == expected


@pytest.mark.parametrize(
    "word",
    [
        "", "10:", "65536:mx.example.com", "x:mx.example.com", "-1:mx", "mx example", "mx=example",
        "[mx.example.com]", "[2001:db8::1", "10:[::1", "mx..example", "-mx.example", "mx-.example",
        "bücher.example", "a" * 64 + ".example", "mx.example\r\n", "mx\x00", ":mx", "10:20:mx",
    ],
)
def test_parse_server_rejects(word: str) -> None:
    with pytest.raises(ServerSyntaxError):
        parse_server(word)


def test_hostname_length_limit() -> None:
    label = "a" * 63
    assert is_valid_hostname(".".join([label] * 3) + ".abc")
    assert not is_valid_hostname(".".join([label] * 4) + ".abc")
    assert is_valid_hostname("Example.COM.")
    assert not is_valid_hostname(".")


def test_hostname_length_limit_is_exact() -> None:
    """253 octets, the most a host name can have (RFC 1035 less the root label)."""
    label = "a" * 63
    longest = ".".join([label] * 3 + ["b" * 61])
    assert len(longest) == 253 and is_valid_hostname(longest) and is_valid_hostname(longest + ".")
    assert not is_valid_hostname(".".join([label] * 3 + ["b" * 62]))


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("[192.0.2.1]", "192.0.2.1"),
        ("[IPv6:2001:db8::1]", "2001:db8::1"),
        ("[ipv6:2001:db8::1]", "2001:db8::1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("[192.0.2.1", None),
        ("192.0.2.1]", None),
        ("2001:db8::1]", None),
        ("IPv6:", None),
        ("mx.example", None),
    ],
)
def test_parse_address(text: str, address: str | None) -> None:
    parsed = parse_address(text)
    assert (None if parsed is None else str(parsed)) == address


@pytest.mark.parametrize(
    ("word", "message"),
    [
        ("", "empty server name"),
        ("65536:mx", "priority out of range 0-65535: '65536:mx'"),
        ("x:mx", "bad priority (want a number before ':'): 'x:mx'"),
        ("10:", "missing server name: '10:'"),
        ("mx example", "not a host name or IP address: 'mx example'"),
        ("[mx.example]", "not a host name or IP address: '[mx.example]'"),
    ],
)
def test_parse_server_says_what_is_wrong(word: str, message: str) -> None:
    """The smtpdcheck command prints this as its one line of error."""
    with pytest.raises(ServerSyntaxError) as caught:
        parse_server(word)
    assert str(caught.value) == message
