"""The studio opens where the README starts (support-bot, on smollm2 where it is installed, the tiny model
otherwise), and its status line tells the run's own memory from the machine's. The page itself, reopened on
its newest run, is driven in headless Chromium by tests/test_studio.py."""

from __future__ import annotations

import importlib.util
import types

import mlflow

from mlflow_finetune_plugin.models import smollm2
from mlflow_finetune_plugin.studio import views, watch
from mlflow_finetune_plugin.studio.recipe_form import project_choices, runnable_model, start_project
from mlflow_finetune_plugin.train.callbacks import MlflowMetrics


def test_the_page_opens_on_the_readmes_recipe():
    options = [(p.name, str(p.path)) for p in project_choices()]
    assert options and options[0][0] != "support-bot"  # alphabetical: adapter comes first
    assert start_project(options).endswith("support-bot")
    assert start_project([("mine", "/x/mine")]) == "/x/mine" and start_project([]) is None


def test_a_built_in_model_that_is_not_installed_gives_way_to_tiny(monkeypatch):
    installed = importlib.util.find_spec(smollm2.MODULE) is not None
    assert runnable_model("smollm2") == ("smollm2" if installed else "tiny")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == smollm2.MODULE else real(name, *a))
    assert runnable_model("smollm2") == "tiny"
    assert runnable_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert runnable_model("") == ""


def _progress(**extra) -> watch.Progress:
    return watch.Progress(run_id="r", status="RUNNING", step=3, max_steps=10, epoch=None, eta_s=None,
                          tokens_per_s=None, charts={}, log_tail="", error=None, checkpoint=None,
                          system={"system_memory_usage_megabytes": 12217.0,
                                  "cpu_utilization_percentage": 90.0}, **extra)


def test_the_status_line_labels_the_runs_memory_and_the_machines():
    line = views.status_line(_progress(memory_gib=0.84))
    assert "run memory 0.84 GiB (its training process, peak)" in line
    assert "machine memory in use 12,217 MB" in line and "machine CPU 90%" in line
    assert "run memory" not in views.status_line(_progress())  # not logged yet: nothing claimed


def test_every_logged_step_carries_the_training_processs_peak_memory(tracking_uri):
    state = types.SimpleNamespace(is_world_process_zero=True, global_step=4)
    with mlflow.start_run() as run:
        callback = MlflowMetrics()
        callback.on_train_begin(None, state, None)
        callback.on_log(None, state, None, logs={"loss": 1.5})
    metrics = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
    assert metrics["train/loss"] == 1.5 and 0.05 < metrics[watch.PEAK_MEMORY] < 64
