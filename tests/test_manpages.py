"""The manual pages: committed copies are current, complete, and render cleanly."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing

from tools import manpage, roff
from policyd.cli import build_parser as daemon_parser
from policyd.config import OPTIONS, Config, default_text
from smtpdcheck.cli import build_parser as check_parser

MAN = Path(__file__).resolve().parent.parent / "man"


@pytest.mark.parametrize("name", sorted(manpage.PAGES))
def test_committed_page_is_current(name: str) -> None:
    committed = (MAN / name).read_text()
    assert committed == manpage.PAGES[name](), f"man/{name} is stale: run python -m tools.manpage man"


def _flags(parser_flags: list[str], page: str) -> list[str]:
    return [flag for flag in parser_flags if roff.bold(flag) not in page]


def test_policyd_page_has_every_option_with_its_default() -> None:
    page = manpage.policyd_page()
    flags = [flag for action in daemon_parser()._actions for flag in action.option_strings]
    assert _flags(flags, page) == []
    for option in OPTIONS:
        assert f"File key {roff.bold(option.name)}" in page
        assert roff.text(default_text(option)) in page or roff.lit(default_text(option)) in page


def test_smtpdcheck_page_has_every_option() -> None:
    page = manpage.smtpdcheck_page()
    flags = [flag for action in check_parser()._actions for flag in action.option_strings]
    assert _flags(flags, page) == []


@pytest.mark.parametrize(("name", "sections"), [
    ("smtpdcheck.1", [
        "NAME", "SYNOPSIS", "DESCRIPTION", '"STOP RULE"', "OPTIONS", '"EXIT STATUS"', "DIAGNOSTICS", "EXAMPLES",
        '"SEE ALSO"',
    ]),
    ("smtpdcheck-policyd.8", [
        "NAME", "SYNOPSIS", "DESCRIPTION", '"DECISION RULES"', "OPTIONS", '"CONFIGURATION FILE"', "SIGNALS",
        '"EXIT STATUS"', "DIAGNOSTICS", "SECURITY", "FILES", "EXAMPLES", '"SEE ALSO"',
    ]),
])
def test_sections_in_order(name: str, sections: list[str]) -> None:
    found = [line.removeprefix(".SH ") for line in manpage.PAGES[name]().splitlines() if line.startswith(".SH ")]
    assert [s for s in found if s in sections] == sections


def test_mail_avenger_examples() -> None:
    page = manpage.smtpdcheck_page()
    for servers in ("10:s1.domain.com 10:s2.domain.com", "10:s1.domain.com 20:s2.domain.com"):
        assert roff.lit(f"smtpdcheck --stop s2.domain.com {servers} 20:s3.domain.com") in page


def test_escaping() -> None:
    assert roff.paragraph(".starts with a dot\\") == ["\\&.starts with a dot\\e"]
    assert roff.display(["'quoted", "--flag"])[3:5] == ["\\&'quoted", "\\-\\-flag"]


@pytest.mark.parametrize("name", sorted(manpage.PAGES))
def test_groff_renders_without_warnings(name: str) -> None:
    if shutil.which("groff") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("groff is needed to check the manual pages (Debian's groff-base)")
        pytest.skip("groff not installed (Debian's groff-base)")
    result = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(MAN / name)], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_policyd_page_names_every_option_a_reload_keeps() -> None:
    from policyd.config import RESTART_ONLY

    page = manpage.PAGES["smtpdcheck-policyd.8"]()
    signals = page.split(".SH SIGNALS", 1)[1].split(".SH ", 1)[0]
    assert [name for name in RESTART_ONLY if name not in signals] == []


# -- version and date: each from the one place it is kept -------------------


def _pyproject_version() -> str:
    import tomllib

    version = tomllib.loads((MAN.parent / "pyproject.toml").read_text())["project"]["version"]
    assert isinstance(version, str)
    return version


@pytest.mark.parametrize("name", sorted(manpage.PAGES))
def test_page_carries_the_release_version_and_date(name: str) -> None:
    th = (MAN / name).read_text().splitlines()[0]
    assert f'"{manpage.release_date()}" "smtpdcheck {_pyproject_version()}"' in th


def test_version_is_not_written_again_in_the_generator() -> None:
    source = Path(manpage.__file__).read_text()
    assert _pyproject_version() not in source
    assert not re.search(r"\d{4}-\d\d-\d\d", source), "a date written into the generator"


def test_release_date_is_the_changelog_entry_of_this_version(tmp_path: Path) -> None:
    changelog = tmp_path / "changelog"
    changelog.write_text(
        "smtpdcheck (9.8.7) unstable; urgency=medium\n\n  * A release.\n\n"
        " -- A Maintainer <a@example.org>  Tue, 05 Jan 2027 10:00:00 +0000\n\n"
        "smtpdcheck (9.8.6) unstable; urgency=medium\n\n  * Before.\n\n"
        " -- A Maintainer <a@example.org>  Mon, 04 Jan 2027 10:00:00 +0000\n"
    )
    assert manpage.release_date(changelog, "9.8.7") == "2027-01-05"
    with pytest.raises(ValueError, match="the latest entry is 9.8.7, the version is 9.8.8: add an entry"):
        manpage.release_date(changelog, "9.8.8")


# -- DIAGNOSTICS, SECURITY, SEE ALSO: what an admin looks for ---------------


def _section(page: str, title: str) -> str:
    return page.split(f".SH {title}\n", 1)[1].split("\n.SH ", 1)[0]


@pytest.mark.parametrize(("name", "refers_to"), [
    ("smtpdcheck.1", ["smtpdcheck-policyd(8)", "postconf(5), check_policy_service"]),
    ("smtpdcheck-policyd.8", ["smtpdcheck(1)", "postconf(5), check_policy_service"]),
])
def test_pages_refer_to_each_other_and_to_check_policy_service(name: str, refers_to: list[str]) -> None:
    see_also = _section(manpage.PAGES[name](), '"SEE ALSO"')
    assert [ref for ref in refers_to if ref not in see_also] == []


def test_diagnostics_show_a_decision_line_as_the_daemon_writes_it() -> None:
    from policyd.decisionlog import decision_line, decision_middle

    diagnostics = _section(manpage.policyd_page(), "DIAGNOSTICS")
    middle = decision_middle("example.com", "DEFER_IF_PERMIT", "primary mx1.example.com live", "hit",
                             mx="10:mx1.example.com,20:backup.example.net", up="192.0.2.1")
    line = decision_line("", "user@example.com", middle, 0.0004, 3.2)
    assert roff.lit(line) in diagnostics
    for field in ("rcpt=", "domain=", "action=", "reason=", "mx=", "up=", "cache=", "ms=", "age=", "NOQUEUE"):
        assert field in diagnostics.replace("\\-", "-")
    for cache in ("hit", "miss", "stale"):
        assert cache in diagnostics


async def test_state_change_example_is_what_the_prober_logs(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    from smtpdcheck.core import CoreSettings, build_core
    from smtpdcheck.servers import parse_address
    from testbeds.virtual import SILENT, Peer, VirtualDNS, VirtualNet

    net = VirtualNet(nursery, {"192.0.2.1": Peer()})
    settings = CoreSettings(probe_timeout=2.0, up_ttl=10.0, down_ttl=10.0, quit_grace=0.1)
    prober = build_core(nursery, settings, connect=net.connect, lookups=VirtualDNS()).prober
    address = parse_address("192.0.2.1")
    assert address is not None
    with caplog.at_level(logging.INFO, logger="smtpdcheck"):
        await prober.probe(address, 25, "mx1.example.com")
        await trio.sleep(11)
        net.peers["192.0.2.1"] = SILENT
        await prober.probe(address, 25, "mx1.example.com")
    changes = [r.getMessage() for r in caplog.records if " -> " in r.getMessage()]
    assert len(changes) == 1 and changes[0].startswith(manpage.STATE_CHANGE_EXAMPLE), changes
    assert roff.lit(manpage.STATE_CHANGE_EXAMPLE) in _section(manpage.policyd_page(), "DIAGNOSTICS")


def test_dropped_lines_example_is_what_the_log_sink_writes() -> None:
    from policyd.decisionlog import LineSink, _Target

    class Gate(_Target):
        """A target that takes nothing until opened, like a stalled journald."""

        def __init__(self) -> None:
            self.open = False
            self.data = b""

        def send(self, data: bytes) -> int:
            if not self.open:
                return 0
            self.data += data
            return len(data)

        def ready(self, timeout: float) -> bool:
            return self.open

    gate = Gate()
    sink = LineSink(gate, limit=100)
    for i in range(20):
        sink.decision("", f"u{i}@example.com", " x", 0.0)
    assert sink.dropped > 0
    gate.open = True
    sink.flush()
    warning = gate.data.decode().splitlines()[-1]
    assert warning == re.sub(r"\d+", str(sink.dropped), manpage.DROPPED_EXAMPLE, count=1)
    assert roff.lit(manpage.DROPPED_EXAMPLE) in _section(manpage.policyd_page(), "DIAGNOSTICS")


def test_security_lists_the_service_units_sandbox() -> None:
    security = _section(manpage.policyd_page(), "SECURITY")
    unit = (MAN.parent / "etc" / "systemd" / "smtpdcheck-policyd.service").read_text()
    for key in ("DynamicUser", "ProtectSystem", "NoNewPrivileges", "RestrictAddressFamilies", "SystemCallFilter"):
        line = next(l for l in unit.splitlines() if l.startswith(key + "="))
        assert roff.lit(line) in security, line
    for topic in ("Who can query it", "Socket modes", "What it connects to", "systemd sandbox"):
        assert f'.IP "{topic}"' in security
    assert f"{Config().socket_mode:04o}" in security  # --socket-mode's default, from the option table


def test_smtpdcheck_diagnostics_show_a_verbose_line_as_the_command_writes_it() -> None:
    diagnostics = _section(manpage.smtpdcheck_page(), "DIAGNOSTICS")
    line = manpage.verbose_example()
    assert re.fullmatch(r"smtpdcheck: 10:mx1\.example\.com \[192\.0\.2\.1\] 192\.0\.2\.1:25 declined \(421 [^)]*\) 12\.3 ms", line)
    assert roff.lit(line) in diagnostics
