"""The thread that moves jobs along, one look every second (the queue is launchers/queue.py's, the start
launchers/submit.py's: the same `mlflow run` a user types):

validating_files  the backend's own checks of the recipe and the data, with the model's tokenizer (what
`mlflow
                  run` checks before it creates a run): a failure is the job's error, with the file's line
queued            waits for a slot (--max-jobs), then `mlflow run PROJECT -e ENTRY --backend finetune` with
the
                  server's --backend-config and `"detach": true`: the same launcher as the CLI, and a run that
                  goes on when the server stops
running           the run's status, read from the tracking store: FINISHED -> succeeded (the registered
version,
                  the metrics CSV, the tokens), FAILED -> failed (the run's error), KILLED -> cancelled (or
                  paused)

Everything it knows is in the job records and the runs, so a restarted server picks every job up where it was.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.finetuning_api import progress
from mlflow_finetune_plugin.finetuning_api.files import RESULTS, FileStore
from mlflow_finetune_plugin.finetuning_api.jobs import TERMINAL, JobStore, Settings, add_event
from mlflow_finetune_plugin.finetuning_api.shapes import APIError
from mlflow_finetune_plugin.launchers.queue import Queue
from mlflow_finetune_plugin.launchers.submit import Started, command

POLL_S = 1.0  # how often jobs are looked at: a status changes within this long


class Runner(Queue):
    """The queue of the server's jobs: a job holds a slot while `running`, and keeps `queued` while its
    `mlflow run` starts (one thread claims and starts); `mlflow run` starts in the job's folder, in this
    process's store."""

    poll_s = POLL_S

    def __init__(self, store: JobStore, files: FileStore, settings: Settings):
        super().__init__(store, settings.max_jobs, state="status", waiting="queued", busy=("running",),
                         name="fine-tuning-jobs")
        self.files, self.settings = files, settings

    def stop(self) -> None:
        self._stopping.set()

    def refresh(self, job: dict) -> dict:
        """Validate a new job, follow a running one (queued ones start in `step`, oldest first)."""
        try:
            if job["status"] == "validating_files":
                self._validate(job)
            elif job["status"] == "running":
                self._follow(job)
        except Exception as e:  # noqa: BLE001 - one job's trouble must not stop the others
            self._fail(job["id"], "server_error", f"the server could not move the job on: {e}")
        return job

    def _validate(self, job: dict) -> None:
        from mlflow_finetune_plugin.backend import resolve_entry_point
        from mlflow_finetune_plugin.data.formats import DataError

        inner = job["_internal"]
        try:
            resolve_entry_point(inner["project"], inner["entry_point"], dict(self.settings.overrides))
        except Exception as e:  # noqa: BLE001 - the backend's checks word every problem; the job carries it
            message, data = str(e), f"{inner['project']}/data/"
            if data + "train.jsonl" in message or isinstance(e, DataError):
                return self._fail(job["id"], "invalid_training_file", self._named(job, message),
                                  "training_file")
            if data + "validation.jsonl" in message:
                return self._fail(job["id"], "invalid_validation_file", self._named(job, message),
                                  "validation_file")
            return self._fail(job["id"], "invalid_request", message, None)

        def queued(j):
            if j["status"] != "validating_files":  # cancelled meanwhile
                return
            j["status"] = "queued"
            add_event(j, "Validated training file: " + j["training_file"])
        self.store.update(job["id"], queued)

    def _named(self, job: dict, message: str) -> str:
        """The backend's message with the job's data files called by the names they were uploaded with."""
        for local, file_id in (("train.jsonl", job["training_file"]),
                               ("validation.jsonl", job["validation_file"])):
            if file_id:
                name = self.files.retrieve(file_id)["filename"]
                message = re.sub(r"\S*/data/" + re.escape(local), name, message)
        return message

    def command(self, job: dict) -> list[str]:
        inner = job["_internal"]
        params = dict(self.settings.overrides)
        if inner["resume_from"]:
            params["train.resume"] = inner["resume_from"]
        return command(inner["project"], inner["entry_point"], params, self.settings.backend_config,
                       self.settings.experiment)

    def launch(self, job: dict) -> None:
        try:
            super().launch(job)
        except Exception as e:  # noqa: BLE001 - one job's trouble must not stop the others
            self._fail(job["id"], "server_error", f"the server could not move the job on: {e}")

    def log_path(self, job: dict) -> Path:
        return self.store.folder(job["id"]) / f"launch-{len(job['_internal']['runs']) + 1}.log"

    def started(self, job: dict, outcome: Started) -> None:
        run_id = outcome.run_id
        if run_id is None:
            return self._fail(job["id"], "launch_failed",
                              f"`mlflow run` did not start the job: {outcome.error}")
        self._tag(run_id, job)

        def running(j):
            if j["status"] != "queued":  # cancelled while it launched: stop what started
                return
            j["status"] = "running"
            j["_internal"]["runs"].append(run_id)
            j["_internal"]["resume_from"] = None
            add_event(j, f"Fine-tuning job started: MLflow run {run_id}")
        job = self.store.update(job["id"], running)
        if job["status"] != "running":
            self._stop_run(run_id)

    def _tag(self, run_id: str, job: dict) -> None:
        from mlflow import MlflowClient

        client = MlflowClient()
        client.set_tag(run_id, tags.OPENAI_JOB, job["id"])
        if job["user_provided_suffix"]:
            client.set_tag(run_id, tags.OPENAI_SUFFIX, job["user_provided_suffix"])
        if job["metadata"]:
            client.set_tag(run_id, tags.OPENAI_METADATA, json.dumps(job["metadata"]))

    def _follow(self, job: dict) -> None:
        from mlflow import MlflowClient

        runs = job["_internal"]["runs"]
        run = MlflowClient().get_run(runs[-1])
        status = run.info.status
        if status in ("RUNNING", "SCHEDULED"):
            tokens = progress.trained_tokens(runs)
            if tokens != job["trained_tokens"]:
                self.store.update(job["id"], lambda j: j.update(trained_tokens=tokens))
            return
        if status == "FINISHED":
            return self._succeed(job, runs)
        if status == "KILLED":
            paused = job["_internal"]["pause"]

            def ended(j):
                if j["status"] != "running":  # the API ended it already
                    return
                j["status"] = "paused" if paused else "cancelled"
                j["finished_at"] = None if paused else int(time.time())
                add_event(j, "Fine-tuning job paused" if paused else "Fine-tuning job cancelled")
            self.store.update(job["id"], ended)
            return
        error = run.data.tags.get(tags.ERROR, f"the run ended {status}")
        self._fail(job["id"], "training_failed", error.strip().splitlines()[0] if error.strip() else error)

    def _succeed(self, job: dict, runs: list[str]) -> None:
        model = progress.fine_tuned_model(runs[-1])
        csv_file = self.files.create(progress.metrics_csv(runs), "step_metrics.csv", RESULTS,
                                     written_by_server=True)
        tokens = progress.trained_tokens(runs)

        def succeeded(j):
            if j["status"] != "running":
                return
            j.update(status="succeeded", fine_tuned_model=model, finished_at=int(time.time()),
                     result_files=[csv_file["id"]], trained_tokens=tokens)
            add_event(j, f"New fine-tuned model created: {model}" if model else
                      "The run registered no model version (registry.enabled is off?)")
            add_event(j, "The job has successfully completed")
        self.store.update(job["id"], succeeded)

    def _fail(self, job_id: str, code: str, message: str, param: str | None = None) -> None:
        def failed(j):
            if j["status"] in TERMINAL:  # cancelled meanwhile: that stands
                return
            j.update(status="failed", finished_at=int(time.time()),
                     error={"code": code, "message": message, "param": param})
            add_event(j, f"Fine-tuning job failed: {message}", "error")
        self.store.update(job_id, failed)

    # --- what the API asks for ------------------------------------------------------------------------------

    def cancel(self, job_id: str, pause: bool = False) -> dict:
        job = self.store.get(job_id)
        verb = "pause" if pause else "cancel"
        if job["status"] in TERMINAL or (job["status"] == "paused" and pause):
            raise APIError(400, f"job {job_id} is {job['status']}: there is nothing to {verb}",
                           code=f"invalid_{verb}", param="fine_tuning_job_id")
        if pause and job["status"] != "running":
            raise APIError(400,
                           f"job {job_id} is {job['status']}: only a running job can be paused (it resumes "
                           "from its last checkpoint)", code="invalid_pause", param="fine_tuning_job_id")
        # The status first: the runner then leaves the job alone, and reads no KILLED run as a cancel of its
        # own.
        def stopped(j):
            j["_internal"]["pause"] = pause
            if pause:
                j["status"] = "paused"
                add_event(j, "Fine-tuning job paused; resume it to go on from its last checkpoint")
            else:
                j.update(status="cancelled", finished_at=int(time.time()))
                add_event(j, "Fine-tuning job cancelled")
        running = job["status"] == "running"
        job = self.store.update(job_id, stopped)
        if running:
            self._stop_run(job["_internal"]["runs"][-1])
        return job

    def resume(self, job_id: str) -> dict:
        job = self.store.get(job_id)
        if job["status"] != "paused":
            raise APIError(400, f"job {job_id} is {job['status']}: only a paused job resumes",
                           code="invalid_resume", param="fine_tuning_job_id")

        def queued(j):
            j["status"] = "queued"
            j["_internal"].update(pause=False, resume_from=j["_internal"]["runs"][-1])
            add_event(j, "Fine-tuning job resumed: it continues from the last checkpoint")
        return self.store.update(job_id, queued)

    def _stop_run(self, run_id: str) -> None:
        self.stop_run(run_id)  # in this process's store (the queue's env is None)
