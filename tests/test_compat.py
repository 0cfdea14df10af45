"""The shims of smtpdcheck.compat: the same behaviour on the oldest supported libraries and the newest.

Each test here passes on current releases with or without its shim; it is
the run with the declared minimum versions (scripts/test-minimums) that
fails without it.
"""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
import trio

from smtpdcheck.compat import run_sync_in_thread_abandoning
from smtpdcheck.core import CoreSettings, build_core
from smtpdcheck.resolver import DNSConfigError, MXKind


async def _only_task_fails() -> str:
    """What a nursery whose only task fails raises: the group, or (trio < 0.25 by default) the bare error."""
    async def fail() -> None:
        raise ValueError("only task")

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail)
    except ValueError:
        return "bare"
    except BaseExceptionGroup:
        return "group"
    return "nothing"


async def test_trio_tests_run_with_strict_exception_groups() -> None:
    # trio < 0.25 would raise the bare ValueError from a nursery's only task.
    assert await _only_task_fails() == "group"


@pytest.mark.parametrize("argv", [
    ["smtpdcheck", "--timeout", "1", "127.0.0.1"],
    ["smtpdcheck-policyd", "--config", "", "--nameserver", "127.0.0.1:9", "--check", "user@example.com"],
    ["smtpdcheck-policyd", "--config", "", "--nameserver", "127.0.0.1:9", "--listen", "inet:127.0.0.1:9"],
    ["smtpdcheck-policyd", "--config", "", "--nameserver", "127.0.0.1:9", "--stdio"],
], ids=lambda argv: " ".join(argv[:1] + [a for a in argv[1:] if a in ("--check", "--stdio", "--listen")]))
def test_both_commands_run_trio_with_strict_exception_groups(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The code is written for strict groups: each trio.run of the commands
    asks for them (trio < 0.25 defaults to loose ones), and a run with what
    they pass does raise groups."""
    from policyd import cli as policyd_cli
    from smtpdcheck import cli as smtpdcheck_cli

    real_run = trio.run
    runs: list[tuple[object, str]] = []

    def recording_run(main: object, *args: object, **kwargs: object) -> int:
        runs.append((kwargs.get("strict_exception_groups"), real_run(_only_task_fails, **kwargs)))
        return 0

    monkeypatch.setattr(trio, "run", recording_run)
    monkeypatch.setattr("policyd.cli.setup_logging", lambda *args, **kwargs: None)
    command = smtpdcheck_cli.main if argv[0] == "smtpdcheck" else policyd_cli.main
    command(argv[1:])
    assert runs == [(True, "group")]


async def test_same_nameserver_address_with_two_ports_is_refused(nursery: trio.Nursery) -> None:
    # One port per address is all dnspython < 2.4 can hold; no release asks the wrong one.
    with pytest.raises(DNSConfigError, match="nameserver 127.0.0.1 given with two ports, 53 and 5353"):
        build_core(nursery, CoreSettings(nameservers=[("127.0.0.1", 53), ("127.0.0.1", 5353)]))


async def test_nameservers_are_asked_at_their_own_ports_in_order(nursery: trio.Nursery) -> None:
    refusing = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    answering = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with refusing, answering:
        await refusing.bind(("127.0.0.1", 0))
        await answering.bind(("127.0.0.2", 0))
        asked: list[str] = []

        async def serve(sock: trio.socket.SocketType, name: str, answer: bool) -> None:
            while True:
                wire, peer = await sock.recvfrom(4096)
                asked.append(name)
                query = dns.message.from_wire(wire)
                reply = _mx_answer(query) if answer else dns.message.make_response(query)
                if not answer:
                    reply.set_rcode(dns.rcode.REFUSED)
                await sock.sendto(reply.to_wire(), peer)

        nursery.start_soon(serve, refusing, "first", False)
        nursery.start_soon(serve, answering, "second", True)
        settings = CoreSettings(nameservers=[refusing.getsockname(), answering.getsockname()], dns_timeout=3.0)
        resolver = build_core(nursery, settings).resolver
        with trio.fail_after(5):
            mx, _ = await resolver.mx("example.test")
    assert mx.kind is MXKind.LIST and mx.hosts == ((10, "mx.example.test"),)
    assert asked[:2] == ["first", "second"]


async def test_stray_datagrams_before_the_answer_are_waited_out(nursery: trio.Nursery) -> None:
    """Garbage, a reply with another ID and a reply from another port come first; the answer last.

    dnspython >= 2.4 ignores the three and takes the answer; dnspython < 2.4
    would fail the lookup at the first of them without the shim.
    """
    server = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with server, stranger:
        await server.bind(("127.0.0.1", 0))
        await stranger.bind(("127.0.0.1", 0))

        async def serve() -> None:
            while True:
                wire, peer = await server.recvfrom(4096)
                answer = _mx_answer(dns.message.from_wire(wire))
                await server.sendto(b"\x12\x34garbage", peer)
                wrong = answer.to_wire()
                await server.sendto(((answer.id + 1) & 0xFFFF).to_bytes(2, "big") + wrong[2:], peer)
                await stranger.sendto(answer.to_wire(), peer)
                await trio.sleep(0.05)
                await server.sendto(answer.to_wire(), peer)

        nursery.start_soon(serve)
        resolver = build_core(nursery, CoreSettings(nameservers=[server.getsockname()], dns_timeout=3.0)).resolver
        with trio.fail_after(5):
            mx, _ = await resolver.mx("example.test")
    assert mx.kind is MXKind.LIST and mx.hosts == ((10, "mx.example.test"),), mx


async def test_a_thread_can_be_abandoned_on_cancel() -> None:
    # trio < 0.23 calls abandon_on_cancel=True cancellable=True.
    release = threading.Event()
    try:
        with trio.move_on_after(0.2) as scope:
            await run_sync_in_thread_abandoning(release.wait, 30)
        assert scope.cancelled_caught
    finally:
        release.set()


def _mx_answer(query: dns.message.Message) -> dns.message.Message:
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    response.answer.append(dns.rrset.from_text(query.question[0].name, 300, "IN", "MX", "10 mx.example.test."))
    return response
