"""The pre-flight check the backend runs before any MLflow run exists (`backend.resolve_entry_point`): every
entry point on every bundled recipe, `data.format: auto` resolved per file, and data that training would
refuse refused here first. Pre-flight only (tiny model, no training)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import ExecutionException

from mlflow_finetune_plugin.backend import FinetuneBackend, resolve_entry_point
from mlflow_finetune_plugin.config.checks import OBJECTIVE_FORMATS
from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.config.presets import PRESETS
from mlflow_finetune_plugin.data import splits
from mlflow_finetune_plugin.data.read import detect_format, read_records
from mlflow_finetune_plugin.errors import FinetuneError, RecipeError
from tests.helpers import REPO, SUPPORT_BOT, chat_rows, jsonl

RECIPES = sorted(p.parent.name for p in (REPO / "recipes").glob("*/finetune.yaml"))


def _data_kind(name: str) -> str:
    """What the recipe's own data is: `mixture`, or the format of its training rows."""
    recipe = load_recipe(REPO / "recipes" / name)
    if recipe.data.tasks:
        return "mixture"
    return detect_format(read_records(recipe.data.train), recipe.data.train)


def _refusal(kind: str, entry_point: str, batch: int, teacher: bool = False, images: bool = False,
             documents: bool = False) -> str | None:
    """None where the data allows the entry point; else the message (a regex) that must say why not. `batch`
    is the recipe's completions per optimizer step, which GRPO's 8 samples per prompt must divide. `teacher`:
    the recipe
    names one (distill.teacher), whose answers to its prompts any single-set sft entry point trains on.
    `images`: its rows have images, which prefix, prompt and IA3 adapters do not train on. `documents`: it
    reads data.documents, whose question rows train with sft."""
    preset = PRESETS[entry_point]
    if documents and not preset.trains:
        return f"data.documents: -e {entry_point} trains no weights"
    if documents and preset.objective != "sft":
        return "data.documents: question rows from documents train with the sft objective"
    if images and preset.adapter in ("prefix", "prompt",
                                     "ia3") and kind in OBJECTIVE_FORMATS[preset.objective]:
        return rf"-e {entry_point}: the {preset.adapter} adapter does not train on rows with images"
    if preset.distill and not teacher:
        return "distill.teacher: -e distill needs a teacher"
    if not preset.trains and (kind == "mixture" or teacher):  # -e optimize-prompt: a prompt for one data set
        return "optimize-prompt searches a prompt for one data set" if kind == "mixture" else \
            "-e optimize-prompt trains no weights"
    if kind == "mixture":
        return None if preset.objective == "sft" else "mixtures train with the sft objective"
    if preset.mixture:
        return "a mixture needs at least two"
    if teacher:
        return None if preset.objective == "sft" else "the teacher's answers train with the sft objective"
    if kind in OBJECTIVE_FORMATS[preset.objective] and not (preset.objective == "grpo" and batch % 8):
        return None
    if preset.objective == "grpo":  # the reward functions' columns are checked first (or GRPO's batch shape)
        return (r"reward 'exact_answer' needs the column answer|grpo\.num_generations \(\d+\) must divide"
                r"|train\.batch_size: auto is not taken with objective: grpo")
    last = OBJECTIVE_FORMATS[preset.objective][-1]
    return rf"data\.train is {kind} data, but the `{entry_point}` method trains on .*{last} rows"


def _tiny_model(recipe) -> str:
    """The tiny model a recipe's data suits: its own tiny vision-language model where its rows have images."""
    from mlflow_finetune_plugin.models import tiny_vision

    return recipe.model.name if tiny_vision.family_of(recipe.model.name) else "tiny"


# Every other recipe (by name; support-bot, README command 1's, always) in the default run, the rest under
# `-m stress`: the whole set took about 3 of CI's 45 minutes; both halves passed on 2026-11-29.
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.stress] if i % 2 and n != "support-bot"
                                               else []) for i, n in enumerate(RECIPES)])
