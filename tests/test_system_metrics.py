"""System metrics: a fine-tune's run carries MLflow's `system/*` metrics (CPU, memory; GPU where nvidia-ml-py
and a GPU are there), sampled every `train.system_metrics_interval` seconds by the training process; off with
`train.system_metrics: false` or MLflow's MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false."""

from __future__ import annotations

import importlib.util

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from mlflow_finetune_plugin.backend import FinetuneBackend
from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.train import job
from tests.helpers import chat_rows, write_project

QUICK = {"train.max_steps": "4", "train.batch_size": "2", "train.save_steps": "4", "eval.enabled": "false",
         "registry.enabled": "false", "train.system_metrics_interval": "0.5"}


def _system_metrics(run_id: str) -> dict[str, list[float]]:
    client = MlflowClient()
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]
    return {k: [m.value for m in client.get_metric_history(run_id, k)] for k in keys}


def test_mlflow_run_logs_system_metrics(tmp_path, tracking_uri):
    proj = write_project(tmp_path / "bot", "data: {max_length: 64}\n", rows=chat_rows(16))
    experiment = mlflow.set_experiment("system").experiment_id
    submitted = FinetuneBackend().run(str(proj), "lora", QUICK, None, {"SYNCHRONOUS": True}, tracking_uri,
                                      experiment)
    assert submitted.wait() is True
    metrics = _system_metrics(submitted.run_id)
    cpu, memory = (
        metrics["system/cpu_utilization_percentage"],
        metrics["system/system_memory_usage_megabytes"],
    )
    assert len(cpu) >= 2 and all(0 <= v <= 100 for v in cpu)  # sampled every 0.5 s while it trained
    assert all(v > 0 for v in memory)
    gpus = torch.cuda.is_available() and importlib.util.find_spec("pynvml") is not None
    assert ("system/gpu_0_utilization_percentage" in metrics) == gpus


@pytest.mark.parametrize("switch", ["recipe", "environment"])
def test_system_metrics_turn_off(switch, tmp_path, tracking_uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)  # job.run sets it in-process
    if switch == "environment":
        monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    proj = write_project(tmp_path / "bot", "data: {max_length: 64}\n", rows=chat_rows(16))
    off = {"train.system_metrics": "false"} if switch == "recipe" else {}
    mlflow.set_experiment("system")
    assert job.run(load_recipe(proj, overrides={**QUICK, **off})) == 0
    run = mlflow.last_active_run()
    # three intervals: on, it would have sampled
    assert (run.info.end_time - run.info.start_time) / 1000 > 1.5
    assert _system_metrics(run.info.run_id) == {}
