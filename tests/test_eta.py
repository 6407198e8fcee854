"""The run's expected time: a few steps in, the training process prints once how long training and the
evaluation after it should still take (`train/callbacks.py: TimeLeft`)."""

from __future__ import annotations

import re

import mlflow

from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.train import job
from tests.helpers import FAST_OVERRIDES, chat_rows, write_project

LINE = re.compile(
    r"=== about (\d+) (s|min) left \((\d+) steps at [\d.e+-]+ s/step ≈ [\d.]+ (s|min) of training; "
    r"then evaluation of 2 held-out questions x 2 contenders, ~\d+ (s|min), estimated\) ===")


def test_a_run_prints_its_time_left_once(tmp_path, tracking_uri, capsys):
    proj = write_project(tmp_path / "bot", "data: {max_length: 64, eval: data/eval.jsonl}\n",
                         rows=chat_rows(16), eval_rows=chat_rows(4, offset=100))
    overrides = {**FAST_OVERRIDES, "train.max_steps": 8, "train.save_steps": 8, "eval.fewshot_k": 0,
                 "eval.forgetting": False, "registry.enabled": False}
    mlflow.set_experiment("eta")
    assert job.run(load_recipe(proj, overrides=overrides)) == 0
    err = capsys.readouterr().err
    found = LINE.findall(err)
    assert len(found) == 1, err[-3000:]
    steps_left = int(found[0][2])
    assert 0 < steps_left < 8  # printed during training, counting the steps still to come
