"""Step timing and a one-step GPU profile inside any process that trains with a transformers `Trainer`, the
plugin's training process (started by `mlflow run`) and bench/plain_train.py alike, so both sides are measured
the same way.

bench/gpu/train_throughput.py puts this folder first on PYTHONPATH and sets BENCH_PROBE (a JSON file to
write); without it this module does nothing. When `transformers.trainer` is imported, `Trainer.training_step`
is wrapped:
- steps are counted from 0 (the Trainer's `global_step` before each step); the window starts before step
  BENCH_PROBE_WARMUP and ends before step BENCH_PROBE_WARMUP + BENCH_PROBE_TIMED, each edge after a
  `torch.cuda.synchronize()` (the only syncs added), so start-up, compilation and warm-up stay outside;
- tokens in the window are the `input_ids` elements of its steps (shapes only, no sync);
- step BENCH_PROBE_PROFILE (before the window) runs under `torch.profiler`; its top ops by device time go to
  BENCH_PROBE_PROFILE_OUT;
- at the window's end the JSON gets seconds, steps, tokens and the process's peak CUDA memory.
"""

import importlib.abc
import importlib.machinery
import json
import os
import sys
import time

_OUT = os.environ.get("BENCH_PROBE")


def _patch(trainer_cls):
    import torch

    warmup = int(os.environ.get("BENCH_PROBE_WARMUP", "10"))
    timed = int(os.environ.get("BENCH_PROBE_TIMED", "50"))
    profile_step = int(os.environ.get("BENCH_PROBE_PROFILE", "-1"))
    profile_out = os.environ.get("BENCH_PROBE_PROFILE_OUT")
    cuda = torch.cuda.is_available()
    state = {"t0": None, "tokens": 0, "done": False}
    original = trainer_cls.training_step

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def training_step(self, model, inputs, *args, **kwargs):
        step = self.state.global_step
        if state["done"]:
            return original(self, model, inputs, *args, **kwargs)
        if step == warmup:
            sync()
            state["t0"] = time.perf_counter()
        elif step == warmup + timed and state["t0"] is not None:
            sync()
            seconds = time.perf_counter() - state["t0"]
            state["done"] = True
            figures = {"seconds": seconds, "steps": timed, "tokens": state["tokens"],
                       "tokens_per_s": state["tokens"] / seconds, "warmup_steps": warmup,
                       "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                       "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20 if cuda else None}
            with open(_OUT, "w") as f:
                json.dump(figures, f)
        if warmup <= step < warmup + timed and "input_ids" in inputs:
            state["tokens"] += inputs["input_ids"].numel()
        if step != profile_step or not profile_out:
            return original(self, model, inputs, *args, **kwargs)
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        sync()
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            out = original(self, model, inputs, *args, **kwargs)
            sync()
        wall = time.perf_counter() - start
        events = prof.key_averages()
        device_key = "device_time_total" if cuda else "cpu_time_total"
        self_key = "self_device_time_total" if cuda else "self_cpu_time_total"
        busy = sum(getattr(e, self_key, 0) for e in events) / 1e6
        with open(profile_out, "w") as f:
            f.write(f"one training step (step {step}) under torch.profiler: {wall:.3f} s wall, "
                    f"{busy:.3f} s of {'GPU' if cuda else 'CPU'} op self time, "
                    f"{inputs['input_ids'].numel() if 'input_ids' in inputs else '?'} tokens\n\n")
            f.write(events.table(sort_by=self_key, row_limit=40, max_name_column_width=70))
            f.write("\n\nby total (incl. children):\n")
            f.write(events.table(sort_by=device_key, row_limit=25, max_name_column_width=70))
        return out

    trainer_cls.training_step = training_step


class _Hook(importlib.abc.MetaPathFinder):
    """Patches `transformers.trainer` right after it is first imported (nothing else is imported early)."""

    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def patched_exec(module):
            exec_module(module)
            _patch(module.Trainer)

        spec.loader.exec_module = patched_exec
        return spec


if _OUT:
    sys.meta_path.insert(0, _Hook())
