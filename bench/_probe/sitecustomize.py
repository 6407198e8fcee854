"""Bench-only: note when each Python process starts (on PYTHONPATH only for bench/startup.py).

Appends one JSON line per interpreter start to $BENCH_PROCESS_LOG: wall time and command line. Nothing in the
package changes; this is how the start-up benchmark sees when `mlflow run` and its training process begin.
"""

import os

if os.environ.get("BENCH_PROCESS_LOG"):
    import json
    import time

    try:
        with open("/proc/self/cmdline", "rb") as _f:
            _argv = [a.decode(errors="replace") for a in _f.read().split(b"\0") if a]
    except OSError:
        _argv = []
    with open(os.environ["BENCH_PROCESS_LOG"], "a") as _f:
        _f.write(json.dumps({"t": time.time(), "pid": os.getpid(), "argv": _argv}) + "\n")

if os.environ.get("BENCH_CUDA_PEAK_FILE"):
    import atexit

    def _write_cuda_peak():
        # Peak GPU memory of a process that used CUDA (the plugin's training process), noted at exit.
        import sys as _sys

        torch = _sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        import json as _json

        with open(os.environ["BENCH_CUDA_PEAK_FILE"], "a") as f:
            f.write(_json.dumps({"pid": os.getpid(), "peak": torch.cuda.max_memory_allocated()}) + "\n")

    atexit.register(_write_cuda_peak)
