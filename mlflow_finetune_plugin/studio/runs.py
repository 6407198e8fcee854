"""The Train page's runs: ordinary `mlflow run PROJECT -e ENTRY --backend finetune` runs, detached, queued,
and started one at a time (or `max_parallel` at once) in the order they were submitted.

The command, its start and the queue are launchers' (`submit.command`, `queue.Queue`): what a user types,
with `"detach": true` added to the backend config, so a run goes on when the page closes. Stopping a run is
`mlflow-finetune cancel RUN_ID` (the run ends KILLED, its logged checkpoints kept); resuming one is a new job
with `-P train.resume=RUN_ID` (it continues from that run's last checkpoint).

Each job is a record on disk, `<state_dir>/jobs/<job id>/job.json`, beside `launch.log` (the output of `mlflow
run`); what became of its run is read from the tracking store. A new Launcher on the same folder (the app
restarted) shows every job where it is and takes the queue over; Launchers sharing a folder take turns under a
file lock, so a job is launched once.

    queued -> starting (`mlflow run` checks the recipe and data, creates the run, starts its job)
           -> running (the run id is known) -> finished | failed | killed (how the run ended)
    queued or starting -> killed (stopped before it ran);  starting -> failed (`mlflow run` started no run:
    its reason)
"""

from __future__ import annotations

import os
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.launchers.queue import LAUNCH_LOG, JobStore, Queue
from mlflow_finetune_plugin.launchers.submit import Started, command, store_env

STATES = ("queued", "starting", "running", "finished", "failed", "killed")
ENDED = ("finished", "failed", "killed")
BUSY = ("starting", "running")  # the jobs that hold one of the max_parallel slots
# MLflow's run status -> the job's state
ENDS = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "killed"}
RUN_ID = re.compile(r"[0-9a-f]{32}")
OTHERS_S = 10.0  # how often the Runs tab looks for runs started elsewhere


@dataclass
class Job:
    id: str
    project: str                 # the project folder, absolute
    entry_point: str
    params: dict[str, str]       # the -P overrides
    state: str                   # one of STATES
    run_id: str | None
    argv: list[str]              # the exact `mlflow run` command
    created: float               # time.time() at submit
    error: str | None = None     # why it failed (the run's error, or `mlflow run`'s reason)
    experiment: str | None = None

    @property
    def ended(self) -> bool:
        return self.state in ENDED


def _job(record: dict) -> Job:
    return Job(**{f.name: record.get(f.name) for f in fields(Job)})


