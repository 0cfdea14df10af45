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


@pytest.mark.parametrize(("code", "valid"), [(199, False), (200, True), (599, True), (600, False)])
def test_reply_code_bounds(code: int, valid: bool) -> None:
    """RFC 5321 §4.2: reply codes run from 2yz to 5yz."""
    reader = GreetingReader()
    line = f"{code} x\r\n".encode()
    if valid:
        reader.feed(line)
        assert reader.first == FirstLine(code, False, "x") and reader.complete
        assert reader.first.available is False
    else:
        with pytest.raises(GreetingError, match=f"^reply code {code} out of range$"):
            reader.feed(line)


@pytest.mark.parametrize("bytewise", [False, True])
def test_a_greeting_of_exactly_the_limit_is_read_one_byte_more_is_not(bytewise: bool) -> None:
    """The limit counts every byte of the greeting, line ends included."""
    exact = b"220 " + b"x" * (MAX_GREETING_BYTES - 6) + b"\r\n"
    assert len(exact) == MAX_GREETING_BYTES
    reader = feed_bytewise(exact) if bytewise else GreetingReader()
    if not bytewise:
        reader.feed(exact)
    assert reader.first is not None and reader.complete and len(reader.first.text) == MAX_GREETING_BYTES - 6
    over = b"220 " + b"x" * (MAX_GREETING_BYTES - 5) + b"\r\n"
    with pytest.raises(GreetingError, match=f"^greeting longer than {MAX_GREETING_BYTES} bytes$"):
        if bytewise:
            feed_bytewise(over)
        else:
            GreetingReader().feed(over)


def test_the_limit_counts_the_lines_of_a_multiline_greeting_together() -> None:
    first = b"220-" + b"a" * 96 + b"\r\n"  # 102 bytes
    rest = MAX_GREETING_BYTES - len(first)
    last = b"220 " + b"b" * (rest - 6) + b"\r\n"
    reader = GreetingReader()
    reader.feed(first)
    reader.feed(last)
    assert reader.complete
    reader = GreetingReader()
    reader.feed(first)
    with pytest.raises(GreetingError):
        reader.feed(b"220 " + b"b" * (rest - 5) + b"\r\n")


def test_a_pending_line_of_exactly_the_limit_waits_for_its_end() -> None:
    reader = GreetingReader()
    reader.feed(b"220 " + b"x" * (MAX_GREETING_BYTES - 4))  # no newline yet: limit bytes, not more
    assert reader.first is None
    with pytest.raises(GreetingError):
        reader.feed(b"\n")


def test_a_fresh_reader_knows_nothing() -> None:
    reader = GreetingReader()
    assert (reader.first, reader.complete, reader.eof) == (None, False, False)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\n", "not an SMTP reply line"),  # an empty first line
        (b"220-a\r\n\n", "not an SMTP reply line"),  # an empty line inside the greeting
        (b"HTTP/1.1 400\r\n", "not an SMTP reply line"),
        (b"220x\r\n", "not an SMTP reply line"),
        (b"220-a\r\n421 b\r\n", "reply code changed inside a multi-line greeting"),
    ],
)
def test_what_is_wrong_with_a_greeting_is_said(data: bytes, message: str) -> None:
    """The message is the probe's detail in ``--check`` and the debug log."""
    for feed in (lambda r: r.feed(data), lambda r: [r.feed(data[i : i + 1]) for i in range(len(data))]):
        with pytest.raises(GreetingError, match=f"^{message}$"):
            feed(GreetingReader())


def test_greeting_text_that_is_not_ascii_is_kept_readable() -> None:
    reader = GreetingReader()
    reader.feed(b"220 caf\xc3\xa9 ESMTP\r\n")
    assert reader.first == FirstLine(220, False, "caf\ufffd\ufffd ESMTP")


def test_an_empty_line_followed_by_much_more_is_not_a_reply_line() -> None:
    """Judged as the empty line it is, not as the bytes after it."""
    with pytest.raises(GreetingError, match="^not an SMTP reply line$"):
        GreetingReader().feed(b"\n" + b"x" * (2 * MAX_GREETING_BYTES))
    reader = GreetingReader()
    reader.feed(b"220-a\r\n")
    with pytest.raises(GreetingError, match="^not an SMTP reply line$"):
        reader.feed(b"\n" + b"x" * (2 * MAX_GREETING_BYTES))
