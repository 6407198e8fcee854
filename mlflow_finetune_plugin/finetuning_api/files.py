"""`client.files` over the tracking store: each uploaded file is the artifact of a run of its own in
experiment `openai-files`, so files live where the store keeps artifacts (a local folder, S3, ...), survive a
restart of the server, and are seen by every server on the same store. The client's file name is a label only:
the artifact's
name is made from it by `safe_name`, and no path is ever built from what a client sent."""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.finetuning_api.shapes import APIError, not_found, page

EXPERIMENT = "openai-files"
PURPOSES = ("fine-tune",)
RESULTS = "fine-tune-results"  # the metrics CSV of a finished job: written by the server, never uploaded
MAX_UPLOAD_MB = 512
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(filename: str | None) -> str:
    """A file name to store under: the last part of `filename`, characters outside [A-Za-z0-9._-] replaced, no
    leading dot, at most 100 characters ("upload.jsonl" when nothing is left)."""
    base = re.split(r"[\\/]", filename or "")[-1]
    name = _UNSAFE.sub("_", base).lstrip(".")[:100]
    return name if name.strip("_") else "upload.jsonl"


def check_jsonl(data: bytes, filename: str) -> int:
    """The number of examples in a fine-tune file; APIError naming the first line that is not a JSON
    object."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400,
                       f"{filename}: not UTF-8 text ({e.reason} at byte {e.start}); upload JSONL, one JSON "
                       "object per line.", code="invalid_file_format", param="file") from None
    count = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise APIError(400,
                           f"{filename}:{number}: not valid JSON ({e}); every line must be one JSON object.",
                           code="invalid_file_format", param="file") from None
        if not isinstance(row, dict):
            raise APIError(400,
                           f"{filename}:{number}: a JSON {type(row).__name__}, not an object; every line "
                           "must be one JSON object.", code="invalid_file_format", param="file")
        count += 1
    if not count:
        raise APIError(400, f"{filename}: no examples (the file is "
                            "empty).", code="invalid_file_format", param="file")
    return count


class FileStore:
    """Files as runs of one experiment: the id is `file-<run id>`."""

    def __init__(self, experiment: str = EXPERIMENT, max_bytes: int = MAX_UPLOAD_MB << 20):
        self.experiment, self.max_bytes = experiment, max_bytes
        self._experiment_id = None

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient()

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            from mlflow_finetune_plugin.tracking import experiment_id

            self._experiment_id = experiment_id(self.experiment, self._client())
        return self._experiment_id

    def create(self, data: bytes, filename: str | None, purpose: str,
               written_by_server: bool = False) -> dict:
        if purpose not in PURPOSES and not (written_by_server and purpose == RESULTS):
            raise APIError(400,
                           f"purpose {purpose!r} is not served here: this server keeps files for fine-tuning "
                           "(purpose='fine-tune').", code="invalid_purpose", param="purpose")
        if len(data) > self.max_bytes:
            raise APIError(413,
                           f"the file is {len(data)} bytes, above this server's limit of {self.max_bytes} "
                           "(--max-upload-mb).", code="file_too_large", param="file")
        name = safe_name(filename)
        if purpose == "fine-tune":
            check_jsonl(data, name)
        client = self._client()
        run = client.create_run(self.experiment_id(), run_name=name, tags={
            tags.FILE_PURPOSE: purpose, tags.FILE_NAME: (filename or name)[:250],
            tags.FILE_BYTES: str(len(data)), tags.FILE_ARTIFACT: f"file/{name}"})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            client.log_artifact(run.info.run_id, str(path), artifact_path="file")
        client.set_terminated(run.info.run_id, "FINISHED")
        return self.retrieve(f"file-{run.info.run_id}")

    def _run(self, file_id: str, param: str | None = "file_id"):
        from mlflow.exceptions import MlflowException

        run_id = file_id.removeprefix("file-") if isinstance(file_id, str) else ""
        if not file_id.startswith("file-") or not re.fullmatch(r"[0-9a-f]{32}", run_id):
            raise not_found("file", file_id, param)
        try:
            run = self._client().get_run(run_id)
        except MlflowException:
            raise not_found("file", file_id, param) from None
        if run.info.experiment_id != self.experiment_id() or run.info.lifecycle_stage != "active":
            raise not_found("file", file_id, param)
        return run

    def retrieve(self, file_id: str, param: str | None = "file_id") -> dict:
        return _file_object(self._run(file_id, param))

    def list(self, purpose: str | None = None, after: str | None = None, limit: int | None = None,
             order: str = "desc") -> dict:
        from mlflow.entities import ViewType

        runs = self._client().search_runs([self.experiment_id()], run_view_type=ViewType.ACTIVE_ONLY,
                                          order_by=[
                                              f"attributes.start_time {'ASC' if order == 'asc' else 'DESC'}"],
                                          max_results=50000)
        files = [_file_object(r) for r in runs]
        return page([f for f in files if purpose in (None, f["purpose"])], after, limit, default_limit=10000)

    def delete(self, file_id: str) -> dict:
        run = self._run(file_id)
        self._client().delete_run(run.info.run_id)
        return {"id": file_id, "object": "file", "deleted": True}

    def content(self, file_id: str, param: str | None = "file_id") -> bytes:
        run = self._run(file_id, param)
        with tempfile.TemporaryDirectory() as tmp:
            local = self._client().download_artifacts(run.info.run_id, run.data.tags[tags.FILE_ARTIFACT], tmp)
            return Path(local).read_bytes()


def _file_object(run) -> dict:
    t = run.data.tags
    return {"id": f"file-{run.info.run_id}", "object": "file", "bytes": int(t.get(tags.FILE_BYTES, 0)),
            "created_at": int(run.info.start_time / 1000) if run.info.start_time else int(time.time()),
            "filename": t.get(tags.FILE_NAME, ""), "purpose": t.get(tags.FILE_PURPOSE, ""),
            "status": "processed", "expires_at": None, "status_details": None}
