"""The Debian package declares the same minimum versions as pyproject.toml.

pyproject.toml is where they are chosen (scripts/test-minimums proves them);
debian/control repeats them in Debian's terms, and must not drift.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pyproject_minimums(requirements: list[str]) -> dict[str, str]:
    """``{"python3-name": "version"}`` for requirements written ``name[extras]>=version``."""
    minimums = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?>=([0-9][0-9.]*)", requirement.replace(" ", ""))
        assert match, f"not name>=version: {requirement!r}"
        minimums["python3-" + match[1].lower().replace("_", "-")] = match[3]
    return minimums


def control_field(field: str, paragraph: int) -> dict[str, str]:
    """``{"package": "version"}`` for the ``(>= version)`` relations of a debian/control field."""
    text = (ROOT / "debian" / "control").read_text()
    block = text.split("\n\n")[paragraph]
    match = re.search(rf"^{field}:(.*?)(?=^\S|\Z)", block, re.M | re.S)
    assert match, f"no {field} in paragraph {paragraph}"
    relations = re.findall(r"([a-z0-9.+-]+)\s*\(>=\s*([^)\s]+)\)", match[1])
    return dict(relations)


def test_runtime_dependencies_agree() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert control_field("Depends", 1) == pyproject_minimums(project["dependencies"])


def test_metrics_extra_is_recommended_at_the_same_minimum() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert control_field("Recommends", 1) == pyproject_minimums(project["optional-dependencies"]["metrics"])


def test_build_dependency_on_setuptools_agrees() -> None:
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    build_depends = control_field("Build-Depends", 0)
    assert {k: v for k, v in build_depends.items() if k == "python3-setuptools"} == pyproject_minimums(requires)


def test_the_shipped_packages_are_the_product_and_read_no_source_tree() -> None:
    """Only smtpdcheck and policyd are installed; the development trees
    (tools, testbeds, bench, tests) are not, and no installed module reads a
    file beside the packages (debian/changelog, etc/), which an installed
    copy does not have."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert packages == ["smtpdcheck", "policyd"]
    for package in packages:
        for module in sorted((ROOT / package).rglob("*.py")):
            source = module.read_text()
            assert "parent.parent" not in source, f"{module.relative_to(ROOT)} reads the source tree"
            assert not re.search(r"[\"'/](debian|etc/systemd)\b", source), f"{module.relative_to(ROOT)} reads the source tree"
