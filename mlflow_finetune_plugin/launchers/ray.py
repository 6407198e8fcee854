"""Launcher `ray`: the training command as a Ray Job on a Ray cluster.

`--backend-config '{"launcher": "ray", "address": "http://HEAD:8265", "num_workers": 2, "use_gpu": true}'`.
The job's entrypoint is the same training command (under torchrun when `num_workers` > 1, on the node Ray
picks for it, which reserves `num_workers` CPUs or GPUs), wrapped in the supervisor that ends the MLflow run
if training dies. The job id is `mlflow-finetune-RUN_ID`. The SubmittedRun follows the job's status and log,
and cancel stops the job (Ray SIGTERMs every process of it, then SIGKILLs what is left).
"""

from __future__ import annotations

import json
import shlex
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.projects.submitted_run import SubmittedRun

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.launchers import local
from mlflow_finetune_plugin.launchers.torchrun import request_cancel, torchrun_command

# Environment the job needs from the submitting shell; the rest of it (PATH, HOME, ...) is the cluster's own.
_ENV_PREFIXES = ("MLFLOW_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "PYTHONPATH", "PYTHONUNBUFFERED",
                 "OMP_NUM_THREADS", "AWS_", "AZURE_", "GOOGLE_", "DATABRICKS_", "LITELLM_")
STOP_TIMEOUT = 60


def launch(cmd: list[str], run_id: str, env: dict, job_dir: Path, detach: bool = False, cwd=None,
           address: str | None = None, num_workers: int = 1, use_gpu: bool = False):
    """Submit `cmd` for `run_id` as a Ray Job; returns a SubmittedRun that follows it."""
    client = job_client(address)
    python = sys.executable if _is_local(address) else "python"
    if num_workers > 1:
        cmd = torchrun_command(cmd, run_id, nproc_per_node=num_workers)
    cmd = [python if c == sys.executable else c for c in cmd]
    entrypoint = shlex.join([python, "-m", "mlflow_finetune_plugin.launchers.supervise", "--run-id", run_id,
                             "--", *cmd])
    if cwd:
        entrypoint = f"cd {shlex.quote(str(cwd))} && {entrypoint}"
    env_vars = {k: v for k, v in env.items() if k.startswith(_ENV_PREFIXES)}
    env_vars["MLFLOW_TRACKING_URI"] = _absolute_uri(env_vars.get("MLFLOW_TRACKING_URI", ""), cwd)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=job_id_for(run_id),
        runtime_env={"env_vars": env_vars},
        metadata={"mlflow_run_id": run_id},
        entrypoint_num_cpus=0 if use_gpu else num_workers,
        entrypoint_num_gpus=num_workers if use_gpu else None,
    )
    (job_dir / "job.json").write_text(json.dumps({"launcher": "ray", "address": address, "job_id": job_id,
                                                  "detached": detach, "entrypoint": entrypoint}))
    return RaySubmittedRun(run_id, address, job_id, client)


def check(address: str | None = None, num_workers: int = 1, use_gpu: bool = False) -> None:
    """Raise FinetuneError unless Ray is installed and the cluster at `address` answers."""
    job_client(address)


def job_id_for(run_id: str) -> str:
    return f"mlflow-finetune-{run_id}"


class RaySubmittedRun(SubmittedRun):
    """A Ray Job: `wait()` streams its log and returns True when the run FINISHED; `cancel()` stops the
    job."""

    def __init__(self, run_id: str, address: str | None, job_id: str, client=None):
        self._run_id = run_id
        self.address = address
        self.job_id = job_id
        self._client = client or job_client(address)
        self._log_offset = 0

    @property
    def run_id(self) -> str:
        return self._run_id

    def wait(self) -> bool:
        try:
            with local.stop_signals_interrupt():
                status = self._follow()
        except KeyboardInterrupt:
            print(f"\nInterrupted: cancelling run {self._run_id} (Ray job {self.job_id}) ...",
                  file=sys.stderr)
            self.cancel()
            raise
        return finalize(self._run_id, self.job_id, status, self._client) == "FINISHED"

    def get_status(self) -> str:
        if not self._client.get_job_status(self.job_id).is_terminal():
            return RunStatus.to_string(RunStatus.RUNNING)
        return MlflowClient().get_run(self._run_id).info.status

    def cancel(self) -> None:
        stop_job(self._run_id, self._client, self.job_id)

    def _follow(self):
        """Print the job's log as it grows until the job ends; returns its final JobStatus."""
        while True:
            status = self._client.get_job_status(self.job_id)
            self._print_new_log()
            if status.is_terminal():
                return status
            time.sleep(1.0)

    def _print_new_log(self) -> None:
        try:
            text = self._client.get_job_logs(self.job_id)
        except Exception:  # noqa: BLE001 - a log hiccup must not stop following the job
            return
        if len(text) > self._log_offset:
            sys.stdout.write(text[self._log_offset:])
            sys.stdout.flush()
            self._log_offset = len(text)


def stop_job(run_id: str, client, job_id: str) -> str:
    """Stop the Ray job of `run_id`, wait until Ray says it ended, and leave the run KILLED."""
    request_cancel(run_id)
    client.stop_job(job_id)
    deadline = time.monotonic() + STOP_TIMEOUT
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    return finalize(run_id, job_id, status, client, cancelled=True)


def finalize(run_id: str, job_id: str, status, client, cancelled: bool = False) -> str:
    """End a run its job left RUNNING (job killed, or the entrypoint never started training); returns its
    status."""
    mlflow_client = MlflowClient()
    run_status = mlflow_client.get_run(run_id).info.status
    if RunStatus.is_terminated(RunStatus.from_string(run_status)):
        return run_status
    if cancelled or str(status) == "STOPPED":
        final, message = "KILLED", "cancelled"
    else:
        final = "FAILED"
        try:
            detail = client.get_job_info(job_id).message or ""
        except Exception:  # noqa: BLE001
            detail = ""
        message = (f"Ray job {job_id} ended {status} without ending the run{': ' + detail if detail else ''} "
                   f"(its log: `ray job logs {job_id}`; last checkpoint, if any, under the run's "
                   "checkpoints/)")
    mlflow_client.set_tag(run_id, tags.ERROR, message[:4900])
    mlflow_client.set_terminated(run_id, final)
    return final


def job_client(address: str | None):
    """A JobSubmissionClient for `address`, with an error that says what to do when Ray is missing or down."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise FinetuneError("launcher 'ray' needs Ray: from the project's clone, "
                            "pip install -e '.[ray]'") from None
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, ValueError, RuntimeError...
        raise FinetuneError(
            f"cannot reach the Ray cluster at {address or '$RAY_ADDRESS / a local cluster'}: {e}. "
            "Start one with `ray start --head` and pass its dashboard address, e.g. "
            "--backend-config '{\"launcher\": \"ray\", \"address\": \"http://127.0.0.1:8265\"}'") from None


def _is_local(address: str | None) -> bool:
    if not address or address == "auto":
        return True
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return host in ("127.0.0.1", "localhost", "::1", socket.gethostname(), socket.getfqdn())


def _absolute_uri(uri: str, cwd) -> str:
    """`sqlite:///mlflow.db` is relative to the submitting shell's folder; the job runs elsewhere."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str((Path(cwd or ".") / uri[len(prefix):]).resolve())
    return uri
