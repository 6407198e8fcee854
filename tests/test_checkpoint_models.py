"""Checkpoints as MLflow 3 logged models: each save step of a real tiny-model fine-tune becomes
`checkpoint-N`, an output of the run at step N with that step's eval loss (on the eval set) and train loss (on
the training set); `mlflow-finetune models NAME --checkpoints RUN_ID` ranks them; any one of them registers as
a version that loads, answers and is promoted on its own evaluation; resume finds checkpoints as before, and
also by model id."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from safetensors.torch import load_file

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.registry.model_card import description
from mlflow_finetune_plugin.registry.versions import checkpoint_models
from mlflow_finetune_plugin.train import job, resume
from tests.helpers import FAST_OVERRIDES, chat_rows, write_project

RECIPE = "data: {train: data/train.jsonl, eval: data/eval.jsonl, max_length: 64}\n"


@pytest.fixture(autouse=True)
def _sampling_interval_stays_here(monkeypatch):
    # job.run sets MLflow's sampling interval in this process's environment; other tests keep MLflow's
    # default.
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)


def _train(root: Path, **overrides) -> str:
    """A real fine-tune in this process; returns its run id."""
    recipe = load_recipe(root, overrides={**FAST_OVERRIDES, "train.learning_rate": 1e-2, **overrides})
    mlflow.set_experiment("checkpoints")
    assert job.run(recipe) == 0
    return mlflow.last_active_run().info.run_id


def _history(run_id: str, key: str) -> dict[int, float]:
    """step -> the first value logged at that step (the final evaluation comes later, at the last step)."""
    history = sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.timestamp, reverse=True)
    return {m.step: m.value for m in history}


def _rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.strip().splitlines()[2:]]


def _adapter(model_uri: str) -> dict:
    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    return load_file(next(local.rglob("adapter_model.safetensors")))


def test_checkpoints_are_logged_models_ranked_registered_and_promoted(tmp_path, tracking_uri):
    proj = write_project(tmp_path / "bot", RECIPE, rows=chat_rows(16), eval_rows=chat_rows(4, 100))
    run_id = _train(proj, **{"train.max_steps": 6, "train.save_steps": 2, "registry.name": "bot"})
    client = MlflowClient()
    run = client.get_run(run_id)

    # One logged model per save step, an output of the run at that step, with that step's metrics and
    # datasets.
    models = checkpoint_models(run_id)
    assert [(m.name, m.tags[tags.CHECKPOINT_STEP]) for m in models] == [
        ("checkpoint-2", "2"), ("checkpoint-4", "4"), ("checkpoint-6", "6")]
    outputs = {o.model_id: o.step for o in run.outputs.model_outputs}
    inputs = {t.value: i.dataset for i in run.inputs.dataset_inputs for t in i.tags
              if t.key == "mlflow.data.context"}
    eval_loss = _history(run_id, "eval/tuned/loss")
    for model in models:
        step = int(model.tags[tags.CHECKPOINT_STEP])
        assert outputs[model.model_id] == step and model.source_run_id == run_id
        assert model.tags[tags.CHECKPOINT_PATH] == f"checkpoints/checkpoint-{step}"
        assert model.tags[tags.BASE_MODEL] == run.data.tags[tags.BASE_MODEL]
        metrics = {m.key: m for m in model.metrics}
        assert metrics["eval/tuned/loss"].value == eval_loss[step]
        assert (metrics["eval/tuned/loss"].dataset_digest, metrics["train/loss"].dataset_digest) == (
            inputs["eval"].digest, inputs["training"].digest)
        assert metrics["train/loss"].value == _history(run_id, "train/loss")[step]
    history = client.get_metric_history(run_id, "eval/tuned/loss")
    assert len(history) == 4  # 3 save steps + the final evaluation
    # The final evaluation is logged at the last step, after the Trainer's eval loss of that step: it is the
    # run's latest value, the one gates and `models` read.
    final = max(history, key=lambda m: (m.step, m.timestamp))
    assert final.step == 6 and run.data.metrics["eval/tuned/loss"] == final.value != eval_loss[6]

    # Ranked by eval loss, lowest first; by a higher-is-better metric, highest first.
    cli = CliRunner()
    out = cli.invoke(main, ["models", "bot", "--checkpoints", run_id])
    assert out.exit_code == 0, out.output
    assert [int(r[1]) for r in _rows(out.output)] == sorted((2, 4, 6), key=lambda s: eval_loss[s])
    assert [r[0] for r in _rows(out.output)] == ["1", "2", "3"]
    accuracy = _history(run_id, "eval/tuned/mean_token_accuracy")
    out = cli.invoke(main, ["models", "bot", "--checkpoints", run_id, "--metric", "mean_token_accuracy"])
    assert [int(r[1]) for r in _rows(out.output)] == sorted((2, 4, 6), key=lambda s: -accuracy[s])

    # Register the first checkpoint (not the last): a version of its own, evaluated in a run of its own.
    wrong = cli.invoke(main, ["models", "bot", "--register-checkpoint", "3", "--run", run_id])
    assert wrong.exit_code == 1 and "no checkpoint at step 3; its checkpoints: 2, 4, 6" in wrong.output
    wrong = cli.invoke(main, ["models", "bot", "--register-checkpoint", "2"])
    assert wrong.exit_code == 1 and "--run RUN_ID" in wrong.output
    out = cli.invoke(main, ["models", "bot", "--register-checkpoint", "2", "--run", run_id])
    assert out.exit_code == 0, out.output
    assert f"Registered bot version 2 (alias @challenger): checkpoint step 2 of run {run_id}" in out.output
    version = client.get_model_version("bot", "2")
    own_run = client.get_run(version.tags[tags.SOURCE_RUN])
    assert own_run.info.run_id != run_id and own_run.data.tags["mlflow.parentRunId"] == run_id
    assert {
        k: version.tags[k] for k in (tags.CHECKPOINT_STEP, tags.CHECKPOINT_RUN, tags.CHECKPOINT_MODEL)
    } == {tags.CHECKPOINT_STEP: "2", tags.CHECKPOINT_RUN: run_id, tags.CHECKPOINT_MODEL: models[0].model_id}
    for key in (tags.METHOD, tags.BASE_MODEL, tags.DATASET_DIGEST, tags.RECIPE_HASH, tags.CHAT_TEMPLATE_HASH):
        assert version.tags[key] == client.get_model_version("bot", "1").tags[key]
    assert client.get_logged_model(models[0].model_id).tags[tags.REGISTERED_VERSION] == "2"
    assert "bot v2" in cli.invoke(main, ["models", "bot", "--checkpoints", run_id]).output

    # The version holds checkpoint-2's adapter (not the final one) and answers through pyfunc.
    checkpoint = load_file(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="checkpoints/checkpoint-2/adapter_model.safetensors"))
    registered, final = _adapter("models:/bot/2"), _adapter("models:/bot/1")
    assert all((registered[k] == checkpoint[k]).all() for k in checkpoint)
    assert any((final[k] != checkpoint[k]).any() for k in checkpoint)
    answers = mlflow.pyfunc.load_model("models:/bot/2").predict(
        [{"messages": [{"role": "user", "content": "What is 3 plus 3?"}]}])
    assert len(answers) == 1 and isinstance(answers[0], str)
    # Its model card: README.md beside MLmodel and the version's description, with the checkpoint's own
    # scores.
    card = Path(mlflow.artifacts.download_artifacts("models:/bot/2")) / "README.md"
    assert card.is_file() and client.get_model_version("bot",
                                                       "2").description == description(card.read_text())
    assert f"{own_run.data.metrics['eval/tuned/rougeL']:.4f}" in card.read_text()

    # Promotion gates on the checkpoint's own evaluation, not the final model's.
    own_loss = own_run.data.metrics["eval/tuned/loss"]
    assert own_loss != run.data.metrics["eval/tuned/loss"]
    base_loss = own_run.data.metrics["eval/base/loss"]
    out = cli.invoke(main, ["promote", "bot", "--version", "2", "--gate", "loss:0:base"])
    assert re.search(rf"loss\s+base\s+min\s+0\s+{own_loss:.4f}\s+{base_loss:.4f}", out.output), out.output
    moved = "=> @champion moved from nobody to v2" in out.output
    assert (out.exit_code, moved) == ((0, True) if own_loss <= base_loss else (1, False)), out.output


def test_resume_finds_checkpoints_by_run_and_by_checkpoint_model(tmp_path, tracking_uri):
    proj = write_project(tmp_path / "bot", "data: {max_length: 64}\n", rows=chat_rows(16))
    quick = {"train.max_steps": 4, "train.save_steps": 2, "eval.enabled": False, "registry.enabled": False}
    first = _train(proj, **quick)
    two = checkpoint_models(first)[0]

    # From one checkpoint by its model id: training continues at step 3 from checkpoint-2's state.
    second = _train(proj, **quick, **{"train.resume": two.model_id})
    run = MlflowClient().get_run(second)
    assert run.data.tags[tags.RESUMED_FROM] == f"{first}/checkpoints/checkpoint-2"
    assert sorted(_history(second, "train/loss")) == [3, 4]
    assert [m.tags[tags.CHECKPOINT_STEP] for m in checkpoint_models(second)] == ["4"]

    # From a run: its last whole checkpoint, as before.
    with mlflow.start_run() as current:
        local = resume.resume_checkpoint(first, current.info.run_id)
        assert Path(local).name == "checkpoint-4" and (Path(local) / "optimizer.pt").is_file()
        final_model = next(o.model_id for o in run.outputs.model_outputs if o.step == 0)
        with pytest.raises(FinetuneError, match="is not a checkpoint"):
            resume.resume_checkpoint(final_model, current.info.run_id)
