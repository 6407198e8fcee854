"""Nothing hangs (issue 58): the GenAI evaluation view inside a run with system metrics on cannot deadlock,
and a stage that stops moving anyway ends the run FAILED with every thread's stack in error.txt, instead of
leaving it RUNNING in a process that no SIGTERM stops.

The deadlock, as MLflow 3.17 has it: MLflow's system-metrics thread builds an `MlflowClient` every sample,
which, with no registry URI set, tries `import pyspark` (absent here, so tried anew each time). The import
holds the interpreter's import lock while MLflow's `ImportHookFinder` waits for MLflow's import-hook lock.
Meanwhile `mlflow.genai.evaluate` holds that hook lock while it fires the autologging hook of an imported
flavor (torch), which imports `mlflow.pytorch` and so waits for the import lock. The scenario below forces the
interleaving the reporter hit by chance: MLflow's hook, under its lock, waits until the system-metrics thread
is blocked on that lock (if it ever enters the import system) before it imports.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_finetune_plugin import tags
from tests.helpers import subprocess_env

SCENARIO = '''
import signal, sys, threading, time

import torch  # noqa: F401 - imported, as in the training process: genai evaluate fires torch's autologging \
hook

import mlflow
from mlflow.models.evaluation.utils import trace as eval_autologging

from mlflow_finetune_plugin import stops, tracking
from mlflow_finetune_plugin.evaluate.genai_view import log_genai_view
from mlflow_finetune_plugin.evaluate.report import EvalResult
from mlflow_finetune_plugin.train import watchdog

pin, stall_timeout = sys.argv[1] == "pin", float(sys.argv[2])
watchdog.SIGNAL_GRACE_S = float(sys.argv[3])
signal.signal(signal.SIGTERM, stops.record_and_raise)  # as job.run does: SIGTERM cancels
assert "mlflow.pytorch" not in sys.modules  # so that the hook imports it, under MLflow's import-hook lock
if pin:
    tracking.pin_registry_uri()  # what job.run does before it starts the run


def metrics_thread_waits_for_the_hook_lock() -> bool:
    thread = next((t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"), None)
    frame = sys._current_frames().get(thread.ident) if thread else None
    return frame is not None and "import_hooks" in frame.f_code.co_filename


original, waited = eval_autologging.get_autolog_function, []


def get_autolog_function(flavor):
    # MLflow calls this holding its import-hook lock, right before it imports the flavor's module.
    if not waited:
        waited.append(True)
        deadline = time.monotonic() + 3  # the metrics thread samples every 0.1 s
        while time.monotonic() < deadline and not metrics_thread_waits_for_the_hook_lock():
            time.sleep(0.01)
        print("metrics thread blocked on the hook lock:", metrics_thread_waits_for_the_hook_lock(), \
flush=True)
        threading.Thread(target=say_when_main_blocks, args=(threading.get_ident(),), daemon=True).start()
    return original(flavor)


def say_when_main_blocks(main: int) -> None:
    """Print once the main thread sits in the import system, at the same instruction twice 0.2 s apart: \
