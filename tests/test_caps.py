"""Honest caps: no function or method in the package over 100 lines, so a page or a pipeline reads in parts
(the studio's and the playground's pages are split by tab and by part into module functions). The module cap
(500 lines) and the floors are tests/test_layers.py's."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 100
PACKAGE = REPO / "mlflow_finetune_plugin"


def _long_functions() -> dict[str, int]:
    long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(REPO).as_posix()}:{node.lineno} {node.name}"] = lines
    return long


def test_no_function_is_over_100_lines():
    long = _long_functions()
    assert not long, (f"functions over {MAX_FUNCTION_LINES} lines (split them into module "
                      "functions): ") + ", ".join(
        f"{name} ({n} lines)" for name, n in sorted(long.items(), key=lambda kv: -kv[1]))


def test_the_code_passes_the_linter():
    """`ruff check` over the repository with pyproject.toml's rules, E501 included: no line over 110
    characters (the package, its tests, benchmarks, recipes' scripts and docs' generators alike)."""
    import subprocess
    import sys

    import pytest

    ruff = [sys.executable, "-m", "ruff"]
    if subprocess.run([*ruff, "--version"], capture_output=True).returncode != 0:
        pytest.fail("ruff is not installed: it comes with the test extras (pip install -e '.[test]')")
    out = subprocess.run([*ruff, "check", "--no-cache", str(REPO)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
