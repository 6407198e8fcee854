"""Preference tuning with images (`-e dpo`, `-e kto`) on the tiny random vision-language models, from
recipes/vision-colors-dpo: TRL's vision collators get the processor and the rows' images, the images reach the
model's vision tower in every training step, the adapter is LoRA on the language model only, the held-out
pairs are scored with their images, and the tuned model prefers the right colour of a shape it has not
seen."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from mlflow_finetune_plugin.errors import FinetuneError
from tests.helpers import REPO, train_in_process

RECIPE = REPO / "recipes" / "vision-colors-dpo"
QUICK = {"train.max_steps": 3, "train.batch_size": 4, "train.logging_steps": 1, "train.save_steps": 3,
         "eval.max_examples": 2, "eval.max_new_tokens": 2, "eval.fewshot_k": 1, "eval.traces": False}
# Short held-out evaluation for the longer runs: their point is the preference margins of all 24 held-out
# pairs.
SHORT_EVAL = {"eval.max_examples": 2, "eval.max_new_tokens": 2, "eval.fewshot_k": 1, "eval.traces": False,
              "train.save_steps": 1000}


@pytest.fixture
def towers(monkeypatch):
    """What the base model the run loads sees: `calls`, one entry per forward pass of its vision tower
    (whether gradients were on, i.e. a training step, and how many images came in), and `targets`, the
    language model's linear layers (`models.vision.lora_target_modules`)."""
    import torch

    from mlflow_finetune_plugin.models import vision
    from mlflow_finetune_plugin.train import pipeline

    seen = {"calls": [], "targets": None}
    load = pipeline.load_base_model

    def loading(*args, **kwargs):
        model = load(*args, **kwargs)
        seen["targets"] = vision.lora_target_modules(model)
        tower = model.get_submodule(vision.vision_modules(model)[0])
        tower.register_forward_hook(lambda module, inputs, output: seen["calls"].append(
            (torch.is_grad_enabled(), (inputs[0] if inputs else next(iter(output.values()))).shape[0])))
        return model

    monkeypatch.setattr(pipeline, "load_base_model", loading)
    return seen


def _registered(name: str):
    version = mlflow.MlflowClient().get_model_version_by_alias(name, "challenger")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}"))
    return version, json.loads(next(local.rglob("adapter_config.json")).read_text())


def _trained_with_images(towers, steps: int) -> None:
    """Every training step's forward passes went through the vision tower with images (policy and
    reference)."""
    training = [n for grad, n in towers["calls"] if grad]
    assert len(training) >= steps and all(n > 0 for n in training), towers["calls"]


@pytest.mark.integration
@pytest.mark.parametrize("family", ["tiny-llava", "tiny-smolvlm"])
def test_dpo_trains_on_image_pairs(family, tmp_path, tracking_uri, towers):
    code, run = train_in_process(RECIPE, tmp_path, {**QUICK, "model.name": family}, "vision-dpo",
                                 method="dpo")
    assert (code, run.info.status) == (0, "FINISHED")
    _trained_with_images(towers, QUICK["train.max_steps"])
    metrics = run.data.metrics
    assert {"train/loss", "train/rewards/margins", "eval/start/pref_accuracy", "eval/tuned/pref_margin",
            "eval/tuned/pref_accuracy", "eval/tuned/exact_match", "eval/fewshot/exact_match"} <= set(metrics)
    assert metrics["eval/n_pairs"] == 24
    version, adapter = _registered("vision-colors-dpo")
    assert version.run_id == run.info.run_id
    # LoRA on the language model's linear layers only: the tower and the projector stay as they were
    assert adapter["peft_type"] == "LORA" and sorted(adapter["target_modules"]) == towers["targets"]


@pytest.mark.integration
def test_kto_trains_on_unpaired_rows_with_images(tmp_path, tracking_uri, towers):
    """Thumbs-up/down rows (prompt, completion, label) with an image each, written as users write them."""
    project = tmp_path / "thumbs"
    for split in ("train", "eval"):
        rows = [json.loads(line)
                for line in (RECIPE / "data" / f"{split}.jsonl").read_text().splitlines()][:12]
        for row in rows:
            part = row["prompt"][0]["content"][0]
            part["image_url"]["url"] = str((RECIPE / "data" / part["image_url"]["url"]).resolve())
        thumbs = [{"prompt": row["prompt"], "completion": row[side], "label": side == "chosen"}
                  for row in rows for side in ("chosen", "rejected")]
        (project / "data").mkdir(parents=True, exist_ok=True)
        (project / "data" / f"{split}.jsonl").write_text("".join(json.dumps(t) + "\n" for t in thumbs))
    recipe = (RECIPE / "finetune.yaml").read_text().replace("format: preference",
                                                            "format: unpaired_preference")
    (project / "finetune.yaml").write_text(recipe.replace("name: vision-colors-dpo", "name: thumbs"))
    code, run = train_in_process(project, tmp_path, QUICK, "vision-kto", method="kto")
    assert (code, run.info.status) == (0, "FINISHED")
    _trained_with_images(towers, QUICK["train.max_steps"])
    metrics = run.data.metrics
    assert {"train/loss", "train/kl", "eval/start/pref_accuracy", "eval/tuned/pref_margin",
            "eval/tuned/pref_accuracy"} <= set(metrics)
    assert metrics["eval/n_pairs"] == 12  # one pair per held-out image: the same question, 12 prompts
    version, adapter = _registered("thumbs")
    assert version.run_id == run.info.run_id and sorted(adapter["target_modules"]) == towers["targets"]


