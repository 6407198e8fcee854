"""One source for each recipe key's help (issue 80): the schema's field descriptions. docs/reference.md's key
tables are written from them by docs/recipe_keys.py, and the studio reads them through config/keys.py."""

from __future__ import annotations

import importlib.util

from mlflow_finetune_plugin.config.keys import key_help, tables
from mlflow_finetune_plugin.studio.reference import reference_row
from tests.helpers import REPO


def _generator():
    spec = importlib.util.spec_from_file_location("recipe_keys", REPO / "docs" / "recipe_keys.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_tables_are_the_schemas():
    generator = _generator()
    text = generator.DOC.read_text(encoding="utf-8")
    for name in tables():  # every table has its place in the file
        assert generator.START.format(name=name) in text and generator.END.format(name=name) in text, name
    assert generator.rendered(text) == text, (
        "docs/reference.md's recipe key tables differ from the schema's descriptions; regenerate them with "
        "`python docs/recipe_keys.py` (describe a key in its Field(description=...), not in the file)")


def test_every_key_is_described_in_the_schema():
    undescribed = [f"{name}: {row.key}" for name, rows in tables().items() for row in rows if not row.help]
    assert not undescribed, f"recipe keys without a Field(description=...): {undescribed}"


def test_help_gives_type_default_and_meaning():
    lr = key_help("train.learning_rate")
    assert (lr.type, lr.default, lr.help) == ("float > 0", "0.0002", "peak learning rate")
    assert key_help("adapter.encoder_hidden_size", "prefix").help != key_help("adapter.encoder_hidden_size",
                                                                               "prompt").help
    assert key_help("adapter.r", "prefix") is None and key_help("no.such") is None
    assert key_help("model.name").default == "empty (= `tiny`)"  # json_schema_extra's default_text
    assert key_help("data.format").type.endswith("`unpaired_preference`")  # the code's choices, all of them
    assert reference_row("dpo.beta") == ("float > 0", "0.1", key_help("dpo.beta").help)
    assert key_help("registry.promote_if.metric").default == "required"
