"""What a served version was trained on, read through its source run: the training questions (its `training`
dataset inputs, read from their source files, or, for a `--retrain` run whose temporary project is gone, from
the copy it logged as artifacts) and the recipe's `monitor` and `eval` sections."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_finetune_plugin.config.monitor import MonitorConfig
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.messages import last_user_text
from mlflow_finetune_plugin.registry import versions as registry

REPLAY = "replay"  # the general-text input (data.replay): not the task's questions
RETRAIN_DATA = "monitor/retrain_data"  # a --retrain run's data files, logged as its artifacts
_copies: list[str] = []  # folders of artifacts read this process, removed when it ends


@dataclass
class Lineage:
    """A version's training questions (user turns), where they came from, and its recipe's monitoring
    section."""

    version: str
    run_id: str | None
    questions: list[str] = field(default_factory=list)
    conversations: list[list[dict]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    missing: str | None = None              # why no training questions could be read
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    structured: bool = False                # eval.output_format json
    json_schema: dict | None = None
    recipe: dict = field(default_factory=dict)


def lineage(name: str, version: str) -> Lineage:
    """The lineage of `name` v`version`; a source that cannot be read is said in `missing`, never raised (a
    version deleted since it served keeps its traffic in the report)."""
    try:
        mv = registry.get_version(name, version)
    except FinetuneError as e:
        return Lineage(version, None, missing=str(e).splitlines()[0])
    run_id = registry.source_run_id(mv)
    recipe = registry.source_recipe(run_id) or {}
    try:
        monitor = MonitorConfig.model_validate(recipe.get("monitor") or {})
    except ValueError as e:
        raise FinetuneError(f"monitor section of the recipe of run {run_id} ({name} v{version}): "
                            f"{e}") from None
    evaluation = recipe.get("eval") or {}
    out = Lineage(str(mv.version), run_id, monitor=monitor,
                  structured=evaluation.get("output_format") == "json",
                  json_schema=evaluation.get("json_schema"), recipe=recipe)
    if run_id is None:
        out.missing = "the version names no source run"
        return out
    _read_inputs(out)
    return out


def _read_inputs(out: Lineage) -> None:
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from mlflow_finetune_plugin.data.read import load_training_dataset

    problems = []
    for given in MlflowClient().get_run(out.run_id).inputs.dataset_inputs:
        tags = {t.key: t.value for t in given.tags}
        if tags.get(MLFLOW_DATASET_CONTEXT) != "training" or given.dataset.name == REPLAY:
            continue
        source = _source_path(given.dataset)
        if source is not None and not Path(source).exists():
            source = _logged_copy(out.run_id, source) or source
        if source is None:
            problems.append(f"input {given.dataset.name!r} ({given.dataset.source_type}) is not a file")
            continue
        try:
            ds, fmt = load_training_dataset(source, fmt=tags.get("format", "auto"))
        except (FinetuneError, OSError) as e:
            problems.append(f"{source}: {str(e).splitlines()[0]}")
            continue
        out.sources.append(source)
        for row in ds:
            messages = row.get("messages") or row.get("prompt")
            if isinstance(messages, list):
                out.conversations.append(messages)
                out.questions.append(last_user_text(messages))
    out.questions = [q for q in out.questions if q]
    if not out.questions:
        out.missing = "; ".join(problems) or f"run {out.run_id} logged no training input with user questions"


def _logged_copy(run_id: str, source: str) -> str | None:
    """The run's own copy of the data file `source` (RETRAIN_DATA), downloaded into a temporary folder that is
    removed when this process ends; None when it logged none."""
    import atexit
    import shutil
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    if not _copies:
        _copies.append(tempfile.mkdtemp(prefix="mlflow-finetune-lineage-"))
        atexit.register(shutil.rmtree, _copies[0], True)
    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{RETRAIN_DATA}/"
                                                   f"{Path(source).name}", dst_path=tempfile.mkdtemp(
                                                       dir=_copies[0]))
    except (MlflowException, OSError):
        return None


def _source_path(dataset) -> str | None:
    try:
        source = json.loads(dataset.source)
    except (TypeError, ValueError):
        return None
    uri = source.get("uri") if isinstance(source, dict) else None
    if isinstance(uri, str) and uri.startswith("file://"):
        uri = uri[len("file://"):]
    return uri if isinstance(uri, str) and uri.startswith("/") else None