class Launcher(Queue):
    """Starts, queues, follows, stops and resumes the page's runs; `start()` its thread, `close()` it at the
    end.

    backend_config: `mlflow run --backend-config` (launcher, nproc_per_node, ...), `"detach": true` added.
    tracking_uri: the tracking and registry store the runs go to; default this process's (a relative sqlite
    path made absolute). `mlflow run` starts in this process's working folder, as when a user types it there.
    """

    poll_s = 1.0  # how often the thread looks at the jobs: a run's end shows within this long

    def __init__(self, state_dir: Path, backend_config: dict | None = None, max_parallel: int = 1,
                 tracking_uri: str | None = None):
        if not isinstance(backend_config or {}, dict):
            raise FinetuneError(f"backend_config must be a dict such as {{\"launcher\": \"torchrun\"}} "
                                f"(got {backend_config!r})")
        self.state_dir = Path(state_dir).expanduser().resolve()
        env = store_env(tracking_uri, tracking_uri)
        # Launchers sharing a folder (the app restarted, two apps) take turns under a file lock: a job starts
        # once.
        super().__init__(JobStore(self.state_dir, shared=True), max_parallel, starting="starting", busy=BUSY,
                         cwd=os.getcwd(), env=env, name="studio launcher")
        self.records = self.store
        self.backend_config = dict(backend_config or {})
        self.tracking_uri = self.env.get("MLFLOW_TRACKING_URI")
        self._client = None
        self._others = None  # (when, the store's runs of the plugin), for listed()

    # --- what the page asks for
    # -----------------------------------------------------------------------------------

    def submit(self, project_dir, entry_point: str, params: dict[str, str] | None = None,
               experiment: str | None = None) -> Job:
        """Queue `mlflow run PROJECT_DIR -e ENTRY_POINT --backend finetune -P k=v ...` (in `experiment`, else
        MLflow's default experiment); it starts when a slot is free and every job submitted before it has
        started."""
        project = Path(project_dir).expanduser().resolve()
        if not project.is_dir():
            raise FinetuneError(f"project folder {project_dir} does not exist: give the folder that holds "
                                "finetune.yaml (and its data)")
        if not isinstance(entry_point, str) or not entry_point.strip():
            raise FinetuneError(
                "entry_point is empty: give one of the backend's (lora, qlora, full, dpo, ...) or one "
                "of the project's MLproject")
        params = _params(params or {})
        job = Job(id=f"job-{uuid.uuid4().hex[:12]}", project=str(project), entry_point=entry_point.strip(),
                  params=params, state="queued", run_id=None, created=time.time(),
                  experiment=experiment or None, argv=command(str(project), entry_point.strip(), params,
                                                              self.backend_config, experiment or None))
        self.records.save(asdict(job))
        return job

    def jobs(self) -> list[Job]:
        """Every job of the state folder, newest first, each where it is now (a run's end read from the
        store)."""
        for record in self.records.all():
            self.refresh(record)
        return [_job(r) for r in self.records.all()]

    def listed(self, limit: int = 20) -> list[Job]:
        """What the Runs tab lists, newest first: the page's jobs, and the plugin's other runs in the store
        (README command 1, any `mlflow run --backend finetune` typed elsewhere), each as a Job whose id is its
        run id, watched, chatted with, promoted and stopped as the page's own (its list read again at most
        every OTHERS_S seconds)."""
        jobs = self.jobs()
        if self._others is None or time.monotonic() - self._others[0] > OTHERS_S:
            from mlflow_finetune_plugin.studio.history import runs

            try:
                found = runs(client=self.client, max_results=limit)
            except Exception as e:  # noqa: BLE001 - the page's own jobs are listed all the same
                print(f"studio launcher: could not list the store's runs: {e}", file=sys.stderr)
                found = []
            self._others = (time.monotonic(), found)
        ours = {j.run_id for j in jobs if j.run_id}
        others = [Job(id=r.run_id, project=r.name or r.run_id[:8], entry_point=r.method or "-", params={},
                      state=ENDS.get(r.status, "running"), run_id=r.run_id, argv=[],
                      created=r.start_time or 0.0, experiment=r.experiment_id)
                  for r in self._others[1] if r.run_id not in ours]
        return sorted([*jobs, *others], key=lambda j: j.created, reverse=True)

    def job(self, job_or_run_id: str) -> Job:
        """One job, by its id or by the id of the run it started."""
        record = self._find(job_or_run_id)
        if record is None:
            raise FinetuneError(f"no job in {self.records.root} started run {job_or_run_id}")
        return _job(self.refresh(record))

    def log(self, job_id: str) -> str:
        """The output of the job's `mlflow run` (the checks, and why it started no run); the run's own log is
        `watch.progress(run_id).log_tail`."""
        path = self.records.folder(job_id) / LAUNCH_LOG
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, job_or_run_id: str) -> Job | None:
        """A queued job is dropped (it never runs: state killed, no run); a running run ends KILLED as
        `mlflow-finetune cancel` ends it, its logged checkpoints kept (resume it with `resume(run_id)`). A run
        this page did not start is cancelled all the same (returns None). An ended job is returned as it
        is."""
        record = self._find(job_or_run_id)
        if record is None:  # a run id no job here started
            self.stop_run(job_or_run_id)
            return None
        record = self.refresh(record)
        if record["state"] in ("queued", "starting"):  # a start under way goes on; `started` cancels its run
            record = self.drop(record["id"],
                               {"state": "killed", "error": "stopped before it started: no run was created"},
                               {"state": "killed", "error": "stopped while `mlflow run` started it"})
        if record["state"] == "running":
            self.stop_run(record["run_id"])
            record = self._follow(record)
        return _job(record)

    def resume(self, run_id: str) -> Job:
        """A new queued job: the run's project, entry point and params, and `train.resume=RUN_ID`, so it
        continues from that run's last complete checkpoint."""
        from mlflow_finetune_plugin.train.resume import resumable_checkpoints

        record = self._find(run_id) if RUN_ID.fullmatch(run_id or "") else None
        if record is None:
            raise FinetuneError(
                f"{run_id!r} is not a run this page started (no job in {self.records.root} has it): "
                f"resume it with `mlflow run PROJECT -e ENTRY --backend finetune -P train.resume="
                f"{run_id}`")
        status = self.client.get_run(run_id).info.status
        if status not in ENDS:
            raise FinetuneError(
                f"run {run_id} is {status}: stop it first (its last checkpoint is where the resumed "
                "run starts)")
        if not resumable_checkpoints(self.client, run_id):
            every = record["params"].get("train.save_steps", "train.save_steps")
            raise FinetuneError(
                f"run {run_id} logged no complete checkpoint (one is saved every {every} steps): "
                "there is nothing to resume from; submit the job again instead")
        params = {k: v for k, v in record["params"].items() if k not in ("train.resume", "resume")}
        return self.submit(record["project"], record["entry_point"], {**params, "train.resume": run_id},
                           record["experiment"])

    # --- the queue's side (launchers/queue.py) --------------------------------------------------------------

    def command(self, record: dict) -> list[str]:
        return record["argv"]

    def started(self, record: dict, outcome: Started) -> None:
        if outcome.run_id is None:
            def failed(r):
                if r["state"] == "starting":
                    r.update(state="failed", error=f"`mlflow run` started no run: {outcome.error}")
                r.pop("launcher", None)
            self.records.update(record["id"], failed)
            return
        run_id = outcome.run_id
        try:
            self.client.set_tag(run_id, tags.STUDIO_JOB, record["id"])
        except Exception as e:  # noqa: BLE001 - the job runs; the tag only links the run back to the page
            print(f"studio launcher: could not tag run {run_id}: {e}", file=sys.stderr)

        def running(r):
            r["run_id"] = run_id
            r.pop("launcher", None)
            if r["state"] == "starting":
                r["state"] = "running"
        if self.records.update(record["id"], running)["state"] == "killed":  # stopped while it started
            self.stop_run(run_id)

    def refresh(self, record: dict) -> dict:
        if record["state"] == "running":
            return self._follow(record)
        return super().refresh(record)

    # --- reading a job's state ------------------------------------------------------------------------------

    def _follow(self, record: dict) -> dict:
        """The job's state from its run's status, once the run has ended."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(record["run_id"])
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return self.records.update(record["id"], lambda r: r.update(
                state="failed",
                error=f"run {record['run_id']} is not in the tracking store {self.tracking_uri}"))
        state = ENDS.get(run.info.status)
        if state is None:
            return record
        error = None
        if state == "failed":
            error = run.data.tags.get(tags.ERROR,
                                      "").strip().splitlines()[:1] or [f"the run ended {run.info.status}"]
            error = error[0]

        def ended(r):
            if r["state"] == "running":
                r.update(state=state, error=error)
        return self.records.update(record["id"], ended)

    def _find(self, key: str) -> dict | None:
        if JobStore.ID.fullmatch(key or ""):
            return self.records.get(key)
        if RUN_ID.fullmatch(key or ""):
            return next((r for r in self.records.all() if r["run_id"] == key), None)
        raise FinetuneError(f"{key!r} is neither a job id (job-...) nor a run id (32 hex digits)")

    @property
    def client(self):
        """An MlflowClient of the launcher's store (hand it to watch.progress, history.runs, ...)."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.env.get("MLFLOW_TRACKING_URI"),
                                        self.env.get("MLFLOW_REGISTRY_URI"))
        return self._client


def _params(params: dict) -> dict[str, str]:
    if not isinstance(params, dict):
        raise FinetuneError(f"params must map recipe keys to values, e.g. {{\"train.max_steps\": \"20\"}} "
                            f"(got {type(params).__name__})")
    out = {}
    for key, value in params.items():
        if not isinstance(key, str) or not key.strip() or "=" in key or any(c.isspace() for c in key.strip()):
            raise FinetuneError(f"param {key!r}: a recipe key by its dotted path, e.g. train.learning_rate")
        if value is None:
            raise FinetuneError(f"param {key}: no value; give one, or leave the key out for the recipe's own")
        out[key.strip()] = str(value).lower() if isinstance(value, bool) else str(value)
    return out
