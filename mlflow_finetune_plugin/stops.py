"""A stop signal the training process received, remembered as well as raised.

`job.py` turns SIGTERM (a cancel) into a KeyboardInterrupt. Python drops an exception raised while a `__del__` or a
weakref callback runs ("Exception ignored in ..."): in a test that pressed Ctrl-C at random moments, a cancel landed
in a weakref callback during evaluation, and the run went on to register its model and end FINISHED. The pipeline
looks at the record between its stages, so a dropped interrupt still stops the run before it publishes anything.
"""

from __future__ import annotations

_requested: str | None = None


def request(why: str) -> None:
    global _requested
    _requested = why


def check() -> None:
    """Raise KeyboardInterrupt if a stop was requested (and its own interrupt may have been dropped)."""
    if _requested is not None:
        raise KeyboardInterrupt(_requested)


def reset() -> None:
    """A new run in this process (tests run several) starts with no stop requested."""
    global _requested
    _requested = None
