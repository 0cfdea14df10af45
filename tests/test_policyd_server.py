"""The policy server over real sockets, with a real DNS server and real greeters."""

from __future__ import annotations

import logging
import re
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from policyd.listeners import ListenError, open_listeners
from policyd.client import parse_reply
from tests.conftest import Farm, zone_with_hosts
from tests.policyd_helpers import RunningPolicyd, policyd_config, rcpt, read_replies, start_policyd
from testbeds.dnsserver import Behavior, FakeDNSServer, Slow
from testbeds.greeters import Mode


def backup_zone(domain: str, primary_ip: str, *, backup_ip: str = "127.0.0.1") -> dict:
    """``domain``: MX 10 mx1 (primary_ip), MX 20 backup (this host)."""
    return {
        (domain, "MX"): [f"10 mx1.{domain}.", f"20 backup.{domain}."],
        **zone_with_hosts({f"mx1.{domain}": [primary_ip], f"backup.{domain}": [backup_ip]}),
    }


@pytest.fixture
async def policyd(nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]) -> tuple[RunningPolicyd, Farm]:
    f = await farm(Mode.OK, Mode.CODE_421, Mode.SILENT)
    dns_server.zone.update(backup_zone("up.example", "127.0.0.2"))
    dns_server.zone.update(backup_zone("down.example", "127.0.0.3"))
    dns_server.zone.update(backup_zone("silent.example", "127.0.0.4"))
    running = await start_policyd(nursery, policyd_config(dns_server.port, f.port))
    return running, f


async def test_live_primary_defers_naming_it(policyd: tuple[RunningPolicyd, Farm]) -> None:
    running, _ = policyd
    with trio.fail_after(5):
        action, text = await running.ask(rcpt("user@up.example"))
    assert action == "DEFER_IF_PERMIT"
    assert "mx1.up.example" in text


@pytest.mark.parametrize("domain", ["down.example", "silent.example", "nonexistent.example"])
async def test_no_live_primary_is_dunno(policyd: tuple[RunningPolicyd, Farm], domain: str) -> None:
    running, _ = policyd
    with trio.fail_after(5):
        assert await running.ask(rcpt(f"user@{domain}")) == ("DUNNO", "")


NOT_CHECKED: list[tuple[dict[str, str], str]] = [
    ({"protocol_state": "VRFY"}, "VRFY also reaches recipient restrictions"),
    ({"protocol_state": "DATA"}, "only RCPT is checked"),
    ({"request": "something_else"}, "not a policy request"),
    ({"recipient": ""}, "empty recipient"),
    ({"recipient": "user@[127.0.0.2]"}, "address literal"),
]


@pytest.mark.parametrize(("attrs", "why"), NOT_CHECKED)
async def test_only_rcpt_with_a_domain_is_checked(policyd: tuple[RunningPolicyd, Farm], attrs: dict[str, str], why: str) -> None:
    running, f = policyd
    attrs = dict(attrs)  # the parameter is shared by every run of this test in the process
    recipient = attrs.pop("recipient", "user@up.example")
    with trio.fail_after(5):
        assert await running.ask(rcpt(recipient, **attrs)) == ("DUNNO", ""), why
    assert f.greeters[0].connections == 0


async def test_only_rcpt_check_survives_a_rerun_in_the_same_process(policyd: tuple[RunningPolicyd, Farm]) -> None:
    """A rerun plugin or a mutation tester runs a test again with the very same
    parameter objects; the second run must ask what the first did."""
    for attrs, why in NOT_CHECKED:
        before = dict(attrs)
        for _ in range(2):
            await test_only_rcpt_with_a_domain_is_checked(policyd, attrs, why)
        assert attrs == before, why


async def test_this_host_is_the_primary(nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]) -> None:
    f = await farm(Mode.OK)
    dns_server.zone.update({
        ("d.example", "MX"): ["10 backup.d.example.", "10 peer.d.example.", "20 mx2.d.example."],
        **zone_with_hosts({"backup.d.example": ["127.0.0.1"], "peer.d.example": ["127.0.0.2"], "mx2.d.example": ["127.0.0.2"]}),
    })
    running = await start_policyd(nursery, policyd_config(dns_server.port, f.port))
    with trio.fail_after(5):
        assert await running.ask(rcpt("user@d.example")) == ("DUNNO", "")
    assert f.greeters[0].connections == 0  # same or worse preference: never probed


