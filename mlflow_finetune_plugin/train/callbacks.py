"""Trainer callbacks that report to the active MLflow run."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
from transformers import TrainerCallback

from mlflow_finetune_plugin import tags


class MlflowMetrics(TrainerCallback):
    """Log training metrics as `train/<name>` and eval metrics as `eval/tuned/<name>`, plus tokens per second.

    Only the main process logs (under torchrun every rank runs the callback).
    """

    def __init__(self, prefix: str = ""):
        self.prefix = prefix  # e.g. "faq/": train/faq/loss, for one trainer per task in the same run
        self._last_tokens = 0
        self._last_time = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        metrics = run_metric_names(logs, self.prefix)
        tokens = logs.get("num_tokens")
        now = time.perf_counter()
        if tokens is not None and self._last_time is not None and now > self._last_time:
            metrics[f"train/{self.prefix}tokens_per_second"] = (tokens - self._last_tokens) / (now - self._last_time)
            self._last_tokens, self._last_time = tokens, now
        if metrics:
            mlflow.log_metrics(metrics, step=state.global_step)


class CheckpointLogger(TrainerCallback):
    """Copy each saved checkpoint into the run's artifacts (`checkpoints/checkpoint-N`), so a run can be resumed
    from any machine that reaches the tracking server, and make it an MLflow logged model (`log_checkpoint_model`).

    Checkpoints come every `save_steps` only: transformers also saves after the last step, but the run logs the
    final model itself, so that extra checkpoint would only cost time and disk (for a full fine-tune, the whole
    model and optimizer state once more). Likewise transformers evaluates after the last step; the run then
    evaluates the final model itself (base / few-shot / tuned, `eval/tuned/loss` included), so that extra pass
    would only cost time and log a second, differently computed `eval/tuned/loss`.
    """

    def __init__(self, logged_models: bool = True):
        # One adapter per task trains task after task with steps counted from 1 each time: their checkpoints share
        # folder names, so none of them is a model of its own.
        self.logged_models = logged_models

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_training_stop and control.should_save and state.save_steps \
                and state.global_step % state.save_steps:
            control.should_save = False
        if control.should_training_stop and control.should_evaluate and state.eval_steps \
                and state.global_step % state.eval_steps:
            control.should_evaluate = False
        return control

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            path = f"checkpoints/{folder.name}"
            mlflow.log_artifacts(str(folder), artifact_path=path)
            # Set only once every file is in: a process killed mid-copy leaves a newer folder without this mark.
            mlflow.set_tag(tags.LAST_CHECKPOINT, path)
            if self.logged_models:
                step_logs = [entry for entry in state.log_history if entry.get("step") == state.global_step]
                log_checkpoint_model(path, state.global_step, step_logs)


def run_metric_names(logs: dict, prefix: str = "") -> dict[str, float]:
    """Trainer logs under the run's metric names: `eval_loss` -> `eval/tuned/<prefix>loss`, the summary logged once
    at the end (`train_runtime`) -> `train/<prefix>summary_runtime`, anything else -> `train/<prefix><name>`."""
    metrics = {}
    for key, value in logs.items():
        if not isinstance(value, (int, float)) or key in ("total_flos", "step"):
            continue
        if key.startswith("eval_"):
            metrics[f"eval/tuned/{prefix}{key[5:]}"] = value
        elif key.startswith("train_"):
            metrics[f"train/{prefix}summary_{key[6:]}"] = value
        else:
            metrics[f"train/{prefix}{key}"] = value
    return metrics


def log_checkpoint_model(path: str, step: int, step_logs: list[dict]) -> str:
    """The checkpoint in the active run's artifacts at `path` as an MLflow logged model, `checkpoint-<step>`: an
    output of the run at `step`, with the run's lineage tags and the metrics the run logged at that step (eval loss
    on the eval set, train loss on the training set, each linked to that dataset input). Returns its model id.

    The model holds no copy of the weights (an external model): they stay in the run's `checkpoints/` where resume
    finds them, and are packaged as a servable model only when the checkpoint is registered
    (`publish.register_checkpoint`).
    """
    from mlflow.entities import LoggedModelOutput, Metric

    client = mlflow.MlflowClient()
    run = client.get_run(mlflow.active_run().info.run_id)
    run_id = run.info.run_id
    lineage = {k: v for k, v in run.data.tags.items() if k in tags.LINEAGE.values()}
    model = mlflow.create_external_model(
        name=f"checkpoint-{step}", source_run_id=run_id,
        tags={**lineage, tags.CHECKPOINT_STEP: str(step), tags.CHECKPOINT_PATH: path, tags.CHECKPOINT_RUN: run_id})
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    datasets = _datasets_by_context(run)
    names = {}
    for entry in step_logs:
        names.update(run_metric_names(entry))
    # The values MlflowMetrics already logged at this step, again with the model and dataset: the same timestamps
    # keep the run's own history free of doubles.
    metrics = {}
    for key in names:
        dataset = datasets.get("eval" if key.startswith("eval/") else "training")
        for m in client.get_metric_history(run_id, key):
            if m.step == step:
                metrics[key] = Metric(key, m.value, m.timestamp, step, model_id=model.model_id, run_id=run_id,
                                      dataset_name=dataset.name if dataset else None,
                                      dataset_digest=dataset.digest if dataset else None)
    if metrics:
        client.log_batch(run_id, metrics=list(metrics.values()))
    return model.model_id


def _datasets_by_context(run) -> dict:
    """`training` / `eval` -> the run's one dataset input of that context (none for a mixture's several)."""
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    found: dict[str, list] = {}
    for dataset_input in run.inputs.dataset_inputs if run.inputs else []:
        context = next((t.value for t in dataset_input.tags if t.key == MLFLOW_DATASET_CONTEXT), None)
        found.setdefault(context, []).append(dataset_input.dataset)
    return {context: datasets[0] for context, datasets in found.items() if len(datasets) == 1}


class DropReferenceAdapter(TrainerCallback):
    """TRL adds a frozen `ref` copy of a pretrained adapter as the reference model (DPO continuing an adapter, GRPO
    with beta > 0); the logged model is the `default` adapter only."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and "ref" in getattr(model, "peft_config", {}):
            model.set_adapter("default")
            model.delete_adapter("ref")
