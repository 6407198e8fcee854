"""Resuming a run from the last whole checkpoint of an earlier run (`-P resume=RUN_ID` or `latest`).

Checkpoints are the run's artifacts (`checkpoints/checkpoint-N`, logged by `callbacks.CheckpointLogger`), so a run
resumes on any machine that reaches the tracking server. A run killed while logging one leaves it partial: only
folders up to the `finetune.last_checkpoint` tag, holding trainer state, optimizer and weights, are resumed from.
"""

from __future__ import annotations

import os

import mlflow

from mlflow_finetune_plugin import paths, tags
from mlflow_finetune_plugin.errors import FinetuneError


def resume_checkpoint(resume: str | None, current_run: str) -> str | None:
    """Download the last checkpoint of run `resume` (or of the latest other run of this experiment)."""
    if not resume:
        return None
    client = mlflow.MlflowClient()
    if resume == "latest":
        exp = client.get_run(current_run).info.experiment_id
        runs = client.search_runs([exp], order_by=["attributes.start_time DESC"], max_results=50)
        candidates = [r.info.run_id for r in runs if r.info.run_id != current_run]
    else:
        candidates = [resume]
    for rid in candidates:
        try:
            checkpoints = resumable_checkpoints(client, rid)
        except Exception as e:  # noqa: BLE001
            raise FinetuneError(f"train.resume: cannot read run {rid!r}: {e}") from None
        if checkpoints:
            last = max(checkpoints, key=_step)
            dest = paths.job_dir(current_run) / "resume"
            local = mlflow.artifacts.download_artifacts(run_id=rid, artifact_path=last, dst_path=str(dest))
            print(f"Resuming from {rid}/{last}")
            mlflow.set_tag(tags.RESUMED_FROM, f"{rid}/{last}")
            return local
        if resume != "latest":
            raise FinetuneError(f"train.resume: run {rid} has no checkpoints to resume from")
    raise FinetuneError("train.resume=latest: no earlier run in this experiment has checkpoints")


def resumable_checkpoints(client, run_id: str) -> list[str]:
    """The checkpoint folders of a run that can be resumed from.

    A run killed while logging a checkpoint leaves that folder partial. The run tags the last folder it finished
    copying (`finetune.last_checkpoint`): folders after it are partial. Runs without the tag (logged elsewhere, or
    killed before their first checkpoint was complete) are judged by their files.
    """
    folders = [a.path for a in client.list_artifacts(run_id, "checkpoints") if a.is_dir]
    marked = client.get_run(run_id).data.tags.get(tags.LAST_CHECKPOINT)
    if marked:
        last = _step(marked)
        folders = [f for f in folders if _step(f) <= last]
    return [f for f in folders if _is_whole_checkpoint(client, run_id, f)]


def _step(checkpoint: str) -> int:
    return int(checkpoint.rsplit("-", 1)[-1])


def _is_whole_checkpoint(client, run_id: str, path: str) -> bool:
    """Trainer state, optimizer and weights all logged, none of them empty."""
    sizes = {a.path.rsplit("/", 1)[-1]: 1 if a.is_dir else a.file_size or 0 for a in client.list_artifacts(run_id, path)}
    weights = any(size for name, size in sizes.items()
                  if name.endswith((".safetensors", ".bin")) or name.startswith("pytorch_model_fsdp"))
    optimizer = any(size for name, size in sizes.items() if name.startswith("optimizer"))
    return bool(sizes.get("trainer_state.json")) and optimizer and weights


def rank_resume_checkpoint(run_id: str) -> str | None:
    """Non-main ranks resume from the checkpoint rank 0 picked (its `finetune.resumed_from` tag): from the job
    folder on rank 0's node, downloaded on any other node."""
    picked = mlflow.MlflowClient().get_run(run_id).data.tags.get(tags.RESUMED_FROM)
    if not picked:
        return None
    source_run, artifact_path = picked.split("/", 1)
    local = paths.job_dir(run_id) / "resume" / artifact_path
    if (local / "trainer_state.json").exists():
        return str(local)
    dest = paths.job_dir(run_id) / f"resume-rank{os.environ.get('RANK', '0')}"
    return mlflow.artifacts.download_artifacts(run_id=source_run, artifact_path=artifact_path, dst_path=str(dest))
