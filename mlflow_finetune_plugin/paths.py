"""Where the plugin keeps local files: the tiny model build and per-run job folders (logs, checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$MLFLOW_FINETUNE_CACHE, else $XDG_CACHE_HOME/mlflow-finetune, else ~/.cache/mlflow-finetune."""
    if os.environ.get("MLFLOW_FINETUNE_CACHE"):
        return Path(os.environ["MLFLOW_FINETUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mlflow-finetune"


def job_dir(run_id: str) -> Path:
    """The local folder of one run's job: resolved recipe, job log, checkpoints before they are logged."""
    path = cache_root() / "runs" / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path
