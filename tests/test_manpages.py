"""The manual pages: committed copies are current, complete, and render cleanly."""

from __future__ import annotations

import os
import re
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
