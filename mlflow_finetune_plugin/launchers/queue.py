"""The one job queue of the doors that start runs and watch them (the OpenAI API, the studio): job records
on disk, started oldest first while fewer than `max_parallel` hold a slot, each a detached `mlflow run`
(`submit.start`, its output in the job's log), and stopped in the queue (a waiting job never starts) or as
a run (`stop_run`).

A door keeps its own record shapes and states (the OpenAI API's fine_tuning.job, the studio's Job) and
subclasses `Queue`: `command` (what a job runs), `started` (what a start did to the record), `refresh` (a
record's state from its run). The queue knows a record's id, when it was created, the field holding its
state, the state that waits for a slot and the states that hold one. Records are JSON files
(`<state_dir>/jobs/<id>/job.json`, replaced atomically), so a restarted door finds every job where it was;
the runs are detached and go on without it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.launchers.submit import Started, logged_run, start

LAUNCH_LOG = "launch.log"
CANCEL_TIMEOUT_S = 180  # `cancel` gives the job 30 s to end its run before it is killed (launchers/local.py)
_CLI = "import sys; from mlflow_finetune_plugin.cli import main; sys.exit(main())"
_LAUNCHING: set[str] = set()  # the jobs this process is starting now, whichever Queue of it


class JobStore:
    """The job records of one state folder (`<state_dir>/jobs/<id>/job.json`, each written whole).
    Thread-safe within a process; `shared=True` takes a file lock that stores in other processes on the
    same folder take too."""

    ID = re.compile(r"job-[0-9a-f]{12}")  # a job id, and the name of its folder

    def __init__(self, state_dir: Path, lock=None, shared: bool = False):
        self.root = Path(state_dir) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        if lock is None and shared:
            from filelock import FileLock

            lock = FileLock(str(self.root / ".lock"))
        self.lock = lock if lock is not None else threading.RLock()

    def unknown(self, job_id: str) -> Exception:
        """The error for an id that names no job."""
        return FinetuneError(f"no job {job_id!r} in {self.root}")

    @staticmethod
    def created(job: dict) -> float:
        return job["created"]

    def folder(self, job_id: str) -> Path:
        if not self.ID.fullmatch(job_id or ""):
            raise self.unknown(job_id)
        return self.root / job_id

    def get(self, job_id: str) -> dict:
        path = self.folder(job_id) / "job.json"
        with self.lock:
            if not path.is_file():
                raise self.unknown(job_id)
            return json.loads(path.read_text())

    def save(self, job: dict) -> dict:
        folder = self.folder(job["id"])
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "job.json.tmp"
        with self.lock:
            tmp.write_text(json.dumps(job, indent=1))
            os.replace(tmp, folder / "job.json")
        return job

    def update(self, job_id: str, change) -> dict:
        """Read, `change(job)` in place, write: one step under the lock."""
        with self.lock:
            job = self.get(job_id)
            change(job)
            return self.save(job)

    def all(self) -> list[dict]:
        """Every job, newest first."""
        with self.lock:
            jobs = [json.loads(p.read_text()) for p in self.root.glob("*/job.json")
                    if self.ID.fullmatch(p.parent.name)]
        return sorted(jobs, key=self.created, reverse=True)


class Queue:
    """Starts the jobs of `store` oldest first, at most `max_parallel` holding a slot (the `busy` states)
    at once.

    state: the record's field holding its state; waiting: the state of a job that waits for a slot;
    starting: the state a claimed job holds while its `mlflow run` starts (None: it keeps `waiting` until
    `started` moves it, for a door whose one thread claims and starts). cwd, env: where `mlflow run` starts
    and the store it uses (None: the job's folder, and this process's store when it starts); a run is
    stopped in that store (`stop_run`). `start()` the thread (one look every `poll_s`), `close()` it at the
    end: the runs go on."""

    poll_s = 1.0

    def __init__(self, store: JobStore, max_parallel: int, *, state: str = "state", waiting: str = "queued",
                 starting: str | None = None, busy: tuple[str, ...] = ("running",), cwd=None,
                 env: dict | None = None, name: str = "job queue"):
        if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1:
            raise FinetuneError(f"max_parallel must be a whole number >= 1 (got {max_parallel!r})")
        self.store, self.max_parallel = store, max_parallel
        self.state, self.waiting, self.starting = state, waiting, starting
        self.busy = (*busy, *([starting] if starting and starting not in busy else []))
        self.cwd, self.env, self.name = cwd, env, name
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # --- what a door fills in -------------------------------------------------------------------------------

    def command(self, record: dict) -> list[str]:
        """The `mlflow run` command of the job (`submit.command`)."""
        raise NotImplementedError

    def started(self, record: dict, outcome: Started) -> None:
        """Record what starting the job did: its run id, or why no run started."""
        raise NotImplementedError

    def refresh(self, record: dict) -> dict:
        """The job as it is now (its run's end read from the store); the default recovers a job left
        starting by a process that is gone."""
        if self.starting and record[self.state] == self.starting and not being_launched(record):
            return self.recover(record)
        return record

    def log_path(self, record: dict) -> Path:
        return self.store.folder(record["id"]) / LAUNCH_LOG

    # --- the queue ------------------------------------------------------------------------------------------

    def step(self) -> None:
        """One pass: every job refreshed, then the oldest waiting jobs started while slots are free."""
        for record in self.store.all():
            self.refresh(record)
        tried: set[str] = set()
        while not self._stopping.is_set() and (record := self.claim()) is not None:
            if record["id"] in tried:  # a start that left its job waiting: the next pass tries again
                break
            tried.add(record["id"])
            self.launch(record)

    def claim(self) -> dict | None:
        """The oldest waiting job when fewer than max_parallel jobs hold a slot, marked `starting` by this
        process under the store's lock; None otherwise."""
        with self.store.lock:
            records = self.store.all()
            waiting = [r for r in records if r[self.state] == self.waiting]
            if not waiting or sum(r[self.state] in self.busy for r in records) >= self.max_parallel:
                return None
            record = waiting[-1]
            if self.starting is None:
                return record
            import psutil

            record.update({self.state: self.starting},
                          launcher={"pid": os.getpid(), "since": psutil.Process().create_time()})
            _LAUNCHING.add(record["id"])
            return self.store.save(record)

    def launch(self, record: dict) -> None:
        """Start the job's `mlflow run` (detached) and hand the outcome to `started`."""
        _LAUNCHING.add(record["id"])
        try:
            try:
                cwd = self.cwd if self.cwd is not None else self.store.folder(record["id"])
                outcome = start(self.command(record), self.log_path(record), cwd, self.env)
            except Exception as e:  # noqa: BLE001 - e.g. an OSError starting `mlflow run`: the job's error
                outcome = Started(None, f"{type(e).__name__}: {e}")
            self.started(record, outcome)
        finally:
            _LAUNCHING.discard(record["id"])

    def recover(self, record: dict) -> dict:
        """A job left starting by a process that is gone: started if its `mlflow run` started the run, else
        waiting again (that start died with its process before it created a run)."""
        run_id = logged_run(self.log_path(record))
        if run_id:
            self.started(record, Started(run_id))
            return self.store.get(record["id"])

        def requeued(r):
            if r[self.state] == self.starting and not being_launched(r):
                r[self.state] = self.waiting
                r.pop("launcher", None)
        return self.store.update(record["id"], requeued)

    def drop(self, job_id: str, ended: dict, while_starting: dict | None = None) -> dict:
        """Take a job that has not started out of the queue: a waiting one never runs (it ends with the
        fields of `ended`, its state among them); one whose start is under way ends with `while_starting`
        (default `ended`), and the door stops its run once it exists (`started`). Any other job is returned
        as it is."""
        def dropped(r):
            if r[self.state] == self.waiting:
                r.update(ended)
            elif self.starting and r[self.state] == self.starting:
                r.update(while_starting or ended)
        return self.store.update(job_id, dropped)

    def stop_run(self, run_id: str) -> None:
        """`mlflow-finetune cancel RUN_ID` in the queue's store: the run ends KILLED."""
        stop_run(run_id, self.env, self.cwd)

    # --- the thread -----------------------------------------------------------------------------------------

    def start(self):
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, daemon=True, name=self.name.replace(" ", "-"))
            self._thread.start()
        return self

    def close(self, timeout: float = 120.0) -> None:
        """Stop the thread (a start under way finishes first; runs go on)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a store that does not answer now may at the next pass
                print(f"{self.name}: {type(e).__name__}: {e}", file=sys.stderr)
            self._stopping.wait(self.poll_s)


def being_launched(record: dict) -> bool:
    """A starting job whose `mlflow run` is under way: in this process, or in another one that still lives."""
    import psutil

    if record["id"] in _LAUNCHING:
        return True
    who = record.get("launcher") or {}
    if not who or who.get("pid") == os.getpid():
        return False
    try:
        # that process, not a reused pid
        return abs(psutil.Process(who["pid"]).create_time() - who["since"]) < 1.0
    except psutil.Error:
        return False


def stop_run(run_id: str, env: dict | None = None, cwd=None) -> None:
    """Stop a run as `mlflow-finetune cancel RUN_ID` does (it ends KILLED, its logged checkpoints kept):
    here when it is in this process's store (`env` None), else in a process that uses the store `env`
    names."""
    if env is None:
        from mlflow_finetune_plugin.launchers.cancel import cancel_run

        cancel_run(run_id)
        return
    try:
        done = subprocess.run([sys.executable, "-c", _CLI, "cancel", run_id], env={**os.environ, **env},
                              cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=CANCEL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise FinetuneError(f"stopping run {run_id} took over {CANCEL_TIMEOUT_S} s; see `mlflow-finetune "
                            f"cancel {run_id}`") from None
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        raise FinetuneError(f"could not stop run {run_id}: {lines[-1] if lines else done.returncode}")
