"""The watchdog of the training process: a stage of the pipeline that makes no progress for `train.stall_timeout`
seconds (no training step, no batch of evaluation answers, no next stage: `stops.py`) ends the run FAILED, with
every thread's stack in `error.txt`, and the process exits.

A stuck process is most likely a deadlock between threads (issue 58: MLflow's system-metrics thread and
`mlflow.genai.evaluate`). Its threads cannot be joined or interrupted then: a thread blocked on a lock never sees an
exception, and a signal handler, which Python runs in the main thread, never runs when the main thread is the one
blocked (SIGTERM did nothing). So the watchdog writes what it saw and ends the process with `os._exit`.

What it may not do at that moment is anything that needs a lock the stuck threads could hold: in issue 58 one of them
held the interpreter's import lock, so a first-time import (which MLflow's client code does lazily, e.g. when it
resolves the registry URI) would block the watchdog too. So everything it needs is imported before it starts, the
stacks go to stderr through `faulthandler` (C code, no locks) and to `error.txt` through modules loaded already, and
the run is marked FAILED by a fresh process (`python -m mlflow_finetune_plugin.train.watchdog`), which shares no lock
with this one. Should that process fail too, the launcher that waits on the job ends a run its process left RUNNING
(`launchers/local.py: finalize`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

from mlflow_finetune_plugin import stops, tags

# How long the fresh process may take to import MLflow and mark the run FAILED before this one exits anyway.
_RECORD_TIMEOUT_S = 300


@contextlib.contextmanager
def watching(run_id: str, timeout: float):
    """Within: a watched stage (`stops.enter`) idle for `timeout` seconds ends the run FAILED and the process
    with exit code 1. `timeout` 0 turns the watchdog off."""
    if timeout <= 0:
        yield
        return
    dog = _Watchdog(run_id, timeout)
    dog.start()
    try:
        yield
    finally:
        stops.enter(None)
        dog.stop()


class _Watchdog(threading.Thread):
    def __init__(self, run_id: str, timeout: float):
        import mlflow

        super().__init__(name="finetune-watchdog", daemon=True)
        self.run_id, self.timeout = run_id, timeout
        self._stopped = threading.Event()
        # Resolved now, in the main thread: at firing time resolving them may need the very locks that are stuck.
        self._env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
                     "MLFLOW_REGISTRY_URI": mlflow.get_registry_uri(), "MLFLOW_RUN_ID": run_id}
        self._error_file = Path(tempfile.mkdtemp(prefix="finetune-watchdog-")) / "error.txt"

    def run(self) -> None:
        poll = min(self.timeout / 4, 10.0)
        while not self._stopped.wait(poll):
            stage, idle = stops.current()
            if stage is not None and idle > self.timeout:
                self._fire(stage, idle)

    def stop(self) -> None:
        self._stopped.set()
        self.join()

    def _fire(self, stage: str, idle: float) -> None:
        message = (f"stage '{stage}' made no progress for {idle:.0f} s (train.stall_timeout: {self.timeout:g} s): "
                   "the training process is stuck, most likely threads waiting on each other's locks; every thread's "
                   f"stack is in the run's error.txt. Run {self.run_id} ended FAILED. If the stage is only slow, "
                   "raise train.stall_timeout (0 turns the watchdog off).")
        os.write(2, f"\nError: {message}\n".encode())
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        try:
            self._error_file.write_text(f"{message}\n\n{thread_stacks()}")
        except Exception as e:  # noqa: BLE001 - the run must still end; the stacks went to stderr above
            self._error_file.write_text(f"{message}\n\n(stacks not formatted: {type(e).__name__}: {e}; see stderr)")
        os.write(2, f"Stacks also in {self._error_file}\n".encode())
        try:
            subprocess.run([sys.executable, "-m", __name__, self.run_id, str(self._error_file)], env=self._env,
                           timeout=_RECORD_TIMEOUT_S, check=True)
        except Exception as e:  # noqa: BLE001 - exit anyway: the launcher ends a run its process left RUNNING
            os.write(2, f"Could not mark run {self.run_id} FAILED ({type(e).__name__}: {e}).\n".encode())
        os._exit(1)


def thread_stacks() -> str:
    """Every thread's stack, named, most recent call last."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"Thread {names.get(ident, '?')} ({ident}):\n{''.join(traceback.format_stack(frame))}")
    return "\n".join(parts)


def _record(run_id: str, error_file: str) -> None:
    """In the fresh process: the run FAILED, the message as its error tag, the file as `error.txt`."""
    from mlflow import MlflowClient

    text = Path(error_file).read_text()
    client = MlflowClient()
    try:
        client.set_tag(run_id, tags.ERROR, text.split("\n\n", 1)[0][:4900])
        client.log_text(run_id, text, "error.txt")
    finally:
        client.set_terminated(run_id, "FAILED")


if __name__ == "__main__":
    _record(*sys.argv[1:3])