async def test_pipelined_requests_answered_in_order(policyd: tuple[RunningPolicyd, Farm]) -> None:
    running, _ = policyd
    burst = rcpt("a@up.example") + rcpt("b@down.example") + rcpt("c@up.example", protocol_state="VRFY") + rcpt("d@up.example")
    with trio.fail_after(5):
        stream = await running.connect()
        async with stream:
            # Feed in awkward chunk sizes.
            for i in range(0, len(burst), 7):
                await stream.send_all(burst[i : i + 7])
            data = await read_replies(stream, 4)
    replies = [parse_reply(part + b"\n\n") for part in data.split(b"\n\n")[:4]]
    assert [a for a, _ in replies] == ["DEFER_IF_PERMIT", "DUNNO", "DUNNO", "DEFER_IF_PERMIT"]


async def test_many_requests_on_one_connection(policyd: tuple[RunningPolicyd, Farm]) -> None:
    running, f = policyd
    with trio.fail_after(5):
        stream = await running.connect()
        async with stream:
            for i in range(50):
                action, _ = await running.ask(rcpt(f"u{i}@up.example"), stream)
                assert action == "DEFER_IF_PERMIT"
    assert f.greeters[0].connections == 1  # one probe, then the cache


async def test_protocol_error_closes_only_that_connection(policyd: tuple[RunningPolicyd, Farm]) -> None:
    running, _ = policyd
    with trio.fail_after(5):
        good = await running.connect()
        bad = await running.connect()
        async with good, bad:
            await bad.send_all(b"request=smtpd_access_policy\nthis line has no equals sign\n\n")
            assert await bad.receive_some(100) == b""  # closed, no reply
            assert (await running.ask(rcpt("x@up.example"), good))[0] == "DEFER_IF_PERMIT"
    assert running.responder.metrics.protocol_errors["line without '='"] == 1


async def test_overlong_line_closes_connection(policyd: tuple[RunningPolicyd, Farm]) -> None:
    running, _ = policyd
    with trio.fail_after(5):
        stream = await running.connect()
        async with stream:
            try:
                await stream.send_all(b"recipient=" + b"x" * 100_000)
                closed = await stream.receive_some(100) == b""
            except trio.BrokenResourceError:
                closed = True  # reset: the server closed with our bytes unread
            assert closed
        assert (await running.ask(rcpt("x@up.example")))[0] == "DEFER_IF_PERMIT"


async def test_non_utf8_recipient_is_answered(policyd: tuple[RunningPolicyd, Farm]) -> None:
    running, _ = policyd
    raw = rcpt("user@up.example").replace(b"recipient=user@up.example", b"recipient=us\xfc\xff@up.example")
    with trio.fail_after(5):
        assert (await running.ask(raw))[0] == "DEFER_IF_PERMIT"
        raw_domain = rcpt("user@up.example").replace(b"recipient=user@up.example", b"recipient=user@up\xfc.example")
        assert await running.ask(raw_domain) == ("DUNNO", "")


async def test_unicode_domain_is_idna_encoded(nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]) -> None:
    f = await farm(Mode.OK)
    dns_server.zone.update(backup_zone("xn--bcher-kva.example", "127.0.0.2"))
    running = await start_policyd(nursery, policyd_config(dns_server.port, f.port))
    with trio.fail_after(5):
        action, text = await running.ask(rcpt("user@BÜCHER.example."))
    assert action == "DEFER_IF_PERMIT" and "mx1.xn--bcher-kva.example" in text


