"""This release's version, kept in one place: pyproject.toml.

Both commands' ``--version`` and the manual pages read it from the
installed distribution's metadata, which pip and Debian's pybuild write
from pyproject.toml; it is not written a second time in the code.
"""

from __future__ import annotations

from importlib import metadata
from typing import Final

DISTRIBUTION: Final = "smtpdcheck"


def version() -> str:
    """The installed version; "unknown" for modules put on sys.path without installing them."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
