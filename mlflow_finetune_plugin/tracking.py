"""How a run records its own end: the error as a tag and an artifact, and the terminal status."""

from __future__ import annotations

import traceback

from mlflow import MlflowClient

ERROR_TAG = "finetune.error"


def record_failure(run_id: str, exc: BaseException, status: str = "FAILED") -> None:
    """Mark the run terminated with `status`, the error as a tag and the traceback as `error.txt`."""
    from mlflow_finetune_plugin.errors import FinetuneError

    client = MlflowClient()
    message = str(exc) if isinstance(exc, FinetuneError) else f"{type(exc).__name__}: {exc}"
    if status == "KILLED":
        message = "cancelled" + (f" ({exc})" if str(exc) else "")
    try:
        client.set_tag(run_id, ERROR_TAG, message[:4900])
        text = message if isinstance(exc, FinetuneError) else "".join(traceback.format_exception(exc))
        client.log_text(run_id, text, "error.txt")
    finally:
        client.set_terminated(run_id, status)