def test_every_entry_point_on_every_bundled_recipe(name, capsys):
    """What `mlflow run recipes/NAME -e EP --backend finetune -P model=tiny` checks before a run exists: every
    entry point the recipe's data allows passes, with the preset's adapter and objective; the others are
    refused saying why. `-e prefix` / `-e prompt` on a recipe that packs for LoRA train unpacked, with a
    note."""
    kind = _data_kind(name)
    own = load_recipe(REPO / "recipes" / name)
    train, teacher = own.train, bool(own.distill and own.distill.teacher)
    tiny = {"model": _tiny_model(own)}
    images = tiny["model"] != "tiny"
    allowed = []
    for entry_point, preset in PRESETS.items():
        batch = 1 if train.batch_size == "auto" else train.batch_size  # auto: chosen when a run starts
        refusal = _refusal(kind, entry_point, batch * train.grad_accum, teacher, images,
                           bool(own.data.documents))
        if refusal is None:
            recipe, command = resolve_entry_point(str(REPO / "recipes" / name), entry_point, tiny)
            assert command is None and recipe.method == entry_point
            assert (recipe.adapter.type, recipe.objective) == (preset.adapter, preset.objective)
            assert recipe.data.packing is not True or recipe.adapter.type not in ("prefix", "prompt")
            allowed.append(entry_point)
            continue
        with pytest.raises((RecipeError, FinetuneError)) as info:
            resolve_entry_point(str(REPO / "recipes" / name), entry_point, tiny)
        assert re.search(refusal, str(info.value)), f"-e {entry_point} on {name}: {info.value}"
    # each recipe runs with its own entry point, and every chat recipe with every single-set sft one
    assert load_recipe(REPO / "recipes" / name).method in allowed
    if kind == "chat":
        every = {"lora", "qlora", "adapter", "full"} | (set() if images else {"prefix", "prompt", "ia3"})
        assert every <= set(allowed)
    if kind == "mixture":
        assert {"multitask", "ia3", "prefix"} <= set(allowed)


def test_prefix_on_a_packed_recipe_trains_unpacked_with_a_note(capsys, tmp_path):
    """A recipe that packs its rows for LoRA (`packing: true`): `-e prefix` turns that off with one line
    saying why; asking for both in one place (`-P data.packing=true`) is still refused. The bundled recipes
    say `auto`, which never packs prefix or prompt tuning, so no note is needed there."""
    assert load_recipe(SUPPORT_BOT, method="prefix").data.packing == "auto"
    assert "data.packing" not in capsys.readouterr().err
    packed = tmp_path / "support-bot"
    shutil.copytree(SUPPORT_BOT, packed, ignore=shutil.ignore_patterns("mlruns", "*.db"))
    yaml_file = packed / "finetune.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("packing: auto ", "packing: true "))
    assert load_recipe(packed).data.packing is True
    for method, what in (("prefix", "the prefix is"), ("prompt", "virtual tokens are")):
        assert load_recipe(packed, method=method).data.packing is False
        note = [line for line in capsys.readouterr().err.splitlines() if "data.packing" in line]
        assert note == [
            f"Note: data.packing is off for the {method} adapter ({what} prepended once per row, and a "
            "packed row holds several conversations); finetune.yaml packs rows for lora."]
    with pytest.raises(RecipeError, match="data.packing: true cannot be used with the prefix adapter"):
        load_recipe(packed, method="prefix", overrides={"data.packing": "true"})


def test_mlproject_entry_points_run_a_preset_that_passes(capsys):
    """An MLproject's own entry points (support-bot's `main`) are its commands, each running a preset entry
    point whose pre-flight is the one above."""
    checked = 0
    for mlproject in sorted((REPO / "recipes").glob("*/MLproject")):
        for entry_point in yaml.safe_load(mlproject.read_text())["entry_points"]:
            if entry_point in PRESETS:  # --backend finetune runs the preset (checked above)
                continue
            recipe, command = resolve_entry_point(str(mlproject.parent), entry_point, {})
            method = re.search(r"--method (\w+)", command).group(1)
            assert recipe is None and method in PRESETS
            resolve_entry_point(str(mlproject.parent), method,
                                {"model": _tiny_model(load_recipe(mlproject.parent))})
            checked += 1
    assert checked  # support-bot's `main`


# ---------------------------------------------------------------- data.format: auto, per file


def _sharegpt(path: Path, n: int = 60) -> str:
    """The support-bot training rows as ShareGPT (`conversations` of {from, value})."""
    tags = {"system": "system", "user": "human", "assistant": "gpt"}
    rows = [json.loads(line) for line in (SUPPORT_BOT / "data" / "train.jsonl").read_text().splitlines()[:n]]
    return jsonl(path, [{"conversations": [{"from": tags[m["role"]], "value": m["content"]}
                                           for m in r["messages"]]} for r in rows])


