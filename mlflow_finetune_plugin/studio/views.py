"""What the studio page shows, as plain data: the recipe keys' table and the overrides it amounts to, the
status line, the charts' frames, the queue's and history's rows, the uploaded files' roles (no Gradio
here)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

KEY_HEADERS = ["key", "value", "default", "type", "help"]
HISTORY_HEADERS = ["run", "id", "method", "model", "settings", "status", "verdict", "started", "took"]
# MLflow's system metrics shown in the status line: (label, unit)
# the machine's, every process's: labelled so, beside the run's own memory
SYSTEM = {"cpu_utilization_percentage": ("machine CPU", "%"),
          "system_memory_usage_megabytes": ("machine memory in use", " MB")}
CHARTS = (("loss", "Training loss"), ("eval_loss", "Eval loss"), ("learning_rate", "Learning rate"),
          ("grad_norm", "Grad norm"))
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")






def key_rows(fields) -> list[list]:
    """The table's rows: every key but the model (its own picker), value = default until edited."""
    return [[f.key, text(f.default), text(f.default), f.accepts or f.kind + (
        f" ({', '.join(f.choices)})" if f.choices else ""), f.help] for f in fields if f.key != "model.name"]


def text(value) -> str:
    from mlflow_finetune_plugin.studio.recipe_form import to_param

    return "" if value is None else to_param(value)


def overrides_of(fields, rows, model: str | None, model_default: str | None) -> dict[str, str]:
    """The keys whose value the table changed (the -P of the command line), and the model when changed."""
    from mlflow_finetune_plugin.studio.recipe_form import changed_overrides

    values = {str(r[0]): "" if r[1] is None else str(r[1]) for r in rows_of(rows) if r and r[0]}
    out = changed_overrides(fields, values)
    if model and model.strip() and model.strip() != (model_default or ""):
        out["model.name"] = model.strip()
    return out


def rows_of(table) -> list[list]:
    if table is None:
        return []
    if hasattr(table, "values"):  # a pandas DataFrame
        return table.values.tolist()
    return [list(r) for r in table]


def plot_frame(points, name: str):
    import pandas as pd

    return pd.DataFrame({"step": [p[0] for p in points], "value": [p[1] for p in points],
                         "series": [name] * len(points)})


def records(items) -> tuple[list[str], list[list]]:
    rows = [dataclasses.asdict(i) if dataclasses.is_dataclass(i) else dict(i) for i in items]
    headers = list(rows[0]) if rows else []
    return headers, [[text(r.get(h)) for h in headers] for r in rows]


def job_label(job) -> str:
    from pathlib import Path

    if job.id == job.run_id:  # started elsewhere (`mlflow run` in a terminal): named by its run
        return f"{job.state} · {job.project} · -e {job.entry_point} · run {job.run_id[:8]} · from a terminal"
    run = f" · run {job.run_id[:8]}" if job.run_id else ""
    return f"{job.state} · {Path(job.project).name} · -e {job.entry_point}{run} · {job.id[:8]}"


def duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def status_line(p) -> str:
    """One line: where the run is (step, epoch, ETA, tokens/s, the last checkpoint, memory)."""
    parts = [f"**{p.status}**"]
    if p.step is not None:
        parts.append(f"step {p.step}" + (f"/{p.max_steps}" if p.max_steps else ""))
    if p.epoch is not None:
        parts.append(f"epoch {p.epoch:.2f}")
    if p.eta_s is not None and p.status == "RUNNING":
        parts.append(f"ETA {duration(p.eta_s)}")
    if p.tokens_per_s:
        parts.append(f"{p.tokens_per_s:,.0f} tokens/s")
    if p.status in ("RUNNING", "KILLED", "FAILED"):  # where Resume would start
        parts.append(f"checkpoint at step {p.checkpoint}" if p.checkpoint is not None
                     else "no checkpoint yet")
    if p.memory_gib:
        parts.append(f"run memory {p.memory_gib:.2f} GiB (its training process, peak)")
    system = p.system or {}
    for name, (label, unit) in SYSTEM.items():
        if isinstance(system.get(name), (int, float)):
            parts.append(f"{label} {system[name]:,.0f}{unit}")
    gpu = [v for k, v in system.items() if k.startswith("gpu_") and k.endswith("memory_usage_megabytes")]
    if gpu:
        parts.append(f"GPU memory {sum(gpu):,.0f} MB")
    return " · ".join(parts)


def history_rows(summaries) -> list[list]:
    import time

    def started(t):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"

    return [[s.name, s.run_id[:8], s.method or "-", s.model or "-",
             ", ".join(f"{k} {v}" for k, v in (s.settings or {}).items()), s.status, s.verdict or "-",
             started(s.start_time), duration(s.duration_s)] for s in summaries]


def guess_files(names: list[str]) -> tuple[str, str | None]:
    """The training file and the held-out one among uploaded data files, by their names (train*,
    eval/test/valid*); the page lets the user pick others."""
    def named(*words):
        return next((n for n in names if any(w in n.lower() for w in words)), None)

    held_out = named("eval", "test", "valid", "dev")
    train = named("train") or next((n for n in names if n != held_out), names[0])
    return train, held_out if held_out != train else None


def upload_path(f) -> object:
    return Path(f if isinstance(f, str) else getattr(f, "name", None) or f["path"])
