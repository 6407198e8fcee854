"""The rehearsal (train/rehearsal.py): before the first training step, two rows go through everything the run
does after training. A failure in any of those stages ends the run FAILED in seconds, naming the stage and the
way out, with no training step taken; a run that passes trains exactly as it would have without the rehearsal.

The failures are the ones issue 52 met after whole trainings (a linear-attention cache that cannot crop, in
evaluation's scoring; a router loss that breaks the first step; ...), raised here at the same places, so that
the test does not depend on a model that still has the bug."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.train import job
from tests.helpers import chat_rows, write_project

EXPERIMENT = "rehearsal"
RECIPE = (
    "data:\n  eval: data/eval.jsonl\n  max_length: 64\ntrain:\n  max_steps: 4\n  batch_size: 2\n  "
    "learning_rate: 5.0e-3\n  logging_steps: 1\n  save_steps: 100\n  system_metrics: false\n"
    "eval:\n  max_examples: 4\n  max_new_tokens: 8\n  traces: false\n")
CROP = "DynamicLinearAttentionLayer does not track past states, so it cannot crop"


def _raise(message):
    def fails(*args, **kwargs):
        raise RuntimeError(message)
    return fails


def _stage_fails(monkeypatch, where: str):
    """Make the named stage fail the way issue 52's models failed there."""
    from mlflow_finetune_plugin import logged_model
    from mlflow_finetune_plugin.evaluate import contenders, forgetting
    from mlflow_finetune_plugin.train.objectives.sft_trainer import FinetuneSFTTrainer

    if where == "training step":
        monkeypatch.setattr(FinetuneSFTTrainer, "compute_loss",
                            _raise("The size of tensor a (8) must match the size of tensor b (1128)"))
    elif where == "evaluation":
        monkeypatch.setattr(contenders, "run_evaluation", _raise(CROP))
    elif where == "forgetting check":
        monkeypatch.setattr(forgetting, "measure", _raise("index out of range in self"))
    else:
        monkeypatch.setattr(logged_model, "saved_artifacts", _raise("cannot save a GGUF-loaded model"))


def _runs(view=ViewType.ACTIVE_ONLY):
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    return MlflowClient().search_runs([exp.experiment_id], run_view_type=view)


@pytest.mark.parametrize("where", ["training step", "evaluation", "forgetting check", "saving the model"])
def test_a_stage_after_training_that_fails_ends_the_run_before_training(tmp_path, tracking_uri, monkeypatch,
                                                                        capsys, where):
    recipe = load_recipe(write_project(tmp_path / "p", RECIPE, rows=chat_rows(16),
                                       eval_rows=chat_rows(4, 100)))
    _stage_fails(monkeypatch, where)
    mlflow.set_experiment(EXPERIMENT)

    assert job.run(recipe) == 1

    (run,) = _runs()
    assert run.info.status == "FAILED"
    error = run.data.tags[tags.ERROR]
    assert f"failed at {where}" in error and ("Nothing was "
                                              "trained") in error and "train.rehearsal=false" in error, error
    assert not MlflowClient().get_metric_history(run.info.run_id, "train/loss")  # no training step was taken
    assert tags.REGISTERED_VERSION not in run.data.tags
    # The rehearsal left no run of its own, not even a deleted one: the run says where it failed.
    assert [r.info.run_id for r in _runs(ViewType.ALL)] == [run.info.run_id]
    assert run.data.tags[tags.REHEARSAL] == f"failed at {where} (the run's error says why)"
    assert "Traceback" not in capsys.readouterr().err
    # ... but error.txt keeps it: the message, then the traceback of the error the stage met.
    text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/error.txt")
    assert text.startswith(error) and "Traceback (most recent call last)" in text and "RuntimeError: " in text