@pytest.mark.integration
@pytest.mark.parametrize("method, epochs", [("dpo", 3), ("kto", 2)])
def test_tuned_model_prefers_the_right_colour_on_held_out_images(method, epochs, tmp_path, tracking_uri):
    """The question is the same for every image: a policy blind to the image prefers the right colour on about
    half of the held-out pairs (the base: 0.46); the tuned one on (nearly) all of them."""
    code, run = train_in_process(RECIPE, tmp_path, {**SHORT_EVAL, "train.epochs": epochs}, f"vision-{method}",
                                 method=method)
    assert (code, run.info.status) == (0, "FINISHED")
    metrics = run.data.metrics
    assert metrics["eval/start/pref_accuracy"] < 0.6
    assert metrics["eval/tuned/pref_accuracy"] >= 0.9, metrics
    assert metrics["eval/tuned/pref_margin"] > metrics["eval/start/pref_margin"] + 1.0


# ---------------------------------------------------------------------------------------- pieces, without
# training


@pytest.fixture(scope="module")
def llava():
    from mlflow_finetune_plugin.models.base import load_tokenizer, resolve_model_path
    from mlflow_finetune_plugin.models.vision import load_vision_model

    tokenizer = load_tokenizer("tiny-llava")
    return load_vision_model(resolve_model_path("tiny-llava")), tokenizer


def _pairs(split: str = "eval", n: int = 4):
    from mlflow_finetune_plugin.data.read import load_training_dataset

    ds, _ = load_training_dataset(str(RECIPE / "data" / f"{split}.jsonl"), "preference", None)
    return ds.select(range(n))


def test_held_out_pairs_are_scored_with_their_images(llava):
    """The margins change with the image alone: the same pairs with each other's images score differently."""
    from mlflow_finetune_plugin.evaluate.preferences import preference_margins

    model, tokenizer = llava
    pairs = [dict(row) for row in _pairs()]
    swapped = [{**row, "images": pairs[(i + 1) % len(pairs)]["images"]} for i, row in enumerate(pairs)]
    margins, again = (preference_margins(model, tokenizer, rows, 256, 2) for rows in (pairs, swapped))
    assert len(margins) == len(again) == 4
    assert all(abs(a - b) > 1e-4 for a, b in zip(margins, again)), (margins, again)
    assert preference_margins(model, tokenizer, pairs, 256, 4) == pytest.approx(margins, abs=1e-4)  # batching


def test_rows_too_long_with_their_image_tokens_are_refused_before_training(llava):
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from mlflow_finetune_plugin.data.image_rows import checked_preference_rows
    from mlflow_finetune_plugin.models.vision import processor_of

    _, tokenizer = llava
    collator = DataCollatorForVisionPreference(processor=processor_of(tokenizer))
    train, _ = checked_preference_rows(collator, 256, _pairs("train"), None)
    assert type(train[0]["images"][0]).__module__.startswith("PIL.")  # read as batches are drawn
    with pytest.raises(FinetuneError,
                       match=r"data.train: 4 row\(s\) longer than data.max_length 16 with their image "
                             r"tokens: row 1 \(\d+ tokens\)"):
        checked_preference_rows(collator, 16, _pairs("train"), None)
    missing = _pairs("train").map(lambda row: {"images": ["/nowhere/red.png"]})
    with pytest.raises(FinetuneError, match="data.train row 1: image not found: /nowhere/red.png"):
        checked_preference_rows(collator, 256, missing, None)


@pytest.mark.integration
def test_image_pairs_for_a_text_model_say_what_to_do(tmp_path, tracking_uri, capsys):
    code, run = train_in_process(RECIPE, tmp_path, {**QUICK, "model.name": "tiny"}, "vision-text",
                                 method="dpo")
    assert (code, run.info.status) == (1, "FAILED")
    assert (
        "the training data has images, but tiny reads text only: name a vision-language model with model.name"
        in capsys.readouterr().err
    )


def test_a_recipes_chat_template_is_the_one_trls_vision_collator_renders(llava, tmp_path):
    """`model.chat_template` replaces the tokenizer's template, and the processor's with it: TRL's vision
    collators render with the processor's."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from mlflow_finetune_plugin.data.image_rows import with_loaded_images
    from mlflow_finetune_plugin.models.base import load_tokenizer
    from mlflow_finetune_plugin.models.vision import processor_of

    _, tokenizer = llava
    (tmp_path / "marked.jinja").write_text("MARKED " + tokenizer.chat_template)
    marked = load_tokenizer("tiny-llava", chat_template="marked.jinja", base_dir=tmp_path)
    processor = processor_of(marked)
    assert processor.chat_template == marked.chat_template != tokenizer.chat_template
    batch = DataCollatorForVisionPreference(processor=processor)([with_loaded_images(_pairs())[0]])
    assert marked.decode(batch["input_ids"][0]).lstrip(marked.pad_token or "").startswith("MARKED")
