"""Every main.cf example the project prints or ships orders restrictions as the snippets do.

The relay check and the permit_* exemptions come before check_policy_service:
a later permit cannot undo DEFER_IF_PERMIT, and without them mail that the
host's own users relay to outside domains would be probed, and deferred.
``etc/postfix-snippets/main.cf`` is the one source: ``--help`` prints its
lines (``policyd.cli.MAIN_CF_EXAMPLE``), and the manual page, the README and
the other snippets are held to its order here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tools import manpage, roff
from policyd.cli import MAIN_CF_EXAMPLE, build_parser

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


def examples(text: str) -> list[tuple[list[str], list[str]]]:
    """(relay restrictions, recipient restrictions) of every example in ``text``, in order."""
    recipient = [_items(m[1] + "}") for m in re.finditer(r"smtpd_recipient_restrictions =([^}]*)\}", text)]
    relay = [_items(m[1]) for m in re.finditer(r"smtpd_relay_restrictions =(.*?reject_unauth_destination)", text, re.S)]
    assert len(relay) == len(recipient), f"an example without smtpd_relay_restrictions: {text}"
    return list(zip(relay, recipient))


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
    [(relay, recipient)] = examples(SNIPPET)
    assert relay == ["permit_mynetworks", "permit_sasl_authenticated", "reject_unauth_destination"]
    assert recipient == ["permit_mynetworks", "permit_sasl_authenticated", "reject_unlisted_recipient", "check_policy_service"]


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_every_example_orders_restrictions_as_the_snippet(source: str) -> None:
    found = examples(SOURCES[source]())
    assert found, f"no main.cf example in {source}"
    assert all(example == examples(SNIPPET)[0] for example in found), found


def test_readme_shows_the_snippets_lines() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.count(MAIN_CF_EXAMPLE) == 1  # the Postfix wiring block
    assert readme.count("".join("    " + line + "\n" for line in MAIN_CF_EXAMPLE.splitlines())) == 1  # Installing
