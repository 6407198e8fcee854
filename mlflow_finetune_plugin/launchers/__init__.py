"""Launchers start the training command somewhere and return a SubmittedRun that waits, polls and cancels.

Each module provides `launch(cmd, run_id, env, job_dir, detach=False, cwd=None, **config) -> SubmittedRun` and
writes `job_dir/job.json`, which `mlflow-finetune cancel RUN_ID` reads to find the job again.
"""

from mlflow_finetune_plugin.launchers import local, ray, torchrun

LAUNCHERS = {
    "local": local,
    "torchrun": torchrun,
    "ray": ray,
}

# The --backend-config keys each launcher takes besides `launcher` and `detach`.
LAUNCHER_KEYS = {
    "local": (),
    "torchrun": ("nproc_per_node", "nnodes", "rdzv_endpoint"),
    "ray": ("address", "num_workers", "use_gpu"),
}
