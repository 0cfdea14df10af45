"""A throwaway, real Postfix smtpd on 127.0.0.1 for end-to-end tests, plus a small async SMTP client.

Why a real Postfix: the policy protocol has sharp edges (LF-only framing, persistent
connections, how ``DEFER_IF_PERMIT`` text turns into an SMTP reply) that only the real
client exercises faithfully.  The set-up is the one verified on Debian 12 /
Postfix 3.7: run as root, chroot off, discard transports, no DNS lookups.

Every instance is self-contained: its own config directory, queue directory, data
directory, maillog file and a single SMTP listener on a free loopback port.  The system
Postfix (if any) and port 25 are never touched.

The blocking methods (``start``/``stop``/``reconfigure``) are plain synchronous calls;
from a trio test run them with ``trio.to_thread.run_sync`` so an in-process policy server
keeps being served while Postfix starts or reloads.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import trio

__all__ = [
    "HARNESS_SOURCE_ADDRESS",
    "PostfixError",
    "PostfixInstance",
    "SMTPClientError",
    "SMTPReply",
    "make_postfix",
    "make_postfix_reachable_dir",
    "postfix_available",
    "smtp_rcpt",
    "smtp_session",
]

# Root's PATH inside containers and CI runners does not always include the sbin
# directories, which is where Debian installs postconf/postfix.
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"]
)
# A fixed, minimal environment for Postfix commands: Postfix imports MAIL_CONFIG and
# friends from the environment, so an inherited value must not redirect our instance.
_POSTFIX_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "LC_ALL": "C"}

_MIN_VERSION = (3, 4)  # maillog_file appeared in 3.4; server_address in policy requests in 3.2
_START_BUDGET = 15.0  # seconds from `postfix start` until the port answers 220
_COMMAND_TIMEOUT = 30.0  # any single postconf/postfix invocation
_STOP_BUDGET = 15.0  # seconds for `postfix stop` plus waiting for the master to go away
_RELOAD_SETTLE = 1.5  # the doc measured ~1 s before a reload takes effect
_BIND_RETRIES = 3  # a freshly probed free port can be taken by someone else before master binds it
# Unix-domain socket paths (Postfix's own under queue/private and our policy socket)
# are limited to 108 bytes; keep the instance root well below that.
_MAX_ROOT_LEN = 48
# The harness's own connections (the start-up greeting check) come from this address, so
# that they never share a test client's address in the log, nor in postscreen's memory of
# which clients passed its tests; a postscreen instance lets it through untested.
HARNESS_SOURCE_ADDRESS = "127.0.0.254"


class PostfixError(RuntimeError):
    """A Postfix command failed; the message carries its output and the maillog tail."""


# --------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def _run(argv: Sequence[str], *, timeout: float = _COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a Postfix command with a bounded wall time so a hung command cannot hang the suite."""
    return subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        env=_POSTFIX_ENV,
        timeout=timeout,
        check=False,
    )


