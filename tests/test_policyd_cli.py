"""smtpdcheck-policyd's command line as an admin meets it: files, usage errors, --version.

The system files the daemon reads when told nothing (its configuration in
/etc/smtpdcheck, /etc/resolv.conf) are given here through the command's
own seam, :class:`policyd.cli.SystemFiles`: a test never reads the real /etc.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from policyd.cli import SystemFiles
from smtpdcheck import release
from testbeds.greeters import unused_port

ROOT = Path(__file__).resolve().parent.parent
LISTEN = ["--listen", f"inet:127.0.0.1:{unused_port()}"]
_MAIN = (
    "import sys; from pathlib import Path; from policyd.cli import SystemFiles, main; "
    "sys.exit(main(sys.argv[3:], SystemFiles(Path(sys.argv[1]), Path(sys.argv[2]))))"
)


def policyd(files: SystemFiles, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _MAIN, str(files.config), str(files.resolv_conf), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )


def one_line(run: subprocess.CompletedProcess[str]) -> str:
    """Exit 2 and exactly one line on stderr: what is wrong, no traceback."""
    assert run.returncode == 2, run
    assert run.stderr.count("\n") == 1, run.stderr
    return run.stderr.rstrip("\n")


@pytest.fixture
def files(tmp_path: Path) -> SystemFiles:
    """No default configuration file; a resolv.conf that names no nameserver."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# nothing here\nsearch example.com\n")
    return SystemFiles(config=tmp_path / "etc" / "policyd.toml", resolv_conf=resolv)


# -- no nameserver to ask -----------------------------------------------------


def test_check_without_any_nameserver_says_so_in_one_line(files: SystemFiles) -> None:
    line = one_line(policyd(files, "--check", "user@example.com"))
    assert line == f"smtpdcheck-policyd: no DNS server to ask: {files.resolv_conf} names no nameserver (give --nameserver)"


def test_daemon_without_any_nameserver_says_so_in_one_line(files: SystemFiles) -> None:
    line = one_line(policyd(files, *LISTEN))
    assert line == f"fatal: no DNS server to ask: {files.resolv_conf} names no nameserver (give --nameserver)"


def test_unreadable_resolv_conf_is_named(tmp_path: Path) -> None:
    files = SystemFiles(config=tmp_path / "none.toml", resolv_conf=tmp_path / "missing" / "resolv.conf")
    line = one_line(policyd(files, "--check", "user@example.com"))
    assert line.startswith(f"smtpdcheck-policyd: no DNS server to ask: cannot read {files.resolv_conf}")


def test_check_says_which_nameservers_it_asked(files: SystemFiles) -> None:
    files.resolv_conf.write_text("nameserver 127.0.0.1\nnameserver ::1\n")
    run = policyd(files, "--check", "user@example.invalid", "--dns-timeout", "0.2", "--timeout", "0.5", "--deadline", "1")
    assert run.stdout.splitlines()[0] == f"nameservers 127.0.0.1:53, [::1]:53 (from {files.resolv_conf})", run
    run = policyd(files, "--check", "user@example.invalid", "--nameserver", "127.0.0.1:1", "--dns-timeout", "0.2")
    assert run.stdout.splitlines()[0] == "nameservers 127.0.0.1:1 (from --nameserver)", run


# -- the default configuration file -------------------------------------------


def _write_default(files: SystemFiles, text: str) -> None:
    files.config.parent.mkdir(parents=True, exist_ok=True)
    files.config.write_text(text)


@pytest.mark.parametrize("mode", [["--check", "user@example.com"], LISTEN])
def test_default_file_is_read_when_it_exists(files: SystemFiles, mode: list[str]) -> None:
    _write_default(files, "timeout = -1\n")
    line = one_line(policyd(files, *mode))
    assert line == f"smtpdcheck-policyd: {files.config}: timeout: must be more than 0: -1"


def test_default_file_gives_the_settings(files: SystemFiles) -> None:
    _write_default(files, 'nameserver = ["127.0.0.1:1"]\ndns_timeout = 0.2\n')
    run = policyd(files, "--check", "user@example.com")
    assert run.stdout.splitlines()[0] == "nameservers 127.0.0.1:1 (from --nameserver)", run


@pytest.mark.parametrize("mode", [["--check", "user@example.com"], LISTEN])
def test_config_empty_means_no_file(files: SystemFiles, mode: list[str]) -> None:
    _write_default(files, "timeout = -1\n")
    line = one_line(policyd(files, "--config", "", *mode))
    assert "names no nameserver" in line  # got past the configuration: the default file was not read


def test_no_default_file_is_no_error(files: SystemFiles) -> None:
    assert "names no nameserver" in one_line(policyd(files, "--check", "user@example.com"))


