"""Launcher `torchrun`: the same training command under torch.distributed, one process per rank.

`--backend-config '{"launcher": "torchrun", "nproc_per_node": 2}'`. The training command runs under torchrun
(`quiet_torchrun ... -m mlflow_finetune_plugin.train.job ...`); rank 0 owns the MLflow run, the other ranks
only train. DDP by default, FSDP with the recipe's `train.distributed: fsdp` (GPUs only). Process management
is the local launcher's (own session, supervisor when detached); cancel also reaches the workers, which
torchrun starts in sessions of their own.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.launchers import local


def launch(cmd: list[str], run_id: str, env: dict, job_dir: Path, detach: bool = False, cwd=None,
           nproc_per_node: int | None = None, nnodes: int = 1, rdzv_endpoint: str | None = None):
    """Start `cmd` on `nproc_per_node` ranks (default: one per GPU, else 1) of this node; returns a
    SubmittedRun."""
    dist_cmd = torchrun_command(cmd, run_id, nproc_per_node, nnodes, rdzv_endpoint)
    if nnodes > 1:  # the other nodes' ranks decide as this node's do (the hint below carries the figure)
        from mlflow_finetune_plugin.models.precision import for_every_rank

        env = {**env, **for_every_rank()}
    submitted = local.launch(dist_cmd, run_id, env, job_dir, detach=detach, cwd=cwd)
    if nnodes > 1:
        print(other_nodes_hint(dist_cmd, nnodes, rdzv_endpoint, env, cwd), file=sys.stderr)
    job_file = job_dir / "job.json"
    job_file.write_text(json.dumps({**json.loads(job_file.read_text()), "launcher": "torchrun"}))
    return TorchrunSubmittedRun(run_id, submitted.process)


def torchrun_command(cmd: list[str], run_id: str, nproc_per_node: int | None = None, nnodes: int = 1,
                     rdzv_endpoint: str | None = None) -> list[str]:
    """`cmd` under torchrun: a `python -m module` command keeps its module, anything else runs
    `--no-python`."""
    if nproc_per_node is None:
        import torch

        nproc_per_node = torch.cuda.device_count() or 1
    out = [sys.executable, "-m", "mlflow_finetune_plugin.launchers.quiet_torchrun",
           "--nproc-per-node", str(nproc_per_node), "--max-restarts", "0"]
    if nnodes == 1 and not rdzv_endpoint:
        out.append("--standalone")
    else:
        # Every node runs the same command with the same rendezvous id: the run id (see docs/scaling.md).
        out += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint,
                "--rdzv-id", run_id]
    if len(cmd) > 2 and cmd[0] == sys.executable and cmd[1] == "-m":
        return [*out, "-m", *cmd[2:]]
    return [*out, "--no-python", *cmd]


def other_nodes_hint(dist_cmd: list[str], nnodes: int, rdzv_endpoint: str, env: dict, cwd=None) -> str:
    """What to run on the other nodes: this node's command (same rendezvous id, the run id), with the tracking
    URI; the recipe file, the data and the tracking server must be reachable there at the same addresses."""
    import shlex

    from mlflow_finetune_plugin.models.precision import SPEEDUP_ENV

    assigned = [f"{key}={env[key]}" for key in ("MLFLOW_TRACKING_URI", SPEEDUP_ENV) if env.get(key)]
    line = shlex.join([*assigned, *dist_cmd])
    where = f"cd {shlex.quote(str(cwd))} && " if cwd else ""
    return (f"=== torchrun: this node waits at the rendezvous {rdzv_endpoint} for {nnodes - 1} more node(s). "
            f"On each of them (recipe, data and tracking store reachable at the same paths), run:\n"
            f"{where}{line}\n===")


class TorchrunSubmittedRun(local.LocalSubmittedRun):
    """Like a local job; cancel marks the run as cancelled first, so rank 0 ends it KILLED rather than
    FAILED."""

    def cancel(self) -> None:
        request_cancel(self.run_id)
        stop_process_tree(self.process.pid, self.process)
        local.finalize(self.run_id, self.process.returncode, cancelled=True)


def request_cancel(run_id: str, timeout: float = 5.0) -> None:
    """Tell rank 0 that the SIGTERM about to come is a cancel (torchrun also SIGTERMs it when another rank
    dies).

    At most `timeout` seconds: the store may be locked by the ranks writing to it, and nothing may hold up the
    signals that stop the job. Without the tag in time the job is stopped all the same, and the run may end
    FAILED instead of KILLED."""
    import threading

    from mlflow import MlflowClient

    writer = threading.Thread(target=lambda: MlflowClient().set_tag(run_id, tags.CANCEL_REQUESTED, "true"),
                              daemon=True)
    writer.start()
    writer.join(timeout)
    if writer.is_alive():
        print(
            f"Warning: could not mark run {run_id} as cancelled within {timeout:.0f} s (tracking store "
            "busy); stopping it anyway", file=sys.stderr)


def stop_process_tree(pid: int, proc=None, grace: float = local.GRACE_SECONDS) -> None:
    """SIGTERM the job's process group (torchrun passes it on to its workers); after `grace` seconds SIGKILL
    the group and every process that descended from it, workers in their own sessions included."""
    import psutil

    try:
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        # Zombies do not count: a detached job's supervisor stays one until its parent (maybe long gone) reaps
        # it.
        if not any(_alive(p) for p in tree):
            break
        time.sleep(0.2)
    else:
        for p in tree:
            try:
                p.kill()  # psutil checks the process is still the one it saw (pid reuse safe)
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc is not None:
        proc.wait()


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


