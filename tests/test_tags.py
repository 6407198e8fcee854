"""Every `finetune.*` MLflow tag name is a constant in `mlflow_finetune_plugin/tags.py`, and only there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.tags import lineage_tags

REPO = Path(__file__).resolve().parents[1]
# A tag name, or the start of one built in an f-string (f"finetune.job.{key}"); finetune.yaml is the recipe's
# file.
TAG_LITERAL = re.compile(r"^finetune\.(?!yaml\b)")

# Files of the core refactor (issue 15) still spelling tag names out; they switch to `tags` and this list
# empties. Nothing is ever added to it.
NOT_YET_ON_TAGS_PY = ()  # emptied: every module uses the constants


def tag_literals(source: str, where: str) -> list[str]:
    """`where:line: 'literal'` for each string literal (f-string parts included) that starts a `finetune.`
    name."""
    return [f"{where}:{node.lineno}: {node.value!r}" for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and TAG_LITERAL.match(node.value)]


def test_tag_names_are_spelled_only_in_tags_py():
    found = []
    for package in ("mlflow_finetune_plugin", "mlflow_finetune_plugin.serving.playground"):
        for path in sorted((REPO / package).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            if relative == "mlflow_finetune_plugin/tags.py" or relative.startswith(NOT_YET_ON_TAGS_PY):
                continue
            found += tag_literals(path.read_text(encoding="utf-8"), relative)
    assert not found, ("tag names spelled out; use the constants in "
                       "mlflow_finetune_plugin/tags.py:\n") + "\n".join(found)


def test_the_check_sees_plain_and_f_string_literals():
    source = 'A = "finetune.method"\nB = f"finetune.job.{key}"\nC = "finetune.yaml"\nD = "finetune_x"\n'
    assert tag_literals(source, "m.py") == ["m.py:1: 'finetune.method'", "m.py:2: 'finetune.job.'"]


def test_constants_are_distinct_finetune_names():
    names = {k: v for k, v in vars(tags).items() if k.isupper() and isinstance(v, str)}
    assert all(v.startswith(tags.PREFIX) for v in names.values())
    values = [v for k, v in names.items() if k != "PREFIX"]
    assert len(values) == len(set(values)), "two constants share a tag name"
    assert set(tags.LINEAGE.values()) <= set(values) and set(tags.JOB_KEYS.values()) <= set(values)


def test_lineage_tags_uses_the_constants_and_refuses_unknown_keys():
    assert lineage_tags(method="lora", base_model="tiny", base_revision=None, precision="") == {
        tags.METHOD: "lora", tags.BASE_MODEL: "tiny"}
    with pytest.raises(TypeError, match="base_modle"):
        lineage_tags(base_modle="tiny")
