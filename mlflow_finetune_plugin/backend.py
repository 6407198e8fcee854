"""The MLflow project backend `finetune`: `mlflow run DIR -e lora --backend finetune`.

Thin on purpose: validate the recipe and the data (before any model loads), create the run, hand the training
command to a launcher, and return its SubmittedRun. From the `mlflow run` CLI it also waits, streaming
progress, and fails the command when the run fails; `--backend-config '{"detach": true}'` returns at once
instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import sys
from pathlib import Path

from mlflow.exceptions import ExecutionException
from mlflow.projects.backend.abstract_backend import AbstractBackend
from mlflow.projects.utils import PROJECT_SYNCHRONOUS, _fetch_project, load_project

from mlflow_finetune_plugin import paths, stops
from mlflow_finetune_plugin import tags as tag
from mlflow_finetune_plugin.config.presets import PRESETS
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.launchers import LAUNCHER_KEYS, LAUNCHERS, local
from mlflow_finetune_plugin.memory.choose import run_tags, settle
from mlflow_finetune_plugin.runtime import allocator, installed, threads
from mlflow_finetune_plugin.vllm_rules import AFTER_INSTALL, torchvision_clash

CONFIG_KEYS = {
    "launcher": "where training runs: " + ", ".join(LAUNCHERS),
    "nproc_per_node": "torchrun: processes per node",
    "nnodes": "torchrun: number of nodes",
    "rdzv_endpoint": "torchrun: host:port of the rendezvous",
    "address": "ray: cluster address",
    "num_workers": "ray: number of training workers",
    "use_gpu": "ray: give each worker a GPU",
    "detach": "return at once; the job ends its own run",
}
_POSITIVE_INTS = ("nproc_per_node", "nnodes", "num_workers")
_BOOLS = ("use_gpu", "detach")
_STRINGS = ("launcher", "rdzv_endpoint", "address")
# Keys MLflow itself adds to every backend config.
_MLFLOW_KEYS = {"ENV_MANAGER", "SYNCHRONOUS", "DOCKER_ARGS", "STORAGE_DIR", "build_image", "docker_auth",
                "_mlflow_local_backend_run_id"}


class FinetuneBackend(AbstractBackend):
    """Fine-tuning entry points (`lora`, ...: presets over adapter x quantization x objective x data) for any
    folder with a `finetune.yaml`."""

    def run(self, project_uri, entry_point, params, version, backend_config, tracking_uri, experiment_id):
        with stops.catching(signal.SIGINT):  # a Ctrl-C Python drops still stops the job (see stops.py)
            return self._run(project_uri, entry_point, params, version, backend_config, tracking_uri,
                             experiment_id)

    def _run(self, project_uri, entry_point, params, version, backend_config, tracking_uri, experiment_id):
        config = _check_backend_config(backend_config or {})
        launcher = LAUNCHERS[config.get("launcher", "local")]
        detach = bool(config.get("detach", False))
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_EXPERIMENT_ID": str(experiment_id),
               "PYTHONUNBUFFERED": "1"}
        # training runs on this machine: its share of the cores from the start
        if launcher is not LAUNCHERS["ray"]:
            env.update(threads.child_env(threads.plan(None, "training")))
            env.update(allocator.child_env(env))  # and tcmalloc where installed (runtime/allocator.py)
        # A local training process starts importing now, while the checks below run (launchers/local.py)
        warm = local.start_warm(env, os.getcwd()) if launcher is local and not detach else None
        try:
            return self._checked_run(project_uri, entry_point, params, version, backend_config, tracking_uri,
                                     experiment_id, config, launcher, detach, env, warm)
        finally:
            if warm is not None:
                # not handed a command: the checks failed, or the entry point is a shell command
                warm.discard()

    def _checked_run(self, project_uri, entry_point, params, version, backend_config, tracking_uri,
                     experiment_id, config, launcher, detach, env, warm):
        from mlflow_finetune_plugin.tracking import ensure_store

        # before this process's first MLflow call: runs started at once share a new store
        ensure_store(tracking_uri)
        clash = torchvision_clash()
        if clash:  # training would fail in transformers' imports, after the run was created
            raise FinetuneError(clash)
        installed.warn_once(AFTER_INSTALL)  # an extra that holds transformers back in this environment
        extra = {k: v for k, v in config.items() if k not in ("launcher", "detach")}
        if hasattr(launcher, "check"):  # e.g. the Ray cluster answers: before any run exists
            try:
                launcher.check(**extra)
            except FinetuneError as e:
                raise ExecutionException(f"--backend-config: {e}") from None
        work_dir = _fetch_project(project_uri, version)
        try:
            recipe, project_command = resolve_entry_point(work_dir, entry_point, params)
            planned = None
            if recipe is not None:  # `auto` settings chosen; on CUDA, refused when it cannot fit
                recipe, planned = settle(recipe)
        except FinetuneError as e:
            raise ExecutionException(str(e)) from None

        _stopped(None)  # a Ctrl-C during the checks: nothing started, no run
        run = _create_run(project_uri, experiment_id, work_dir, version, entry_point,
                          params if project_command else None)
        run_id = run.info.run_id
        _log_plan(run_id, planned)
        job_dir = paths.job_dir(run_id)
        if recipe is not None:
            recipe_path = job_dir / "recipe.json"
            recipe_path.write_text(json.dumps(recipe.model_dump(mode="json")))
            cmd = [sys.executable, "-m", local.TRAINING_MODULE, "--recipe-json", str(recipe_path),
                   "--run-id", run_id]
            cwd = os.getcwd()
        else:
            cmd, cwd = ["bash", "-c", project_command], work_dir
        env = {**env, "MLFLOW_RUN_ID": run_id}
        _stopped(run_id)
        try:
            if warm is not None:
                extra["warm"] = warm
            submitted = launcher.launch(cmd, run_id, env, job_dir, detach=detach, cwd=cwd, **extra)
        except Exception as e:
            from mlflow_finetune_plugin.tracking import record_failure

            record_failure(run_id, e)
            raise ExecutionException(f"could not start run {run_id}: {e}") from None
        _tag_job(run_id, job_dir)
        name = launcher.__name__.rsplit(".", 1)[-1]
        log = f"`ray job logs {getattr(submitted, 'job_id', '')}`" if name == "ray" else str(job_dir
                                                                                             / "job.log")
        print(f"=== Run {run_id} started ({name}{', detached: log in ' + log if detach else ''}; "
              f"stop it with `mlflow-finetune cancel {run_id}`) ===", file=sys.stderr)
        # MLflow's CLI passes synchronous=False to plugin backends and never waits: wait here, like `local`
        # does. A synchronous Python API call is waited on by MLflow itself through SubmittedRun.wait().
        if not detach and not backend_config.get(PROJECT_SYNCHRONOUS, False):
            _wait_or_raise(submitted)
        return submitted


def resolve_entry_point(work_dir: str, entry_point: str, params: dict):
    """(recipe, None) for a preset entry point, validated with its data; (None, command) for an MLproject
    one."""
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.data.check import check_data
    from mlflow_finetune_plugin.data.preflight import check_recipe_data

    project_entry = _mlproject_entry_point(work_dir, entry_point)
    if entry_point in PRESETS or entry_point == "main" and project_entry is None:
        recipe = load_recipe(work_dir, method=entry_point if entry_point in PRESETS else None,
                             overrides=params)
        check_combination(recipe)
        check_recipe_data(recipe, check_data)
        return recipe, None
    if project_entry is not None:
        return None, project_entry.compute_command(params, storage_dir=None)
    raise FinetuneError(
        f"unknown entry point {entry_point!r}. This backend provides: {', '.join(PRESETS)}"
        f"{' (and MLproject entry points)' if (Path(work_dir) / 'MLproject').exists() else ''}.")


def check_combination(recipe) -> None:
    """The objective's checks that need the project's own code (GRPO's reward functions load from its
    rewards.py and read columns of the data), before any model loads; raises listing every problem. Everything
    the recipe alone decides was checked when it loaded (`config/checks.py`)."""
    from mlflow_finetune_plugin.errors import RecipeError
    from mlflow_finetune_plugin.train.objectives import objective_of

    problems = objective_of(recipe).check(recipe)
    if problems:
        raise RecipeError(problems, "finetune.yaml")
    if recipe.eval.enabled and "optimized" in recipe.eval.contenders and recipe.eval.optimize.proposer:
        from mlflow_finetune_plugin.evaluate.proposer import proposer_of, reachable

        # a proposer the recipe names answers, or nothing trains
        reachable(proposer_of(recipe.eval, recipe.distill))


def _mlproject_entry_point(work_dir: str, entry_point: str):
    if not (Path(work_dir) / "MLproject").exists() and not (Path(work_dir) / "mlproject").exists():
        return None
    project = load_project(work_dir)
    return project._entry_points.get(entry_point)


def _check_backend_config(config: dict) -> dict:
    import difflib

    user = {k: v for k, v in config.items() if k not in _MLFLOW_KEYS}
    problems = []
    for key in user:
        if key not in CONFIG_KEYS:
            close = difflib.get_close_matches(key, list(CONFIG_KEYS), n=1)
            problems.append(f"unknown key {key!r}{f' (did you mean {close[0]!r}?)' if close else ''}")
    problems.extend(_type_problems(user))
    launcher = user.get("launcher", "local")
    if isinstance(launcher, str) and launcher not in LAUNCHERS:
        problems.append(f"launcher {launcher!r} is not one of: {', '.join(LAUNCHERS)}")
    elif isinstance(launcher, str):
        problems.extend(_launcher_problems(launcher, user))
    if problems:
        valid = "\n".join(f"    {k}: {v}" for k, v in CONFIG_KEYS.items())
        raise ExecutionException("--backend-config: " + "; ".join(problems) + f"\n  Valid keys:\n{valid}")
    return user


def _type_problems(user: dict) -> list[str]:
    problems = []
    for key in _POSITIVE_INTS:
        value = user.get(key)
        if key in user and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"{key} must be a whole number >= 1 (got {json.dumps(value, default=str)})")
    for key in _BOOLS:
        if key in user and not isinstance(user[key], bool):
            problems.append(f"{key} must be true or false (got {json.dumps(user[key], default=str)})")
    for key in _STRINGS:
        if key in user and not isinstance(user[key], str):
            problems.append(f"{key} must be a string (got {json.dumps(user[key], default=str)})")
    return problems


def _launcher_problems(launcher: str, user: dict) -> list[str]:
    """Keys of another launcher are mistakes (they would be ignored), and the combinations that cannot
    work."""
    problems = []
    for key in user:
        for other, keys in LAUNCHER_KEYS.items():
            if key in keys and other != launcher:
                problems.append(f"{key!r} is a {other} key: add \"launcher\": \"{other}\" or leave it out")
    endpoint = user.get("rdzv_endpoint")
    if isinstance(endpoint, str) and not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", endpoint):
        problems.append(f"rdzv_endpoint must be host:port, e.g. \"10.0.0.1:29400\" (got {endpoint!r})")
    nnodes = user.get("nnodes", 1)
    if isinstance(nnodes, int) and nnodes > 1 and not endpoint:
        problems.append(f"nnodes={nnodes} needs rdzv_endpoint (host:port reachable from every node)")
    if launcher == "ray" and importlib.util.find_spec("ray") is None:
        problems.append("launcher 'ray' needs Ray installed: from the project's clone, "
                        "pip install -e '.[ray]'")
    return problems


def _tag_job(run_id: str, job_dir: Path) -> None:
    """Record where the job runs on the run itself, so `mlflow-finetune cancel RUN_ID` finds it from
    anywhere."""
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    try:
        job = json.loads((job_dir / "job.json").read_text())
        tags = {tag.JOB_LAUNCHER: job.get("launcher", "local"), tag.JOB_HOST: socket.gethostname()}
        for key in ("pid", "job_id", "address"):
            if job.get(key) is not None:
                tags[tag.JOB_KEYS[key]] = str(job[key])
        MlflowClient().log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    # the job is running; only `cancel` from another machine needs these
    except Exception as e:  # noqa: BLE001
        print(f"Warning: could not record the job's whereabouts on run {run_id}: {e}", file=sys.stderr)


def _log_plan(run_id: str, planned) -> None:
    """The plan a run starts with: tagged, and its peak logged beside the peak training measures
    (`train/peak_rss_gib` on a CPU, `train/peak_gpu_gib` on CUDA)."""
    if planned is None:
        return
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in run_tags(planned).items():
        client.set_tag(run_id, key, value)
    client.log_metric(run_id, f"train/planned_peak_{'gpu' if planned.device == 'cuda' else 'rss'}_gib",
                      planned.peak / 2**30)


def _create_run(uri, experiment_id, work_dir, version, entry_point, params):
    """Create the run with the tags MLflow's own backends set (source, entry point, git commit, user)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param, SourceType
    from mlflow.projects.utils import _expand_uri, _is_local_uri
    from mlflow.tracking import _tracking_service
    from mlflow.tracking.context.default_context import _get_user
    from mlflow.utils.git_utils import get_git_commit, get_git_repo_url
    from mlflow.utils.mlflow_tags import (
        MLFLOW_GIT_COMMIT,
        MLFLOW_GIT_REPO_URL,
        MLFLOW_PROJECT_ENTRY_POINT,
        MLFLOW_SOURCE_NAME,
        MLFLOW_SOURCE_TYPE,
        MLFLOW_USER,
    )

    source = _tracking_service.utils._get_git_url_if_present(_expand_uri(uri)) if _is_local_uri(uri) else uri
    tags = {MLFLOW_USER: _get_user(), MLFLOW_SOURCE_NAME: source,
            MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.PROJECT),
            MLFLOW_PROJECT_ENTRY_POINT: entry_point}
    if commit := get_git_commit(work_dir):
        tags[MLFLOW_GIT_COMMIT] = commit
    if repo := get_git_repo_url(work_dir):
        tags[MLFLOW_GIT_REPO_URL] = repo
    client = MlflowClient()
    run = client.create_run(experiment_id=experiment_id, tags=tags)
    if params:  # only for MLproject entry points; recipe runs log their resolved, typed params themselves
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run


def _stopped(run_id: str | None) -> None:
    """Raise if a Ctrl-C came while `mlflow run` checked and started the job; a run already created ends
    KILLED."""
    if stops.requested() is None:
        return
    if run_id is None:
        raise ExecutionException("cancelled (Ctrl-C) before the run was created")
    from mlflow_finetune_plugin.tracking import record_failure

    record_failure(run_id, KeyboardInterrupt("Ctrl-C before the job started"), "KILLED")
    raise ExecutionException(f"Run {run_id} cancelled (KILLED) before the job started")


def _wait_or_raise(submitted) -> None:
    from mlflow import MlflowClient

    try:
        ok = submitted.wait()
    except KeyboardInterrupt:
        raise ExecutionException(f"Run {submitted.run_id} cancelled (KILLED)") from None
    if not ok:
        run = MlflowClient().get_run(submitted.run_id)
        error = run.data.tags.get(tag.ERROR, "see the output above")
        raise ExecutionException(f"Run {submitted.run_id} {run.info.status}: {error.splitlines()[0]}")
