"""Bench-only probes, put on PYTHONPATH by the benchmark scripts; each is off unless its variable is set.

- $BENCH_PROCESS_LOG: one JSON line per interpreter start (wall time, command line): how the start-up benchmark
  sees when `mlflow run` and its training process begin.
- $BENCH_CUDA_PEAK_FILE: peak GPU memory of a process that used CUDA, noted at exit.
- $BENCH_STEP_LOG: per-step timings, CPU time and page faults of every `Trainer.train()` (the throughput
  benchmark's plugin and plain sides measured by the same code). With $BENCH_TRAIN_BARRIER (a folder) and
  $BENCH_TRAIN_PARTIES, `train()` first waits until that many processes have reached it, so that paired runs
  started together train at the same time.

Nothing in the package changes.
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

if os.environ.get("BENCH_STEP_LOG"):
    # Per optimizer step of every Trainer.train() in this process (plugin and plain sides alike): wall time at
    # step begin / step end / the step's training log (after every other callback, the plugin's MLflow logging
    # included), this process's user and system CPU seconds and minor page faults during the step, and the
    # trainer's non-padding token counter. Written as one JSON line per train() call when it returns.
    import importlib.abc
    import importlib.machinery
    import sys as _sys

    def _install_step_probe(trainer_module):
        import json
        import resource
        import time

        from transformers import TrainerCallback

        def now() -> float:
            # System-wide monotonic clock: step times of processes running side by side can be compared.
            return time.clock_gettime(time.CLOCK_MONOTONIC)

        def usage():
            r = resource.getrusage(resource.RUSAGE_SELF)
            return r.ru_utime, r.ru_stime, r.ru_minflt

        class StepProbe(TrainerCallback):
            def __init__(self, trainer):
                self.trainer, self.steps, self._open = trainer, [], None

            def on_step_begin(self, args, state, control, **kwargs):
                self._open = {"step": state.global_step + 1, "begin": now(), "usage": usage()}

            def on_step_end(self, args, state, control, **kwargs):
                if self._open is None:
                    return
                end, u = now(), usage()
                o, self._open = self._open, None
                self.steps.append({"step": o["step"], "begin": o["begin"], "end": end, "log": None,
                                   "user": u[0] - o["usage"][0], "sys": u[1] - o["usage"][1],
                                   "faults": u[2] - o["usage"][2],
                                   "tokens": getattr(self.trainer, "_total_train_tokens", None)})

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs and self.steps and self.steps[-1]["step"] == state.global_step:
                    self.steps[-1]["log"] = now()

        original = trainer_module.Trainer.train

        def wait_at_barrier(folder: str, parties: int, timeout: float = 900.0) -> float:
            # Each process leaves its pid in the folder and trains once `parties` pids are there (or after
            # `timeout`: a partner that failed must not hang this side). Outside the Trainer's timed loop.
            t0 = time.perf_counter()
            os.makedirs(folder, exist_ok=True)
            open(os.path.join(folder, str(os.getpid())), "w").close()
            while len(os.listdir(folder)) < parties and time.perf_counter() - t0 < timeout:
                time.sleep(0.005)
            return time.perf_counter() - t0

        def train(self, *args, **kwargs):
            barrier = os.environ.get("BENCH_TRAIN_BARRIER")
            waited = wait_at_barrier(barrier, int(os.environ.get("BENCH_TRAIN_PARTIES", "2"))) if barrier else None
            probe = StepProbe(self)
            self.add_callback(probe)  # last in line: its on_log runs after the plugin's MLflow callback
            out = original(self, *args, **kwargs)
            with open(os.environ["BENCH_STEP_LOG"], "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "runtime": out.metrics.get("train_runtime"),
                                    "barrier_wait_s": waited, "steps": probe.steps}) + "\n")
            return out

        trainer_module.Trainer.train = train

    class _TrainerHook(importlib.abc.MetaPathFinder):
        """Patch transformers.trainer right after it is first imported (nothing is imported early)."""

        def find_spec(self, name, path, target=None):
            if name != "transformers.trainer":
                return None
            _sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                _install_step_probe(module)

            spec.loader.exec_module = exec_and_patch
            return spec

    _sys.meta_path.insert(0, _TrainerHook())
