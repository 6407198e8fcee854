"""The rehearsal (train/rehearsal.py): before the first training step, two rows go through everything the run does
after training. A failure in any of those stages ends the run FAILED in seconds, naming the stage and the way out,
with no training step taken; a run that passes trains exactly as it would have without the rehearsal.

The failures are the ones issue 52 met after whole trainings (a linear-attention cache that cannot crop, in
evaluation's scoring; a router loss that breaks the first step; ...), raised here at the same places, so that the
test does not depend on a model that still has the bug."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.train import job
from tests.helpers import chat_rows, write_project

EXPERIMENT = "rehearsal"
RECIPE = ("data:\n  eval: data/eval.jsonl\n  max_length: 64\ntrain:\n  max_steps: 4\n  batch_size: 2\n  learning_rate: 5.0e-3\n"
          "  logging_steps: 1\n  save_steps: 100\n  system_metrics: false\n"
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
def test_a_stage_after_training_that_fails_ends_the_run_before_training(tmp_path, tracking_uri, monkeypatch, capsys,
                                                                       where):
    recipe = load_recipe(write_project(tmp_path / "p", RECIPE, rows=chat_rows(16), eval_rows=chat_rows(4, 100)))
    _stage_fails(monkeypatch, where)
    mlflow.set_experiment(EXPERIMENT)

    assert job.run(recipe) == 1

    (run,) = _runs()
    assert run.info.status == "FAILED"
    error = run.data.tags[tags.ERROR]
    assert f"failed at {where}" in error and "Nothing was trained" in error and "train.rehearsal=false" in error, error
    assert not MlflowClient().get_metric_history(run.info.run_id, "train/loss")  # no training step was taken
    assert tags.REGISTERED_VERSION not in run.data.tags
    # The rehearsal's own run is gone (deleted, never left running), and the parent was not touched by it.
    rehearsals = [r for r in _runs(ViewType.ALL) if r.info.run_name == "rehearsal"]
    assert all(r.info.lifecycle_stage == "deleted" and r.info.status != "RUNNING" for r in rehearsals)
    assert "Traceback" not in capsys.readouterr().err


def test_the_rehearsal_leaves_training_as_it_would_have_been(tmp_path, tracking_uri, capsys):
    """Same losses step by step with and without it: it takes no optimizer step and restores the random state."""
    proj = write_project(tmp_path / "p", RECIPE, rows=chat_rows(16), eval_rows=chat_rows(4, 100))
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
    # Its run left nothing visible: one rehearsal run, deleted; the two real runs are the only active ones.
    assert len(_runs()) == 2
    assert [r.info.lifecycle_stage for r in _runs(ViewType.ALL) if r.info.run_name == "rehearsal"] == ["deleted"]
