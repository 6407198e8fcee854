"""The training process's sign of life: which stage of the pipeline it is in and when it last moved on (a training
step, a batch of evaluation answers, a new stage). `train/watchdog.py` ends a run whose stage stops moving; the
stages and loops that move report here, whatever layer they live in."""

from __future__ import annotations

import time

_stage: str | None = None  # None: nothing watched (before training: data checks, model download and load)
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
