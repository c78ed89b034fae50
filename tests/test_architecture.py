"""The code's shape, held as tests: short functions, no private names across modules, a curated API.

These are the rules ``docs/architecture.md`` states; a change that breaks one should say why in
the docs rather than slip through.
"""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import pytest

import cnf

PACKAGE = Path(cnf.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 60


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_is_longer_than_60_lines(path):
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert not long, f"split these into functions with one job each: {long}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_is_imported_from_another_module(path):
    private = [
        f"{alias.name} from {node.module}"
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.ImportFrom)
        and (node.level > 0 or (node.module or "").split(".")[0] == "cnf")  # ours, not numpy's
        for alias in node.names
        if alias.name.startswith("_") and alias.name != "__version__"
    ]
    assert not private, f"make these public in their module or keep them local: {private}"


def test_the_public_api_is_sorted_and_complete():
    assert cnf.__all__ == sorted(cnf.__all__)
    for name in cnf.__all__:
        assert not name.startswith("_") and hasattr(cnf, name), name
    # mutable registries and recipe factories stay in their modules
    for name in ("TABLEAUS", "ACTIVATIONS", "digits_model", "mnist_model", "DIGITS_DENSE"):
        assert name not in cnf.__all__, name


def test_version_comes_from_the_installed_metadata():
    assert cnf.__version__ == importlib.metadata.version("cnf")
