"""The training process: one per rank under torchrun, started by the finetune backend's launcher.

It runs the pipeline (`pipeline.fine_tune`) inside an MLflow run that already exists (`--run-id`, or
MLFLOW_RUN_ID as set by MLflow's local backend) or a new one, and always ends that run: FINISHED, FAILED with
the error as a tag and `error.txt`, or KILLED on Ctrl-C / SIGTERM. Signals, out-of-memory and disk-full errors
are handled here and nowhere else.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import mlflow

from mlflow_finetune_plugin import paths, stops, tags
from mlflow_finetune_plugin.config.schema import Recipe
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.runtime import allocator, threads
from mlflow_finetune_plugin.tracking import ensure_store, pin_registry_uri, record_failure
from mlflow_finetune_plugin.train.pipeline import fine_tune
from mlflow_finetune_plugin.train.trainers import is_main_process
from mlflow_finetune_plugin.train.watchdog import watching


def run(recipe, run_id: str | None = None) -> int:
    """Train inside an MLflow run and end it with the right status; returns a process exit code.

    Under torchrun only rank 0 talks to MLflow; the other ranks train and exit. While it runs, the process is
    one of the project's heavy processes on this machine, with its share of the cores (`runtime/threads.py`).
    """
    chosen = threads.start(recipe.train.threads, "training")
    if chosen.busy_note and is_main_process():
        print(chosen.busy_note, file=sys.stderr, flush=True)
    if is_main_process():
        print(allocator.describe(), flush=True)
    try:
        return _run(recipe, run_id, chosen)
    finally:
        threads.stop()


def _run(recipe, run_id: str | None, chosen) -> int:
    stops.reset()
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    if not is_main_process():
        try:
            fine_tune(recipe, run_id or os.environ.get("MLFLOW_RUN_ID"), main=False)
            return 0
        except KeyboardInterrupt:
            return 130
        except Exception as e:
            if not _lost_peer(e):
                raise
            print(f"Error: {_peer_error(e)}", file=sys.stderr)
            return 1
    ensure_store()  # `mlflow-finetune train` may be the first process to open a new store
    # before the system-metrics thread starts: else it can deadlock genai evaluate (issue 58)
    pin_registry_uri()
    active = mlflow.start_run(run_id=run_id, log_system_metrics=_system_metrics(recipe.train))
    run_id = active.info.run_id
    try:
        mlflow.set_tag(tags.THREADS, chosen.describe())
        with watching(run_id, recipe.train.stall_timeout):  # a stuck stage ends the run FAILED
            fine_tune(recipe, run_id)
        stops.check()
    except KeyboardInterrupt as e:
        previous = _ignore_stop_signals()
        status = _interrupted_status(run_id)
        record_failure(run_id, e if status == "KILLED" else _PEER_FAILED, status)
        mlflow.end_run(status)  # else MLflow's exit hook would end the active run as FINISHED
        _restore_signals(previous)
        print(f"\nRun {run_id} {'cancelled' if status == 'KILLED' else 'failed: ' + str(_PEER_FAILED)}.",
              file=sys.stderr)
        return 130
    except BaseException as e:  # noqa: BLE001 - every failure must end the run, not leave it RUNNING
        previous = _ignore_stop_signals()
        e = _peer_error(e) if _lost_peer(e) else _explain_resource_error(e)
        record_failure(run_id, e, "FAILED")
        mlflow.end_run("FAILED")
        _restore_signals(previous)
        if isinstance(e, FinetuneError):
            print(f"Error: {e}", file=sys.stderr)
        else:
            import traceback

            traceback.print_exc()
        return 1
    mlflow.end_run("FINISHED")
    return 0


def _system_metrics(train) -> bool:
    """Whether the run logs MLflow's system metrics (`system/*`: CPU, memory, disk, network, and GPUs where
    nvidia-ml-py is installed), sampled every `train.system_metrics_interval` seconds. Off with
    `train.system_metrics: false`, or for every run with MLflow's own
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false."""
    import importlib.util

    import torch
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

    if not train.system_metrics or (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.is_set()
                                    and not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get()):
        return False
    # MLflow's default (10 s) leaves a run of a minute with a handful of points; a sample is taken only once a
    # whole interval has passed.
    mlflow.set_system_metrics_sampling_interval(train.system_metrics_interval)
    if torch.cuda.is_available() and importlib.util.find_spec("pynvml") is None:
        print("Note: no GPU system metrics without nvidia-ml-py (pip install nvidia-ml-py).", file=sys.stderr)
    return True


_PEER_FAILED = FinetuneError(
    "stopped because another training process of this job failed or stopped (on this node "
    "or another); its own output says why (under torchrun: the lines prefixed [rankN])")


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")


def _lost_peer(e: BaseException) -> bool:
    """A collective failed because another rank went away (stopped, crashed, its node lost): gloo and NCCL
    raise RuntimeError/DistError naming the closed connection."""
    import torch.distributed as dist

    return isinstance(e, (RuntimeError, dist.DistError)) and any(text in str(e) for text in _PEER_GONE)


def _peer_error(e: BaseException) -> FinetuneError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return FinetuneError(f"{_PEER_FAILED} ({first})")


def _ignore_stop_signals() -> dict:
    """While the run is being ended: a second signal (torchrun's SIGTERM after gloo already failed, a second
    Ctrl-C) would cut that short, and MLflow's exit hook would then end the run FINISHED."""
    signal.setitimer(signal.ITIMER_REAL, 0)  # a deferred stop signal, too
    return {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)}


