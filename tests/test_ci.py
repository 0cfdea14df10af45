"""CI follows the machine: .ci/debian takes its Debian mirror from the machine's apt sources.

And the README says where CI keeps its Debian roots and how to remove them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APT_MIRROR = ROOT / ".ci" / "apt-mirror"

SECURITY_THEN_MAIN = """\
Types: deb
# http://snapshot.example/archive/debian-security/20250520T000000Z
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def apt_mirror(sources: Path, codename: str = "bookworm") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(APT_MIRROR), "--sources-dir", str(sources), "--codename", codename],
        capture_output=True, text=True, timeout=30,
    )


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param({"debian.sources": SECURITY_THEN_MAIN}, "http://mirror.example/debian", id="deb822"),
        pytest.param(
            {"sources.list": "# deb http://old.example/debian bookworm main\n"
                             "deb-src http://src.example/debian bookworm main\n"
                             "deb [arch=amd64 signed-by=/k.gpg] http://list.example/debian bookworm main\n"},
            "http://list.example/debian", id="one-line",
        ),
        pytest.param(
            {"a.sources": "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\nComponents: main\n",
             "b.list.disabled": "deb http://disabled.example/debian bookworm main\n",
             "c.sources": SECURITY_THEN_MAIN},
            "http://mirror.example/debian", id="disabled-ones-skipped",
        ),
    ],
)
def test_mirror_is_the_one_the_apt_sources_name(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    result = apt_mirror(tmp_path)
    assert (result.returncode, result.stdout.strip()) == (0, expected), result.stderr


def test_no_source_for_the_release_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "debian.sources").write_text(SECURITY_THEN_MAIN)
    result = apt_mirror(tmp_path, codename="trixie")
    assert result.returncode == 1 and result.stdout == ""
    assert f"no enabled 'deb' source for trixie main in {tmp_path}" in result.stderr


def test_ci_debian_names_no_mirror_of_its_own() -> None:
    script = (ROOT / ".ci" / "debian").read_text()
    assert not re.findall(r"https?://", script)
    # The mirror is the one .ci/apt-mirror reads from this machine's sources
    # (a mention in a comment would not do: the call itself is looked for).
    assert re.search(r"^mirror=\$\{DEBIAN_MIRROR:-\$\(\.ci/apt-mirror\)\}$", script, re.MULTILINE)


def test_readme_says_where_the_ci_cache_is_and_how_to_remove_it() -> None:
    script = (ROOT / ".ci" / "debian").read_text()
    match = re.search(r"cache=\$\{SMTPDCHECK_CI_CACHE:-([^}]+)\}", script)
    assert match, "the cache's default place in .ci/debian"
    readme = (ROOT / "README.md").read_text()
    assert f"rm -r {match[1]}" in readme