def test_a_given_file_replaces_the_default_one(files: SystemFiles, tmp_path: Path) -> None:
    _write_default(files, "timeout = -1\n")
    given = tmp_path / "given.toml"
    given.write_text("deadline = 0\n")
    line = one_line(policyd(files, "--config", str(given), "--check", "user@example.com"))
    assert line == f"smtpdcheck-policyd: {given}: deadline: must be more than 0: 0"


def test_help_names_the_default_file(files: SystemFiles) -> None:
    run = policyd(files, "--help")
    assert f"(default:{files.config}ifitexists;''=none)" in "".join(run.stdout.split())


# -- usage ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--server-address", "192.0.2.25"], "--server-address is only for --check"),
        (["--check", "u@example.com", "--server-address", "mx.example.com"], "--server-address: not an IP address: 'mx.example.com'"),
        (["--check", "u@example.com", "--server-address", "192.0.2.300"], "not an IP address: '192.0.2.300'"),
    ],
)
def test_server_address_is_an_ip_address_for_check(files: SystemFiles, args: list[str], message: str) -> None:
    line = one_line(policyd(files, *args))
    assert line.startswith("smtpdcheck-policyd: ") and message in line


def _pyproject_version() -> str:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert isinstance(version, str)
    return version


@pytest.mark.parametrize("module", ["policyd.cli", "smtpdcheck.cli"])
def test_version_is_pyprojects(module: str) -> None:
    run = subprocess.run([sys.executable, "-m", module, "--version"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    prog = "smtpdcheck-policyd" if module == "policyd.cli" else "smtpdcheck"
    assert (run.returncode, run.stdout, run.stderr) == (0, f"{prog} {_pyproject_version()}\n", "")
    assert release.version() == _pyproject_version()


# -- unix socket paths that cannot be listened on --------------------------


def _ns(files: SystemFiles) -> list[str]:
    files.resolv_conf.write_text("nameserver 127.0.0.1\n")
    return []


@pytest.mark.parametrize(
    ("where", "why"),
    [
        ("missing/policy", "no such directory: {dir}"),
        ("file/policy", "Not a directory"),
        ("long" + "/x" * 60, "path too long for a unix socket (at most 107 bytes)"),
    ],
)
def test_bad_unix_socket_path_is_fatal_naming_it(files: SystemFiles, tmp_path: Path, where: str, why: str) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "long").mkdir()
    path = tmp_path / where
    run = policyd(files, *_ns(files), "--listen", f"unix:{path}")
    line = one_line(run)
    assert line == f"fatal: unix:{path}: {why.format(dir=path.parent)}"


# -- budgets that cannot work together ---------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--timeout", "6"], "--timeout 6 plus --dns-timeout 2 (8s) must be less than --deadline 8"),
        (["--deadline", "6", "--dns-timeout", "1.5"], "--timeout 5 plus --dns-timeout 1.5 (6.5s) must be less than --deadline 6"),
        (["--greeting-timeout", "4"], "--greeting-timeout 4 must be at least --timeout 5"),
    ],
)
def test_waits_that_cannot_fit_are_refused_in_one_line_naming_the_options(
    files: SystemFiles, args: list[str], message: str,
) -> None:
    line = one_line(policyd(files, "--nameserver", "127.0.0.1", *LISTEN, *args))
    assert message in line, line


def test_waits_that_cannot_fit_are_refused_in_a_file_too(files: SystemFiles, tmp_path: Path) -> None:
    config = tmp_path / "policyd.toml"
    config.write_text("deadline = 4\n")
    line = one_line(policyd(files, "--config", str(config), "--nameserver", "127.0.0.1", *LISTEN))
    assert line.endswith("--timeout 5 plus --dns-timeout 2 (7s) must be less than --deadline 4: a lookup and a probe must fit in a request's deadline"), line


# -- values that are accepted only if they can work ----------------------------


def test_a_cache_up_ttl_below_the_probe_refresh_floor_is_refused_in_one_line(files: SystemFiles, tmp_path: Path) -> None:
    """0.5 s expired before a probe could confirm it: half the RCPTs to a live primary got DUNNO."""
    line = one_line(policyd(files, *LISTEN, "--cache-up-ttl", "0.5"))
    assert line == "smtpdcheck-policyd: --cache-up-ttl: must be 0, or 1 or more: '0.5'"
    config = tmp_path / "p.toml"
    config.write_text("cache_up_ttl = 0.999\n")
    line = one_line(policyd(files, *LISTEN, "--config", str(config)))
    assert line == f"smtpdcheck-policyd: {config}: cache_up_ttl: must be 0, or 1 or more: 0.999"