def _restore_signals(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _interrupted_status(run_id: str) -> str:
    """SIGTERM under torchrun is a cancel only when the canceller said so (the `finetune.cancel_requested`
    tag): torchrun also SIGTERMs rank 0 when another rank dies, and that run FAILED."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return "KILLED"
    try:
        run_tags = mlflow.MlflowClient().get_run(run_id).data.tags
    except Exception:  # noqa: BLE001 - the run must still end; a cancel is the likelier cause
        return "KILLED"
    return "KILLED" if run_tags.get(tags.CANCEL_REQUESTED) == "true" else "FAILED"


def _explain_resource_error(e: BaseException) -> BaseException:
    """Out of memory and disk full, as errors that say what to change."""
    import errno

    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return FinetuneError(
            f"disk full{' writing ' + str(e.filename) if e.filename else ''}. Free space, or move the job "
            f"folders (now {paths.cache_root()}) to a bigger disk with MLFLOW_FINETUNE_CACHE; keep fewer "
            "checkpoints with a lower train.save_total_limit or a higher train.save_steps.")
    text = str(e)
    if (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)):
        return FinetuneError(
            f"out of memory ({type(e).__name__}: {text.splitlines()[0][:200] if text else 'no details'}). "
            "Lower train.batch_size (raise train.grad_accum to keep the effective batch), set "
            "train.gradient_checkpointing: true, lower data.max_length, or use -e qlora (4-bit base model).")
    return e


# Code a stop signal must not cut short: a tracking-store write interrupted halfway leaves the sqlite database
# locked (the run could then not even be ended), an artifact copy leaves a partial file.
_UNINTERRUPTIBLE = ("mlflow.store", "sqlalchemy", "sqlite3", "alembic")


def _raise_keyboard_interrupt(signum, frame):
    """SIGTERM (cancel) as KeyboardInterrupt in the main thread, once it is outside tracking-store code."""
    inner = frame
    while inner is not None:
        if inner.f_globals.get("__name__", "").startswith(_UNINTERRUPTIBLE):
            signal.signal(signal.SIGALRM, lambda _, later: _raise_keyboard_interrupt(signum, later))
            signal.setitimer(signal.ITIMER_REAL, 0.05)  # look again in 50 ms
            return
        inner = inner.f_back
    stops.record_and_raise(signum, frame)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Internal: the training process started by the finetune backend.")
    parser.add_argument("--recipe-json", required=True, help="Resolved recipe (JSON) written by the backend.")
    parser.add_argument("--run-id", default=None)
    args = parser.parse_args(argv)
    recipe = Recipe.model_validate(json.loads(Path(args.recipe_json).read_text()))
    _exit(run(recipe, args.run_id))


def _exit(code: int) -> None:
    """End the training process without tearing the interpreter down: with torch, transformers, TRL and MLflow
    loaded (4,000 modules, 485,000 objects), freeing it all took 1.3-1.6 s after the run had ended, every run
    and every rank. The run is ended and its files closed by now; the exit hooks (MLflow's, logging's) still
    run."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