@pytest.mark.parametrize(
    ("zone_value", "expect_reason"),
    [
        (Behavior.SERVFAIL, "dns failure: SERVFAIL"),
        (Behavior.HANG, "dns failure: timeout"),
        (Behavior.GARBAGE, "dns failure"),
        (Behavior.REFUSED, "dns failure: REFUSED"),
    ],
)
async def test_dns_failure_fails_open(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], caplog: pytest.LogCaptureFixture,
    zone_value: Behavior, expect_reason: str,
) -> None:
    f = await farm(Mode.OK)
    dns_server.zone[("broken.example", "MX")] = zone_value
    running = await start_policyd(nursery, policyd_config(dns_server.port, f.port))
    caplog.set_level(logging.INFO, logger="smtpdcheck")
    with trio.fail_after(running.responder.config.deadline + 1):
        assert await running.ask(rcpt("user@broken.example")) == ("DUNNO", "")
    # Answered as a DNS failure, not cut off by the deadline (whose arithmetic
    # test_virtual_time proves at exact instants).
    assert running.responder.metrics.requests == {("DUNNO", "dns failure"): 1}
    assert expect_reason in caplog.text


async def test_failure_action_can_defer(nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]) -> None:
    f = await farm(Mode.OK)
    dns_server.zone[("broken.example", "MX")] = Behavior.SERVFAIL
    running = await start_policyd(nursery, policyd_config(dns_server.port, f.port, failure_action="DEFER_IF_PERMIT"))
    with trio.fail_after(5):
        action, text = await running.ask(rcpt("user@broken.example"))
    assert action == "DEFER_IF_PERMIT" and "try again later" in text


async def test_deadline_bounds_slow_dns(nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]) -> None:
    """A slow MX answer then slow address answers: the deadline answers first."""
    f = await farm(Mode.SILENT)
    dns_server.zone.update({
        ("slow.example", "MX"): Slow(0.4, ["10 mx1.slow.example.", "20 backup.slow.example."]),
        ("mx1.slow.example", "A"): Slow(0.4, ["127.0.0.2"]),
        ("backup.slow.example", "A"): ["127.0.0.1"],
    })
    config = policyd_config(dns_server.port, f.port, deadline=1.0, timeout=0.5, dns_timeout=0.45)
    running = await start_policyd(nursery, config)
    with trio.fail_after(3):
        assert await running.ask(rcpt("user@slow.example")) == ("DUNNO", "")
    # The deadline answered, not the silent primary's 3 s timeout; that it does
    # so at exactly 1 s is proven on virtual time (test_virtual_time).
    assert running.responder.metrics.requests == {("DUNNO", "deadline"): 1}
    assert dns_server.query_count("mx1.slow.example", "A") == 1  # it got as far as the second lookup
    assert running.responder.metrics.requests[("DUNNO", "deadline")] == 1


async def test_null_and_implicit_mx(nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]) -> None:
    f = await farm(Mode.OK)
    dns_server.zone.update({
        ("nullmx.example", "MX"): ["0 ."],
        ("implicit.example", "A"): ["127.0.0.2"],  # no MX: the domain itself is the MX
    })
    running = await start_policyd(nursery, policyd_config(dns_server.port, f.port))
    with trio.fail_after(5):
        assert await running.ask(rcpt("user@nullmx.example")) == ("DUNNO", "")
        action, text = await running.ask(rcpt("user@implicit.example"))
    assert action == "DEFER_IF_PERMIT" and "implicit.example" in text


async def test_hostile_mx_names_never_reach_reply_or_log(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], caplog: pytest.LogCaptureFixture
) -> None:
    f = await farm(Mode.OK)
    dns_server.zone.update({
        ("evil.example", "MX"): [
            "5 bad\\032name.evil.example.", "5 a\\061b.evil.example.", "5 cr\\013\\010lf.evil.example.",
            "5 nul\\000.evil.example.", "5 \\195\\169t\\195\\169.evil.example.", "10 mx1.evil.example.", "20 backup.evil.example.",
        ],
        **zone_with_hosts({"mx1.evil.example": ["127.0.0.2"], "backup.evil.example": ["127.0.0.1"]}),
    })
    caplog.set_level(logging.DEBUG, logger="smtpdcheck")
    running = await start_policyd(nursery, policyd_config(dns_server.port, f.port))
    with trio.fail_after(5):
        stream = await running.connect()
        async with stream:
            await stream.send_all(rcpt("user@evil.example"))
            raw = await read_replies(stream, 1)
    assert raw == raw.decode("ascii").encode() and b"\r" not in raw
    action, text = parse_reply(raw)
    assert action == "DEFER_IF_PERMIT" and "mx1.evil.example" in text
    for record in caplog.records:
        message = record.getMessage()
        assert all(" " <= c <= "~" for c in message), message