blocked
    (a stop signal sent earlier could still find it running Python code, and stop it the ordinary way)."""
    seen = None
    while True:
        frame = sys._current_frames()[main]
        now = (frame, frame.f_lasti) if frame.f_code.co_filename.startswith("<frozen importlib") else None
        if now is not None and now == seen:
            print("main thread blocked on the import lock", flush=True)
            return
        seen = now
        time.sleep(0.2)


eval_autologging.get_autolog_function = get_autolog_function
rows = [{"prompt": f"question {i}", "reference": f"answer {i}", "tuned_answer": f"reply {i}", \
"tuned_rougeL": 0.5}
        for i in range(4)]
mlflow.set_system_metrics_sampling_interval(0.1)
with mlflow.start_run(log_system_metrics=True) as run:
    print("run", run.info.run_id, flush=True)
    with watchdog.watching(run.info.run_id, stall_timeout):
        stops.enter("evaluate")
        log_genai_view(EvalResult({}, rows, ["tuned"]))
print("view logged", flush=True)
'''


def _scenario(tmp_path, tracking_uri, pin: bool, stall_timeout: float, sigterm: bool = False):
    """Run SCENARIO; with `sigterm`, send SIGTERM once the main thread is blocked. Returns (exit code, stdout,
    stderr, run id)."""
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO)
    env = subprocess_env(tracking_uri)
    env.pop("MLFLOW_REGISTRY_URI", None)  # as under `mlflow run`: MLflow resolves the registry URI itself
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen([sys.executable, str(script), "pin" if pin else "unpinned", str(stall_timeout),
                             "3"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    for line in proc.stdout:  # ends when the process does
        lines.append(line)
        if sigterm and line.startswith("main thread blocked on the import lock"):
            proc.send_signal(signal.SIGTERM)
    # The deadlocked process is ended by the watchdog; the timeout only keeps a broken watchdog from hanging
    # pytest.
    _, err = proc.communicate(timeout=300)
    out = "".join(lines)
    run_line = [line for line in lines if line.startswith("run ")]
    assert run_line, out + err
    return proc.returncode, out, err, run_line[0].split()[1]


def test_the_genai_view_in_a_run_with_system_metrics_does_not_deadlock(tmp_path, tracking_uri):
    code, out, err, run_id = _scenario(tmp_path, tracking_uri, pin=True, stall_timeout=120)
    assert code == 0, out + err
    # Pinned, the metrics thread never entered the import system, so MLflow's hook imported without waiting on
    # it.
    assert "metrics thread blocked on the hook lock: False" in out
    assert "view logged" in out
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    traces = mlflow.search_traces(locations=[run.info.experiment_id], run_id=run_id, return_type="list")
    assert len(traces) == 4
    assert any(k.startswith("system/") for k in run.data.metrics)  # system metrics were on throughout


def _assert_stacks_show_the_inversion(run) -> None:
    text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/error.txt")
    stacks = {part.split(" ", 1)[0]: part for part in text.split("\nThread ")[1:]}
    # Each side of the lock-order inversion, where it waits.
    assert "import_hooks/__init__.py" in stacks["SystemMetricsMonitor"]
    assert "_get_active_spark_session" in stacks["SystemMetricsMonitor"]
    assert "register_post_import_hook" in stacks["MainThread"]
    assert "genai_view.py" in stacks["MainThread"]


def test_the_watchdog_ends_a_deadlocked_stage_failed_with_every_threads_stack(tmp_path, tracking_uri):
    code, out, err, run_id = _scenario(tmp_path, tracking_uri, pin=False, stall_timeout=10)
    # Unpinned, MLflow's two threads deadlock (should a later MLflow not, this scenario no longer reproduces
    # it).
    assert "metrics thread blocked on the hook lock: True" in out, out + err
    assert "view logged" not in out
    assert code == 1, out + err
    assert "Error: stage 'evaluate' made no progress" in err
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[tags.ERROR].startswith("stage 'evaluate' made no progress for ")
    assert "raise train.stall_timeout" in run.data.tags[tags.ERROR]
    _assert_stacks_show_the_inversion(run)


def test_sigterm_ends_a_deadlocked_process_killed_with_every_threads_stack(tmp_path, tracking_uri):
    code, out, err, run_id = _scenario(tmp_path, tracking_uri, pin=False, stall_timeout=600, sigterm=True)
    assert "main thread blocked on the import lock" in out, out + err
    assert "view logged" not in out
    assert code == 130, out + err  # long before the stall timeout: the signal's grace (3 s here) ran out
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[tags.ERROR].startswith(
        "the training process had not stopped 3 s after SIGTERM (stage "
        "'evaluate')")
    _assert_stacks_show_the_inversion(run)


@pytest.mark.parametrize("timeout", [0, 3600])
def test_stall_timeout_is_a_recipe_key(tmp_path, timeout):
    from mlflow_finetune_plugin.config.loading import load_recipe
    from tests.helpers import chat_rows, write_project

    proj = write_project(tmp_path / "bot", "data: {max_length: 64}\n", rows=chat_rows(4))
    assert load_recipe(proj, overrides={"train.stall_timeout": str(timeout)}).train.stall_timeout == timeout


def test_a_pinned_registry_uri_keeps_mlflow_clients_out_of_the_import_system(tracking_uri, monkeypatch):
    from mlflow_finetune_plugin.tracking import pin_registry_uri

    class Recorder:  # sees every module lookup that goes through the import system
        def find_spec(self, name, path, target=None):
            looked_up.append(name)

    looked_up: list[str] = []
    monkeypatch.delenv("MLFLOW_REGISTRY_URI")  # as under `mlflow run`
    mlflow.set_registry_uri(None)
    monkeypatch.setattr(sys, "meta_path", [Recorder(), *sys.meta_path])
    MlflowClient()
    if "pyspark" not in sys.modules:  # absent, it is looked up again by every client, in every thread
        assert "pyspark" in looked_up
    pin_registry_uri()
    assert mlflow.get_registry_uri() == tracking_uri
    looked_up.clear()
    MlflowClient()
    assert looked_up == []
