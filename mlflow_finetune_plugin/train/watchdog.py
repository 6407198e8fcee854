"""The watchdog of the training process: a stage of the pipeline that makes no progress for
`train.stall_timeout` seconds (no training step, no batch of evaluation answers, no next stage: `stops.py`)
ends the run FAILED, with every thread's stack in `error.txt`, and the process exits.

A stuck process is most likely a deadlock between threads (issue 58: MLflow's system-metrics thread and
`mlflow.genai.evaluate`). Its threads cannot be joined or interrupted then: a thread blocked on a lock never
sees an exception, and a signal handler, which Python runs in the main thread, never runs when the main thread
is the one blocked (SIGTERM did nothing). So the watchdog writes what it saw and ends the process with
`os._exit`; it does the same, ending the run KILLED, when a stop signal has not stopped the process
`SIGNAL_GRACE_S` later.

What it may not do at that moment is anything that needs a lock the stuck threads could hold: in issue 58 one
of them held the interpreter's import lock, so a first-time import (which MLflow's client code does lazily,
e.g. when it resolves the registry URI) would block the watchdog too. So everything it needs is imported
before it starts, the stacks go to stderr through `faulthandler` (C code, no locks) and to `error.txt` through
modules loaded already, and the run is ended by a fresh process (`python -m
mlflow_finetune_plugin.train.watchdog`), which shares no lock with this one. Should that process fail too, the
launcher that waits on the job ends a run its process left RUNNING (`launchers/local.py: finalize`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from mlflow_finetune_plugin import stops, tags

# How long the fresh process may take to import MLflow and mark the run ended before this one exits anyway.
_RECORD_TIMEOUT_S = 300
# A stop signal (SIGTERM, SIGINT) the process has not acted on this many seconds later: its main thread is
# stuck. Python runs signal handlers in the main thread only, between bytecodes; one blocked on a lock never
# gets to them.
SIGNAL_GRACE_S = 30
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def watching(run_id: str, timeout: float):
    """Within: a watched stage (`stops.enter`) idle for `timeout` seconds ends the run FAILED and the process
    with exit code 1; a stop signal the process has not acted on `SIGNAL_GRACE_S` seconds later ends the run
    KILLED and the process with exit code 130. `timeout` 0 turns the watchdog off."""
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
        self._signalled: tuple[str, float] | None = None  # the stop signal's name, when it came
        # Resolved now, in the main thread: at firing time resolving them may need the very locks that are
        # stuck.
        self._env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
                     "MLFLOW_REGISTRY_URI": mlflow.get_registry_uri()}
        # Named now (the temporary folder is looked up once), made only if it fires: a run that ends leaves
        # nothing.
        self._error_file = Path(tempfile.gettempdir()) / f"finetune-watchdog-{run_id}" / "error.txt"
        # Signals reach this thread as bytes on a pipe (`signal.set_wakeup_fd`, written by the interpreter's C
        # handler even while the main thread is blocked); settable from the main thread only.
        self._pipe = os.pipe() if threading.current_thread() is threading.main_thread() else None
        if self._pipe:
            os.set_blocking(self._pipe[1], False)
            self._previous_wakeup_fd = signal.set_wakeup_fd(self._pipe[1])

    def run(self) -> None:
        poll = min(self.timeout / 4, 5.0)
        while not self._stopped.is_set():
            self._wait(poll)
            stage, idle = stops.current()
            if self._stopped.is_set():
                return
            if self._signalled and time.monotonic() - self._signalled[1] > SIGNAL_GRACE_S:
                self._fire(
                    f"the training process had not stopped {SIGNAL_GRACE_S:g} s after {self._signalled[0]} "
                    f"(stage '{stage}'): its main thread is stuck, most likely threads waiting on each "
                    "other's locks, so the signal's handler never ran", "KILLED", 130)
            if stage is not None and idle > self.timeout:
                self._fire(f"stage '{stage}' made no progress for {idle:.0f} s (train.stall_timeout: "
                           f"{self.timeout:g} s): the training process is stuck, most likely threads waiting "
                           "on each other's locks. If the stage is only slow, raise train.stall_timeout (0 "
                           "turns the watchdog off)", "FAILED", 1)

    def _wait(self, seconds: float) -> None:
        if self._pipe is None:
            self._stopped.wait(seconds)
            return
        if select.select([self._pipe[0]], [], [], seconds)[0]:
            received = os.read(self._pipe[0], 512)
            stop = next((signal.Signals(n).name for n in received if n in _STOP_SIGNALS), None)
            if stop and self._signalled is None:
                self._signalled = (stop, time.monotonic())

    def stop(self) -> None:
        self._stopped.set()
        if self._pipe:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            with contextlib.suppress(BlockingIOError):  # a full pipe wakes the thread just as well
                os.write(self._pipe[1], b"\0")  # wakes the thread at once
        self.join()
        if self._pipe:
            for fd in self._pipe:
                os.close(fd)

    def _fire(self, why: str, status: str, exit_code: int) -> None:
        message = f"{why}. Every thread's stack is in the run's error.txt; run {self.run_id} ended {status}."
        os.write(2, f"\nError: {message}\n".encode())
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        self._error_file.parent.mkdir(exist_ok=True)
        try:
            self._error_file.write_text(f"{message}\n\n{thread_stacks()}")
        except Exception as e:  # noqa: BLE001 - the run must still end; the stacks went to stderr above
            self._error_file.write_text(
                f"{message}\n\n(stacks not formatted: {type(e).__name__}: {e}; see stderr)")
        os.write(2, f"Stacks also in {self._error_file}\n".encode())
        try:
            subprocess.run([sys.executable, "-m", __name__, self.run_id, str(self._error_file), status],
                           env=self._env, timeout=_RECORD_TIMEOUT_S, check=True)
        except Exception as e:  # noqa: BLE001 - exit anyway: the launcher ends a run its process left RUNNING
            os.write(2, f"Could not mark run {self.run_id} {status} ({type(e).__name__}: {e}).\n".encode())
        os._exit(exit_code)


def thread_stacks() -> str:
    """Every thread's stack, named, most recent call last."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"Thread {names.get(ident, '?')} ({ident}):\n{''.join(traceback.format_stack(frame))}")
    return "\n".join(parts)


def _record(run_id: str, error_file: str, status: str) -> None:
    """In the fresh process: the run ended with `status`, the message as its error tag, the file as
    `error.txt`."""
    from mlflow import MlflowClient

    text = Path(error_file).read_text()
    client = MlflowClient()
    try:
        client.set_tag(run_id, tags.ERROR, text.split("\n\n", 1)[0][:4900])
        client.log_text(run_id, text, "error.txt")
    finally:
        client.set_terminated(run_id, status)


if __name__ == "__main__":
    _record(*sys.argv[1:4])
