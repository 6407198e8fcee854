"""Shared fixtures and hooks: a private tiny-model cache for the whole session, a fresh sqlite MLflow store
per test, a real Ray head per module that asks for one. Helpers that tests import live in tests/helpers.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, forget_active_experiment, free_port


def pytest_configure(config):
    # One tiny-model build per session, shared with the subprocesses tests start; nothing from the user's
    # cache.
    if "MLFLOW_FINETUNE_CACHE" not in os.environ:
        os.environ["MLFLOW_FINETUNE_CACHE"] = config._finetune_cache = tempfile.mkdtemp(
            prefix="mlflow-finetune-test-cache-"
        )
    # No hub at run time: fail fast instead of retrying a network that is not there.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Tests send Ctrl-C (SIGINT) and SIGHUP to the processes they start, and check what those do. Started from
    # `nohup` or as a background job of a non-interactive shell, pytest would have both ignored and hand that
    # on to every child (an ignored signal stays ignored across exec): the stop-signal tests would then time
    # out testing the harness, not the program. The default handlers come back here, for pytest and its
    # children.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGHUP, signal.SIGQUIT):
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # One torch thread per pytest-xdist worker (and the processes its tests start): workers already take
        # every core, and an OpenMP team sharing its cores with another worker stalls at each barrier.
        os.environ.setdefault("OMP_NUM_THREADS", "1")


# The longest files, longest first (their per-file times in the full suite of 2026-11-28, two workers, after
# that session's trims; earlier orders: docs/benchmarks-history.md, "The test suite"). pytest-xdist's `--dist
# loadfile` hands whole files to the workers in collection order: in alphabetical order a long file near the
# end (the distill and registry-matrix files were not on this list and ran late) leaves the last minutes to
# one worker. Longest first, the short files fill in at the end.
LONGEST_FIRST = ("test_vision.py", "test_registry_matrix.py", "test_distill.py", "test_monitor.py",
                 "test_launchers.py", "test_openai_api.py", "test_serving.py", "test_family_matrix.py",
                 "test_multitask_dpo.py", "test_objectives.py", "test_studio.py", "test_smollm2.py",
                 "test_preflight.py", "test_studio_runs.py", "test_faults.py", "test_system_prompts.py",
                 "test_sweep.py", "test_tracking_server.py", "test_multinode.py", "test_integration.py",
                 "test_rehearsal.py", "test_vision_preferences.py", "test_traces.py", "test_backend.py",
                 "test_architecture.py", "test_playground.py", "test_trace_images.py", "test_watchdog.py",
                 "test_served_retrieval.py", "test_rlhf.py", "test_base_models.py", "test_gguf.py",
                 "test_kill_moments.py", "test_gemma3.py", "test_documents_run.py", "test_vllm.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


def pytest_unconfigure(config):
    # The session's own cache goes with the session (a cache the caller set is theirs to keep).
    cache = getattr(config, "_finetune_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
        os.environ.pop("MLFLOW_FINETUNE_CACHE", None)


@pytest.fixture(autouse=True)
def _own_answer_cache(tmp_path_factory):
    """Each test's in-process evaluations keep the base model's answers (`eval.reuse_answers`) in a folder of
    their own: a test that watches the model answer is not handed an earlier test's answers to the same
    prompts. The runs tests start as subprocesses share the session's cache, as a user's runs share theirs.
    Set and undone by hand, not with `monkeypatch`: an autouse fixture asking for it would set it up before a
    test module's own autouse fixtures, and so undo the test's patches only after their teardown ran
    (test_precision.py's clears a cache it patched)."""
    from mlflow_finetune_plugin.evaluate import answer_cache

    folder, original = tmp_path_factory.mktemp("answers"), answer_cache.cache_folder
    answer_cache.cache_folder = lambda: folder
    yield
    answer_cache.cache_folder = original


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    """A fresh sqlite tracking + registry store; set for this process and inherited by subprocesses."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A sqlite store puts artifacts in ./mlruns of the working directory: keep them in the test's folder.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # mlflow.set_registry_uri below exports MLFLOW_REGISTRY_URI: set it here too, so that it is undone
    # afterwards (a later test's subprocesses would otherwise look up models in this test's store)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    forget_active_experiment()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    forget_active_experiment()
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.fixture(scope="session")
def tiny_model_dir():
    from mlflow_finetune_plugin.models.tiny import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head on 127.0.0.1 (dashboard on, for Ray Jobs), stopped after the module's tests."""
    pytest.importorskip("ray")
    from ray.job_submission import JobSubmissionClient

    ray_bin = Path(sys.executable).parent / "ray"
    tmp = tmp_path_factory.mktemp("ray")
    # Ray's socket paths live under --temp-dir and must stay under 107 bytes (AF_UNIX): pytest's own temp
    # folders (with pytest-xdist's popen-gwN level) are too deep for that.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-"))
    dashboard = free_port()
    cmd = [str(ray_bin) if ray_bin.exists() else "ray", "start", "--head", "--block",
           "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard=true",
           # Ray's minimum: 75 MiB
           "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(100 * 2**20),
           "--disable-usage-stats", "--temp-dir", str(ray_tmp)]
    # The jobs inherit this environment: the package from this checkout, no hub.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    head = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(tmp / "head.log", "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray head exited: {(tmp / 'head.log').read_text()[-3000:]}")
            try:
                JobSubmissionClient(address)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield address
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of this head's session still alive
        except ProcessLookupError:
            pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
