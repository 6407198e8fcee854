"""A stop signal, remembered as well as raised: in the training process (SIGTERM, a cancel) and in `mlflow
run` while it checks and starts the job (SIGINT, Ctrl-C).

Python drops an exception raised while a `__del__` or a weakref callback runs ("Exception ignored in ..."). In
a test that pressed Ctrl-C at random moments, a cancel landed in a weakref callback during evaluation and the
run went on to register its model and end FINISHED; a Ctrl-C landed in a regex object's `__del__` during
`mlflow run`'s data check and the job started anyway. So the stop is also recorded here, and the pipeline and
the backend look at the record between their stages: a dropped interrupt still stops the job before it starts
or publishes anything.

The other way a training process must stop is when it is stuck: the pipeline says here which stage it is in
and when that stage last moved on (a training step, a batch of evaluation answers, a new stage), and
`train/watchdog.py` ends a run whose stage stops moving.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

_requested: str | None = None


def request(why: str) -> None:
    global _requested
    _requested = why


def requested() -> str | None:
    """Why a stop was requested since the last reset, or None."""
    return _requested


def check() -> None:
    """Raise KeyboardInterrupt if a stop was requested (and its own interrupt may have been dropped)."""
    if _requested is not None:
        raise KeyboardInterrupt(_requested)


def reset() -> None:
    """A new run in this process (tests run several) starts with no stop requested."""
    global _requested
    _requested = None


@contextlib.contextmanager
def catching(signum: int):
    """Within: `signum` records a stop and raises KeyboardInterrupt. Main thread only (signals are delivered
    there); the previous handler comes back on exit."""
    reset()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signum, record_and_raise)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signum, previous)


def record_and_raise(signum, frame) -> None:
    """A signal handler: record the stop, then raise it as KeyboardInterrupt."""
    why = f"signal {signal.Signals(signum).name}"
    request(why)
    raise KeyboardInterrupt(why)


# The watched stage (None: nothing watched, as before training: data checks, model download and load) and the
# time of its last progress, for train/watchdog.py.
_stage: str | None = None
_last = time.monotonic()


def beat() -> None:
    """The current stage made progress."""
    global _last
    _last = time.monotonic()


def enter(stage: str | None) -> None:
    """The pipeline is in `stage` from now on (None: nothing to watch); a new stage counts as progress."""
    global _stage
    _stage = stage
    beat()


def current() -> tuple[str | None, float]:
    """The stage now (None when none is watched) and the seconds since its last progress."""
    return _stage, time.monotonic() - _last
