"""The manual pages: committed copies are current, complete, and render cleanly."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from policyd import manpage
from policyd.cli import build_parser as daemon_parser
from policyd.config import OPTIONS, default_text
from smtpdcheck.cli import build_parser as check_parser

MAN = Path(__file__).resolve().parent.parent / "man"


@pytest.mark.parametrize("name", sorted(manpage.PAGES))
def test_committed_page_is_current(name: str) -> None:
    committed = (MAN / name).read_text()
    assert committed == manpage.PAGES[name](), f"man/{name} is stale: run python -m policyd.manpage man"


def _flags(parser_flags: list[str], page: str) -> list[str]:
    return [flag for flag in parser_flags if manpage.bold(flag) not in page]


def test_policyd_page_has_every_option_with_its_default() -> None:
    page = manpage.policyd_page()
    flags = [flag for action in daemon_parser()._actions for flag in action.option_strings]
    assert _flags(flags, page) == []
    for option in OPTIONS:
        assert f"File key {manpage.bold(option.name)}" in page
        assert manpage.text(default_text(option)) in page or manpage.lit(default_text(option)) in page


def test_smtpdcheck_page_has_every_option() -> None:
    page = manpage.smtpdcheck_page()
    flags = [flag for action in check_parser()._actions for flag in action.option_strings]
    assert _flags(flags, page) == []


@pytest.mark.parametrize(("name", "sections"), [
    ("smtpdcheck.1", ["NAME", "SYNOPSIS", "DESCRIPTION", '"STOP RULE"', "OPTIONS", '"EXIT STATUS"', "EXAMPLES", '"SEE ALSO"']),
    ("smtpdcheck-policyd.8", [
        "NAME", "SYNOPSIS", "DESCRIPTION", '"DECISION RULES"', "OPTIONS", '"CONFIGURATION FILE"', "SIGNALS",
        '"EXIT STATUS"', "FILES", "EXAMPLES", '"SEE ALSO"',
    ]),
])
def test_sections_in_order(name: str, sections: list[str]) -> None:
    found = [line.removeprefix(".SH ") for line in manpage.PAGES[name]().splitlines() if line.startswith(".SH ")]
    assert [s for s in found if s in sections] == sections


def test_mail_avenger_examples() -> None:
    page = manpage.smtpdcheck_page()
    for servers in ("10:s1.domain.com 10:s2.domain.com", "10:s1.domain.com 20:s2.domain.com"):
        assert manpage.lit(f"smtpdcheck --stop s2.domain.com {servers} 20:s3.domain.com") in page


def test_escaping() -> None:
    assert manpage.paragraph(".starts with a dot\\") == ["\\&.starts with a dot\\e"]
    assert manpage.display(["'quoted", "--flag"])[3:5] == ["\\&'quoted", "\\-\\-flag"]


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
