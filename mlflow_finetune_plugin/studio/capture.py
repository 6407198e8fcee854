"""What the recipe loader and the data preflight print (their notes and advice, on stderr), caught for the
page.

The page's handlers run in Gradio's worker threads, so stderr is not swapped for everyone: a pass-through
stream sends each thread's writes to that thread's buffer while it captures, and everything else where it
always went."""

from __future__ import annotations

import contextlib
import io
import sys
import threading

_local = threading.local()
_lock = threading.Lock()


class _PerThread:
    def __init__(self, target):
        self.target = target

    def write(self, text: str) -> int:
        buffer = getattr(_local, "buffer", None)
        return (buffer if buffer is not None else self.target).write(text)

    def flush(self) -> None:
        buffer = getattr(_local, "buffer", None)
        (buffer if buffer is not None else self.target).flush()

    def isatty(self) -> bool:  # progress bars (tqdm) draw nothing into a buffer
        return getattr(_local, "buffer", None) is None and self.target.isatty()

    def __getattr__(self, name):
        return getattr(self.target, name)


@contextlib.contextmanager
def captured_stderr():
    """Yield a StringIO that receives what this thread writes to stderr inside the block."""
    with _lock:
        if not isinstance(sys.stderr, _PerThread):
            sys.stderr = _PerThread(sys.stderr)
    outer = getattr(_local, "buffer", None)
    _local.buffer = buffer = io.StringIO()
    try:
        yield buffer
    finally:
        _local.buffer = outer
