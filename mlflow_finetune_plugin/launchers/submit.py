"""The one way to start a fine-tune run, whichever door asks (a sweep, `monitor --retrain`, the OpenAI API,
the studio): `mlflow run PROJECT -e ENTRY --backend finetune [-P key=value ...] [--backend-config JSON]
[--experiment-name NAME]`, the command a user types. A new door that starts runs calls `submit()`.

How the caller stays with the run is its choice (`mode`):

wait    in this process, until the run has ended (`monitor --retrain`): MLflow's `mlflow.projects.run`,
        synchronous; a run that fails raises MLflow's ExecutionException, as `mlflow run` exits non-zero.
follow  in this process, detached: returns at once with the launcher's SubmittedRun, which the caller polls
        and cancels (a sweep reports each trial's eval loss to its pruner and cancels the trials it prunes).
detach  `mlflow run` as a child process with `"detach": true`, its output in a log file; returns once the run
        exists, and the run goes on when the caller stops (queue.py: the OpenAI API's jobs and the studio's).

The backend is reached through MLflow only (its entry point `finetune`, or the `mlflow run` command line),
never imported: launchers sit below it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MODES = ("wait", "follow", "detach")
_STARTED = re.compile(r"=== Run ([0-9a-f]{32}) started")
_CLI_ERROR = re.compile(r"ERROR mlflow\.cli: === (.*?) ===$", re.S | re.M)


@dataclass
class Started:
    """What `submit` started: the run's id, or None and why no run was started."""

    run_id: str | None
    error: str = ""
    submitted: object | None = None  # wait and follow: the launcher's SubmittedRun (get_status, wait, cancel)

    def status(self, client=None) -> str | None:
        """The run's status in the tracking store (RUNNING, FINISHED, FAILED, KILLED); None without a run."""
        if self.run_id is None:
            return None
        from mlflow import MlflowClient

        return (client or MlflowClient()).get_run(self.run_id).info.status


def submit(project, entry_point: str, params: dict | None = None, backend_config: dict | None = None,
           experiment_name: str | None = None, *, mode: str = "wait", experiment_id: str | None = None,
           run_name: str | None = None, log: Path | None = None, cwd=None,
           env: dict | None = None) -> Started:
    """Start `mlflow run PROJECT -e ENTRY_POINT --backend finetune` with `params` as `-P key=value` and
    `backend_config` (see the module for `mode`; follow and detach add `"detach": true`).

    wait and follow run in this process, in its tracking store (`experiment_id` and `run_name` as `mlflow
    run` takes them); follow returns Started(None, why) when the backend refuses before any run exists.
    detach runs the command from `cwd` with `env` (default `store_env()`), its output in `log` (see
    `start`)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
    params, config = dict(params or {}), dict(backend_config or {})
    if experiment_name:
        _create_first(experiment_name, (env or store_env()) if mode == "detach" else {})
    if mode == "detach":
        if log is None:
            raise ValueError("mode detach needs log: the file that keeps the output of `mlflow run`")
        return start(command(project, entry_point, params, config, experiment_name), Path(log), cwd, env)
    import mlflow
    from mlflow.exceptions import ExecutionException

    if mode == "follow":
        config["detach"] = True
    try:
        submitted = mlflow.projects.run(str(project), entry_point, parameters=params, backend="finetune",
                                        backend_config=config, synchronous=mode == "wait",
                                        experiment_name=experiment_name, experiment_id=experiment_id,
                                        run_name=run_name)
    except ExecutionException as e:  # refused before a run existed: recipe, data, --backend-config, Ray
        if mode == "wait":
            raise
        return Started(None, str(e))
    return Started(submitted.run_id, submitted=submitted)


def _create_first(name: str, env: dict) -> None:
    """Experiment `name` created before `mlflow run` looks it up, in the store of `env` (else this
    process's): MLflow's CLI gets, then creates, a new experiment unguarded, and of several doors starting
    runs into one new experiment at once all but one fail on a SQL store (mlflow/mlflow#4123). A store that
    cannot be reached here is left for `mlflow run` to report."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from mlflow_finetune_plugin.tracking import experiment_id

    try:
        experiment_id(name, MlflowClient(tracking_uri=env.get("MLFLOW_TRACKING_URI")))
    except MlflowException:
        pass


def command(project, entry_point: str, params: dict, backend_config: dict,
            experiment: str | None = None) -> list[str]:
    """`mlflow run PROJECT -e ENTRY --backend finetune` with `backend_config` and `"detach": true` (the
    launcher's job goes on by itself, its run in the tracking store), `-P key=value` for each of `params`."""
    argv = [sys.executable, "-m", "mlflow", "run", str(project), "-e", entry_point, "--backend", "finetune"]
    if experiment:
        argv += ["--experiment-name", experiment]
    argv += ["--backend-config", json.dumps({**backend_config, "detach": True})]
    for key, value in params.items():
        argv += ["-P", f"{key}={value}"]
    return argv


def store_env(tracking_uri: str | None = None, registry_uri: str | None = None) -> dict:
    """The tracking and registry store (default: this process's) for `mlflow run`, which may start in
    another folder: a relative sqlite path (MLflow's default `sqlite:///mlflow.db`) made absolute, so the
    job uses the same store."""
    import mlflow

    env = {}
    for key, uri in (("MLFLOW_TRACKING_URI", tracking_uri or mlflow.get_tracking_uri()),
                     ("MLFLOW_REGISTRY_URI", registry_uri or mlflow.get_registry_uri())):
        if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
        if uri:
            env[key] = uri
    return env


def start(argv: list[str], log: Path, cwd=None, env: dict | None = None) -> Started:
    """Run `argv` (a detached `mlflow run`, `command`) from `cwd` with its output in `log`: Started(run id)
    or Started(None, the reason it started none). A log from an earlier start that already names its run is
    that start's outcome: it is not run again (a door stopped while `mlflow run` started the job: the start
    itself dies with it, see _die_with_parent, so a log without a run id is a start that never was)."""
    code = 0
    if not logged_run(log):
        with open(log, "w") as out:
            code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                  env={**os.environ, **(env or store_env()), "PYTHONUNBUFFERED": "1"},
                                  stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent).returncode
    text = log.read_text(errors="replace")
    found = _STARTED.search(text)
    if code == 0 and found:
        return Started(found.group(1))
    refused = _CLI_ERROR.findall(text)  # the backend's refusal, as MLflow's CLI prints it (several lines)
    if refused:
        return Started(None, refused[-1].strip())
    lines = [ln for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    reason = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), last)
    return Started(None, reason.strip() or f"`mlflow run` exited with {code}")


def logged_run(log: Path) -> str | None:
    """The run id a start's log names (`=== Run <id> started`), or None: no log, or no run started (yet)."""
    found = _STARTED.search(log.read_text(errors="replace")) if log.exists() else None
    return found.group(1) if found else None


def _die_with_parent() -> None:
    """In `mlflow run`, before exec: SIGTERM when the door's process dies, so no start goes on unrecorded
    (the job it starts runs in a session of its own and is not touched)."""
    import signal

    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
