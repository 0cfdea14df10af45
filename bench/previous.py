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
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
#: The release this round of work is measured against (main before it began).
PREVIOUS: Final = "05969980cedffd3c77fec05dc2368ee8f2d72b68"
RELEASES_DIR: Final = REPO_ROOT / ".bench-releases"


class ReleaseUnavailable(RuntimeError):
    """The commit is not in this clone (a shallow clone, say): nothing to compare with."""


@dataclass(frozen=True, slots=True)
class Release:
    """A daemon to benchmark: this tree (``commit`` None) or an extracted commit."""

    label: str
    commit: str | None = None

    def tree(self) -> Path:
        """The source tree the daemon runs from (extracted on first use)."""
        return REPO_ROOT if self.commit is None else extract(self.commit)


THIS: Final = Release("this tree")
PREVIOUS_RELEASE: Final = Release(f"previous release ({PREVIOUS[:7]})", PREVIOUS)


def extract(commit: str) -> Path:
    """``git archive`` the commit's ``smtpdcheck/``, ``policyd/`` and ``bench/`` once; its path."""
    dest = RELEASES_DIR / commit
    if (dest / "policyd" / "cli.py").is_file():
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
            ["git", "archive", "--format=tar", commit, "smtpdcheck", "policyd", "bench"],
            cwd=REPO_ROOT, check=True, capture_output=True, timeout=60,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True, capture_output=True, timeout=60)
        os.replace(tmp, dest)  # atomic: a concurrent run sees all of it or none
    except (OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if (dest / "policyd" / "cli.py").is_file():
            return dest  # another run extracted it first
        raise ReleaseUnavailable(f"could not extract {commit[:12]}: {exc}") from exc
    return dest
