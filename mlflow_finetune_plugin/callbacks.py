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
        metrics = {}
        for key, value in logs.items():
            if not isinstance(value, (int, float)) or key in ("total_flos",):
                continue
            if key.startswith("eval_"):
                metrics[f"eval/tuned/{self.prefix}{key[5:]}"] = value
            elif key.startswith("train_"):  # the summary logged once at the end
                metrics[f"train/{self.prefix}summary_{key[6:]}"] = value
            else:
                metrics[f"train/{self.prefix}{key}"] = value
        tokens = logs.get("num_tokens")
        now = time.perf_counter()
        if tokens is not None and self._last_time is not None and now > self._last_time:
            metrics[f"train/{self.prefix}tokens_per_second"] = (tokens - self._last_tokens) / (now - self._last_time)
            self._last_tokens, self._last_time = tokens, now
        if metrics:
            mlflow.log_metrics(metrics, step=state.global_step)


class CheckpointLogger(TrainerCallback):
    """Copy each saved checkpoint into the run's artifacts (`checkpoints/checkpoint-N`), so a run can be resumed
    from any machine that reaches the tracking server.

    Checkpoints come every `save_steps` only: transformers also saves after the last step, but the run logs the
    final model itself, so that extra checkpoint would only cost time and disk (for a full fine-tune, the whole
    model and optimizer state once more). Likewise transformers evaluates after the last step; the run then
    evaluates the final model itself (base / few-shot / tuned, `eval/tuned/loss` included), so that extra pass
    would only cost time and log a second, differently computed `eval/tuned/loss`.
    """

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
            mlflow.log_artifacts(str(folder), artifact_path=f"checkpoints/{folder.name}")
            # Set only once every file is in: a process killed mid-copy leaves a newer folder without this mark.
            mlflow.set_tag(tags.LAST_CHECKPOINT, f"checkpoints/{folder.name}")


class DropReferenceAdapter(TrainerCallback):
    """TRL adds a frozen `ref` copy of a pretrained adapter as the reference model (DPO continuing an adapter, GRPO
    with beta > 0); the logged model is the `default` adapter only."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and "ref" in getattr(model, "peft_config", {}):
            model.set_adapter("default")
            model.delete_adapter("ref")
