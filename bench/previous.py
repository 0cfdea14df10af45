"""The previous release, run beside this tree in the same benchmark.

A figure is only comparable with one measured on the same machine in the
same minutes: this shared two-core machine drifts by tens of percent
between runs.  So benchmarks that promise "no worse than before" start the
previous release's daemon next to this tree's and report both.

The previous release is a commit of this repository, extracted once with
``git archive`` into ``.bench-releases/<commit>/`` (ignored by git) and
run with the interpreter and libraries of this tree's environment.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
#: The release this round of work is measured against (main before it began).
PREVIOUS: Final = "05969980cedffd3c77fec05dc2368ee8f2d72b68"
RELEASES_DIR: Final = REPO_ROOT / ".bench-releases"


class ReleaseUnavailable(RuntimeError):
    """Nothing to compare with: the commit is not in this clone (a shallow one, say),
    or it needs newer libraries than this environment has (the minimum-versions run)."""


@dataclass(frozen=True, slots=True)
class Release:
    """A daemon to benchmark: this tree (``commit`` None) or an extracted commit."""

    label: str
    commit: str | None = None

    def tree(self) -> Path:
        """The source tree the daemon runs from (extracted on first use).

        Raises :class:`ReleaseUnavailable` when this environment's libraries
        are older than the release declares: it would fail at import, or
        worse, run and measure something else.
        """
        if self.commit is None:
            return REPO_ROOT
        tree = extract(self.commit)
        unmet = unmet_requirements(tree / "pyproject.toml")
        if unmet:
            raise ReleaseUnavailable(f"{self.label} needs {', '.join(unmet)}")
        return tree


THIS: Final = Release("this tree")
PREVIOUS_RELEASE: Final = Release(f"previous release ({PREVIOUS[:7]})", PREVIOUS)


def extract(commit: str) -> Path:
    """``git archive`` the commit's code, benchmarks and ``pyproject.toml`` once; its path."""
    dest = RELEASES_DIR / commit
    if _complete(dest):
        return dest
    try:
        subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=REPO_ROOT, check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ReleaseUnavailable(f"commit {commit[:12]} is not in this clone ({exc})") from exc
    RELEASES_DIR.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{commit[:12]}-", dir=RELEASES_DIR))
    try:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", commit, *_PARTS],
            cwd=REPO_ROOT, check=True, capture_output=True, timeout=60,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True, capture_output=True, timeout=60)
        if dest.exists():
            shutil.rmtree(dest)  # an extraction of fewer parts, by an older harness
        os.replace(tmp, dest)  # atomic: a concurrent run sees all of it or none
    except (OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _complete(dest):
            return dest  # another run extracted it first
        raise ReleaseUnavailable(f"could not extract {commit[:12]}: {exc}") from exc
    return dest


_PARTS: Final = ("smtpdcheck", "policyd", "bench", "pyproject.toml")


def _complete(tree: Path) -> bool:
    return (tree / "policyd" / "cli.py").is_file() and (tree / "pyproject.toml").is_file()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def unmet_requirements(pyproject: Path) -> list[str]:
    """The ``name>=version`` dependencies of a release that this environment does not meet."""
    try:
        declared = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    except (OSError, tomllib.TOMLDecodeError, KeyError) as exc:
        return [f"a readable {pyproject.name} ({exc})"]
    unmet = []
    for requirement in declared:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?>=([0-9][0-9.]*)", requirement.replace(" ", ""))
        if match is None:
            continue  # not a lower bound: nothing to compare
        name, wanted = match[1], match[2]
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{name}>={wanted} (not installed)")
            continue
        if _version(have) < _version(wanted):
            unmet.append(f"{name}>={wanted} (this environment has {have})")
    return unmet
