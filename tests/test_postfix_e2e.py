"""End to end: a real Postfix smtpd asks the real policy server over real sockets.

Postfix runs as a throwaway instance on a loopback port (see
tests/support/postfix.py); its check_policy_service points at the policy
server under test, which looks MX lists up in the test's DNS server and
probes greeters on 127.0.0.x.  Skipped loudly without Postfix; a failure
under CI=true.

With SMTPDCHECK_BINDIR set (.ci/debian sets /usr/bin), the policy server
is the installed smtpdcheck-policyd run as its own process, not the one in
this test's process: that proves a package against a Postfix version.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pytest
import trio
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import Farm
from tests.installed import command, installed_daemon_requested, start_daemon
from tests.policyd_helpers import policyd_config, start_policyd
from testbeds.dnsserver import FakeDNSServer
from testbeds.greeters import Mode
from tests.support.postfix import smtp_rcpt
from tests.support.pytest_postfix import PostfixFactory
from tests.test_policyd_server import backup_zone

pytestmark = pytest.mark.postfix

DOMAINS = {
    "up.example.com": "127.0.0.2",  # greets 220
    "busy.example.com": "127.0.0.3",  # greets 421
    "silent.example.com": "127.0.0.4",  # accepts, never greets
    "refused.example.com": "127.0.0.9",  # nothing listens
}


async def _setup(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], postfix_factory: PostfixFactory,
    *, unix: bool = False, **config: object,
) -> object:
    f = await farm(Mode.OK, Mode.CODE_421, Mode.SILENT)
    for domain, ip in DOMAINS.items():
        dns_server.zone.update(backup_zone(domain, ip))
    listen = ("inet:127.0.0.1:0",)
    if unix:
        listen = (f"unix:{postfix_factory.socket_dir()}/policy",)
    config = policyd_config(dns_server.port, f.port, listen=listen, socket_mode=0o666, timeout=1.5, deadline=4.0, **config)
    if installed_daemon_requested():
        endpoint = await start_daemon(nursery, config)
    else:
        endpoint = (await start_policyd(nursery, config)).endpoints[0]
    instance = await postfix_factory.start(policy_endpoint=endpoint, relay_domains=list(DOMAINS))
    return instance


async def test_live_primary_gets_450_naming_it(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], postfix_factory: PostfixFactory
) -> None:
    instance = await _setup(nursery, dns_server, farm, postfix_factory)
    with trio.fail_after(20):
        reply = await smtp_rcpt(instance.smtp_port, "user@up.example.com")  # type: ignore[attr-defined]
        # Postfix passes the recipient as written; we lower-case and strip the dot.
        reply2 = await smtp_rcpt(instance.smtp_port, "e@UP.Example.COM.")  # type: ignore[attr-defined]
    assert reply.code == 450
    assert reply.text.startswith("4.7.1 <user@up.example.com>: Recipient address rejected:")
    assert "mx1.up.example.com" in reply.text
    assert reply2.code == 450


@pytest.mark.parametrize("domain", ["busy.example.com", "silent.example.com", "refused.example.com"])
async def test_primary_not_available_gets_250(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], postfix_factory: PostfixFactory, domain: str
) -> None:
    instance = await _setup(nursery, dns_server, farm, postfix_factory)
    with trio.fail_after(20):
        reply = await smtp_rcpt(instance.smtp_port, f"user@{domain}")  # type: ignore[attr-defined]
    assert reply.code == 250, reply


async def test_unix_socket_endpoint(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], postfix_factory: PostfixFactory
) -> None:
    instance = await _setup(nursery, dns_server, farm, postfix_factory, unix=True)
    with trio.fail_after(20):
        up = await smtp_rcpt(instance.smtp_port, "user@up.example.com")  # type: ignore[attr-defined]
        down = await smtp_rcpt(instance.smtp_port, "user@busy.example.com")  # type: ignore[attr-defined]
    assert (up.code, down.code) == (450, 250)


async def test_warn_mode_accepts_and_postfix_logs_it(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], postfix_factory: PostfixFactory
) -> None:
    instance = await _setup(nursery, dns_server, farm, postfix_factory, mode="warn")
    with trio.fail_after(20):
        reply = await smtp_rcpt(instance.smtp_port, "user@up.example.com")  # type: ignore[attr-defined]
    assert reply.code == 250
    log = ""
    with trio.move_on_after(5):
        while "warn: RCPT" not in log:
            await trio.sleep(0.2)
            log = instance.maillog()  # type: ignore[attr-defined]
    assert "warn: RCPT" in log and "mx1.up.example.com" in log, log[-2000:]


async def test_policy_server_failure_is_fail_open(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], postfix_factory: PostfixFactory
) -> None:
    """With the recommended wiring, even a dead policy server costs nothing but the check."""
    instance = await _setup(nursery, dns_server, farm, postfix_factory)
    await trio.to_thread.run_sync(lambda: instance.set_policy_endpoint("inet:127.0.0.1:9"))  # type: ignore[attr-defined]
    with trio.fail_after(20):
        reply = await smtp_rcpt(instance.smtp_port, "user@up.example.com")  # type: ignore[attr-defined]
    assert reply.code == 250


SYSTEM_PYTHON = "/usr/bin/python3.11"


def _copy_runtime(dest: Path) -> Path:
    """The daemon and its pure-Python dependencies, where spawn's user can read them.

    spawn(8) refuses to run commands as root, and the test's own interpreter
    and virtual environment may live where nobody else can read; Debian's
    python3.11 with a copied import path works for any user.  The
    dependencies are those the installed distributions declare, followed
    through, so that the set is right for whichever versions are installed.
    """
    import importlib

    lib = dest / "lib"
    for name in ("smtpdcheck", "policyd"):
        module = importlib.import_module(name)
        assert module.__file__ is not None
        shutil.copytree(Path(module.__file__).parent, lib / name, ignore=shutil.ignore_patterns("__pycache__"))
    for dist in _runtime_distributions():
        for file in dist.files or []:
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue  # console scripts and byte code
            target = lib / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(str(dist.locate_file(file))), target)
    for path in [dest, *sorted(p for p in lib.rglob("*"))]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return lib


def _runtime_distributions() -> list[metadata.Distribution]:
    """What the installed smtpdcheck needs at run time: its requirements and theirs, with extras."""
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    wanted: list[tuple[str, frozenset[str]]] = [("smtpdcheck", frozenset())]
    for _ in range(1000):  # far more than any real dependency tree
        if not wanted:
            break
        name, extras = wanted.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        dist = metadata.distribution(name)
        if canonicalize_name(name) != "smtpdcheck":
            found[canonicalize_name(name)] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or any(
                requirement.marker.evaluate({"extra": extra}) for extra in extras | {""}
            ):
                wanted.append((requirement.name, frozenset(requirement.extras)))
    assert not wanted, "dependency tree too deep"
    return list(found.values())


async def test_spawn_mode_under_real_postfix(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], postfix_factory: PostfixFactory
) -> None:
    """master.cf runs `smtpdcheck-policyd --stdio` through spawn(8), as etc/postfix-snippets/master.cf shows."""
    if installed_daemon_requested():
        daemon = command("smtpdcheck-policyd")
    elif os.access(SYSTEM_PYTHON, os.X_OK):
        lib = await trio.to_thread.run_sync(_copy_runtime, postfix_factory.socket_dir())
        daemon = f"/usr/bin/env PYTHONPATH={lib} {SYSTEM_PYTHON} -m policyd.cli"
    else:
        pytest.skip(f"spawn test needs Debian's {SYSTEM_PYTHON} (spawn runs the command as an unprivileged user)")
    f = await farm(Mode.OK, Mode.CODE_421, Mode.SILENT)
    for domain, ip in DOMAINS.items():
        dns_server.zone.update(backup_zone(domain, ip))
    argv = (
        f"{daemon} --stdio "
        f"--nameserver 127.0.0.1:{dns_server.port} --smtp-port {f.port} --timeout 1.5 --deadline 4"
    )
    instance = postfix_factory(policy_endpoint="unix:private/smtpdcheck", relay_domains=list(DOMAINS))
    instance.master_services = [f"smtpdcheck/unix = smtpdcheck unix - n n - 0 spawn user=nobody argv={argv}"]
    instance.main_cf_extra = {"smtpdcheck_time_limit": "3600"}
    await trio.to_thread.run_sync(instance.start)
    with trio.fail_after(30):
        up = await smtp_rcpt(instance.smtp_port, "user@up.example.com")
        down = await smtp_rcpt(instance.smtp_port, "user@busy.example.com")
    assert up.code == 450 and "mx1.up.example.com" in up.text, (up, instance.maillog())
    assert down.code == 250


ROOT = Path(__file__).resolve().parent.parent
# The source tree's files, or (testing an installed package, whose tests
# run without etc/) the package's copies of them.
PACKAGE_EXAMPLES = Path("/usr/share/doc/smtpdcheck/examples")
UNIX_SOCKET_UNIT, UNIX_SOCKET_SNIPPET = (
    (ROOT / "etc" / "systemd" / "smtpdcheck-policyd-unix.socket", ROOT / "etc" / "postfix-snippets" / "main.cf-unix-socket")
    if (ROOT / "etc").is_dir()
    else (PACKAGE_EXAMPLES / "smtpdcheck-policyd-unix.socket", PACKAGE_EXAMPLES / "main.cf-unix-socket")
)
DEBIAN_QUEUE_DIRECTORY = "/var/spool/postfix"


async def test_unix_socket_unit_reaches_a_chrooted_smtpd_running_as_postfix(
    nursery: trio.Nursery, dns_server: FakeDNSServer, farm: Callable[..., Farm], postfix_factory: PostfixFactory
) -> None:
    """The unix-socket set-up as shipped: the socket unit's directory and socket, the snippet's endpoint.

    smtpd runs chrooted into the queue directory and as the mail owner
    (postfix), as on Debian; the socket and its directory are made from the
    unit file's own settings, as systemd makes them, and handed to the
    daemon as socket activation does.  Before the directory was made
    searchable by postfix, smtpd got EACCES and fell back to DUNNO.
    """
    import re

    from policyd.systemd import listeners_from
    from tests.support.systemd_units import UnixSocketUnit

    unit = UnixSocketUnit.read(UNIX_SOCKET_UNIT)
    snippet = UNIX_SOCKET_SNIPPET.read_text()
    match = re.search(r"check_policy_service \{ (unix:[^,]+), ([^}]*?) \}", snippet)
    assert match is not None, "no check_policy_service line in the snippet"
    endpoint, options = match[1], match[2]
    f = await farm(Mode.OK, Mode.CODE_421)
    for domain, ip in DOMAINS.items():
        dns_server.zone.update(backup_zone(domain, ip))
    instance = postfix_factory(policy_endpoint=endpoint, relay_domains=list(DOMAINS))
    instance.policy_options = options
    instance.chroot_smtpd = True
    instance.queue_dir.mkdir(parents=True)
    sock, path = unit.listen_under(DEBIAN_QUEUE_DIRECTORY, instance.queue_dir)
    assert path == instance.queue_dir / endpoint.removeprefix("unix:")
    config = policyd_config(dns_server.port, f.port, timeout=1.5, deadline=4.0)
    if installed_daemon_requested():
        with sock:
            await start_daemon(nursery, config, activate=sock)
    else:
        await start_policyd(nursery, config, listeners=listeners_from([sock]))
    await trio.to_thread.run_sync(instance.start)
    # smtpd as Debian runs it: chrooted, and unprivileged (as mail_owner, postfix).
    service = f"127.0.0.1:{instance.smtp_port}/inet"
    columns = await trio.to_thread.run_sync(lambda: instance._postconf("-Fh", f"{service}/chroot", f"{service}/unprivileged"))
    assert columns.split() == ["y", "-"]
    with trio.fail_after(20):
        up = await smtp_rcpt(instance.smtp_port, "user@up.example.com")
        down = await smtp_rcpt(instance.smtp_port, "user@busy.example.com")
    log = instance.maillog()
    assert (up.code, down.code) == (450, 250), log[-3000:]
    assert "mx1.up.example.com" in up.text
    assert "Permission denied" not in log, log[-3000:]
