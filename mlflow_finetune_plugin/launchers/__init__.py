"""Launchers start the training command somewhere and return a SubmittedRun that waits, polls and cancels.

Each module provides `launch(cmd, run_id, env, job_dir, detach=False, cwd=None, **config) -> SubmittedRun`.
"""

from mlflow_finetune_plugin.launchers import local

LAUNCHERS = {
    "local": local,
}
