"""Self-test of the throwaway-Postfix harness, against a scripted policy server.

The scripted server answers every request with one fixed reply, so any failure here is the
harness's (or Postfix's), never the project's policy logic.  It runs in the test's trio
loop; Postfix start/stop go through worker threads so the server keeps serving meanwhile.
"""

from __future__ import annotations

import functools
import os
import pathlib
import socket
from dataclasses import dataclass, field

import pytest
import trio

from tests.support import pytest_postfix
from tests.support.postfix import PostfixInstance, SMTPReply, smtp_rcpt, smtp_session
from tests.support.pytest_postfix import PostfixFactory

pytestmark = pytest.mark.postfix

# Registered here until conftest wires it for the whole suite.
postfix_factory = pytest.fixture(pytest_postfix.postfix_factory)

DEFER_TEXT = "Primary MX mx1.example.net is up"


@dataclass
class ScriptedPolicyServer:
    """What a test needs from the scripted server: where it listens and what it was asked."""

    endpoint: str
    reply: bytes
    requests: list[dict[str, str]] = field(default_factory=list)
    connections: int = 0


async def _serve_policy_connection(stream: trio.abc.Stream, server: ScriptedPolicyServer) -> None:
    """Answer each LF-terminated attribute block with the fixed reply, on one persistent connection."""
    server.connections += 1
    buffer = b""
    try:
        async with stream:
            while True:
                while b"\n\n" not in buffer:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    buffer += chunk
                block, _, buffer = buffer.partition(b"\n\n")
                request: dict[str, str] = {}
                for line in block.decode("utf-8", errors="surrogateescape").split("\n"):
                    name, _, value = line.partition("=")
                    request[name] = value
                server.requests.append(request)
                await stream.send_all(server.reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        # smtpd going away mid-conversation (e.g. Postfix stopped first) is not our concern.
        return


async def start_policy_server(
    nursery: trio.Nursery, reply: bytes, *, unix_path: pathlib.Path | None = None
) -> ScriptedPolicyServer:
    """Serve the fixed reply on an ephemeral 127.0.0.1 port, or on ``unix_path``.

    It runs in pytest-trio's ``nursery`` fixture rather than a nursery of its own, so an
    assertion failing in the test body is reported as itself, not wrapped in an
    ExceptionGroup; the fixture cancels the server when the test ends.
    """
    server = ScriptedPolicyServer(endpoint="", reply=reply)

    async def handler(stream: trio.abc.Stream) -> None:
        await _serve_policy_connection(stream, server)

    if unix_path is None:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        server.endpoint = f"inet:127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    else:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(unix_path))
        sock.listen(16)
        # smtpd connects as the unprivileged mail_owner; connecting needs write permission.
        os.chmod(unix_path, 0o666)
        await nursery.start(trio.serve_listeners, handler, [trio.SocketListener(sock)])
        server.endpoint = f"unix:{unix_path}"
    return server


async def _stop(instance: PostfixInstance) -> None:
    await trio.to_thread.run_sync(instance.stop)


def _assert_deferred(reply: SMTPReply, rcpt: str, instance: PostfixInstance) -> None:
    expected = f"4.7.1 <{rcpt}>: Recipient address rejected: {DEFER_TEXT}"
    assert (reply.code, reply.text) == (450, expected), f"{reply}\n--- maillog ---\n{instance.maillog()}"


DEFER_REPLY = f"action=DEFER_IF_PERMIT {DEFER_TEXT}\n\n".encode()
DUNNO_REPLY = b"action=DUNNO\n\n"


async def test_defer_if_permit_reply_becomes_450(postfix_factory: PostfixFactory, nursery: trio.Nursery) -> None:
    policy = await start_policy_server(nursery, DEFER_REPLY)
    instance = await postfix_factory.start(policy_endpoint=policy.endpoint, relay_domains=["example.com"])
    reply = await smtp_rcpt(instance.smtp_port, "user@example.com")
    _assert_deferred(reply, "user@example.com", instance)
    await _stop(instance)
    assert "Recipient address rejected" in instance.maillog(), "maillog survives stop() as a saved copy"


async def test_dunno_reply_accepts_and_request_carries_rcpt_state(
    postfix_factory: PostfixFactory, nursery: trio.Nursery
) -> None:
    policy = await start_policy_server(nursery, DUNNO_REPLY)
    instance = await postfix_factory.start(policy_endpoint=policy.endpoint, relay_domains=["example.com"])
    reply = await smtp_rcpt(instance.smtp_port, "user@example.com")
    assert reply.code == 250, f"{reply}\n{instance.maillog()}"
    # A second session, over the lower-level client; smtpd reuses its policy connection.
    replies = await smtp_session(
        instance.smtp_port,
        ["EHLO client.test", "MAIL FROM:<a@sender.test>", "RCPT TO:<other@example.com>", "QUIT"],
    )
    await _stop(instance)

    assert replies[0].code == 220
    assert replies[1].code == 250 and "PIPELINING" in replies[1].text.split("\n"), "multi-line EHLO parsed"
    assert [r.code for r in replies[2:]] == [250, 250, 221]
    assert len(policy.requests) == 2
    first = policy.requests[0]
    assert first["request"] == "smtpd_access_policy"
    assert first["protocol_state"] == "RCPT"
    assert first["recipient"] == "user@example.com"
    assert first["sender"] == "sender@sender.test"
    assert first["helo_name"] == "client.test"
    assert first["server_address"] == "127.0.0.1"
    assert first["server_port"] == str(instance.smtp_port)
    assert policy.requests[1]["recipient"] == "other@example.com"


async def test_non_relay_domain_never_reaches_policy(postfix_factory: PostfixFactory, nursery: trio.Nursery) -> None:
    """The relay check runs first, so the harness cannot turn Postfix into an open relay."""
    policy = await start_policy_server(nursery, DUNNO_REPLY)
    instance = await postfix_factory.start(policy_endpoint=policy.endpoint, relay_domains=["example.com"])
    reply = await smtp_rcpt(instance.smtp_port, "user@elsewhere.test")
    await _stop(instance)
    assert reply.code == 554 and "Relay access denied" in reply.text, str(reply)
    assert policy.requests == []


async def test_unix_socket_endpoint(postfix_factory: PostfixFactory, nursery: trio.Nursery) -> None:
    policy = await start_policy_server(nursery, DEFER_REPLY, unix_path=postfix_factory.socket_dir() / "policy.sock")
    instance = await postfix_factory.start(policy_endpoint=policy.endpoint, relay_domains=["example.com"])
    reply = await smtp_rcpt(instance.smtp_port, "user@example.com")
    _assert_deferred(reply, "user@example.com", instance)
    await _stop(instance)
    assert policy.requests and policy.requests[0]["protocol_state"] == "RCPT"


async def test_sequential_instances_and_reconfigure(postfix_factory: PostfixFactory, nursery: trio.Nursery) -> None:
    """Two instances back to back in one process; reconfiguring switches the policy endpoint."""
    accepting = await start_policy_server(nursery, DUNNO_REPLY)
    deferring = await start_policy_server(nursery, DEFER_REPLY)

    first = await postfix_factory.start(policy_endpoint=accepting.endpoint, relay_domains=["example.com"])
    assert (await smtp_rcpt(first.smtp_port, "user@example.com")).code == 250
    await _stop(first)
    await _stop(first)  # idempotent
    assert not first.workdir.exists()

    second = await postfix_factory.start(policy_endpoint=accepting.endpoint, relay_domains=["example.com"])
    assert second.workdir != first.workdir
    assert (await smtp_rcpt(second.smtp_port, "user@example.com")).code == 250
    await trio.to_thread.run_sync(second.set_policy_endpoint, deferring.endpoint)
    _assert_deferred(await smtp_rcpt(second.smtp_port, "user@example.com"), "user@example.com", second)
    await _stop(second)
    assert (len(accepting.requests), len(deferring.requests)) == (2, 1)