async def test_decision_log_line(policyd: tuple[RunningPolicyd, Farm], caplog: pytest.LogCaptureFixture) -> None:
    running, _ = policyd
    caplog.set_level(logging.INFO, logger="smtpdcheck")
    with trio.fail_after(5):
        await running.ask(rcpt("User@Up.Example", queue_id="4F2A1B2C3D"))
        await running.ask(rcpt("x\rinjected\x1b[31m@down.example"))
        await running.ask(rcpt("user@up.example"))
    lines = [r.getMessage() for r in caplog.records if "rcpt=" in r.getMessage()]
    assert len(lines) == 3
    assert lines[0].startswith("4F2A1B2C3D: rcpt=<User@Up.Example> domain=up.example action=DEFER_IF_PERMIT")
    assert 'reason="primary mx1.up.example live"' in lines[0] and "cache=miss" in lines[0]
    assert lines[1].startswith("NOQUEUE: rcpt=<x\\x0dinjected\\x1b[31m@down.example>")
    assert 'reason="all 1 more-preferred MX down"' in lines[1]
    assert "cache=hit" in lines[2]
    assert all("\n" not in line for line in lines)


async def test_decision_line_says_what_postfixs_450_line_does_not(
    policyd: tuple[RunningPolicyd, Farm], caplog: pytest.LogCaptureFixture
) -> None:
    """The MX list considered, the address found up and how old its greeting is; a memo hit says the same."""
    running, _ = policyd
    caplog.set_level(logging.INFO, logger="smtpdcheck")
    with trio.fail_after(5):
        await running.ask(rcpt("user@up.example"))
        await trio.sleep(0.2)
        await running.ask(rcpt("other@up.example"))  # decided again, from the caches
        await running.ask(rcpt("third@up.example"))  # the memoised answer
        await running.ask(rcpt("user@down.example"))
    assert len(running.responder.answers) == 1  # the third was answered from the memo
    lines = [r.getMessage() for r in caplog.records if "rcpt=" in r.getMessage()]
    found = " mx=10:mx1.up.example,20:backup.up.example up=127.0.0.2 cache="
    assert found + "miss ms=" in lines[0] and found + "hit ms=" in lines[1] and found + "hit ms=" in lines[2], lines
    first, *later = (float(re.search(r" ms=[0-9.]+ age=([0-9.]+)s$", line)[1]) for line in lines[:3])  # type: ignore[index]
    assert first < 0.2 <= min(later)  # the same greeting, older
    assert re.search(r' reason="all 1 more-preferred MX down" mx=10:mx1\.down\.example,20:backup\.down\.example cache=miss ms=[0-9.]+$', lines[3])


async def test_stop_names_from_config(nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]) -> None:
    """Postfix behind NAT: server_address is not in DNS, --stop names this host."""
    from smtpdcheck.stoprule import StopSet

    f = await farm(Mode.OK)
    dns_server.zone.update(backup_zone("nat.example", "127.0.0.2", backup_ip="127.0.0.1"))
    dns_server.zone.update({("nat.example", "MX"): ["10 backup.nat.example.", "20 mx1.nat.example."]})
    running = await start_policyd(nursery, policyd_config(dns_server.port, f.port), stop=StopSet.build(["backup.nat.example"]))
    with trio.fail_after(5):
        assert await running.ask(rcpt("user@nat.example", server_address="10.0.0.5")) == ("DUNNO", "")
    assert f.greeters[0].connections == 0


async def test_unix_socket_listener(nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], tmp_path: Path) -> None:
    f = await farm(Mode.OK)
    dns_server.zone.update(backup_zone("up.example", "127.0.0.2"))
    path = tmp_path / "policy.sock"
    running = await start_policyd(
        nursery, policyd_config(dns_server.port, f.port, listen=(f"unix:{path}",), socket_mode=0o660)
    )
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    with trio.fail_after(5):
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            action, _ = await running.ask(rcpt("user@up.example"), stream)  # type: ignore[arg-type]
    assert action == "DEFER_IF_PERMIT"