@functools.cache
def _postconf_default(name: str) -> str:
    """``postconf -d NAME``: works without /etc/postfix/main.cf (absent on a fresh Debian install)."""
    postconf = _which("postconf")
    if postconf is None:
        raise PostfixError("postconf not found")
    proc = _run([postconf, "-dh", name])
    if proc.returncode != 0:
        raise PostfixError(f"postconf -dh {name} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def _master_cf_template() -> pathlib.Path | None:
    """The packaged master.cf; every service we need (postlogd, discard, smtpd) is in it."""
    candidates = [
        pathlib.Path(_postconf_default("config_directory")) / "master.cf",
        pathlib.Path(_postconf_default("meta_directory")) / "master.cf.proto",
    ]
    return next((p for p in candidates if p.is_file()), None)


@functools.cache
def postfix_available() -> str | None:
    """Return None if a throwaway Postfix can be run here, otherwise the reason why not.

    The reason is meant to be shown to a human (a skip or a CI failure), so it names the fix.
    The answer is cached: the environment does not change within a test process.
    """
    for program in ("postconf", "postfix"):
        if _which(program) is None:
            return f"{program} not found: install Debian's postfix package (apt-get install postfix)"
    if os.geteuid() != 0:
        return "must run as root: `postfix -c DIR start` and the queue ownership set-up need root"
    try:
        version_text = _postconf_default("mail_version")
        mail_owner = _postconf_default("mail_owner")
        setgid_group = _postconf_default("setgid_group")
        daemon_dir = pathlib.Path(_postconf_default("daemon_directory"))
    except (PostfixError, OSError, subprocess.TimeoutExpired) as exc:
        return f"postconf does not work: {exc}"
    match = re.match(r"(\d+)\.(\d+)", version_text)
    if match is None or (int(match[1]), int(match[2])) < _MIN_VERSION:
        return f"Postfix {version_text!r} is too old: need >= {_MIN_VERSION[0]}.{_MIN_VERSION[1]} (maillog_file)"
    try:
        pwd.getpwnam(mail_owner)
    except KeyError:
        return f"the Postfix mail_owner user {mail_owner!r} does not exist: reinstall the postfix package"
    try:
        grp.getgrnam(setgid_group)
    except KeyError:
        return f"the Postfix setgid_group {setgid_group!r} does not exist: reinstall the postfix package"
    for daemon in ("master", "smtpd", "postlogd"):
        if not (daemon_dir / daemon).is_file():
            return f"{daemon_dir / daemon} is missing: reinstall the postfix package"
    if _master_cf_template() is None:
        return "no master.cf template found in config_directory or meta_directory"
    return None


# --------------------------------------------------------------------------------------
# Directories and ports
# --------------------------------------------------------------------------------------


def _postfix_can_traverse(path: pathlib.Path) -> bool:
    """Whether the unprivileged mail_owner can reach ``path``.

    pytest's base temp dir (/tmp/pytest-of-root) is mode 0700, so the master's lock file
    and smtpd's policy socket connect would fail with EACCES underneath it.
    """
    for part in (path, *path.parents):
        try:
            mode = part.stat().st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return True


def make_postfix_reachable_dir(tmp_path: pathlib.Path | None = None, *, prefix: str = "pf") -> pathlib.Path:
    """Create a short directory (mode 0755) that Postfix's unprivileged daemons can reach.

    Used for an instance's root and for policy server unix sockets.  It is created under
    ``tmp_path`` when that is short and traversable by the mail_owner, else under /tmp.
    The caller owns the directory and must remove it.
    """
    parent: pathlib.Path = pathlib.Path("/tmp")
    if tmp_path is not None and len(str(tmp_path)) <= _MAX_ROOT_LEN - 12 and _postfix_can_traverse(tmp_path):
        parent = tmp_path
    path = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    return path


def _free_loopback_port() -> int:
    """Ask the kernel for a free port; racy by nature, hence the retry in ``start``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_taken(port: int) -> bool:
    """Whether binding 127.0.0.1:port fails the way master's bind (with SO_REUSEADDR) would."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


# --------------------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------------------


def _process_alive(pid: int) -> bool:
    """True while ``pid`` is a running (non-zombie) process.

    Zombies count as gone: in containers PID 1 is often not a reaping init, and Postfix's
    master is reparented to it after `postfix start`, so a stopped master can linger as a
    zombie for a while.
    """
    try:
        raw = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    # Field 3 follows the parenthesised command name, which may itself contain spaces.
    state = raw.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def _process_group_members(pgid: int) -> list[int]:
    """PIDs of live processes in process group ``pgid`` (Postfix's master leads its own group)."""
    members: list[int] = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw.rpartition(")")[2].split()
        # fields[0] = state, fields[1] = ppid, fields[2] = pgrp
        if len(fields) > 2 and fields[0] not in ("Z", "X") and fields[2] == str(pgid):
            members.append(int(entry.name))
    return members


def _wait_until(predicate: Callable[[], bool], deadline: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``deadline`` (time.monotonic); every wait here is bounded."""
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --------------------------------------------------------------------------------------
# The instance
# --------------------------------------------------------------------------------------


def _format_value(value: str | int | bool | Iterable[str]) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (str, int)):
        return str(value)
    return ", ".join(value)


@dataclass
class PostfixInstance:
    """One throwaway Postfix whose smtpd listens on ``127.0.0.1:smtp_port``.

    ``smtpd_recipient_restrictions`` is ``extra_restrictions_before..., check_policy_service
    { policy_endpoint, policy_options }``; relay domains are accepted for any local part
    (``relay_recipient_maps =``) and delivered to the discard transport, so nothing ever
    leaves the box.
    """

    workdir: pathlib.Path
    smtp_port: int
    policy_endpoint: str
    relay_domains: list[str] = field(default_factory=lambda: ["example.com"])
    extra_restrictions_before: list[str] = field(default_factory=list)
    policy_options: str = "timeout=10s, try_limit=1, default_action=DUNNO"
    # Where to keep a copy of the maillog after stop() removed the workdir, for post-mortems.
    log_copy_dir: pathlib.Path | None = None
    # Extra master.cf services, as `postconf -Me` arguments ("name/type = entry ..."), and
    # extra main.cf parameters: e.g. a spawn(8) policy service and its time limit.
    master_services: list[str] = field(default_factory=list)
    main_cf_extra: dict[str, str] = field(default_factory=dict)
    # Run the SMTP listener chrooted into the queue directory, as Debian does:
    # its unix: policy endpoints are then resolved inside the queue directory.
    chroot_smtpd: bool = False
    # Put postscreen(8) in front of smtpd on the listener, as a primary MX runs it.  Its
    # tests and their actions are main.cf parameters (``main_cf_extra``).  Only
    # HARNESS_SOURCE_ADDRESS is exempt: the default ``postscreen_access_list``
    # (permit_mynetworks, and mynetworks is 127.0.0.0/8) would wave every test client through.
    postscreen: bool = False

    _started: bool = field(default=False, init=False, repr=False)
    _stopped: bool = field(default=False, init=False, repr=False)
    _saved_maillog: pathlib.Path | None = field(default=None, init=False, repr=False)

    # ---- paths -----------------------------------------------------------------------

    @property
    def config_dir(self) -> pathlib.Path:
        return self.workdir / "etc"

    @property
    def queue_dir(self) -> pathlib.Path:
        return self.workdir / "queue"

    @property
    def data_dir(self) -> pathlib.Path:
        return self.workdir / "data"

    @property
    def maillog_path(self) -> pathlib.Path:
        return self.workdir / "maillog"

    @property
    def postscreen_access_path(self) -> pathlib.Path:
        return self.config_dir / "postscreen_access.cidr"

    @property
    def policy_restriction(self) -> str:
        """The ``check_policy_service { ... }`` restriction text, as written to main.cf."""
        return f"check_policy_service {{ {self.policy_endpoint}, {self.policy_options} }}"

    @property
    def recipient_restrictions(self) -> str:
        return ", ".join([*self.extra_restrictions_before, self.policy_restriction])

    @property
    def _service_name(self) -> str:
        return f"127.0.0.1:{self.smtp_port}/inet"

    # ---- commands --------------------------------------------------------------------

    def _postconf(self, *args: str) -> str:
        postconf = _which("postconf")
        assert postconf is not None, "postfix_available() should have been checked first"
        proc = _run([postconf, "-c", str(self.config_dir), *args])
        if proc.returncode != 0:
            raise PostfixError(f"postconf {' '.join(args)} failed (rc={proc.returncode}): {proc.stderr.strip()}")
        self._backdate_config()
        return proc.stdout

    def _backdate_config(self) -> None:
        """Set main.cf/master.cf mtimes 2 s into the past.

        Postfix's config reader treats a file whose mtime is not yet in the past as "being
        modified" and polls it every 300 ms until the clock moves on, so every postconf,
        `postfix check/start/reload` right after a write would stall for up to a second.
        Nobody but us writes these files, so claiming they are older is harmless.
        """
        past = time.time() - 2
        for name in ("main.cf", "master.cf"):
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.config_dir / name, (past, past))

    def _postfix(self, action: str, *, timeout: float = _COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        postfix = _which("postfix")
        assert postfix is not None, "postfix_available() should have been checked first"
        return _run([postfix, "-c", str(self.config_dir), action], timeout=timeout)

    def _fail(self, what: str, proc: subprocess.CompletedProcess[str] | None = None) -> PostfixError:
        detail = ""
        if proc is not None:
            detail = f" (rc={proc.returncode}) stdout={proc.stdout.strip()!r} stderr={proc.stderr.strip()!r}"
        tail = "\n".join(self.maillog().splitlines()[-20:])
        return PostfixError(f"{what} failed for {self.config_dir}{detail}\n--- maillog tail ---\n{tail}")

    # ---- configuration ---------------------------------------------------------------

    def _write_config(self) -> None:
        """Lay out the instance directories and write main.cf/master.cf with postconf."""
        template = _master_cf_template()
        assert template is not None
        for sub in (self.config_dir, self.queue_dir, self.data_dir):
            sub.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, self.config_dir / "master.cf")
        (self.config_dir / "main.cf").write_text("")
        self._backdate_config()
        # master opens $data_directory/master.lock after dropping to mail_owner for some
        # operations; root-owned data dir gives "open lock file ...: Permission denied".
        owner = pwd.getpwnam(_postconf_default("mail_owner"))
        os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "myhostname": "backup-mx.test",
            "mydomain": "test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": str(self.workdir),
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "relay_domains": ", ".join(self.relay_domains),
            "relay_recipient_maps": "",
            "relay_transport": "discard",
            "default_transport": "discard",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": self.recipient_restrictions,
        }
        if self.postscreen:
            self.postscreen_access_path.write_text(f"{HARNESS_SOURCE_ADDRESS}/32 permit\n")
            settings["postscreen_access_list"] = f"cidr:{self.postscreen_access_path}"
        settings.update(self.main_cf_extra)
        self._postconf("-e", *(f"{k} = {v}" for k, v in settings.items()))
        services = list(self.master_services)
        if self.postscreen:
            # postscreen hands clients that passed to smtpd through the pass service;
            # dnsblog and tlsproxy are spawned for DNSBL lookups and STARTTLS.
            services += [
                "smtpd/pass = smtpd pass - - n - - smtpd",
                "dnsblog/unix = dnsblog unix - - n - 0 dnsblog",
                "tlsproxy/unix = tlsproxy unix - - n - 0 tlsproxy",
            ]
        for service in services:
            self._postconf("-Me", service)
        # Drop the :25 listener; we never compete with a system Postfix.
        self._postconf("-MX", "smtp/inet")
        self._set_listener(self.smtp_port)
        # Debian chroots most services; with chroot off absolute unix: policy paths work
        # and no copies of resolv.conf/hosts are needed under the queue directory.
        chrooted = [
            f"{name.strip()}=n"
            for name, _, value in (line.partition("=") for line in self._postconf("-F", "*/*/chroot").splitlines())
            if value.strip() == "y" and not (self.chroot_smtpd and name.strip().startswith(self._service_name))
        ]
        if chrooted:
            self._postconf("-Fe", *chrooted)

    def _set_listener(self, port: int, *, old_port: int | None = None) -> None:
        if old_port is not None:
            self._postconf("-MX", f"127.0.0.1:{old_port}/inet")
        chroot = "y" if self.chroot_smtpd else "n"
        # postscreen is a single process per listener (process limit 1).
        command = "1 postscreen" if self.postscreen else "- smtpd"
        self._postconf("-Me", f"127.0.0.1:{port}/inet = 127.0.0.1:{port} inet n - {chroot} - {command}")
        self.smtp_port = port

    # ---- lifecycle -------------------------------------------------------------------

    def _master_pid(self) -> int | None:
        """The live master of *this* instance, or None.

        The pid file outlives a master that died during start-up, and the pid may since
        have been reused; only trust it if that process runs in our queue directory
        (master chdirs there), so stop() can never signal an unrelated process group.
        """
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().strip())
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except (OSError, ValueError):
            return None
        if cwd != str(self.queue_dir) or not _process_alive(pid):
            return None
        return pid

    def start(self) -> None:
        """Configure, check and start the instance; return once the SMTP port greets with 220.

        Blocking (a second or so); call through ``trio.to_thread.run_sync`` from trio code.
        """
        if self._started:
            raise PostfixError("instance already started")
        if self._stopped:
            raise PostfixError("a stopped instance cannot be restarted; make a new one")
        self._write_config()
        proc = self._postfix("check")
        if proc.returncode != 0:
            raise self._fail("postfix check", proc)
        for attempt in range(_BIND_RETRIES):
            started_at = time.monotonic()
            proc = self._postfix("start", timeout=_START_BUDGET)
            if proc.returncode == 0:
                self._started = True
                self._wait_for_greeting(started_at + _START_BUDGET)
                return
            # The port probed free may have been grabbed in the meantime.  master then dies
            # before postlogd runs, so the bind error never reaches maillog_file (nor
            # stderr); probe the port ourselves to tell a clash from other failures.
            self._wait_master_gone(time.monotonic() + 5)
            if _port_taken(self.smtp_port) and attempt + 1 < _BIND_RETRIES:
                self._set_listener(_free_loopback_port(), old_port=self.smtp_port)
                continue
            raise self._fail(
                "postfix start (master's own start-up errors are lost: it logs to postlogd, which"
                f" it had not spawned yet; port {self.smtp_port} taken: {_port_taken(self.smtp_port)};"
                " check master.cf, or run `postfix -c DIR start-fg` by hand)",
                proc,
            )

    def _wait_for_greeting(self, deadline: float) -> None:
        """Poll until smtpd answers 220: master binds the port, but smtpd is spawned lazily.

        The check connects from HARNESS_SOURCE_ADDRESS, which postscreen lets through.
        """
        last_error = "no attempt made"
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(
                    ("127.0.0.1", self.smtp_port), timeout=2, source_address=(HARNESS_SOURCE_ADDRESS, 0)
                ) as sock:
                    sock.settimeout(max(0.1, min(5.0, deadline - time.monotonic())))
                    greeting = b""
                    while not re.search(rb"(^|\n)\d{3}(?: [^\n]*)?\r?\n$", greeting):
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        greeting += chunk
                    if greeting.startswith(b"220"):
                        with contextlib.suppress(OSError):
                            sock.sendall(b"QUIT\r\n")
                            sock.recv(4096)
                        return
                    last_error = f"unexpected greeting {greeting!r}"
            except OSError as exc:
                last_error = repr(exc)
            time.sleep(0.1)
        raise self._fail(f"waiting for 220 on 127.0.0.1:{self.smtp_port} ({last_error})")

    def _wait_master_gone(self, deadline: float) -> bool:
        pid = self._master_pid()
        if pid is None:
            return True
        return _wait_until(lambda: not _process_alive(pid), deadline)

    def stop(self) -> None:
        """Stop the instance (bounded) and remove its workdir.

        Idempotent, and safe after a failed or partial ``start``: whatever was created is
        torn down.  If ``postfix stop`` does not get the master down in time, the master's
        process group is killed, so a later instance never competes with a leftover one.
        """
        if self._stopped:
            return
        self._stopped = True
        try:
            pid = self._master_pid()
            if pid is not None:
                deadline = time.monotonic() + _STOP_BUDGET
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._postfix("stop", timeout=_STOP_BUDGET / 2)
                if not _wait_until(lambda: not _process_alive(pid), deadline):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signal.SIGKILL)
                    _wait_until(lambda: not _process_alive(pid), time.monotonic() + 2)
                # master's children (smtpd holding the policy connection, postlogd) exit
                # once they notice the master is gone; wait so nothing writes into the
                # workdir while it is being removed.
                _wait_until(lambda: not _process_group_members(pid), time.monotonic() + 5)
                for straggler in _process_group_members(pid):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(straggler, signal.SIGKILL)
        finally:
            self._save_maillog()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _save_maillog(self) -> None:
        if self.log_copy_dir is None or not self.maillog_path.exists():
            return
        with contextlib.suppress(OSError):
            target = self.log_copy_dir / f"postfix-{self.smtp_port}.maillog"
            shutil.copyfile(self.maillog_path, target)
            self._saved_maillog = target

    def reconfigure(self, **main_cf: str | int | bool | Iterable[str]) -> None:
        """Change main.cf parameters on the running instance and reload it.

        Sleeps ~1.5 s afterwards: smtpd processes keep their policy connection (and old
        settings) across SMTP sessions, and only pick up the change once replaced after
        the reload.  Lists are joined with ", "; booleans become yes/no.  Rewriting
        ``smtpd_recipient_restrictions`` here bypasses the ``policy_endpoint`` and
        ``extra_restrictions_before`` fields; use ``set_policy_endpoint`` to keep them true.
        """
        if not main_cf:
            return
        self._postconf("-e", *(f"{name} = {_format_value(value)}" for name, value in main_cf.items()))
        if self._started:
            proc = self._postfix("reload")
            if proc.returncode != 0:
                raise self._fail("postfix reload", proc)
            time.sleep(_RELOAD_SETTLE)

    def set_policy_endpoint(self, endpoint: str, *, policy_options: str | None = None) -> None:
        """Point the policy check at another endpoint (and optionally other options), then reload."""
        self.policy_endpoint = endpoint
        if policy_options is not None:
            self.policy_options = policy_options
        self.reconfigure(smtpd_recipient_restrictions=self.recipient_restrictions)

    def maillog(self) -> str:
        """The instance's maillog (or its saved copy after ``stop``); empty if none yet."""
        for path in (self.maillog_path, self._saved_maillog):
            if path is not None:
                with contextlib.suppress(OSError):
                    return path.read_text(errors="replace")
        return ""


def make_postfix(
    tmp_path: pathlib.Path,
    *,
    policy_endpoint: str,
    relay_domains: list[str],
    extra_restrictions_before: Sequence[str] = (),
    policy_options: str = "timeout=10s, try_limit=1, default_action=DUNNO",
) -> PostfixInstance:
    """Create (but do not start) an instance with a fresh workdir and a free loopback port.

    ``policy_endpoint`` is ``inet:127.0.0.1:PORT`` or ``unix:/abs/path``.  For a unix
    socket, the socket's directory must be traversable and the socket writable by the
    mail_owner (smtpd connects as that user): create it in
    ``make_postfix_reachable_dir()`` and chmod the socket 0666.
    """
    return PostfixInstance(
        workdir=make_postfix_reachable_dir(tmp_path),
        smtp_port=_free_loopback_port(),
        policy_endpoint=policy_endpoint,
        relay_domains=list(relay_domains),
        extra_restrictions_before=list(extra_restrictions_before),
        policy_options=policy_options,
        log_copy_dir=tmp_path,
    )


# --------------------------------------------------------------------------------------
# Async SMTP client
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SMTPReply:
    """One SMTP reply: the code and the text of all its lines joined with "\\n"."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class SMTPClientError(Exception):
    """The SMTP dialogue failed before it produced what the caller asked for.

    ``replies`` holds every reply received so far, for assertion messages.
    """

    def __init__(self, message: str, replies: Sequence[SMTPReply] = ()) -> None:
        super().__init__(message + "".join(f"\n  {r}" for r in replies))
        self.replies = list(replies)


_REPLY_LINE = re.compile(rb"^(\d{3})([ -]?)(.*)$", re.DOTALL)
_MAX_REPLY_BYTES = 64 * 1024


class _SMTPConnection:
    """A line-buffered SMTP conversation over a trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def _read_line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line.rstrip(b"\r\n")
            if len(self._buffer) > _MAX_REPLY_BYTES:
                raise SMTPClientError("SMTP reply line too long")
            chunk = await self._stream.receive_some(4096)
            if not chunk:
                raise SMTPClientError(f"connection closed by server (pending {bytes(self._buffer)!r})")
            self._buffer += chunk

    async def read_reply(self) -> SMTPReply:
        """Read one possibly multi-line reply (RFC 5321 4.2: ``NNN-`` continues, ``NNN `` ends)."""
        code: bytes | None = None
        texts: list[str] = []
        while True:
            line = await self._read_line()
            match = _REPLY_LINE.match(line)
            if match is None:
                raise SMTPClientError(f"malformed SMTP reply line {line!r}")
            if code is not None and match[1] != code:
                raise SMTPClientError(f"reply code changed mid-reply: {code!r} then {line!r}")
            code = match[1]
            texts.append(match[3].decode("utf-8", errors="replace"))
            if match[2] != b"-":
                return SMTPReply(int(code), "\n".join(texts))

    async def command(self, line: str) -> SMTPReply:
        # surrogateescape lets a caller send raw non-UTF-8 bytes (smuggled as surrogates).
        await self._stream.send_all(line.encode("utf-8", errors="surrogateescape") + b"\r\n")
        return await self.read_reply()


async def _open(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def smtp_session(port: int, commands: Sequence[str], *, timeout: float = 30) -> list[SMTPReply]:
    """Connect to 127.0.0.1:port and return the greeting followed by each command's reply.

    Commands are sent one at a time (no pipelining), without the trailing CRLF.  No QUIT is
    added.  Raises SMTPClientError (with the replies so far) if the server disconnects or
    the whole exchange exceeds ``timeout`` seconds.
    """
    replies: list[SMTPReply] = []
    try:
        with trio.fail_after(timeout):
            stream = await _open(port)
            async with stream:
                conn = _SMTPConnection(stream)
                replies.append(await conn.read_reply())
                for command in commands:
                    replies.append(await conn.command(command))
    except trio.TooSlowError:
        raise SMTPClientError(f"SMTP session with 127.0.0.1:{port} timed out after {timeout} s", replies) from None
    except SMTPClientError as exc:
        raise SMTPClientError(str(exc).splitlines()[0], replies) from None
    except OSError as exc:
        raise SMTPClientError(f"cannot talk to 127.0.0.1:{port}: {exc}", replies) from exc
    except trio.BrokenResourceError as exc:
        raise SMTPClientError(f"connection to 127.0.0.1:{port} broke: {exc}", replies) from exc
    return replies


async def smtp_rcpt(
    port: int,
    rcpt: str,
    *,
    sender: str = "sender@sender.test",
    helo: str = "client.test",
    timeout: float = 30,
    smtputf8: bool = False,
) -> SMTPReply:
    """Run greeting, EHLO, MAIL FROM, RCPT TO against 127.0.0.1:port and return the RCPT reply.

    A QUIT is sent afterwards (best effort: after a 421 the server has already hung up).
    Raises SMTPClientError if the greeting is not 220 or EHLO/MAIL are not 250, because then
    the RCPT reply would not say anything about the policy under test.
    """
    replies: list[SMTPReply] = []

    def expect(reply: SMTPReply, code: int, step: str) -> None:
        replies.append(reply)
        if reply.code != code:
            raise SMTPClientError(f"{step}: expected {code}, got {reply.code}", replies)

    try:
        with trio.fail_after(timeout):
            stream = await _open(port)
            async with stream:
                conn = _SMTPConnection(stream)
                expect(await conn.read_reply(), 220, "greeting")
                expect(await conn.command(f"EHLO {helo}"), 250, "EHLO")
                mail = f"MAIL FROM:<{sender}>" + (" SMTPUTF8" if smtputf8 else "")
                expect(await conn.command(mail), 250, "MAIL FROM")
                rcpt_reply = await conn.command(f"RCPT TO:<{rcpt}>")
                replies.append(rcpt_reply)
                with contextlib.suppress(SMTPClientError, trio.BrokenResourceError, OSError):
                    with trio.move_on_after(5):
                        await conn.command("QUIT")
                return rcpt_reply
    except trio.TooSlowError:
        raise SMTPClientError(f"SMTP RCPT dialogue with 127.0.0.1:{port} timed out after {timeout} s", replies) from None
    except SMTPClientError as exc:
        if exc.replies:
            raise
        raise SMTPClientError(str(exc), replies) from None
    except OSError as exc:
        raise SMTPClientError(f"cannot talk to 127.0.0.1:{port}: {exc}", replies) from exc
    except trio.BrokenResourceError as exc:
        raise SMTPClientError(f"connection to 127.0.0.1:{port} broke: {exc}", replies) from exc
