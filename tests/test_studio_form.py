"""The Train page before "Start" (studio/recipe_form.py, checks.py, files.py): the recipe's fields as the
project resolves them with the reference's words, the `mlflow run` command and the finetune.yaml it amounts to
(round trip through the loader), the check a run makes before it exists, and the workspace's gate on paths. No
training."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from mlflow_finetune_plugin.config.loading import load_recipe, resolved_dict
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.studio import reference
from mlflow_finetune_plugin.studio.checks import check
from mlflow_finetune_plugin.studio.files import Workspace
from mlflow_finetune_plugin.studio.recipe_form import (
    changed_overrides,
    command_line,
    effective_yaml,
    expand_model,
    model_choices,
    project_choices,
    recipe_fields,
    shell_line,
)
from mlflow_finetune_plugin.studio.runs import Launcher
from tests.helpers import REPO, SUPPORT_BOT, chat_rows, register_eval_version, write_project

RECIPES = REPO / "recipes"


def _reference_meaning(key: str, after: str | None = None) -> str:
    """The meaning column of `key`'s row in docs/reference.md (the first after the line `after`), read here
    apart from the page's own parser."""
    lines = (REPO / "docs" / "reference.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(after)) if after else 0
    row = next(ln for ln in lines[start:] if ln.startswith(f"| `{key}` |"))
    return row.replace("\\|", "\x00").split("|")[4].strip().replace("\x00", "|")


def _fields(project, entry):
    return {f.key: f for f in recipe_fields(project, entry)}


def test_fields_are_the_projects_resolved_values_in_the_reference_words():
    fields = _fields(SUPPORT_BOT, "lora")
    lr = fields["train.learning_rate"]
    # the project's
    assert (lr.kind, lr.default, lr.section, lr.accepts) == ("float", 0.004, "train", "float > 0")
    assert lr.help == _reference_meaning("train.learning_rate") == "peak learning rate"
    r = fields["adapter.r"]  # support-bot writes it in its older `lora:` section
    assert (r.kind, r.default, r.section) == ("int", 16, "lora")
    assert r.help == _reference_meaning("adapter.r", "| **lora**")
    assert fields["model.name"].default == "smollm2" and fields["data.max_length"].default == 256
    assert fields["train.epochs"].default == 2.0 and fields["train.batch_size"].default == 2
    fmt = fields["data.format"]
    assert fmt.kind == "choice" and "chat" in fmt.choices and fmt.default == "chat"
    assert fields["data.packing"].choices == ("auto", "true", "false")
    assert fields["data.replay_loss"].default == "kl" and fields["registry.name"].default == "support-bot"
    assert fields["data.packing"].help == _reference_meaning("data.packing")
    # no row in the reference: the schema's own description
    from mlflow_finetune_plugin.config.schema import LoraAdapter

    assert (
        fields["adapter.target_parameters"].help == LoraAdapter.model_fields["target_parameters"].description
    )
    for decided in ("method", "objective", "adapter.type", "project_dir", "data.tasks", "monitor.window"):
        assert decided not in fields

    # the entry point's adapter, its own keys under the reference's group
    prefix = _fields(SUPPORT_BOT, "prefix")
    assert "adapter.r" not in prefix and prefix["adapter.num_virtual_tokens"].section == "prefix"
    assert prefix["adapter.encoder_hidden_size"].help == _reference_meaning("adapter.encoder_hidden_size",
                                                                            "| **prefix**")
    dpo = _fields(RECIPES / "dpo", "dpo")
    assert dpo["dpo.beta"].section == "dpo" and dpo["dpo.beta"].help == _reference_meaning("dpo.beta")


def test_without_the_checkout_the_schema_still_explains_and_no_recipes_are_bundled(monkeypatch, tmp_path):
    monkeypatch.setattr(reference, "checkout_root", lambda: None)  # an installed wheel: no docs/, no recipes/
    fields = _fields(SUPPORT_BOT, "lora")
    from mlflow_finetune_plugin.config.schema import ModelConfig

    assert fields["model.quantization"].help == ModelConfig.model_fields["quantization"].description
    lr = fields["train.learning_rate"]  # the schema's words need no checkout
    assert (lr.help, lr.accepts) == ("peak learning rate", "float > 0")
    write_project(tmp_path / "mine", "method: dpo\n")
    write_project(tmp_path / "group" / "inner", "model: {name: tiny}\n")
    (tmp_path / ".hidden").mkdir()
    write_project(tmp_path / ".hidden" / "x", "{}\n")
    found = project_choices([tmp_path])
    assert [(p.name, p.bundled) for p in found] == [("inner", False), ("mine", False)]
    assert found[1].entry_points[0] == "dpo" and found[0].entry_points[0] == "lora"
    assert set(found[1].entry_points) >= {"lora", "qlora", "grpo", "optimize-prompt"}


def test_bundled_recipes_are_projects():
    bundled = {p.name: p for p in project_choices() if p.bundled}
    assert bundled["support-bot"].path == SUPPORT_BOT.resolve() and bundled["grpo"].entry_points[0] == "grpo"


@pytest.mark.parametrize("recipe,entry,overrides", [
    ("support-bot", "lora", {"model": "tiny", "train.learning_rate": "1e-3", "lora.r": "8",
                             "train.epochs": "2", "data.max_length": "256", "registry.name": "support-bot"}),
    ("support-bot", "prefix", {"adapter.num_virtual_tokens": "8", "data.packing": "auto",
                               "eval.contenders": "[base]"}), ("dpo", "dpo",
                                                               {"dpo.beta": "0.2",
                                                                "model.quantization": "4bit",
                                                                "max_steps": "3"}),
    ("grpo", "grpo", {"grpo.num_generations": "2", "grpo.rewards": "[exact_answer]"}),
])
def test_command_line_and_effective_yaml_give_the_recipe_the_overrides_give(tmp_path, recipe, entry,
                                                                            overrides):
    project = shutil.copytree(RECIPES / recipe, tmp_path / recipe)
    config = {"launcher": "local"}
    params, argv = command_line(project, entry, overrides, backend_config=config, experiment="studio")
    # the line shown is the one Start queues: the page's launcher builds it from the same -P values
    queued = Launcher(tmp_path / "state", backend_config=config).submit(project, entry, params, "studio")
    assert argv == queued.argv and queued.params == params
    head = [sys.executable, "-m", "mlflow", "run", str(Path(project).resolve()), "-e", entry, "--backend",
            "finetune", "--experiment-name", "studio", "--backend-config",
            json.dumps({**config, "detach": True})]
    assert argv[:len(head)] == head
    assert argv[len(head):] == [arg for key, value in params.items() for arg in ("-P", f"{key}={value}")]
    expected = resolved_dict(load_recipe(project, entry, overrides))
    assert resolved_dict(load_recipe(project, entry, params)) == expected  # the command trains that recipe
    if recipe == "support-bot" and entry == "lora":  # equal to the project's own values: left out
        assert params == {"model": "tiny", "train.learning_rate": "1e-3", "lora.r": "8"}
    assert shlex.split(shell_line(argv)) == argv

    text = effective_yaml(project, entry, overrides)
    copy = shutil.copytree(project, tmp_path / "copy")
    (copy / "finetune.yaml").write_text(text)
    again = resolved_dict(load_recipe(copy, entry))
    assert {k: v for k, v in again.items() if k != "project_dir"} == \
        {k: v for k, v in expected.items() if k != "project_dir"}


def test_the_pages_values_become_the_overrides_that_change_something():
    fields = recipe_fields(SUPPORT_BOT, "lora")
    values = {f.key: f.default for f in fields}  # the page as it opens: nothing to pass
    assert changed_overrides(fields, values) == {}
    values.update({"train.learning_rate": "4e-3", "adapter.r": 8, "data.packing": "false",
                   "model.name": "tiny", "adapter.target_modules": ["q_proj", "v_proj"], "data.eval": "",
                   "train.resume": "", "eval.contenders": "[base, fewshot]", "train.seed": "42"})
    overrides = changed_overrides(fields, values)
    assert overrides == {"adapter.r": "8", "data.packing": "false", "model.name": "tiny",
                         "adapter.target_modules": "[q_proj, v_proj]", "data.eval": "null",
                         "eval.contenders": "[base, fewshot]"}
    recipe = load_recipe(SUPPORT_BOT, "lora", overrides)
    assert (recipe.adapter.target_modules, recipe.data.eval, recipe.eval.contenders) == \
        (["q_proj", "v_proj"], None, ["base", "fewshot"])


def _broken_project(root: Path) -> Path:
    rows = [json.dumps(r) for r in chat_rows(12)]
    rows[2] = rows[2][:-7]  # line 3 cut short
    project = write_project(root, "model: {name: tiny}\ndata:\n  max_length: 64\ntrain:\n  max_steps: 2\n"
                                  "  learning_rate: 1.0e-3\n")
    (project / "data" / "train.jsonl").write_text("\n".join(rows) + "\n")
    return project


def test_check_names_the_broken_line_then_passes_with_the_data_summary(tmp_path):
    project = _broken_project(tmp_path / "p")
    result = check(project, "lora", {})
    assert not result.ok and result.recipe_ok
    (bad,) = [p for p in result.problems if p.severity == "error"]
    assert bad.where == "data/train.jsonl:3" and "invalid JSON" in bad.message and "line 3" in bad.fix
    assert "`data/train.jsonl:3`" in result.as_markdown()

    lines = (project / "data" / "train.jsonl").read_text().splitlines()
    lines[2] = json.dumps(chat_rows(1, offset=40)[0])
    (project / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
    result = check(project, "lora", {"data.max_length": "24"})
    assert result.ok and result.recipe_ok and result.format == "chat" and result.rows == {"data.train": 12}
    t = result.token_lengths
    assert 0 < t["min"] <= t["median"] <= t["p95"] <= t["max"] and t["max_length"] == 24
    assert 0 < t["over_max_length"] < 12 and t["max"] > 24  # rows longer than data.max_length, counted
    cut = [p for p in result.problems if p.severity == "warning" and "max_length" in p.message]
    assert cut and cut[0].where.startswith("data/train.jsonl") and "data.max_length" in cut[0].fix
    (few,) = [a for a in result.advice if "few-shot prompting" in a]
    assert few.startswith("data.train: only 12 training rows")
    assert result.as_markdown().startswith("**Ready to start.**")
    # the memory plan the backend makes, on this machine's device (a CPU here)
    assert "Memory plan of tiny on cpu" in result.memory and "**Memory**" in result.as_markdown()


def test_bad_recipe_values_are_problems_naming_the_key(tmp_path):
    project = _broken_project(tmp_path / "p")
    result = check(project, "lora", {"train.learning_rate": "-1", "train.learnin_rate": "0.1"})
    # the data waits for a recipe that loads
    assert not result.ok and not result.recipe_ok and not result.rows
    by_key = {p.key: p for p in result.problems}
    lr = by_key["train.learning_rate"]
    assert lr.where == "train.learning_rate" and "greater than 0" in lr.message and "float > 0" in lr.fix
    assert by_key["train.learnin_rate"].fix == "Rename `train.learnin_rate` to `train.learning_rate`"

    (project / "finetune.yaml").write_text("model: {name: tiny}\ntrain:\n  learning_rate: -1\n")
    (written,) = check(project, "lora", {}).problems
    assert (written.where, written.key) == ("finetune.yaml:3", "train.learning_rate")

    (project / "finetune.yaml").write_text("model: {name: tiny}\n")
    # a combination -e prefix refuses
    (combination,) = check(project, "prefix", {"data.packing": "true"}).problems
    assert combination.where == combination.key == "data.packing"
    assert combination.fix.startswith("Set data.packing: auto")
    assert check(project, "nope", {}).problems[0].where == "-e"


def test_registered_versions_are_models_to_continue(tracking_uri):
    from mlflow import MlflowClient

    from mlflow_finetune_plugin.tags import lineage_tags

    version = register_eval_version({"rougeL": 0.5})  # a LoRA version on the tiny model
    client = MlflowClient()
    client.create_model_version("bot", "runs:/x/model", tags=lineage_tags(method="full", base_model="tiny"))
    choices = model_choices()
    assert [v for _, v in choices[:3]] == ["tiny", "smollm2", "gemma3"]
    assert [v for _, v in choices[3:]] == [f"models:/bot/{version}"]  # the full fine-tune is not continued
    assert expand_model({"model": f"models:/bot/{version}", "max_steps": "2"}) == {
        "max_steps": "2", "model.name": "builtin:tiny-llama", "model.init_adapter": f"models:/bot/{version}"}
    # the command Start runs continues it the same way (it queued the bare models:/ name before)
    params, argv = command_line(SUPPORT_BOT, "lora", {"model.name": f"models:/bot/{version}"})
    assert params == {"model.name": "builtin:tiny-llama", "model.init_adapter": f"models:/bot/{version}"}
    assert argv[-4:] == ["-P", "model.name=builtin:tiny-llama", "-P",
                         f"model.init_adapter=models:/bot/{version}"]
    with pytest.raises(FinetuneError, match="not in the model registry"):
        expand_model({"model.name": "models:/bot/99"})
    with pytest.raises(FinetuneError, match="full fine-tune"):
        expand_model({"model.name": "models:/bot/2"})


def test_workspace_refuses_what_could_leave_its_folders(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text("{}\n")
    started = tmp_path / "started"
    workspace = Workspace(tmp_path / "ws", [started], max_upload_bytes=1000)
    with pytest.raises(FinetuneError, match="outside the folders"):
        workspace.resolve(outside / "secret.jsonl")
    with pytest.raises(FinetuneError, match="outside the folders"):
        workspace.resolve("../outside/secret.jsonl")
    (workspace.root / "link").symlink_to(outside)
    with pytest.raises(FinetuneError, match="outside the folders"):
        workspace.resolve(workspace.root / "link" / "secret.jsonl")
    assert workspace.resolve(SUPPORT_BOT) == SUPPORT_BOT.resolve()
    assert workspace.resolve(started / "p") == started.resolve() / "p"

    upload = tmp_path / "tmp" / "train.jsonl"
    upload.parent.mkdir()
    upload.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(4)))
    for names, match in ((["../x.jsonl"], "may not contain a folder"),
                         (["a/b.jsonl"], "may not contain a folder"), ([".env.jsonl"], "hidden"),
                         (["run.sh"], "not a file type")):
        with pytest.raises(FinetuneError, match=match):
            workspace.save_uploads([upload], names)
    big = tmp_path / "tmp" / "big.jsonl"
    big.write_bytes(b"x" * 1001)
    with pytest.raises(FinetuneError, match="more than the"):
        workspace.save_uploads([upload, big])
    link = tmp_path / "tmp" / "link.jsonl"
    link.symlink_to(outside / "secret.jsonl")
    with pytest.raises(FinetuneError, match="not a regular file"):
        workspace.save_uploads([link])
    assert not (workspace.root / "uploads").exists() or not any((workspace.root / "uploads").iterdir())
    with pytest.raises(FinetuneError, match="outside the folders"):
        workspace.check_request(SUPPORT_BOT, {"data.train": str(outside / "secret.jsonl")})
    with pytest.raises(FinetuneError, match="outside the folders"):
        workspace.check_request(SUPPORT_BOT, {"data": "../../../outside.jsonl"})
    assert workspace.check_request(SUPPORT_BOT, {"model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                 "data.eval": "hf:org/name:test", "data.replay": "true"})


def test_uploads_become_a_project_the_loader_accepts(tmp_path):
    workspace = Workspace(tmp_path / "ws", [])
    sent = tmp_path / "tmp"
    sent.mkdir()
    (sent / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(8)))
    (sent / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(3, offset=20)))
    uploads = workspace.save_uploads([sent / "mine.jsonl", sent / "held.jsonl"])
    assert uploads.parent == workspace.root / "uploads" and sorted(os.listdir(uploads)) == ["held.jsonl",
                                                                                            "mine.jsonl"]
    with pytest.raises(FinetuneError, match="may not contain a folder"):
        workspace.project_from_uploads(uploads, SUPPORT_BOT, "../mine.jsonl", None)
    with pytest.raises(FinetuneError, match="no training file of that name"):
        workspace.project_from_uploads(uploads, SUPPORT_BOT, "other.jsonl", None)

    project = workspace.project_from_uploads(uploads, SUPPORT_BOT, "mine.jsonl", "held.jsonl")
    assert project.parent == workspace.root / "projects"
    recipe = load_recipe(project, "lora", {"model": "tiny"})
    assert recipe.data.train == str(project / "data" / "mine.jsonl")
    assert recipe.data.eval == str(project / "data" / "held.jsonl")
    assert recipe.adapter.r == 16 and recipe.train.learning_rate == 0.004  # the base project's recipe
    assert recipe.registry.name == "support-bot-mine"  # not the base's registered model
    alone = workspace.project_from_uploads(uploads, SUPPORT_BOT, "mine.jsonl", None)
    recipe = load_recipe(alone, "lora")
    assert recipe.data.eval is None and recipe.data.eval_split == 0.1
    assert check(alone, "lora", {"model": "tiny"}).rows == {"data.train": 8}
