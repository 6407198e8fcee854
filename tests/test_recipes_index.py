"""recipes/README.md is the index of the bundled recipes: one row per folder holding a finetune.yaml, each
with the command that runs it, and a ready recipe for every entry point. The bundled recipes teach today's
form: none carries the older per-method sections (`lora:`, `qlora:`, `prefix:`, ...; they still load, for old
recipes: docs/reference.md), and a `dpo:` section holds only the objective's own knobs."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mlflow_finetune_plugin.config.presets import LEGACY_SECTIONS, PRESETS
from mlflow_finetune_plugin.config.schema import DPOConfig
from tests.test_front_door import table_after

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
FOLDERS = sorted(p.parent.name for p in RECIPES.glob("*/finetune.yaml"))


def _rows() -> list[list[str]]:
    return table_after((RECIPES / "README.md").read_text(), "# Recipes")


def test_the_index_has_one_row_per_recipe_folder_with_its_command():
    rows = _rows()
    named = [re.fullmatch(r"\[([\w-]+)\]\(([\w-]+)/finetune\.yaml\)", row[0]) for row in rows]
    assert all(named), [row[0] for row, m in zip(rows, named) if not m]
    assert sorted(m.group(1) for m in named) == FOLDERS
    assert all(m.group(1) == m.group(2) for m in named)
    for (name, *_), row in zip((m.groups() for m in named), rows):
        command = re.fullmatch(r"`mlflow run recipes/([\w-]+) -e ([\w-]+) --backend finetune[^`]*`", row[2])
        assert command and command.group(1) == name and command.group(2) in PRESETS, row


def test_every_entry_point_has_a_ready_recipe_in_the_index():
    used = {re.search(r" -e ([\w-]+) ", row[2]).group(1) for row in _rows()}
    assert set(PRESETS) - used == set()


def test_no_bundled_recipe_uses_the_older_per_method_sections():
    objective_keys = set(DPOConfig.model_fields)
    found = {}
    for name in FOLDERS:
        raw = yaml.safe_load((RECIPES / name / "finetune.yaml").read_text()) or {}
        legacy = [section for section in LEGACY_SECTIONS if section in raw]
        if isinstance(raw.get("dpo"), dict) and set(raw["dpo"]) - objective_keys:
            legacy.append(f"dpo: {sorted(set(raw['dpo']) - objective_keys)}")
        if legacy:
            found[name] = legacy
    assert found == {}, "write these keys under adapter:, model: or data: (docs/reference.md)"
