"""roff for the manual pages: escaping, layout, and argparse parsers as page text.

The helpers :mod:`tools.manpage` writes both pages with, kept apart from
what the pages say.  Postfix's own pages are the model: ``.SH`` sections,
``.IP`` items, literal displays indented and unfilled.  Every string that
reaches a page goes through :func:`text` or :func:`lit`, so a backslash,
a leading dot or a minus sign cannot turn into a roff request or a hyphen.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Sequence
from typing import Final

# -- roff escaping and layout ----------------------------------------------


def text(value: str) -> str:
    """Escape running text: a backslash would start an escape sequence."""
    return value.replace("\\", "\\e")


def lit(value: str) -> str:
    """Escape literal text (flags, commands): '-' must stay an ASCII minus, not a hyphen."""
    return text(value).replace("-", "\\-")


def bold(value: str) -> str:
    return f"\\fB{lit(value)}\\fR"


def italic(value: str) -> str:
    return f"\\fI{lit(value)}\\fR"


def safe_line(line: str) -> str:
    """A line starting with '.' or "'" would be read as a request."""
    return "\\&" + line if line.startswith((".", "'")) else line


def paragraph(words: str) -> list[str]:
    """Filled text: source line breaks are not kept, runs of spaces collapse."""
    joined = " ".join(words.split())
    return [safe_line(text(joined))] if joined else []


def paragraphs(block: str) -> list[str]:
    out: list[str] = []
    for chunk in re.split(r"\n\s*\n", block.strip()):
        if out:
            out.append(".PP")
        out.extend(paragraph(chunk))
    return out


def display(lines: Iterable[str]) -> list[str]:
    """Unfilled, indented literal lines (commands, configuration)."""
    out = [".sp", ".in +4", ".nf"]
    out.extend(safe_line(lit(line)) if line.strip() else "" for line in lines)
    out.extend([".fi", ".in -4"])
    return [line if line else ".sp" for line in out]


def section(title: str, *, filled: bool = True) -> list[str]:
    quoted = f'"{title}"' if " " in title else title
    return [f".SH {quoted}", ".ad" if filled else ".na", ".fi" if filled else ".nf"]


def item(label: str, body: Sequence[str]) -> list[str]:
    return [f'.IP "{label}"', *body]



def name_section(name: str, summary: str) -> list[str]:
    return [".SH NAME", f"{lit(name)} \\- {text(summary)}"]


# -- argparse -----------------------------------------------------------------


# -- argparse: a parser and its --help epilog as page text -----------------


def help_of(action: argparse.Action, prog: str) -> str:
    assert action.help is not None
    if "%" not in action.help:
        return action.help
    return action.help % {**vars(action), "prog": prog}


def action_label(action: argparse.Action) -> str:
    flags = ", ".join(bold(flag) for flag in action.option_strings)
    if action.nargs == 0:
        return flags
    metavar = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return f"{flags} {italic(metavar)}"


def parser_options(parser: argparse.ArgumentParser, skip: Iterable[str] = ()) -> list[str]:
    """An .IP item per optional argument, in the order of ``--help``."""
    skipped = set(skip)
    out: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest in skipped:
            continue
        out.extend(item(action_label(action), paragraph(sentence(help_of(action, parser.prog)))))
    return out


def sentence(value: str) -> str:
    """Help strings are phrases; on a page each item ends with a full stop."""
    value = value.strip()
    return value if value.endswith(".") else value + "."


def epilog_sections(epilog: str) -> dict[str, list[str]]:
    """``--help`` epilog blocks: a title and a colon at column 0 start one.

    The block's text may follow the colon on the same line ("signals: ...").
    """
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in epilog.splitlines():
        heading = _HEADING.match(line)
        if heading is not None:
            current = sections.setdefault(heading[1], [])
            if heading[2]:
                current.append(heading[2])
        elif current is not None:
            current.append(line)
    return sections


_HEADING: Final = re.compile(r"([A-Za-z][A-Za-z .()]*):(?: (.*))?$")


def dedent(lines: Sequence[str]) -> list[str]:
    margin = min((len(l) - len(l.lstrip()) for l in lines if l.strip()), default=0)
    return [l[margin:] for l in lines]


# -- smtpdcheck(1) ------------------------------------------------------------


def usage_line(parser: argparse.ArgumentParser) -> str:
    usage = parser.format_usage().strip().removeprefix("usage:").strip()
    prog, _, rest = usage.partition(" ")
    return f"{bold(prog)} {lit(' '.join(rest.split()))}"


def exit_status(lines: Sequence[str]) -> list[str]:
    out: list[str] = []
    for line in dedent(lines):
        head, _, rest = line.partition("  ")
        if line and not line[0].isspace() and head.isdigit():
            out.extend([f".IP {head}", safe_line(text(rest.strip()))])
        elif line.strip():
            out.append(safe_line(text(line.strip())))
    return out


def examples(lines: Sequence[str]) -> list[str]:
    """Commands at the epilog's left margin, each followed by its explanation."""
    out: list[str] = []
    commands: list[str] = []
    prose: list[str] = []

    def flush() -> None:
        if commands:
            out.extend(display(commands))
        if prose:
            out.extend([".PP", *paragraph(" ".join(prose))])
        commands.clear()
        prose.clear()

    for line in dedent(lines):
        if not line.strip():
            continue
        if not line[0].isspace():
            flush()
            commands.append(line)
        else:
            prose.append(line.strip())
    flush()
    return out
