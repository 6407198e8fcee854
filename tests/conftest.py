"""Shared fixtures: a private tiny-model cache for the whole session and a fresh sqlite MLflow store per test."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUPPORT_BOT = REPO / "recipes" / "support-bot"


def pytest_configure(config):
    # One tiny-model build per session, shared with the subprocesses tests start; nothing from the user's cache.
    if "MLFLOW_FINETUNE_CACHE" not in os.environ:
        os.environ["MLFLOW_FINETUNE_CACHE"] = config._finetune_cache = tempfile.mkdtemp(
            prefix="mlflow-finetune-test-cache-"
        )
    # No hub at run time: fail fast instead of retrying a network that is not there.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Tests send Ctrl-C (SIGINT) and SIGHUP to the processes they start, and check what those do. Started from
    # `nohup` or as a background job of a non-interactive shell, pytest would have both ignored and hand that on
    # to every child (an ignored signal stays ignored across exec): the stop-signal tests would then time out
    # testing the harness, not the program. The default handlers come back here, for pytest and its children.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGHUP, signal.SIGQUIT):
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # One torch thread per pytest-xdist worker (and the processes its tests start): workers already take every
        # core, and an OpenMP team sharing its cores with another worker stalls at each barrier.
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_unconfigure(config):
    # The session's own cache goes with the session (a cache the caller set is theirs to keep).
    cache = getattr(config, "_finetune_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
        os.environ.pop("MLFLOW_FINETUNE_CACHE", None)


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    """A fresh sqlite tracking + registry store; set for this process and inherited by subprocesses."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A sqlite store puts artifacts in ./mlruns of the working directory: keep them in the test's folder.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    _forget_active_experiment()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    _forget_active_experiment()
    mlflow.set_tracking_uri(None)


def _forget_active_experiment():
    """`mlflow.set_experiment` caches the id in a module global and in MLFLOW_EXPERIMENT_ID; a later test with a
    fresh store would otherwise look for an experiment that only existed in the previous one."""
    import mlflow.tracking.fluent as fluent

    fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture(scope="session")
def tiny_model_dir():
    from mlflow_finetune_plugin.models.tiny import tiny_model_path

    return tiny_model_path()


def write_project(root: Path, recipe_yaml: str, rows: list[dict] | None = None, eval_rows: list[dict] | None = None):
    """A minimal project folder: finetune.yaml plus data/train.jsonl (and data/eval.jsonl)."""
    import json

    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "finetune.yaml").write_text(recipe_yaml)
    if rows is not None:
        (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if eval_rows is not None:
        (root / "data" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    return root


def chat_rows(n: int, offset: int = 0) -> list[dict]:
    """n small, distinct chat rows."""
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
            for i in range(offset, offset + n)]


# -P overrides that make a tiny-model run take seconds: 2 steps, 2 held-out rows, short answers.
FAST_OVERRIDES = {"train.max_steps": 2, "train.batch_size": 2, "train.logging_steps": 1, "train.save_steps": 2,
                  "eval.max_examples": 2, "eval.max_new_tokens": 4, "eval.fewshot_k": 1}


def jsonl(path: Path, rows: list[dict]) -> str:
    """Write `rows` as a JSONL file (parent folders made); returns the path."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
