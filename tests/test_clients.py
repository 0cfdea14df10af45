"""Known clients only: --allow-client decided at accept, from real source addresses on loopback.

Linux routes all of 127.0.0.0/8 to the loopback interface, so a client
socket bound to 127.0.0.2 or 127.0.0.3 connects from that address to a
listener on 127.0.0.1 or 0.0.0.0: the daemon sees a real peer address.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from policyd.clients import AllowList, RefusalLog, exposed_endpoint
from policyd.config import Config
from policyd.exposition import make_registry, render
from policyd.listeners import split_inet
from policyd.cli import SystemFiles
from tests.policyd_helpers import rcpt, start_policyd
from testbeds.greeters import unused_port
from tests.test_policyd_cli import files, one_line, policyd  # noqa: F401 (files is a fixture)

NOT_RCPT = rcpt("user@example.com", protocol_state="DATA")  # answered DUNNO at once: no DNS involved


def _config(*listen: str, allow: tuple[str, ...] = ()) -> Config:
    return Config(listen=listen, nameserver=("127.0.0.1:9",), allow_clients=allow)


async def _ask_from(source: str, endpoint: str) -> bytes:
    """Connect from ``source``, send one request, return everything read until the server closes or answers."""
    host, port = split_inet(endpoint)
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    with sock:
        await sock.bind((source, 0))
        await sock.connect((host if host not in ("0.0.0.0", "::") else source, port))
        stream = trio.SocketStream(sock)
        data = b""
        with trio.fail_after(5):
            try:
                await stream.send_all(NOT_RCPT)
                while b"\n\n" not in data:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    data += chunk
            except trio.BrokenResourceError:
                pass  # reset: the server closed with our request unread
        return data


@pytest.mark.parametrize("listen", ["inet:127.0.0.1:0", "inet:0.0.0.0:0"])
async def test_only_allowed_clients_are_answered(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, listen: str
) -> None:
    caplog.set_level(logging.INFO, logger="smtpdcheck")
    running = await start_policyd(nursery, _config(listen, allow=("127.0.0.2", "127.0.0.4/31")))
    endpoint = running.endpoints[0]
    assert await _ask_from("127.0.0.2", endpoint) == b"action=DUNNO\n\n"
    assert await _ask_from("127.0.0.5", endpoint) == b"action=DUNNO\n\n"
    assert await _ask_from("127.0.0.3", endpoint) == b""
    assert running.responder.metrics.clients_refused == 1
    assert running.responder.metrics.connections_total == 2  # the refused one never became a connection
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused == [f"refused a connection from 127.0.0.3 to {endpoint}: not in --allow-client"]
    assert caplog.records[-1].levelno == logging.WARNING


async def test_loopback_needs_no_list_but_obeys_one(nursery: trio.Nursery) -> None:
    open_to_all = await start_policyd(nursery, _config("inet:127.0.0.1:0"))
    assert await _ask_from("127.0.0.3", open_to_all.endpoints[0]) == b"action=DUNNO\n\n"
    listed = await start_policyd(nursery, _config("inet:127.0.0.1:0", allow=("127.0.0.1",)))
    assert await _ask_from("127.0.0.1", listed.endpoints[0]) == b"action=DUNNO\n\n"
    assert await _ask_from("127.0.0.3", listed.endpoints[0]) == b""


async def test_ipv6_peers_are_matched_as_ipv6(nursery: trio.Nursery) -> None:
    v4_only = await start_policyd(nursery, _config("inet:[::1]:0", allow=("127.0.0.0/8",)))
    assert await _ask_from("::1", v4_only.endpoints[0]) == b""
    v6 = await start_policyd(nursery, _config("inet:[::1]:0", allow=("::1",)))
    assert await _ask_from("::1", v6.endpoints[0]) == b"action=DUNNO\n\n"


async def test_connections_waiting_together_are_sorted_at_accept(nursery: trio.Nursery) -> None:
    """A burst taken by the non-blocking twin of the listener is judged peer by peer too."""
    (listener,) = await trio.open_tcp_listeners(0, host="0.0.0.0", backlog=64)
    port = listener.socket.getsockname()[1]
    clients = []
    try:
        for i in range(12):  # waiting in the backlog before the accept loop runs
            client = socket.socket()
            client.bind((f"127.0.0.{2 + i % 2}", 0))
            client.connect(("127.0.0.1", port))
            client.sendall(NOT_RCPT)
            clients.append(client)
        running = await start_policyd(nursery, _config("inet:0.0.0.0:0", allow=("127.0.0.2",)), listeners=[listener])
        with trio.fail_after(5):
            while sum(running.responder.metrics.requests.values()) < 6:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert running.responder.metrics.clients_refused == 6
        assert running.responder.metrics.connections_total == 6
        for i, client in enumerate(clients):
            client.settimeout(5)
            try:
                data = client.recv(100)
            except ConnectionResetError:
                data = b""
            assert data == (b"action=DUNNO\n\n" if i % 2 == 0 else b""), i
    finally:
        for client in clients:
            client.close()


async def test_refusals_are_logged_at_most_once_a_minute_with_the_count(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="smtpdcheck")
    refusals = RefusalLog()
    for _ in range(5):
        refusals.refused("192.0.2.7", "inet:0.0.0.0:10036", trio.current_time())
        await trio.sleep(10)
    await trio.sleep(20)  # 60 s after the first line
    refusals.refused("192.0.2.8", "inet:0.0.0.0:10036", trio.current_time())
    refusals.refused("192.0.2.9", "inet:0.0.0.0:10036", trio.current_time())
    assert [r.getMessage() for r in caplog.records] == [
        "refused a connection from 192.0.2.7 to inet:0.0.0.0:10036: not in --allow-client",
        "refused a connection from 192.0.2.8 to inet:0.0.0.0:10036: not in --allow-client"
        " (4 more since the last such line)",
    ]


def test_allow_list_matches_networks_and_mapped_addresses() -> None:
    allow = AllowList(["192.0.2.0/24", "2001:db8::/32"])
    assert allow.allows("192.0.2.200")
    assert allow.allows("::ffff:192.0.2.1")  # an IPv4 peer on a dual-stack socket
    assert allow.allows("2001:db8::25")
    assert not allow.allows("198.51.100.1")
    assert not allow.allows("")  # no address: never allowed
    assert not allow.allows("2001:db9::1")


@pytest.mark.parametrize(
    ("endpoints", "exposed"),
    [
        (("inet:127.0.0.1:10036", "inet:[::1]:10036", "inet:localhost:1", "unix:/run/p"), None),
        (("inet:127.0.0.2:10036",), None),
        (("inet:127.0.0.1:1", "inet:0.0.0.0:10036"), "inet:0.0.0.0:10036"),
        (("inet:[::]:10036",), "inet:[::]:10036"),
        (("inet:192.0.2.25:10036",), "inet:192.0.2.25:10036"),
    ],
)
def test_endpoints_off_loopback_are_exposed(endpoints: tuple[str, ...], exposed: str | None) -> None:
    assert exposed_endpoint(endpoints) == exposed


def test_wildcard_listener_without_a_list_is_refused_at_start(files: SystemFiles) -> None:  # noqa: F811
    files.resolv_conf.write_text("nameserver 127.0.0.1\n")
    port = unused_port()
    line = one_line(policyd(files, "--listen", "inet:127.0.0.1:1", "--listen", f"inet:0.0.0.0:{port}"))
    assert line == (
        f"fatal: inet:0.0.0.0:{port}: other hosts may reach this address; name the clients allowed to ask with "
        "--allow-client (allow_clients in the file)"
    )


async def test_refusals_are_exposed_as_a_metric(nursery: trio.Nursery) -> None:
    pytest.importorskip("prometheus_client")
    running = await start_policyd(nursery, _config("inet:127.0.0.1:0", allow=("127.0.0.2",)))
    await _ask_from("127.0.0.3", running.endpoints[0])
    text = render(make_registry(running.responder)).decode()
    assert "smtpdcheck_clients_refused_total 1.0" in text


async def test_unix_sockets_are_not_gated(nursery: trio.Nursery, tmp_path: Path) -> None:
    running = await start_policyd(nursery, _config(f"unix:{tmp_path}/p", allow=("192.0.2.1",)))
    with trio.fail_after(5):
        stream = await trio.open_unix_socket(f"{tmp_path}/p")
        async with stream:
            await stream.send_all(NOT_RCPT)
            assert await stream.receive_some(100) == b"action=DUNNO\n\n"
    assert running.responder.metrics.clients_refused == 0


def test_a_socket_group_that_does_not_exist_stops_start_up(files: SystemFiles) -> None:  # noqa: F811
    files.resolv_conf.write_text("nameserver 127.0.0.1\n")
    line = one_line(policyd(files, "--listen", f"inet:127.0.0.1:{unused_port()}", "--socket-group", "no-such-group-here"))
    assert line == "smtpdcheck-policyd: --socket-group: no such group: 'no-such-group-here'"
