"""The import graph points one way: tests and benchmarks build on the product, never back.

The installed packages (``smtpdcheck``, ``policyd``) must run without the
repository around them, so they import none of the development trees; the
benchmarks share the test beds with the tests (``testbeds``) rather than
reaching into the test suite; the command-line module does not depend on
the daemon.  Read from the source (every ``import``, at any depth, relative
ones resolved), so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Top-level trees and the trees each may never import.
FORBIDDEN: dict[str, frozenset[str]] = {
    "smtpdcheck": frozenset({"policyd", "tests", "bench", "testbeds", "tools"}),
    "policyd": frozenset({"tests", "bench", "testbeds", "tools"}),
    "testbeds": frozenset({"tests", "bench", "tools"}),
    "bench": frozenset({"tests", "tools"}),
    "tools": frozenset({"tests", "bench"}),
}


def imported_trees(path: Path, package: str) -> set[str]:
    """The top-level names ``path`` (a module of ``package``, dotted) imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                found.add(base[0] if base else "")
            elif node.module:
                found.add(node.module.partition(".")[0])
    return found


def _modules(tree: str) -> list[tuple[Path, str]]:
    root = ROOT / tree
    return [
        (path, ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1]))
        for path in sorted(root.rglob("*.py"))
    ]


@pytest.mark.parametrize("tree", sorted(FORBIDDEN))
def test_imports_point_one_way(tree: str) -> None:
    modules = _modules(tree)
    assert modules or tree == "tools", f"{tree}/ has no modules: the check would prove nothing"
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported_trees(path, package) & FORBIDDEN[tree])
        for path, package in modules
    }
    assert {path: names for path, names in wrong.items() if names} == {}


def test_the_reader_sees_imports_at_any_depth(tmp_path: Path) -> None:
    """The check itself: a nested, a dotted and a relative import are all found."""
    module = tmp_path / "m.py"
    module.write_text(
        "import os.path\n"
        "def f():\n"
        "    from tests.support import virtual\n"
        "    import bench.run\n"
        "from . import sibling\n"
        "from .. import parent\n"
    )
    assert imported_trees(module, "policyd.sub") == {"os", "tests", "bench", "policyd"}


def test_the_package_docstring_names_every_module() -> None:
    """smtpdcheck/__init__.py is the map of the core: a module it omits is one nobody finds."""
    import smtpdcheck

    assert smtpdcheck.__doc__ is not None
    modules = {path.stem for path in (ROOT / "smtpdcheck").glob("*.py")} - {"__init__"}
    assert {m for m in modules if f":mod:`smtpdcheck.{m}`" not in smtpdcheck.__doc__} == set()


#: The size past which a product module is split into modules named for what they hold.
MAX_MODULE_LINES = 550


@pytest.mark.parametrize("package", ["smtpdcheck", "policyd"])
def test_no_product_module_outgrows_one_concern(package: str) -> None:
    sizes = {path.name: len(path.read_text().splitlines()) for path in sorted((ROOT / package).glob("*.py"))}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}
