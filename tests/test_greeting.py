"""The SMTP greeting reader, byte at a time and whole (no I/O)."""

from __future__ import annotations

import pytest

from smtpdcheck.greeting import MAX_GREETING_BYTES, FirstLine, GreetingError, GreetingReader


def feed_bytewise(data: bytes) -> GreetingReader:
    reader = GreetingReader()
    for i in range(len(data)):
        reader.feed(data[i : i + 1])
    return reader


@pytest.mark.parametrize(
    ("data", "first", "complete"),
    [
        (b"220 mx.example.com ESMTP\r\n", FirstLine(220, False, "mx.example.com ESMTP"), True),
        (b"220\r\n", FirstLine(220, False, ""), True),
        (b"220 bare lf\n", FirstLine(220, False, "bare lf"), True),
        (b"220-mx.example.com ESMTP\r\n", FirstLine(220, True, "mx.example.com ESMTP"), False),
        (b"220-one\r\n220-two\r\n220 three\r\n", FirstLine(220, True, "one"), True),
        (b"421 4.3.2 shutting down\r\n", FirstLine(421, False, "4.3.2 shutting down"), True),
        (b"554 5.3.2 no service\r\n", FirstLine(554, False, "5.3.2 no service"), True),
    ],
)
def test_greetings(data: bytes, first: FirstLine, complete: bool) -> None:
    for reader in (feed_bytewise(data), GreetingReader()):
        if reader.first is None:
            reader.feed(data)
        assert reader.first == first
        assert reader.complete is complete
        assert reader.first.available is (first.code == 220)


def test_first_line_decides_before_the_rest() -> None:
    reader = GreetingReader()
    reader.feed(b"220-postscreen pause")
    assert reader.first is None
    reader.feed(b"\r\n")
    assert reader.first == FirstLine(220, True, "postscreen pause")
    assert not reader.complete
    reader.feed(b"220 ready\r\n")
    assert reader.complete


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\xffHELLO NOT SMTP\r\n", b"HTTP/1.1 400 Bad Request\r\n", b"22 short\r\n", b"2200 x\r\n",
        b"220x\r\n", b"999 odd\r\n", b"220-a\r\n421 b\r\n", b"SSH-2.0-OpenSSH_9.2\r\n",
    ],
)
def test_garbage_is_an_error(data: bytes) -> None:
    with pytest.raises(GreetingError):
        feed_bytewise(data)


def test_endless_line_is_cut_off() -> None:
    reader = GreetingReader()
    with pytest.raises(GreetingError):
        for _ in range(MAX_GREETING_BYTES // 100 + 2):
            reader.feed(b"A" * 100)


def test_endless_multiline_is_cut_off() -> None:
    reader = GreetingReader()
    reader.feed(b"220-first\r\n")
    assert reader.first is not None and reader.first.available
    with pytest.raises(GreetingError):
        for _ in range(MAX_GREETING_BYTES):
            reader.feed(b"220-more\r\n")


def test_eof() -> None:
    reader = GreetingReader()
    reader.feed(b"")
    assert reader.eof and reader.first is None
