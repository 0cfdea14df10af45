"""The documented deployment, against a real Postfix: who can reach the daemon, and for which recipients.

* A unix socket the daemon makes (mode 0660, ``--socket-group`` the mail
  owner's group) is reached by Postfix's smtpd, chrooted into the queue
  directory (the socket under its ``private/``, as Debian keeps sockets)
  or not, and refused to any other unprivileged user.
* The shipped ``etc/postfix-snippets/main.cf``, parsed from the file
  itself, sends only recipients of relay domains to the daemon: local
  (``mydestination``) and virtual domains never reach it.

Skipped loudly without Postfix; a failure under CI=true.
"""

from __future__ import annotations

import grp
import os
import pathlib
import pwd
import re
import subprocess
from collections.abc import Callable

import pytest
import trio

from policyd.config import DEFAULT_LISTEN
from tests.conftest import Farm
from tests.installed import installed_daemon_requested, start_daemon
from tests.policyd_helpers import policyd_config, start_policyd
from testbeds.dnsserver import FakeDNSServer
from testbeds.greeters import Mode
from tests.support.postfix import PostfixInstance, _postconf_default, smtp_rcpt
from tests.support.pytest_postfix import PostfixFactory
from tests.test_policyd_server import backup_zone

pytestmark = pytest.mark.postfix

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The source tree's snippet, or (testing an installed package, whose tests run without etc/) the package's copy.
SNIPPET = (
    ROOT / "etc" / "postfix-snippets" / "main.cf"
    if (ROOT / "etc").is_dir()
    else pathlib.Path("/usr/share/doc/smtpdcheck/examples/main.cf")
)
SYSTEM_PYTHON = "/usr/bin/python3"

# Connect to a unix socket as whoever runs this; exit 0 connected, 13 refused (EACCES), 1 otherwise.
_CONNECT = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n"
    "except OSError as e:\n    print(e); sys.exit(1)\n"
)


def mail_owner_group() -> str:
    """The group smtpd runs with: the primary group of Postfix's mail_owner (postfix on Debian)."""
    owner = pwd.getpwnam(_postconf_default("mail_owner"))
    return grp.getgrgid(owner.pw_gid).gr_name


def connect_as_nobody(path: pathlib.Path) -> int:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.fail(f"{SYSTEM_PYTHON} is needed to try the socket as another user")
    run = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", _CONNECT, str(path)],
        user="nobody", group="nogroup", extra_groups=[], capture_output=True, text=True, timeout=30, check=False,
    )
    return run.returncode


async def _start(nursery: trio.Nursery, config: object) -> None:
    if installed_daemon_requested():
        await start_daemon(nursery, config)  # type: ignore[arg-type]
    else:
        await start_policyd(nursery, config)  # type: ignore[arg-type]


@pytest.mark.parametrize("chrooted", [False, True], ids=["not-chrooted", "chrooted"])
async def test_a_socket_the_daemon_makes_is_postfixs_alone(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], postfix_factory: PostfixFactory,
    chrooted: bool,
) -> None:
    """The README's settings: listen on a unix socket, socket_group = the mail owner's group, the default mode."""
    f = await farm(Mode.OK)
    dns_server.zone.update(backup_zone("up.example.com", "127.0.0.2"))
    if chrooted:
        endpoint = "unix:private/smtpdcheck"  # relative to the queue directory: works inside the chroot
        instance = postfix_factory(policy_endpoint=endpoint, relay_domains=["up.example.com"])
        instance.chroot_smtpd = True
        await trio.to_thread.run_sync(instance.start)  # makes private/ (postfix, 0700)
        path = instance.queue_dir / "private" / "smtpdcheck"
    else:
        path = postfix_factory.socket_dir() / "policy"
        instance = postfix_factory(policy_endpoint=f"unix:{path}", relay_domains=["up.example.com"])
        await trio.to_thread.run_sync(instance.start)
    config = policyd_config(
        dns_server.port, f.port, listen=(f"unix:{path}",), socket_group=mail_owner_group(), timeout=1.5, deadline=4.0
    )
    await _start(nursery, config)
    st = path.stat()
    assert (st.st_mode & 0o777, grp.getgrgid(st.st_gid).gr_name) == (0o660, mail_owner_group())
    with trio.fail_after(20):
        up = await smtp_rcpt(instance.smtp_port, "user@up.example.com")
    log = instance.maillog()
    assert up.code == 450 and "mx1.up.example.com" in up.text, log[-3000:]
    assert "Permission denied" not in log
    assert await trio.to_thread.run_sync(connect_as_nobody, path) == 13


