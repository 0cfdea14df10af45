"""Every main.cf example the project prints or ships orders restrictions as the snippets do.

The relay check and the permit_* exemptions come before the policy check:
a later permit cannot undo DEFER_IF_PERMIT, and without them mail that the
host's own users relay to outside domains would be probed, and deferred.
The check itself is a restriction class that the relay_domains table
selects, so only recipients of relay domains reach the daemon.
``etc/postfix-snippets/main.cf`` is the one source: ``--help`` prints its
lines (``policyd.cli.MAIN_CF_EXAMPLE``), and the manual page, the README and
the other snippets are held to its order here.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tools import manpage, roff
from policyd.cli import MAIN_CF_EXAMPLE, build_parser
from policyd.config import DEFAULT_LISTEN, DEFAULT_PORT

ROOT = Path(__file__).resolve().parent.parent
SNIPPETS = ROOT / "etc" / "postfix-snippets"


def without_comments(text: str) -> str:
    """main.cf as Postfix reads it: lines whose first non-blank is '#' are skipped."""
    return "".join(line + "\n" for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def commented_main_cf(text: str) -> str:
    """The main.cf lines that master.cf shows in a comment, uncommented."""
    tail = text.split("And in /etc/postfix/main.cf", 1)[1].split("\n", 1)[1]
    return "".join(line.lstrip("#") + "\n" for line in tail.splitlines() if line.startswith("#     "))


def _items(value: str) -> list[str]:
    """The restrictions of a setting; ``{ endpoint, options }`` dropped (the endpoint may differ)."""
    value = re.sub(r"\{[^}]*\}", "", value)
    return [item for item in (" ".join(part.split()) for part in value.split(",")) if item]


Example = tuple[list[str], list[str], list[str], str]


def examples(text: str) -> list[Example]:
    """(relay restrictions, recipient restrictions, the class's restrictions, relay_domains) of every example in ``text``.

    The policy check lives in the restriction class smtpdcheck_backup, which
    the recipient restrictions select through the relay_domains table.
    """
    recipient = [_items(m[1]) for m in re.finditer(r"smtpd_recipient_restrictions =(.*?check_recipient_access \S+)", text, re.S)]
    relay = [_items(m[1]) for m in re.finditer(r"smtpd_relay_restrictions =(.*?reject_unauth_destination)", text, re.S)]
    classes = [
        [m[1], *_items(m[2] + "}")]
        for m in re.finditer(r"smtpd_restriction_classes = (\S+)\s+#?\s*\1 =([^}]*)\}", text)
    ]
    tables = re.findall(r"^[#\s]*relay_domains = (\S+)$", text, re.M)
    assert len(relay) == len(recipient) == len(classes) == len(tables), f"an example without one of its parts: {text}"
    return list(zip(relay, recipient, classes, tables))


def _man_text(page: str) -> str:
    return page.replace("\\-", "-").replace("\\e", "\\")


SNIPPET = without_comments((SNIPPETS / "main.cf").read_text())
SOURCES = {
    "--help": lambda: build_parser().format_help(),
    "smtpdcheck-policyd(8)": lambda: _man_text(manpage.policyd_page()),
    "man/smtpdcheck-policyd.8": lambda: _man_text((ROOT / "man" / "smtpdcheck-policyd.8").read_text()),
    "README.md": lambda: (ROOT / "README.md").read_text(),
    "main.cf-unix-socket": lambda: without_comments((SNIPPETS / "main.cf-unix-socket").read_text()),
    "master.cf": lambda: commented_main_cf((SNIPPETS / "master.cf").read_text()),
}


def test_help_prints_the_snippets_lines() -> None:
    assert MAIN_CF_EXAMPLE == SNIPPET


def test_the_snippet_orders_exemptions_and_the_relay_check_first() -> None:
    [(relay, recipient, restriction_class, table)] = examples(SNIPPET)
    assert relay == ["permit_mynetworks", "permit_sasl_authenticated", "reject_unauth_destination"]
    assert recipient == [
        "permit_mynetworks", "permit_sasl_authenticated", "reject_unlisted_recipient", f"check_recipient_access {table}"
    ]
    # The check runs only where the relay table selects the class: one table, read by both.
    assert restriction_class == ["smtpdcheck_backup", "check_policy_service"]
    assert table == "hash:/etc/postfix/relay_domains"


def test_the_snippet_and_help_name_the_default_endpoint() -> None:
    assert f"check_policy_service {{ {DEFAULT_LISTEN}, " in SNIPPET
    assert DEFAULT_LISTEN == f"inet:127.0.0.1:{DEFAULT_PORT}"


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_every_example_orders_restrictions_as_the_snippet(source: str) -> None:
    found = examples(SOURCES[source]())
    assert found, f"no main.cf example in {source}"
    assert all(example == examples(SNIPPET)[0] for example in found), found


def test_readme_shows_the_snippets_lines() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.count(MAIN_CF_EXAMPLE) == 1  # the Postfix wiring block
    assert readme.count("".join("    " + line + "\n" for line in MAIN_CF_EXAMPLE.splitlines())) == 1  # Installing


# -- the default port: one constant, and the files that cannot import it say it --

OLD_DEFAULT_PORT = "10040"  # postfwd's; 0.1.0's default, named only where an upgrade is explained
UPGRADE_NOTES = ("debian/changelog", "debian/NEWS")


def test_the_socket_unit_listens_on_the_default_port() -> None:
    unit = (ROOT / "etc" / "systemd" / "smtpdcheck-policyd.socket").read_text()
    assert re.findall(r"^ListenStream=(.*)$", unit, re.M) == [f"127.0.0.1:{DEFAULT_PORT}"]


@pytest.mark.parametrize("name", ["README.md", "scripts/run", "debian/rules", "etc/postfix-snippets/main.cf", "man/smtpdcheck-policyd.8"])
def test_files_that_cannot_import_the_port_say_the_constants(name: str) -> None:
    text = (ROOT / name).read_text()
    assert f"127.0.0.1:{DEFAULT_PORT}" in text
    assert set(re.findall(r"127\.0\.0\.1:(100\d\d)\b", text)) == {str(DEFAULT_PORT)}


def test_the_old_default_port_is_named_only_in_the_upgrade_notes() -> None:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = [name for name in tracked.decode().split("\0") if name]
    if not files:
        pytest.skip("not a git checkout")
    naming = []
    for name in files:
        try:
            if OLD_DEFAULT_PORT in (ROOT / name).read_text(errors="strict"):
                naming.append(name)
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
    assert sorted(naming) == sorted([*UPGRADE_NOTES, "tests/test_wiring.py"])  # and this test, which looks for it


def test_the_upgrade_notes_tell_an_administrator_what_to_change() -> None:
    news = (ROOT / "debian" / "NEWS").read_text()
    changelog = (ROOT / "debian" / "changelog").read_text()
    # The same version and format as the changelog's latest entry (dh_installchangelogs installs both).
    assert news.splitlines()[0] == changelog.splitlines()[0]
    assert re.search(r"^ -- .+ <.+>  \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}$", news, re.M)
    latest = changelog.split("\n -- ", 1)[0]
    assert f"inet:127.0.0.1:{DEFAULT_PORT}" in latest
    words = " ".join(news.split())
    assert f"from inet:127.0.0.1:{OLD_DEFAULT_PORT} to inet:127.0.0.1:{DEFAULT_PORT}" in words
    assert "check_policy_service line of /etc/postfix/main.cf" in words
