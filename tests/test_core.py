"""The core is built in smtpdcheck/core.py and nowhere else.

Both commands, the tests and the benchmarks take it from :mod:`smtpdcheck.core`,
so a new part or setting is wired in once; a test that needs its own network
or DNS gives it through the seams there (``connect``, ``lookups``) instead of
building parts by hand or swapping them in a built core.
"""

from __future__ import annotations

import ast
from pathlib import Path

import trio

from smtpdcheck.core import CoreSettings, build_core
from testbeds.virtual import VirtualDNS, VirtualNet

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"Resolver", "Prober", "Checker"}


def _sources() -> list[Path]:
    return sorted(p for d in ("smtpdcheck", "policyd", "bench", "tests") for p in (ROOT / d).rglob("*.py"))


def _offences(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in PARTS:
            found.append(f"{node.lineno}: builds a {node.func.id}")
        targets = node.targets if isinstance(node, ast.Assign) else []
        for target in targets:
            if (
                isinstance(target, ast.Attribute)
                and target.attr in {"resolver", "prober", "checker", "lookups"}
                and not (isinstance(target.value, ast.Name) and target.value.id == "self")
            ):
                found.append(f"{node.lineno}: swaps the {target.attr} of a built core")
    return found


def test_the_core_is_built_in_core_py_only() -> None:
    core = ROOT / "smtpdcheck" / "core.py"
    offences = {
        str(path.relative_to(ROOT)): found
        for path in _sources()
        if path != core and (found := _offences(path))
    }
    assert offences == {}


def test_the_scan_sees_what_it_forbids(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("core.checker.resolver = dns\nresolver = Resolver(nursery)\nself.checker = checker\n")
    assert _offences(sample) == ["1: swaps the resolver of a built core", "2: builds a Resolver"]


async def test_lookups_given_to_the_core_answer_the_checks_and_the_decisions(nursery: trio.Nursery) -> None:
    dns = VirtualDNS()
    core = build_core(nursery, CoreSettings(), connect=VirtualNet(nursery).connect, lookups=dns)
    assert core.lookups is dns and core.checker.resolver is dns
    assert core.resolver is not dns  # the real one stays, for --stop names and statistics
