"""End to end as a user runs it: `mlflow run` as a subprocess against a temporary sqlite store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from bench import readme_run
from tests.helpers import SUPPORT_BOT

pytestmark = pytest.mark.integration


def _mlflow_run(tmp_path, tracking_uri, *args, timeout=900):
    """`mlflow run recipes/support-bot ...` on the tiny model unless the args name another."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    model = [] if any(str(a).startswith("model=") for a in args) else ["-P", "model=tiny"]
    cmd = [sys.executable, "-m", "mlflow", "run", str(SUPPORT_BOT), *args, *model]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_mlflow_run_lora_backend_finetune(tmp_path, tracking_uri):
    proc = _mlflow_run(tmp_path, tracking_uri, "-e", "lora", "--backend", "finetune",
                       "-P", "train.max_steps=40", "-P", "train.save_steps=20", "-P", "train.batch_size=8",
                       "-P", "eval.max_examples=4", "-P", "eval.max_new_tokens=16",
                       "--experiment-name", "support")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Registered support-bot version 1 (alias @challenger)" in proc.stdout + proc.stderr

    client = MlflowClient()
    exp = client.get_experiment_by_name("support")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.backend"] == "finetune"
    assert run.data.tags["mlflow.project.entryPoint"] == "lora"
    assert run.data.params["train.max_steps"] == "40" and run.data.params["adapter.r"] == "16"
    assert run.data.params["adapter.type"] == "lora" and run.data.params["objective"] == "sft"

    # The task's loss curve falls (train/loss also carries the recipe's replay KL term, on one step in four at
    # 4x) and the eval loss beats the untouched base.
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/task_loss")]
    assert len(losses) >= 5
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]
    assert "train/tokens_per_second" in run.data.metrics
    # The training stage's peak memory (the process's high-water mark when training ends), logged and printed.
    assert 0.1 < run.data.metrics["train/peak_rss_gib"] < 24
    assert "Training done: this process's peak memory so far " in proc.stdout + proc.stderr
    assert run.data.metrics["eval/tuned/loss"] < run.data.metrics["eval/base/loss"]
    # The README's block is made from what the command prints (bench/readme_run.py): the table rebuilt from
    # the logged eval/* figures is the one printed, and the verdict line follows it.
    block = readme_run.printed_block(proc.stdout + proc.stderr, readme_run.eval_figures(run.data.metrics))
    assert block.startswith("metric ") and "rougeL" in block and "\n\nVerdict: " in block

    # Dataset inputs, resolved recipe, checkpoints.
    contexts = {t.value for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert contexts == {"training", "eval"}  # (mlflow.genai.evaluate adds its own input, without a context)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "checkpoints"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == [
        "checkpoints/checkpoint-20", "checkpoints/checkpoint-40"]

    # The registered version: alias, lineage tags, loadable by alias, answers a chat prompt.
    version = client.get_model_version_by_alias("support-bot", "challenger")
    assert version.run_id == run.info.run_id
    assert version.tags["finetune.method"] == "lora"
    assert version.tags["finetune.base_model"] == "builtin:tiny-llama"
    assert version.tags["finetune.dataset_digest"] == run.data.tags["finetune.dataset_digest"]
    model = mlflow.pyfunc.load_model("models:/support-bot@challenger")
    answers = model.predict([{"messages": [{"role": "user", "content": "How do I reset my password?"}]}])
    assert isinstance(answers[0], str)

    # The adapter folder loads with plain PEFT and gives the same logits as the pyfunc's model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlflow_finetune_plugin.logged_model import load_logged_model
    from mlflow_finetune_plugin.models.tiny import tiny_model_path

    local = Path(mlflow.artifacts.download_artifacts("models:/support-bot@challenger"))
    loaded = load_logged_model(local)
    adapter_dir = next(p.parent for p in local.rglob("adapter_config.json"))
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path()),
                                      adapter_dir).eval()
    ids = loaded.tokenizer("Where are my invoices?", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(plain(**ids).logits, loaded.model(**ids).logits, atol=1e-5)


def test_mlflow_run_fails_with_nonzero_exit_and_a_failed_run(tmp_path, tracking_uri):
    proc = _mlflow_run(tmp_path, tracking_uri, "-e", "lora", "--backend", "finetune",
                       "-P", "model=no-such-org/no-such-model", "--experiment-name", "broken")
    assert proc.returncode != 0
    assert "could not load model" in proc.stderr
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("broken").experiment_id])
    assert run.info.status == "FAILED"


def test_mlflow_run_bad_override_exits_before_any_run(tmp_path, tracking_uri):
    proc = _mlflow_run(tmp_path, tracking_uri, "-e", "lora", "--backend", "finetune",
                       "-P", "train.lerning_rate=1e-4", "--experiment-name", "typo")
    assert proc.returncode == 1
    assert "Did you mean `learning_rate`?" in proc.stderr
    exp = MlflowClient().get_experiment_by_name("typo")
    assert exp is None or MlflowClient().search_runs([exp.experiment_id]) == []


def test_local_backend_runs_the_mlproject_entry_point(tmp_path, tracking_uri):
    proc = _mlflow_run(tmp_path, tracking_uri, "-e", "lora", "-P", "train.max_steps=3", "-P",
                       "eval.enabled=false", "-P", "registry.enabled=false", "--experiment-name", "local")
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("local").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "3"
    assert "train/loss" in run.data.metrics