async def test_a_socket_without_the_group_is_not_postfixs(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], postfix_factory: PostfixFactory
) -> None:
    """The default mode alone (0660, the daemon's own group root) keeps smtpd out too: the group is what lets it in."""
    f = await farm(Mode.OK)
    dns_server.zone.update(backup_zone("up.example.com", "127.0.0.2"))
    path = postfix_factory.socket_dir() / "policy"
    await _start(nursery, policyd_config(dns_server.port, f.port, listen=(f"unix:{path}",), timeout=1.5, deadline=4.0))
    instance = await postfix_factory.start(policy_endpoint=f"unix:{path}", relay_domains=["up.example.com"])
    with trio.fail_after(20):
        up = await smtp_rcpt(instance.smtp_port, "user@up.example.com")
    assert up.code == 250  # default_action=DUNNO: smtpd could not connect
    assert "Permission denied" in instance.maillog()


# -- the shipped snippet: only relay domains reach the daemon ---------------------------


def snippet_parameters(text: str) -> dict[str, str]:
    """main.cf as Postfix reads it: comments skipped, indented lines continue the parameter before."""
    params: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            params[name] += " " + line.strip()
            continue
        name, _, value = line.partition("=")
        name = name.strip()
        params[name] = value.strip()
    return params


def snippet_table(text: str) -> dict[str, str]:
    """The relay_domains table as the snippet's comment writes it: ``example.com  smtpdcheck_backup``."""
    return dict(re.findall(r"^#\s+(example\.com)\s+(\w+)$", text, re.M))


def relay_domains_table(params: dict[str, str]) -> str:
    match = re.fullmatch(r"(\w+):(/\S+)", params["relay_domains"])
    assert match, params["relay_domains"]
    assert f"check_recipient_access {params['relay_domains']}" in params["smtpd_recipient_restrictions"]
    return match[2]


def configure_from_snippet(instance: PostfixInstance, endpoint: str, relay_domains: list[str]) -> None:
    """The snippet's parameters on the instance, with the test's endpoint and table path; local and virtual domains beside them."""
    text = SNIPPET.read_text()
    params = snippet_parameters(text)
    table_path = relay_domains_table(params)
    table = instance.workdir / "relay_domains"
    [(_, value)] = snippet_table(text).items()
    table.write_text("".join(f"{domain} {value}\n" for domain in relay_domains))
    kind = params["relay_domains"].partition(":")[0]
    postmap_config = instance.workdir / "postmap"  # postmap reads a main.cf; the instance's is written at start
    postmap_config.mkdir()
    (postmap_config / "main.cf").write_text("")
    subprocess.run(
        ["/usr/sbin/postmap", "-c", str(postmap_config), f"{kind}:{table}"], check=True, timeout=30, capture_output=True
    )
    params = {k: v.replace(table_path, str(table)).replace(DEFAULT_LISTEN, endpoint) for k, v in params.items()}
    params["relay_recipient_maps"] = ""  # any user of a relay domain: the test's recipients are made up
    instance.main_cf_extra = {
        **params,
        # The test's SMTP client connects from 127.0.0.1: outside mynetworks, as a sender on the Internet.
        "mynetworks": "192.0.2.0/24",
        "mydestination": "local.test",
        "local_recipient_maps": "",
        "virtual_mailbox_domains": "vmbox.test",
        "virtual_mailbox_maps": "inline:{ user@vmbox.test=vmbox/user/ }",
        "virtual_alias_domains": "valias.test",
        "virtual_alias_maps": "inline:{ user@valias.test=user@local.test }",
    }


async def test_the_snippet_sends_only_relay_domains_to_the_daemon(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], postfix_factory: PostfixFactory
) -> None:
    f = await farm(Mode.OK)
    # Every domain's more-preferred MX greets: whichever reaches the daemon is deferred.
    for domain in ("up.example.com", "local.test", "vmbox.test", "valias.test"):
        dns_server.zone.update(backup_zone(domain, "127.0.0.2"))
    running = await start_policyd(nursery, policyd_config(dns_server.port, f.port, timeout=1.5, deadline=4.0))
    instance = postfix_factory(policy_endpoint=running.endpoints[0], relay_domains=["up.example.com"])
    configure_from_snippet(instance, running.endpoints[0], ["up.example.com"])
    await trio.to_thread.run_sync(instance.start)
    with trio.fail_after(40):
        for rcpt in ("user@local.test", "user@vmbox.test", "user@valias.test"):
            reply = await smtp_rcpt(instance.smtp_port, rcpt)
            assert reply.code == 250, (rcpt, reply, instance.maillog()[-3000:])
        assert sum(running.responder.metrics.requests.values()) == 0
        relay = await smtp_rcpt(instance.smtp_port, "user@up.example.com")
    assert relay.code == 450 and "mx1.up.example.com" in relay.text, instance.maillog()[-3000:]
    assert sum(running.responder.metrics.requests.values()) == 1
