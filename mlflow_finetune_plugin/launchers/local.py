"""Launcher `local`: the training command as a child process on this machine.

The child runs in its own session (process group) so that cancel stops it and everything it started, and
Ctrl-C reaches only the waiting parent, which then cancels cleanly. A detached job runs under a small
supervisor process that outlives `mlflow run` and ends the MLflow run if training dies without doing so
itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.projects.submitted_run import SubmittedRun

from mlflow_finetune_plugin import tags

GRACE_SECONDS = 30


TRAINING_MODULE = "mlflow_finetune_plugin.train.job"


def launch(cmd: list[str], run_id: str, env: dict, job_dir: Path, detach: bool = False, cwd=None,
           warm: WarmProcess | None = None):
    """Start `cmd` for `run_id`; returns a SubmittedRun. Detached jobs log to `job_dir/job.log`. With `warm`
    (a training process already importing, `start_warm`) a training command is handed to it instead of a new
    one."""
    proc = warm.hand_over(cmd, env, cwd) if warm is not None and not detach else None
    handed = proc is not None
    if proc is None and detach:
        log = open(job_dir / "job.log", "ab")  # noqa: SIM115 - handed to the child
        supervisor = [sys.executable, "-m", "mlflow_finetune_plugin.launchers.supervise", "--run-id", run_id,
                      "--", *cmd]
        proc = subprocess.Popen(supervisor, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
    elif proc is None:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True)
    (job_dir / "job.json").write_text(json.dumps({"pid": proc.pid, "pgid": proc.pid, "launcher": "local",
                                                  "detached": detach, "cmd": cmd,
                                                  "warm": handed}))
    return LocalSubmittedRun(run_id, proc)


class WarmProcess:
    """A training process started before its run exists: it imports the training code while the backend checks
    the recipe and data (on another core), then runs the training command it is handed (`train/warm.py`).
    About 3 s off every local run on 2 cores. Not handed a command, it is stopped (`discard`)."""

    def __init__(self, proc: subprocess.Popen, cwd):
        self.proc, self.cwd = proc, cwd

    def hand_over(self, cmd: list[str], env: dict, cwd=None) -> subprocess.Popen | None:
        """The process, now running `cmd` with `env`; None when `cmd` is not the training command, the folder
        is not the one it started in, or the process is gone (the caller then starts `cmd` as usual)."""
        if (cmd[:3] != [sys.executable, "-m", TRAINING_MODULE] or cwd != self.cwd or self.proc is None
                or self.proc.poll() is not None):
            self.discard()
            return None
        try:
            self.proc.stdin.write((json.dumps({"argv": cmd[3:], "env": env}) + "\n").encode())
            self.proc.stdin.close()
        except OSError:  # it died in between
            self.discard()
            return None
        proc, self.proc = self.proc, None
        return proc

    def discard(self) -> None:
        """Stop the process if it was not handed a command. It has only imported modules, so it is killed at
        once: a failed check must not wait for its imports."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.wait()


def start_warm(env: dict, cwd=None) -> WarmProcess | None:
    """Start a training process that imports now and runs the command `launch` hands it later, or None where
    one cannot start (it is only an optimisation: `launch` then starts the command as usual)."""
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow_finetune_plugin.train.warm"], env=env, cwd=cwd,
                                stdin=subprocess.PIPE, start_new_session=True)
    except OSError:
        return None
    return WarmProcess(proc, cwd)


class LocalSubmittedRun(SubmittedRun):
    """A job on this machine: `wait()` returns True when the run FINISHED; `cancel()` leaves it KILLED."""

    def __init__(self, run_id: str, proc: subprocess.Popen):
        self._run_id = run_id
        self._proc = proc

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def process(self) -> subprocess.Popen:
        return self._proc

    def wait(self) -> bool:
        try:
            with stop_signals_interrupt():
                returncode = self._proc.wait()
        except KeyboardInterrupt:
            print(f"\nInterrupted: cancelling run {self._run_id} ...", file=sys.stderr)
            self.cancel()
            raise
        finalize(self._run_id, returncode)
        return MlflowClient().get_run(self._run_id).info.status == "FINISHED"

    def get_status(self) -> str:
        if self._proc.poll() is None:
            return RunStatus.to_string(RunStatus.RUNNING)
        return MlflowClient().get_run(self._run_id).info.status

    def cancel(self) -> None:
        stop_process_group(self._proc.pid, self._proc)
        finalize(self._run_id, self._proc.returncode, cancelled=True)


@contextlib.contextmanager
def stop_signals_interrupt():
    """While `mlflow run` waits on a job: SIGTERM and SIGHUP (a process manager, `kill`, a closed terminal)
    interrupt the wait like Ctrl-C, so the job is cancelled instead of left running in its own session after
    the waiting process is gone. Only in the main thread (Python delivers signals there); the previous
    handlers come back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_process_group(pgid: int, proc: subprocess.Popen | None = None, grace: float = GRACE_SECONDS) -> None:
    """SIGTERM the group (training ends its run KILLED), then SIGKILL whatever is left after `grace`
    seconds."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None and not _group_alive(pgid):
            return
        if proc is None and not _group_alive(pgid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc is not None:
        proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def finalize(run_id: str, returncode: int | None, cancelled: bool = False) -> str:
    """End a run the training process left RUNNING (it was killed hard, or never started); returns the
    status."""
    client = MlflowClient()
    status = client.get_run(run_id).info.status
    if RunStatus.is_terminated(RunStatus.from_string(status)):
        return status
    if cancelled:
        status, message = "KILLED", "cancelled"
    else:
        status = "FAILED"
        if returncode is not None and returncode < 0:
            message = f"training process was killed by signal {signal.Signals(-returncode).name}"
        else:
            message = f"training process exited with code {returncode} without ending the run"
        message += " (last checkpoint, if any, is under the run's checkpoints/ artifacts)"
    client.set_tag(run_id, tags.ERROR, message)
    client.set_terminated(run_id, status)
    return status
