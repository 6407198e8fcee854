"""What a job's MLflow runs say, in OpenAI's shapes: the metrics events, the checkpoints (with step and loss),
the metrics CSV of `result_files`, the tokens trained, and the fine-tuned model's id (`NAME-vN`, the name the
same server answers at /v1/chat/completions)."""

from __future__ import annotations

import csv
import io

from mlflow_finetune_plugin import tags

LOSS = "train/loss"
TOKENS = "train/num_tokens"
# CSV column -> the run's metric
CSV_COLUMNS = {"train_loss": LOSS, "train_mean_token_accuracy": "train/mean_token_accuracy",
               "learning_rate": "train/learning_rate", "valid_loss": "eval/tuned/loss"}
# a checkpoint's metrics as OpenAI names them -> the run's metric
CHECKPOINT_METRICS = {"train_loss": LOSS, "train_mean_token_accuracy": "train/mean_token_accuracy",
                      "valid_loss": "eval/tuned/loss",
                      "valid_mean_token_accuracy": "eval/tuned/mean_token_accuracy"}


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def history(run_id: str, metric: str) -> list:
    try:
        return sorted(_client().get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))
    except Exception:  # noqa: BLE001 - a run without the metric (yet)
        return []


def metric_events(job_id: str, runs: list[str]) -> list[dict]:
    """One `metrics` event per logged training loss, as OpenAI reports steps."""
    events = []
    for run_id in runs:
        for m in history(run_id, LOSS):
            events.append({"object": "fine_tuning.job.event", "id": f"ftevent-{run_id[:12]}-{m.step}",
                           "created_at": int(m.timestamp / 1000), "level": "info", "type": "metrics",
                           "message": f"Step {m.step}: training loss={m.value:.4f}",
                           "data": {"step": m.step, "train_loss": m.value}, "_t": m.timestamp / 1000})
    return events


def checkpoints(job_id: str, runs: list[str]) -> list[dict]:
    """The checkpoints of the job's runs, newest first: the logged model `checkpoint-N` of each saved step
    (the end of each of the last three epochs and the last step, and every train.save_steps; register one with
    `mlflow-finetune models NAME --register-checkpoint MODEL_ID`), with OpenAI's metrics at that step: the
    training ones as last logged by then, the validation ones where the run evaluated at that very step."""
    from mlflow_finetune_plugin.registry.versions import checkpoint_models

    out = []
    for run_id in runs:
        logged = {name: {m.step: m.value for m in history(run_id, metric)} for name,
                  metric in CHECKPOINT_METRICS.items()}
        for model in checkpoint_models(run_id):
            step = int(model.tags[tags.CHECKPOINT_STEP])
            metrics = {"step": step}
            for name, values in logged.items():
                known = [s for s in values if s <= step] if name.startswith("train_") else [s for s in values
                                                                                            if s == step]
                if known:
                    metrics[name] = values[max(known)]
            out.append({"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{model.model_id}",
                        "created_at": int(model.creation_timestamp / 1000), "fine_tuning_job_id": job_id,
                        "fine_tuned_model_checkpoint": model.model_id, "step_number": step,
                        "metrics": metrics})
    return sorted(out, key=lambda c: (c["created_at"], c["step_number"]), reverse=True)


def metrics_csv(runs: list[str]) -> bytes:
    """step, train_loss, ... for every step any of the job's runs logged (a resumed run continues the
    steps)."""
    table: dict[int, dict] = {}
    for run_id in runs:
        for column, metric in CSV_COLUMNS.items():
            for m in history(run_id, metric):
                table.setdefault(m.step, {})[column] = m.value
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["step", *CSV_COLUMNS])
    for step in sorted(table):
        writer.writerow([step, *(table[step].get(c, "") for c in CSV_COLUMNS)])
    return out.getvalue().encode()


def trained_tokens(runs: list[str]) -> int | None:
    """Tokens trained, as TRL counts them (`num_tokens`), over the job's runs; None where the trainer counts
    none."""
    counts = [history(run_id, TOKENS) for run_id in runs]
    if not any(counts):
        return None
    # A resumed run counts on from its checkpoint's count: the last run's last value is the total.
    return int(next(c for c in reversed(counts) if c)[-1].value)


FT = "ft:"


def fine_tuned_model(run_id: str) -> str | None:
    """`ft:NAME-vN` for the version the run registered (None when it registered none): `NAME-vN` as `serve`
    names it, behind OpenAI's `ft:` mark of a fine-tuned model, which clients route by (litellm sends an `ft:`
    model to the OpenAI provider, so DSPy's fine-tuned LM answers through this server)."""
    from mlflow_finetune_plugin.serving.base import ModelChoice
    from mlflow_finetune_plugin.serving.choices import served_name

    run_tags = _client().get_run(run_id).data.tags
    name, version = run_tags.get(tags.REGISTERED_MODEL), run_tags.get(tags.REGISTERED_VERSION)
    return FT + served_name(ModelChoice(name, version)) if name and version else None
