"""The import floor: cuda_ext ← quant ← compress ← search. A package imports only packages on its floor or below;
the one exception is the CLI (``compress/cli.py``), the top floor, which imports ``search`` lazily inside a
function for its ``search`` subcommand."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"cuda_ext": 0, "quant": 1, "compress": 2, "search": 3}
LAZY_EXCEPTIONS = {("compress/cli.py", "search")}


def _imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(top-level package, imported at module level?) of every import statement."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module.split(".")[0], top))
            visit(child, inside)

    visit(tree, True)
    return found


def _sources() -> list[Path]:
    return sorted(p for package in FLOORS for p in (ROOT / package).rglob("*.py"))


def test_every_package_has_sources():
    assert {p.relative_to(ROOT).parts[0] for p in _sources()} == set(FLOORS)


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_respect_the_floor(path):
    rel = path.relative_to(ROOT).as_posix()
    floor = FLOORS[rel.split("/")[0]]
    for package, top in _imports(ast.parse(path.read_text(), filename=rel)):
        if package not in FLOORS or FLOORS[package] <= floor:
            continue
        if (rel, package) in LAZY_EXCEPTIONS and not top:
            continue
        raise AssertionError(f"{rel} imports {package} (floor {FLOORS[package]} above its own {floor})")


def test_the_floor_check_catches_a_violation():
    tree = ast.parse("import os\nfrom search.driver import run_search\ndef f():\n    import search.cli\n")
    assert _imports(tree) == [("os", True), ("search", True), ("search", False)]