def test_the_rehearsal_leaves_training_as_it_would_have_been(tmp_path, tracking_uri, capsys):
    """Same losses step by step with and without it: it takes no optimizer step and restores the random
    state."""
    proj = write_project(tmp_path / "p", RECIPE, rows=chat_rows(16), eval_rows=chat_rows(4, 100))
    # The experiment set is not the store's first one (ids 2, 3, 4...): the rehearsal's own store numbers its
    # experiment 1, and start_run refuses a run of another experiment id than set_experiment's (a full test
    # session).
    earlier = [mlflow.create_experiment(f"earlier-{i}") for i in range(2)]
    mlflow.set_experiment(EXPERIMENT)
    losses = {}
    for rehearse in (True, False):
        recipe = load_recipe(proj, overrides={"train.rehearsal": str(rehearse).lower()})
        assert job.run(recipe) == 0
        run = _runs()[0]
        assert run.info.status == "FINISHED"
        history = MlflowClient().get_metric_history(run.info.run_id, "train/loss")
        losses[rehearse] = [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]
        said = capsys.readouterr().out
        assert ("Rehearsal before training: 2 rows" in said) is rehearse
    assert len(losses[True]) == 4 and losses[True] == losses[False]
    # A rehearsal is not a result (issue 69): the store holds the two fine-tunes and nothing else, not even a
    # deleted run or an experiment of its own; the newest finished run, and the best by tuned rougeL, is a
    # fine-tune, whose metrics are its own evaluation's alone; it keeps the rehearsal's outcome as a tag.
    client = MlflowClient()
    plain, rehearsed = _runs(ViewType.ALL)  # newest first
    assert sorted(e.name for e in client.search_experiments(ViewType.ALL)) == sorted(
        [EXPERIMENT, "Default", *(client.get_experiment(e).name for e in earlier)])
    for query in ({"filter_string": "attributes.status = 'FINISHED'",
                   "order_by": ["attributes.start_time DESC"]},
                  {"order_by": ["metrics.`eval/tuned/rougeL` DESC"]}):
        found = client.search_runs([plain.info.experiment_id], run_view_type=ViewType.ALL, **query)
        assert {r.info.run_id for r in found} == {plain.info.run_id, rehearsed.info.run_id}
    assert [m.step for m in client.get_metric_history(rehearsed.info.run_id, "eval/tuned/rougeL")] == [4]
    assert [m.step for m in client.get_metric_history(rehearsed.info.run_id, "eval/base/rougeL")] == [4]
    assert rehearsed.data.tags[tags.REHEARSAL].startswith("passed in ")
    assert rehearsed.data.tags[tags.REHEARSAL].endswith(
        " s (2 rows through evaluation, forgetting check, verdict, the model's save and reload)")
    assert tags.REHEARSAL not in plain.data.tags and tags.VERDICT in rehearsed.data.tags


def test_a_full_fine_tune_of_experts_saved_in_the_checkpoint_layout_passes_the_save_check(tmp_path,
                                                                                          tracking_uri,
                                                                                          capsys):
    """Issue 58: transformers 5 saves a Qwen3-MoE's fused experts one tensor per expert and fuses them on
    load. The rehearsal's save check compared the saved names with the model's and refused every full
    fine-tune of it; it asks transformers what reloads now."""
    from transformers import AutoModelForCausalLM

    from mlflow_finetune_plugin.paths import tensor_names
    from tests.arch_models import build

    base = build("qwen3_moe", tmp_path / "qwen3-moe")
    saved = set(tensor_names(base))
    in_memory = set(AutoModelForCausalLM.from_pretrained(base).state_dict())
    assert saved - in_memory and in_memory - saved  # the layouts differ: what the old check refused
    proj = write_project(tmp_path / "p", RECIPE, rows=chat_rows(16), eval_rows=chat_rows(4, 100))
    recipe = load_recipe(proj, method="full", overrides={"model.name": str(base), "train.max_steps": "1"})
    mlflow.set_experiment(EXPERIMENT)

    assert job.run(recipe) == 0

    (run,) = _runs()
    assert run.info.status == "FINISHED"
    assert "Rehearsal before training: 2 rows" in capsys.readouterr().out


def _save_goes_wrong(monkeypatch, change):
    """The model saves as usual, then `change` edits its saved tensors: the save check must notice."""
    from safetensors.torch import load_file, save_file

    from mlflow_finetune_plugin import logged_model

    real = logged_model.saved_artifacts

    def saved_artifacts(model, tokenizer, config, folder, **options):
        config, artifacts = real(model, tokenizer, config, folder, **options)
        (path,) = Path(artifacts.get("adapter") or artifacts["model"]).glob("*.safetensors")
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
        return config, artifacts

    monkeypatch.setattr(logged_model, "saved_artifacts", saved_artifacts)


def _drop_a_query(tensors):
    del tensors[next(name for name in sorted(tensors) if "q_proj" in name)]


def _shift_a_lora_b(tensors):
    name = next(name for name in sorted(tensors) if "lora_B" in name and "q_proj" in name)
    tensors[name] = tensors[name] + 1.0


@pytest.mark.parametrize("method, change, fault",
                         [("full", _drop_a_query, "1 missing (e.g. ['model.layers.0."),
                          ("lora", _shift_a_lora_b, "1 with other values than the model's")])
def test_a_model_that_does_not_reload_as_it_was_saved_fails_the_rehearsal(tmp_path, tracking_uri, monkeypatch,
                                                                         method, change, fault):
    recipe = load_recipe(write_project(tmp_path / "p", RECIPE, rows=chat_rows(16),
                                       eval_rows=chat_rows(4, 100)), method=method)
    _save_goes_wrong(monkeypatch, change)
    mlflow.set_experiment(EXPERIMENT)

    assert job.run(recipe) == 1

    (run,) = _runs()
    error = run.data.tags[tags.ERROR]
    assert "failed at reloading the saved model" in error and fault in error and "q_proj" in error, error
    # The check exists only in the rehearsal: skipping it would not fail the run after training, and it says
    # so.
    assert "train.rehearsal=false" in error and "end the run after training" not in error
    assert not MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/error.txt")
    assert text.startswith(error) and "Traceback (most recent call last)" in text and fault in text.split(
        error)[1]
