"""`mlflow-finetune cancel RUN_ID`: stop a fine-tune's job on any launcher and leave its run KILLED.

The job is found from the run id alone: `job.json` in the run's job folder on the machine that launched it,
else the `finetune.job.*` tags the backend put on the run (enough for a Ray job, from any machine).
"""

from __future__ import annotations

import json
import socket

from mlflow import MlflowClient
from mlflow.entities import RunStatus

from mlflow_finetune_plugin import paths, tags
from mlflow_finetune_plugin.errors import FinetuneError


def cancel_run(run_id: str) -> tuple[str, bool]:
    """Stop the job of `run_id`; returns the run's final status and whether this call stopped it (False: the
    run had already ended with that status)."""
    from mlflow_finetune_plugin.launchers import local, ray, torchrun

    client = MlflowClient()
    try:
        status = client.get_run(run_id).info.status
    except Exception as e:  # noqa: BLE001 - MLflow raises MlflowException / RestException for unknown ids
        raise FinetuneError(f"no run {run_id!r} in the tracking store ({client.tracking_uri}): {e}") from None
    if RunStatus.is_terminated(RunStatus.from_string(status)):
        return status, False
    job = job_info(run_id)
    launcher = job.get("launcher", "local")
    if launcher == "ray":
        return ray.stop_job(run_id, ray.job_client(job.get("address")), job["job_id"]), True
    host = job.get("host")
    if host and host != socket.gethostname():
        raise FinetuneError(f"run {run_id} runs on {host} ({launcher} launcher); cancel it there: "
                            f"ssh {host} mlflow-finetune cancel {run_id}")
    pid = int(job["pid"]) if job.get("pid") else None
    torchrun.request_cancel(run_id)
    if pid is not None and _belongs_to(pid, run_id):
        torchrun.stop_process_tree(pid)
    # Nothing left to stop (the job died without ending its run): the cancel still ends it.
    return local.finalize(run_id, None, cancelled=True), True


def job_info(run_id: str) -> dict:
    """Where the job of `run_id` runs: launcher, pid or Ray job id and address, host."""
    job_file = paths.cache_root() / "runs" / run_id / "job.json"
    if job_file.exists():
        return {"host": socket.gethostname(), **json.loads(job_file.read_text())}
    run_tags = MlflowClient().get_run(run_id).data.tags
    job = {key: run_tags[name] for key, name in tags.JOB_KEYS.items() if name in run_tags}
    if not job:
        raise FinetuneError(
            f"run {run_id} was not started by the finetune backend (no job recorded): nothing to "
            "cancel. A run started by `mlflow run` without --backend finetune stops with Ctrl-C.")
    return job


def _belongs_to(pid: int, run_id: str) -> bool:
    """The process is still this run's job (its command line or environment names the run), not a reused
    pid."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if any(run_id in part for part in proc.cmdline()):
            return True
        return proc.environ().get("MLFLOW_RUN_ID") == run_id
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
