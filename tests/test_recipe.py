"""Recipe loading: strict keys, every error at once with its place, overrides, resolution."""

from __future__ import annotations

import pytest
import yaml

from mlflow_finetune_plugin.config.loading import flat_params, load_recipe, recipe_hash, to_yaml
from mlflow_finetune_plugin.errors import RecipeError
from tests.helpers import REPO, chat_rows, write_project


def _project(tmp_path, text):
    return write_project(tmp_path / "proj", text, rows=chat_rows(3))


def test_defaults_and_resolution(tmp_path):
    proj = _project(tmp_path, "train:\n  max_steps: 5\n")
    recipe = load_recipe(proj)
    assert recipe.method == "lora"
    assert recipe.model.name is None  # the built-in tiny model
    assert recipe.train.max_steps == 5
    assert recipe.data.train == str(proj / "data" / "train.jsonl")  # made absolute against the project
    assert recipe.registry.name == "proj"  # default: the folder's name
    assert recipe.adapter.target_modules == "all-linear"


def test_all_errors_reported_at_once_with_lines_and_suggestions(tmp_path):
    proj = _project(tmp_path,
                    "train:\n  lerning_rate: 1e-4\n  batch_size: -3\nlora:\n  r: abc\ncolour: blue\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(proj)
    problems = info.value.problems
    assert len(problems) == 4
    text = str(info.value)
    assert "line 2: train.lerning_rate: unknown key" in text and "Did you mean `learning_rate`?" in text
    assert "learning_rate, lr_scheduler" in text  # the valid keys are listed
    assert "line 3: train.batch_size" in text and "greater than 0" in text
    assert "line 5: lora.r" in text
    assert "line 6: colour: unknown key" in text
    assert str(proj / "finetune.yaml") in text


def test_overrides_typed_short_forms_and_errors_point_at_the_flag(tmp_path):
    proj = _project(tmp_path, "train:\n  max_steps: 5\n")
    recipe = load_recipe(proj, method="lora", overrides={
        "max_steps": "20", "lora.r": "8", "train.learning_rate": "1e-3",
        "lora.target_modules": "[q_proj,v_proj]", "registered_model": "my-bot", "data.packing": "true"})
    assert recipe.train.max_steps == 20
    assert recipe.adapter.r == 8
    assert recipe.train.learning_rate == pytest.approx(1e-3)
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    assert recipe.registry.name == "my-bot"
    assert recipe.data.packing is True
    with pytest.raises(RecipeError) as info:
        load_recipe(proj, overrides={"max_steps": "many", "lora.alpah": "3"})
    text = str(info.value)
    assert "-P max_steps=many: train.max_steps" in text
    assert "-P lora.alpah=3: lora.alpah: unknown key" in text and "Did you mean `alpha`?" in text


@pytest.mark.parametrize("bits", ["3", "4bit", "x"])
def test_a_bad_qlora_bits_is_one_problem_with_its_fix(tmp_path, bits):
    proj = _project(tmp_path, "train:\n  max_steps: 5\n")
    assert load_recipe(proj, method="qlora", overrides={"qlora.bits": "8"}).model.quantization == "8bit"
    with pytest.raises(RecipeError) as info:
        load_recipe(proj, method="qlora", overrides={"qlora.bits": bits})
    assert info.value.problems == ["qlora.bits: must be 4 or 8 (or set model.quantization: 4bit | 8bit)"]


def test_unknown_method_and_missing_data(tmp_path):
    proj = write_project(tmp_path / "p", "data:\n  eval: data/missing.jsonl\n", rows=None)
    with pytest.raises(RecipeError) as info:
        load_recipe(proj, method="lorra")
    text = str(info.value)
    assert "unknown method 'lorra'" in text and "Did you mean `lora`?" in text
    assert "data.train: file not found: data/train.jsonl" in text
    assert "data.eval: file not found: data/missing.jsonl" in text


def test_broken_yaml_names_the_line(tmp_path):
    proj = _project(tmp_path, "train:\n  max_steps: [1, 2\nlora: {}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(proj)
    assert "invalid YAML" in str(info.value) and "line " in str(info.value)


def test_resolved_recipe_round_trips_and_logs_only_the_active_method(tmp_path):
    proj = _project(tmp_path, "lora:\n  r: 4\n")
    recipe = load_recipe(proj)
    params = flat_params(recipe)
    assert params["adapter.r"] == "4" and params["method"] == "lora" and params["train.batch_size"] == "8"
    assert (
        params["adapter.type"] == "lora"
        and params["objective"] == "sft"
        and params["model.quantization"] == "none"
    )
    assert not any(k.startswith("project_dir") for k in params)
    dumped = yaml.safe_load(to_yaml(recipe))
    assert dumped["adapter"]["r"] == 4 and "lora" not in dumped and "dpo" not in dumped
    again = load_recipe(proj)
    assert recipe_hash(again) == recipe_hash(recipe)
    assert recipe_hash(load_recipe(proj, overrides={"lora.r": "8"})) != recipe_hash(recipe)


def test_every_shipped_recipe_loads():
    recipes = sorted(p.parent for p in (REPO / "recipes").glob("*/finetune.yaml"))
    assert recipes, "no recipes shipped"
    for folder in recipes:
        recipe = load_recipe(folder)
        assert recipe.registry.name
