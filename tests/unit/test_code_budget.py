"""The size budget of the product code (issue 18): no function over 60 lines, no class
over 250, outside tests. Ruff's C901 holds the complexity budget; this holds the size,
which no linter we run measures. A function or class past it does more than one job:
split it by meaning, not at line 60."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("server", "adapters_registry", "clients", "loadtests")
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 250


def _over_budget(path: Path, root: Path = ROOT) -> list[str]:
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            limit = MAX_FUNCTION_LINES
        elif isinstance(node, ast.ClassDef):
            limit = MAX_CLASS_LINES
        else:
            continue
        lines = (node.end_lineno or node.lineno) - node.lineno + 1
        if lines > limit:
            found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {lines} lines")
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_or_class_over_budget(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    over = [line for f in files for line in _over_budget(f)]
    assert over == []


def test_the_budget_sees_an_oversized_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    big = tmp_path / "big.py"
    big.write_text(f"def big() -> None:\n{body}\n")
    assert _over_budget(big, tmp_path) == [f"big.py:1 big: {MAX_FUNCTION_LINES + 1} lines"]
