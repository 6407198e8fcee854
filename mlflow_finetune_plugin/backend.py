"""The MLflow project backend `finetune`: `mlflow run DIR -e lora --backend finetune`.

Thin on purpose: validate the recipe and the data (before any model loads), create the run, hand the training
command to a launcher, and return its SubmittedRun. From the `mlflow run` CLI it also waits, streaming progress,
and fails the command when the run fails; `--backend-config '{"detach": true}'` returns at once instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mlflow.exceptions import ExecutionException
from mlflow.projects.backend.abstract_backend import AbstractBackend
from mlflow.projects.utils import PROJECT_SYNCHRONOUS, _fetch_project, load_project

from mlflow_finetune_plugin import paths
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.launchers import LAUNCHERS
from mlflow_finetune_plugin.methods import METHODS

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
# Keys MLflow itself adds to every backend config.
_MLFLOW_KEYS = {"ENV_MANAGER", "SYNCHRONOUS", "DOCKER_ARGS", "STORAGE_DIR", "build_image", "docker_auth",
                "_mlflow_local_backend_run_id"}


class FinetuneBackend(AbstractBackend):
    """Fine-tuning entry points (`lora`, ...) for any folder with a `finetune.yaml`."""

    def run(self, project_uri, entry_point, params, version, backend_config, tracking_uri, experiment_id):
        config = _check_backend_config(backend_config or {})
        work_dir = _fetch_project(project_uri, version)
        try:
            recipe, project_command = _resolve_entry_point(work_dir, entry_point, params)
        except FinetuneError as e:
            raise ExecutionException(str(e)) from None

        run = _create_run(project_uri, experiment_id, work_dir, version, entry_point,
                          params if project_command else None)
        run_id = run.info.run_id
        job_dir = paths.job_dir(run_id)
        if recipe is not None:
            recipe_path = job_dir / "recipe.json"
            recipe_path.write_text(json.dumps(recipe.model_dump(mode="json")))
            cmd = [sys.executable, "-m", "mlflow_finetune_plugin.train", "--recipe-json", str(recipe_path),
                   "--run-id", run_id]
            cwd = os.getcwd()
        else:
            cmd, cwd = ["bash", "-c", project_command], work_dir
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_EXPERIMENT_ID": str(experiment_id),
               "MLFLOW_RUN_ID": run_id, "PYTHONUNBUFFERED": "1"}
        launcher = LAUNCHERS[config.get("launcher", "local")]
        detach = bool(config.get("detach", False))
        extra = {k: v for k, v in config.items() if k not in ("launcher", "detach")}
        try:
            submitted = launcher.launch(cmd, run_id, env, job_dir, detach=detach, cwd=cwd, **extra)
        except Exception as e:
            from mlflow_finetune_plugin.tracking import record_failure

            record_failure(run_id, e)
            raise ExecutionException(f"could not start run {run_id}: {e}") from None
        print(f"=== Run {run_id} started ({launcher.__name__.rsplit('.', 1)[-1]}"
              f"{', detached: log in ' + str(job_dir / 'job.log') if detach else ''}) ===", file=sys.stderr)
        # MLflow's CLI passes synchronous=False to plugin backends and never waits: wait here, like `local` does.
        # A synchronous Python API call is waited on by MLflow itself through SubmittedRun.wait().
        if not detach and not backend_config.get(PROJECT_SYNCHRONOUS, False):
            _wait_or_raise(submitted)
        return submitted


def _resolve_entry_point(work_dir: str, entry_point: str, params: dict):
    """(recipe, None) for a method entry point, validated with its data; (None, command) for an MLproject one."""
    from mlflow_finetune_plugin.data_check import check_data
    from mlflow_finetune_plugin.recipe import load_recipe

    project_entry = _mlproject_entry_point(work_dir, entry_point)
    if entry_point in METHODS or entry_point == "main" and project_entry is None:
        recipe = load_recipe(work_dir, method=entry_point if entry_point in METHODS else None, overrides=params)
        _check_data(recipe, check_data)
        return recipe, None
    if project_entry is not None:
        return None, project_entry.compute_command(params, storage_dir=None)
    raise FinetuneError(
        f"unknown entry point {entry_point!r}. This backend provides: {', '.join(METHODS)}"
        f"{' (and MLproject entry points)' if (Path(work_dir) / 'MLproject').exists() else ''}.")


def _check_data(recipe, check_data) -> None:
    issues = []
    for split in ("train", "eval"):
        path = getattr(recipe.data, split)
        if path:
            report = check_data(path, fmt=recipe.data.format, tokenizer=None, max_length=recipe.data.max_length,
                                system_prompt=recipe.data.system_prompt)
            issues.extend(str(i) for i in report.errors)
    if issues:
        shown = issues[:20] + ([f"... and {len(issues) - 20} more"] if len(issues) > 20 else [])
        raise FinetuneError(f"{len(issues)} problem(s) in the data; nothing was started:\n  "
                            + "\n  ".join(shown) + "\nRun `mlflow-finetune data check FILE` for the full report.")


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
    launcher = user.get("launcher", "local")
    if launcher not in LAUNCHERS:
        problems.append(f"launcher {launcher!r} is not one of: {', '.join(LAUNCHERS)}")
    if problems:
        valid = "\n".join(f"    {k}: {v}" for k, v in CONFIG_KEYS.items())
        raise ExecutionException("--backend-config: " + "; ".join(problems) + f"\n  Valid keys:\n{valid}")
    return user


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
            MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.PROJECT), MLFLOW_PROJECT_ENTRY_POINT: entry_point}
    if commit := get_git_commit(work_dir):
        tags[MLFLOW_GIT_COMMIT] = commit
    if repo := get_git_repo_url(work_dir):
        tags[MLFLOW_GIT_REPO_URL] = repo
    client = MlflowClient()
    run = client.create_run(experiment_id=experiment_id, tags=tags)
    if params:  # only for MLproject entry points; recipe runs log their resolved, typed params themselves
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run


def _wait_or_raise(submitted) -> None:
    from mlflow import MlflowClient

    try:
        ok = submitted.wait()
    except KeyboardInterrupt:
        raise ExecutionException(f"Run {submitted.run_id} cancelled (KILLED)") from None
    if not ok:
        run = MlflowClient().get_run(submitted.run_id)
        error = run.data.tags.get("finetune.error", "see the output above")
        raise ExecutionException(f"Run {submitted.run_id} {run.info.status}: {error.splitlines()[0]}")