async def test_unix_socket_safety(tmp_path: Path) -> None:
    # A stale socket left by a crashed run is replaced.
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    listeners = await open_listeners((f"unix:{stale}",), socket_mode=0o600)
    for listener in listeners:
        await listener.aclose()
    # A regular file is never clobbered.
    regular = tmp_path / "regular"
    regular.write_text("precious")
    with pytest.raises(ListenError, match="not a socket"):
        await open_listeners((f"unix:{regular}",), socket_mode=0o600)
    assert regular.read_text() == "precious"
    # A socket another live server listens on is left alone.
    live = tmp_path / "live.sock"
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(live))
    other.listen(1)
    try:
        with pytest.raises(ListenError, match="another server"):
            await open_listeners((f"unix:{live}",), socket_mode=0o600)
        assert stat.S_ISSOCK(os.stat(live).st_mode)
    finally:
        other.close()


async def test_ipv6_listener(nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]) -> None:
    f = await farm(Mode.OK)
    dns_server.zone.update(backup_zone("up.example", "127.0.0.2"))
    running = await start_policyd(nursery, policyd_config(dns_server.port, f.port, listen=("inet:[::1]:0",)))
    port = int(running.endpoints[0].rsplit(":", 1)[1])
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("::1", port)
        async with stream:
            action, _ = await running.ask(rcpt("user@up.example"), stream)
    assert action == "DEFER_IF_PERMIT"


async def test_idle_close_is_not_a_protocol_error(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], caplog: pytest.LogCaptureFixture
) -> None:
    """--idle-timeout closing a silent connection is routine: counted as an
    idle close, not as a protocol error, and logged at info."""
    f = await farm(Mode.OK)
    running = await start_policyd(nursery, policyd_config(dns_server.port, f.port, idle_timeout=0.3, request_timeout=5.0))
    metrics = running.responder.metrics
    caplog.set_level(logging.INFO, logger="smtpdcheck.policyd")
    with trio.fail_after(10):
        stream = await running.connect()
        async with stream:
            assert await stream.receive_some(100) == b""  # closed by the server
    assert metrics.idle_closes == 1
    assert metrics.protocol_errors["timeout"] == 0
    assert [r.levelno for r in caplog.records if "idle for" in r.getMessage()] == [logging.INFO]


async def test_incomplete_request_still_counts_as_a_timeout(nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm]) -> None:
    f = await farm(Mode.OK)
    running = await start_policyd(nursery, policyd_config(dns_server.port, f.port, idle_timeout=60.0, request_timeout=0.3))
    metrics = running.responder.metrics
    with trio.fail_after(10):
        stream = await running.connect()
        async with stream:
            await stream.send_all(b"request=smtpd_access_policy\nprotocol_st")  # half a request
            assert await stream.receive_some(100) == b""
    assert metrics.protocol_errors["timeout"] == 1
    assert metrics.idle_closes == 0


async def test_bare_domain_recipient_is_not_answered_from_a_memoised_address(
    policyd: tuple[RunningPolicyd, Farm], caplog: pytest.LogCaptureFixture
) -> None:
    """``recipient=up.example`` has no domain part: it must not share the memo entry of ``u@up.example``."""
    running, _ = policyd
    caplog.set_level(logging.INFO, logger="smtpdcheck")
    with trio.fail_after(5):
        for _ in range(2):  # the second answer, from the core's caches, is memoised
            assert (await running.ask(rcpt("u@up.example")))[0] == "DEFER_IF_PERMIT"
        assert len(running.responder.answers) == 1
        assert await running.ask(rcpt("up.example")) == ("DUNNO", "")
        assert (await running.ask(rcpt("v@up.example")))[0] == "DEFER_IF_PERMIT"
    lines = [r.getMessage() for r in caplog.records if "rcpt=" in r.getMessage()]
    assert lines[2].startswith('NOQUEUE: rcpt=<up.example> domain=- action=DUNNO reason="no recipient domain" cache=')
    assert "cache=hit" in lines[3]