def test_auto_detects_each_file_on_its_own(tmp_path, capsys):
    """A ShareGPT train file with the recipe's chat eval file (issue 29): each file is read in its own format,
    by the pre-flight and by the function training reads the data with, and one line says which."""
    train = _sharegpt(tmp_path / "sharegpt.jsonl")
    recipe, _ = resolve_entry_point(str(SUPPORT_BOT), "lora", {"model": "tiny", "data": train,
                                                               "data.format": "auto"})
    assert ("Data formats, detected per file: data.train sharegpt.jsonl: sharegpt, data.eval eval.jsonl: chat"
            in capsys.readouterr().err)
    data = splits.load_splits(recipe)
    assert data.formats == {"data.train": "sharegpt", "data.eval": "chat"} and data.fmt == "sharegpt"
    assert data.train[0]["messages"][-1]["role"] == "assistant" and data.eval[0]["messages"][0]["role"] in (
        "system", "user")


def test_dataset_inputs_carry_the_format_of_each_file(tmp_path, tracking_uri):
    train = _sharegpt(tmp_path / "sharegpt.jsonl", n=8)
    recipe = load_recipe(SUPPORT_BOT, overrides={"model": "tiny", "data": train, "data.format": "auto"})
    with mlflow.start_run() as run:
        tags = splits.log_inputs(recipe, splits.load_splits(recipe))
    inputs = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    formats = {i.dataset.name: {t.key: t.value for t in i.tags}["format"] for i in inputs}
    assert formats == {"sharegpt": "sharegpt", "eval": "chat", "replay": "text"}  # the recipe replays prose
    assert tags["finetune.data_format"] == "sharegpt"


def _submit(params: dict, tracking_uri: str, project: Path = SUPPORT_BOT):
    exp_id = mlflow.set_experiment("preflight").experiment_id
    return FinetuneBackend().run(str(project), "lora", params, None, {"SYNCHRONOUS": True}, tracking_uri,
                                 exp_id)


def _no_runs() -> bool:
    client = MlflowClient()
    return not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_bad_row_in_a_detected_eval_file_is_refused_before_any_run(tmp_path, tracking_uri):
    """The eval file is detected as chat on its own (the train file is ShareGPT) and its bad row is named by
    file and line, by the backend, before the run is created."""
    train = _sharegpt(tmp_path / "sharegpt.jsonl")
    rows = chat_rows(6)
    rows[2]["messages"][0]["role"] = "robot"
    held_out = jsonl(tmp_path / "eval.jsonl", rows)
    with pytest.raises(ExecutionException) as info:
        _submit({"model": "tiny", "data": train, "data.eval": held_out, "data.format": "auto"}, tracking_uri)
    assert f"{held_out}:3: messages[0]: unknown role 'robot'" in str(info.value)
    assert "nothing was started" in str(info.value)
    assert _no_runs()


def test_data_that_training_could_not_mix_is_refused_before_any_run(tmp_path, tracking_uri):
    """Rows that pass the row checks one file at a time but that training cannot read together (a task whose
    messages carry per-turn weights mixed with one whose messages do not) stop the backend before a run
    exists."""
    weighted = chat_rows(8)
    for row in weighted:
        row["messages"][-1]["weight"] = 1
    jsonl(tmp_path / "data" / "a.jsonl", weighted)
    jsonl(tmp_path / "data" / "b.jsonl", chat_rows(8, 20))
    (tmp_path / "finetune.yaml").write_text("method: multitask\ndata:\n  max_length: 64\n  tasks:\n"
                                            "    a: {train: data/a.jsonl}\n    b: {train: data/b.jsonl}\n")
    with pytest.raises(ExecutionException) as info:
        _submit({"model": "tiny"}, tracking_uri, tmp_path)
    text = str(info.value)
    assert "nothing was started" in text and "the tasks' rows cannot be mixed" in text and "a.jsonl" in text
    assert _no_runs()


def test_reference_answers_longer_than_the_generation_budget_are_named_before_the_run(capsys):
    """A held-out answer longer than eval.max_new_tokens would be cut short for every contender and score
    lower than it should: the pre-flight says how many of the scored references are, and the value that covers
    them."""
    resolve_entry_point(str(SUPPORT_BOT), "lora", {"model": "tiny", "eval.max_new_tokens": "8",
                                                   "eval.max_examples": "12"})
    err = capsys.readouterr().err
    found = re.search(r"data\.eval: (\d+) of the 12 reference answers scored after training are longer than "
                      r"eval\.max_new_tokens 8 \(up to (\d+) tokens\).*-P eval\.max_new_tokens=(\d+)", err)
    assert found, err
    assert 0 < int(found[1]) <= 12 and int(found[3]) == int(found[2]) + 8 > 8
    resolve_entry_point(str(SUPPORT_BOT), "lora", {"model": "tiny", "eval.max_new_tokens": found[3],
                                                   "eval.max_examples": "12"})
    assert "reference answers scored after training" not in capsys.readouterr().err
