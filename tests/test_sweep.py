"""`mlflow-finetune sweep`: Optuna trials as nested runs through the real backend, pruning from the eval loss,
the best trial logged and registered. Real fine-tunes of the tiny model on a fresh sqlite store."""

from __future__ import annotations

import mlflow
import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.sweep.study import (
    PLOT_FILE,
    SWEEP_BEST_RUN,
    SWEEP_STATE,
    SWEEP_TRIAL,
    final_value,
    importances,
    run_sweep,
)
from tests.helpers import FAST_OVERRIDES, chat_rows, write_project

RECIPE = "model:\n  name: tiny\ndata:\n  eval: data/eval.jsonl\n  max_length: 64\n  packing: false\n"
SPACE = "train.learning_rate: {low: 1.0e-7, high: 1.0e-2, log: true}\nlora.r: {choices: [4, 8]}\n"
# An eval loss at steps 2, 4 and 6 while training: what the pruner judges. The sweep prunes a trial only while
# its run is still going, and sees each loss at its next poll (1 s): after the first loss, four more steps,
# two checkpoints and the evaluation leave it several polls (with 4 steps, and the base model's answers taken
# from the first trial's by eval.reuse_answers, trial 1 once ended before a poll saw its step-2 loss).
TRIAL_PARAMS = {**FAST_OVERRIDES, "train.max_steps": 6}


def _project(tmp_path, space=SPACE):
    proj = write_project(tmp_path / "proj", RECIPE, rows=chat_rows(16), eval_rows=chat_rows(4, offset=100))
    (proj / "sweep.yaml").write_text(space)
    return proj


