"""Resuming a run from the last whole checkpoint of an earlier run (`-P resume=RUN_ID` or `latest`), or from
one checkpoint given by its logged model id (`-P resume=m-...`, see `mlflow-finetune models NAME --checkpoints
RUN_ID`).

Checkpoints are the run's artifacts (`checkpoints/checkpoint-N`, logged by `callbacks.CheckpointLogger`), so a
run resumes on any machine that reaches the tracking server. A run killed while logging one leaves it partial:
only
folders up to the `finetune.last_checkpoint` tag, holding trainer state, optimizer and weights, are resumed
from.
"""

from __future__ import annotations

import os

import mlflow

from mlflow_finetune_plugin import paths, tags
from mlflow_finetune_plugin.errors import FinetuneError


def resume_checkpoint(resume: str | None, current_run: str) -> str | None:
    """Download the last checkpoint of run `resume` (or of the latest other run of this experiment), or the
    checkpoint whose logged model id `resume` is."""
    if not resume:
        return None
    client = mlflow.MlflowClient()
    if resume.startswith("m-"):
        rid, path = _checkpoint_of_model(client, resume)
        return _download(rid, path, current_run)
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
            return _download(rid, max(checkpoints, key=_step), current_run)
        if resume != "latest":
            raise FinetuneError(f"train.resume: run {rid} has no checkpoints to resume from")
    raise FinetuneError("train.resume=latest: no earlier run in this experiment has checkpoints")


def _download(run_id: str, checkpoint: str, current_run: str) -> str:
    dest = paths.job_dir(current_run) / "resume"
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=checkpoint, dst_path=str(dest))
    print(f"Resuming from {run_id}/{checkpoint}")
    mlflow.set_tag(tags.RESUMED_FROM, f"{run_id}/{checkpoint}")
    return local


def _checkpoint_of_model(client, model_id: str) -> tuple[str, str]:
    """(training run, checkpoint folder) of a checkpoint's logged model, which must be whole to resume
    from."""
    try:
        model = client.get_logged_model(model_id)
    except Exception as e:  # noqa: BLE001
        raise FinetuneError(f"train.resume: cannot read logged model {model_id!r}: {e}") from None
    path = model.tags.get(tags.CHECKPOINT_PATH)
    if not path:
        raise FinetuneError(
            f"train.resume: logged model {model_id} ({model.name}) is not a checkpoint; give a "
            "checkpoint's model id (`mlflow-finetune models NAME --checkpoints RUN_ID`) or a run id")
    if path not in resumable_checkpoints(client, model.source_run_id):
        raise FinetuneError(
            f"train.resume: checkpoint {model_id} ({path} of run {model.source_run_id}) is not "
            "complete in the run's artifacts; resume from the run instead (-P resume=RUN_ID)")
    return model.source_run_id, path


def resumable_checkpoints(client, run_id: str) -> list[str]:
    """The checkpoint folders of a run that can be resumed from.

    A run killed while logging a checkpoint leaves that folder partial. The run tags the last folder it
    finished copying (`finetune.last_checkpoint`): folders after it are partial. Runs without the tag (logged
    elsewhere, or killed before their first checkpoint was complete) are judged by their files.
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
    sizes = {a.path.rsplit("/", 1)[-1]: 1 if a.is_dir else a.file_size or 0
             for a in client.list_artifacts(run_id, path)}
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
    return mlflow.artifacts.download_artifacts(run_id=source_run, artifact_path=artifact_path,
                                               dst_path=str(dest))
