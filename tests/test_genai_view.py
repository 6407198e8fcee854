"""The per-example results in MLflow's own GenAI evaluation view: after a real tiny fine-tune, and after
`mlflow-finetune evaluate` of its version, the run holds one trace per held-out example with the reference as
an expectation and a feedback per contender and metric (the scores the evaluation computed, the answer as
rationale)."""

from __future__ import annotations

import mlflow
import pytest

from mlflow_finetune_plugin.evaluate.genai_view import log_genai_view
from mlflow_finetune_plugin.evaluate.report import EvalResult
from tests.helpers import chat_rows, write_project

CONTENDERS = ("base", "fewshot", "retrieval", "tuned")


def _traces_by_question(run_id: str) -> dict[str, object]:
    experiment_id = mlflow.get_run(run_id).info.experiment_id
    traces = mlflow.search_traces(locations=[experiment_id], run_id=run_id, return_type="list")
    by_question = {}
    for trace in traces:
        messages = trace.data.spans[0].inputs["messages"]
        by_question[messages[-1]["content"]] = trace
    assert len(by_question) == len(traces)  # one trace per held-out question
    return by_question


def _assert_view(run_id: str, table) -> None:
    """Every row of `table` (eval/examples.json) is a trace carrying the same answers and scores."""
    traces = _traces_by_question(run_id)
    assert set(traces) == set(table["prompt"])
    for _, row in table.iterrows():
        trace = traces[row["prompt"]]
        assert trace.data.spans[0].outputs == row["tuned_answer"]
        assessments = {a.name: a for a in trace.info.assessments}
        assert assessments["expected_response"].value == row["reference"]
        for c in CONTENDERS:
            for metric in ("rougeL", "token_f1", "exact_match"):
                feedback = assessments[f"{c}/{metric}"]
                assert feedback.value == pytest.approx(row[f"{c}_{metric}"])
                assert feedback.rationale == f"{c} answered: {row[f'{c}_answer']}"
                assert feedback.source.source_type == "CODE"
    # The run's aggregates stay the evaluation's own eval/<contender>/<metric>, not duplicated by MLflow's
    # scorers.
    assert not [k for k in mlflow.get_run(run_id).data.metrics if k.endswith("/mean")]


def test_a_tiny_run_and_its_reevaluation_show_every_example_in_the_genai_view(tmp_path, tracking_uri):
    from click.testing import CliRunner

    from mlflow_finetune_plugin.cli import main
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.train.job import run

    proj = write_project(tmp_path / "view", "data: {eval_split: 0.25, max_length: 64}\n"
                         "train: {max_steps: 1, batch_size: 2}\neval: {max_new_tokens: 3, fewshot_k: 1, "
                         "max_examples: 2}\n",
                         rows=chat_rows(16))
    assert run(load_recipe(proj)) == 0
    version = mlflow.MlflowClient().get_model_version_by_alias("view", "challenger")
    trained = mlflow.load_table("eval/examples.json", run_ids=[version.run_id])
    assert len(trained) == 2  # of 4 held out: eval.max_examples caps the view as it caps the evaluation
    _assert_view(version.run_id, trained)

    out = CliRunner().invoke(main, ["evaluate", "models:/view@challenger", "--max-new-tokens", "3"])
    assert out.exit_code == 0, out.output
    runs = mlflow.search_runs(filter_string="tags.mlflow.runName = 'eval view v1'", output_format="list")
    assert len(runs) == 1
    again = mlflow.load_table("eval/examples.json", run_ids=[runs[0].info.run_id])
    _assert_view(runs[0].info.run_id, again)


def test_a_view_that_cannot_be_logged_warns_and_the_evaluation_goes_on(tracking_uri, capsys):
    broken = EvalResult({}, [{"prompt": "q", "tuned_answer": "a"}], ["tuned"])  # a row without its reference
    with mlflow.start_run() as active:
        log_genai_view(broken)
        assert mlflow.active_run().info.run_id == active.info.run_id
    assert "Warning: per-example evaluation view not logged (KeyError" in capsys.readouterr().out
    log_genai_view(EvalResult({}, [{"prompt": "q", "reference": "r", "tuned_answer": "a"}], ["tuned"]))
    assert "no active MLflow run" in capsys.readouterr().out
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == 1