def _children(parent_id):
    return MlflowClient().search_runs(
        [MlflowClient().get_run(parent_id).info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'")


def test_sweep_of_four_trials_prunes_logs_the_best_and_registers_only_it(tmp_path, tracking_uri):
    proj = _project(tmp_path)
    args = ["sweep", str(proj), "-e", "lora", "--space", "sweep.yaml", "--trials", "4", "--startup-trials",
            "1",
            "--seed", "0", "--metric", "eval/tuned/loss",
            # a good trial first, then one whose learning rate cannot move the loss: the pruner stops it
            "--enqueue", "{train.learning_rate: 5.0e-3, lora.r: 8}", "--enqueue",
            "{train.learning_rate: 1.0e-7}",
            *[a for k, v in TRIAL_PARAMS.items() for a in ("-P", f"{k}={v}")]]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    (parent,) = client.search_runs(["0"], filter_string=f"tags.`{SWEEP_BEST_RUN}` != ''")
    assert parent.info.status == "FINISHED"
    children = {int(r.data.tags[SWEEP_TRIAL]): r for r in _children(parent.info.run_id)}
    assert sorted(children) == [0, 1, 2, 3]
    assert all(r.data.tags["mlflow.project.backend"] == "finetune" for r in children.values())

    pruned = children[1]
    assert pruned.data.tags[SWEEP_STATE] == "pruned" and pruned.info.status == "KILLED"
    assert float(pruned.data.params["train.learning_rate"]) == pytest.approx(1e-7)
    assert children[0].data.tags[SWEEP_STATE] == "complete" and children[0].info.status == "FINISHED"

    complete = {n: r for n, r in children.items() if r.data.tags[SWEEP_STATE] == "complete"}
    values = {n: final_value(client, r.info.run_id, "eval/tuned/loss") for n, r in complete.items()}
    best_n = min(values, key=values.get)
    best = complete[best_n]
    assert parent.data.tags[SWEEP_BEST_RUN] == best.info.run_id
    assert parent.data.metrics["best/eval/tuned/loss"] == pytest.approx(values[best_n])
    assert float(parent.data.params["best.train.learning_rate"]) == pytest.approx(
        float(best.data.params["train.learning_rate"]))
    assert parent.data.params["best.lora.r"] == best.data.params["adapter.r"]
    assert f"Best: trial {best_n}" in result.output

    plot = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path=PLOT_FILE,
                                               dst_path=str(tmp_path / "plot"))
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    (version,) = client.search_model_versions("name='proj'")  # exactly one: the best trial's
    assert version.run_id == best.info.run_id
    assert version.tags[tags.SOURCE_RUN] == best.info.run_id and version.tags[tags.DATASET_DIGEST]
    assert client.get_model_version_by_alias("proj", "challenger").version == version.version
    assert client.get_run(best.info.run_id).data.tags[tags.REGISTERED_VERSION] == str(version.version)
    assert all(tags.REGISTERED_MODEL not in r.data.tags for n, r in children.items() if n != best_n)


def test_bad_space_fails_before_any_run_naming_each_key_and_fix(tmp_path, tracking_uri):
    proj = _project(tmp_path, space=(
        "train.lerning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
        "lora.r: {choices: []}\n"
        "train.warmup_ratio: {low: 0.5, high: 0.1}\n"))
    result = CliRunner().invoke(main, ["sweep", str(proj), "--space", str(proj / "sweep.yaml"), "--trials",
                                       "2"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "lora.r: choices must be a non-empty list" in result.output
    assert "train.warmup_ratio: low (0.5) must be below high (0.1)" in result.output
    # the shape is fine but the key is not the recipe's: checked against the schema, with the nearest key
    proj.joinpath("sweep.yaml").write_text("train.lerning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
                                           "lora.r: {choices: [0, 8]}\n")
    with pytest.raises(Exception) as info:
        run_sweep(str(proj), "lora", proj / "sweep.yaml", 2, params={"model": "tiny"})
    text = str(info.value)
    assert "train.lerning_rate: unknown key" in text and "Did you mean `learning_rate`?" in text
    assert "lora.r: Input should be greater than 0 (got 0)" in text
    assert "nothing was started" in text
    assert MlflowClient().search_runs(["0"]) == []


def test_importance_needs_enough_completed_trials():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + 0.01 * t.suggest_int("y", 0, 3), n_trials=2)
    found, note = importances(study)
    assert found == {} and "needs 3 completed trials (2 completed)" in note
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + 0.01 * t.suggest_int("y", 0, 3), n_trials=10)
    found, note = importances(study)
    assert note is None and set(found) == {"x", "y"} and sum(found.values()) == pytest.approx(1.0)
    assert found["x"] > found["y"]


@pytest.mark.integration
@pytest.mark.stress  # CI time: the sweep itself runs above, and a Ray job in tests/test_launchers.py
def test_sweep_trials_run_and_are_pruned_on_ray(tmp_path, tracking_uri, ray_head):
    proj = _project(tmp_path)
    result = run_sweep(str(proj), "lora", proj / "sweep.yaml", 2, params=TRIAL_PARAMS, startup_trials=1,
                       seed=0, backend_config={"launcher": "ray", "address": ray_head}, poll_seconds=0.5,
                       enqueue=[{"train.learning_rate": 5e-3, "lora.r": 8}, {"train.learning_rate": 1e-7}])
    assert [t["state"] for t in result.trials] == ["complete", "pruned"]
    client = MlflowClient()
    runs = [client.get_run(t["run_id"]) for t in result.trials]
    assert all(r.data.tags[tags.JOB_LAUNCHER] == "ray" for r in runs)
    assert all(r.data.tags[MLFLOW_PARENT_RUN_ID] == result.parent_run_id for r in runs)
    assert [r.info.status for r in runs] == ["FINISHED", "KILLED"]
    from ray.job_submission import JobSubmissionClient

    assert str(JobSubmissionClient(ray_head).get_job_status(runs[1].data.tags[tags.JOB_ID])) == "STOPPED"
    (version,) = client.search_model_versions("name='proj'")
    assert version.run_id == runs[0].info.run_id == result.best["run_id"]
    assert "needs 3 completed trials (1 completed)" in result.report()


def test_a_yaml_list_is_choices(tmp_path):
    from mlflow_finetune_plugin.sweep.space import load_space

    space = tmp_path / "sweep.yaml"
    space.write_text(
        "lora.r: [4, 8]\nlora: {alpha: [16, 32]}\ntrain.learning_rate: {low: 1.0e-4, high: 1.0e-2}\n")
    dims = {d.key: d for d in load_space(space)}
    assert (dims["lora.r"].kind, dims["lora.r"].choices) == ("choice", (4, 8))
    assert (dims["lora.alpha"].kind, dims["lora.alpha"].choices) == ("choice", (16, 32))
    assert dims["train.learning_rate"].kind == "float"
    # the same checks as {choices: [...]}: a list that repeats a value or is empty is refused, naming the key
    space.write_text("lora.r: [4, 4]\nlora.alpha: []\n")
    with pytest.raises(FinetuneError) as info:
        load_space(space)
    assert "lora.r: choices [4, 4] repeat a value" in str(info.value)
    assert "lora.alpha: choices must be a non-empty list" in str(info.value)
