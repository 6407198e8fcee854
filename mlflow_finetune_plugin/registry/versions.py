"""The model registry: every fine-tune becomes a version; aliases mark the ones to use."""

from __future__ import annotations

import mlflow
from mlflow import MlflowClient

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.metrics import format_table


def register(model_uri: str, name: str, lineage: dict[str, str], alias: str | None = "challenger"):
    """Register `model_uri` as a new version of `name` with `lineage` tags; point `alias` at it. Returns the
    version."""
    from mlflow_finetune_plugin.tracking import despite_race

    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in lineage.items()})
    if alias:  # runs registering at once on a SQL store race in the alias' insert (registered_model_alias_pk)
        despite_race(lambda: MlflowClient().set_registered_model_alias(name, alias, version.version))
    return version


# Lineage every version must carry before it may hold the champion alias (base_revision is absent for local
# bases).
REQUIRED_LINEAGE = (tags.METHOD, tags.BASE_MODEL, tags.DATASET_DIGEST, tags.RECIPE_HASH,
                    tags.CHAT_TEMPLATE_HASH, tags.SOURCE_RUN)


def get_version(name: str, ref: str):
    """The version `ref` of `name`: a number ('3', 'v3') or an alias ('@champion', 'champion')."""
    from mlflow.exceptions import MlflowException

    from mlflow_finetune_plugin.errors import FinetuneError

    client = MlflowClient()
    ref = str(ref).strip()
    number = ref[1:] if ref[:1] in "vV" and ref[1:].isdigit() else ref
    try:
        if number.isdigit():
            return client.get_model_version(name, number)
        return client.get_model_version_by_alias(name, ref.lstrip("@"))
    except MlflowException as e:
        raise FinetuneError(f"model {name!r} has no version {ref!r}: {e.message}. "
                            f"List them with `mlflow-finetune models {name}`.") from None


def alias_holder(name: str, alias: str):
    """The version holding `alias`, or None."""
    aliases = MlflowClient().get_registered_model(name).aliases
    return MlflowClient().get_model_version(name, str(aliases[alias])) if alias in aliases else None


def aliases_by_version(name: str) -> dict[str, list[str]]:
    """version -> its aliases (search results leave aliases empty, the registered model has them all)."""
    out: dict[str, list[str]] = {}
    for alias, version in MlflowClient().get_registered_model(name).aliases.items():
        out.setdefault(str(version), []).append(alias)
    return out


def list_versions(name: str) -> list:
    """Every version of `name`, oldest first."""
    from mlflow_finetune_plugin.errors import FinetuneError

    client = MlflowClient()
    versions = list(client.search_model_versions(f"name = '{name}'", max_results=10_000))
    if not versions:
        known = [m.name for m in client.search_registered_models(max_results=100)]
        raise FinetuneError(
            f"no registered model named {name!r}. Registered models: {', '.join(known) or 'none'}")
    return sorted(versions, key=lambda v: int(v.version))


def source_run_id(version) -> str | None:
    """The run that trained (and evaluated) this version."""
    return version.tags.get(tags.SOURCE_RUN) or version.run_id


def missing_lineage(version) -> list[str]:
    return [name for name in REQUIRED_LINEAGE if not version.tags.get(name)]


def run_metrics(run_id: str | None) -> dict[str, float]:
    return dict(MlflowClient().get_run(run_id).data.metrics) if run_id else {}


def source_recipe(run_id: str | None) -> dict | None:
    """The resolved recipe (`recipe.yaml` artifact) a run was trained with, as plain data; None if it has
    none."""
    import tempfile

    import yaml
    from mlflow.exceptions import MlflowException

    if not run_id or "recipe.yaml" not in {a.path for a in MlflowClient().list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="recipe.yaml",
                                                       dst_path=tmp)
        except (MlflowException, OSError):
            return None
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}


def logged_model_id(version) -> str | None:
    """The logged model (m-...) a registered version was made from: MLflow 3 registers `models:/<model id>`
    (the version's own `model_id` field stays empty in a SQL store); None for a version registered from a
    run's files."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = str(version.source or "")
    rest = source[len("models:/"):] if source.startswith("models:/") else ""
    return rest if rest.startswith("m-") and "/" not in rest else None


def resolve_model_uri(model_uri: str) -> tuple[str | None, str | None, str | None]:
    """(registered name, version, source run id) of `models:/NAME/N`, `models:/NAME@ALIAS`, `models:/<model
    id>` or `runs:/<run id>/path`; name and version are None for unregistered models."""
    from mlflow_finetune_plugin.errors import FinetuneError

    if model_uri.startswith("runs:/"):
        return None, None, model_uri[len("runs:/"):].split("/", 1)[0]
    if not model_uri.startswith("models:/"):
        raise FinetuneError(f"{model_uri!r} is not a model URI; use models:/NAME/VERSION, models:/NAME@ALIAS "
                            "or runs:/RUN_ID/model")
    rest = model_uri[len("models:/"):].rstrip("/")
    if "@" in rest:
        name, ref = rest.split("@", 1)
    elif "/" in rest:
        name, ref = rest.rsplit("/", 1)
    else:  # a logged model id (models:/m-...)
        return None, None, mlflow.get_logged_model(rest).source_run_id
    version = get_version(name, ref if "@" not in rest else "@" + ref)
    return name, str(version.version), source_run_id(version)


def versions_table(name: str, metrics: list[str]) -> str:
    """Every version of `name` with its aliases, lineage and its source run's `eval/tuned/<metric>` values."""
    versions = list_versions(name)  # first: it explains an unknown name
    aliases = aliases_by_version(name)
    rows = []
    for v in versions:
        values = run_metrics(source_run_id(v))
        rows.append([v.version, ",".join("@" + a for a in sorted(aliases.get(str(v.version), []))) or "-",
                     v.tags.get(tags.METHOD, "-"), v.tags.get(tags.BASE_MODEL, "-"),
                     *(values.get(f"eval/tuned/{m}") for m in metrics), (source_run_id(v) or "-")[:12]])
    return format_table(["version", "aliases", "method", "base", *metrics, "run"], rows)


def checkpoint_models(run_id: str) -> list:
    """The checkpoints of training run `run_id` as logged models (`checkpoint-N`, see
    callbacks.CheckpointLogger), by step."""
    from mlflow.exceptions import MlflowException

    from mlflow_finetune_plugin.errors import FinetuneError

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as e:
        raise FinetuneError(f"no run {run_id!r}: {e.message}") from None
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'", output_format="list")
    return sorted((m for m in models if tags.CHECKPOINT_STEP in m.tags),
                  key=lambda m: int(m.tags[tags.CHECKPOINT_STEP]))


def find_checkpoint(ref: str, run_id: str | None = None):
    """A checkpoint's logged model by its model id (`m-...`), or by its step in training run `run_id`."""
    from mlflow.exceptions import MlflowException

    from mlflow_finetune_plugin.errors import FinetuneError

    ref = str(ref).strip()
    if ref.startswith("m-"):
        try:
            model = mlflow.get_logged_model(ref)
        except MlflowException as e:
            raise FinetuneError(f"no logged model {ref!r}: {e.message}") from None
        if tags.CHECKPOINT_STEP not in model.tags:
            raise FinetuneError(
                f"logged model {ref} ({model.name}) is not a checkpoint; list a run's checkpoints "
                "with `mlflow-finetune models NAME --checkpoints RUN_ID`")
        return model
    if not ref.isdigit():
        raise FinetuneError(
            f"checkpoint {ref!r}: give its step (a number) with its run, or its model id (m-...)")
    if not run_id:
        raise FinetuneError(
            f"checkpoint step {ref} of which run? Name the training run (--run RUN_ID), or give "
            "the checkpoint's model id (m-...)")
    found = checkpoint_models(run_id)
    for model in found:
        if int(model.tags[tags.CHECKPOINT_STEP]) == int(ref):
            return model
    steps = ", ".join(m.tags[tags.CHECKPOINT_STEP] for m in found) or "none"
    raise FinetuneError(f"run {run_id} has no checkpoint at step {ref}; its checkpoints: {steps}")


def checkpoints_table(run_id: str, metrics: list[str]) -> str:
    """The checkpoints of training run `run_id` ranked by `eval/tuned/<metrics[0]>` (the eval at each save
    step; lower is better for loss, perplexity and misrouted), best first; checkpoints without that metric
    come last, unranked."""
    from mlflow_finetune_plugin.errors import FinetuneError
    from mlflow_finetune_plugin.metrics import lower_is_better

    found = checkpoint_models(run_id)
    if not found:
        raise FinetuneError(
            f"run {run_id} has no checkpoint models: it stopped before its first checkpoint, or it "
            "ran before checkpoints became logged models")
    key, sign = f"eval/tuned/{metrics[0]}", 1 if lower_is_better(metrics[0]) else -1
    rows = [({m.key: m.value for m in sorted(model.metrics or [], key=lambda m: m.timestamp)}, model)
            for model in found]
    rows.sort(key=lambda row: (row[0].get(key) is None, sign * (row[0].get(key) or 0.0)))
    table = []
    for rank, (values, model) in enumerate(rows, 1):
        registered = model.tags.get(tags.REGISTERED_MODEL)
        table.append([rank if key in values else "-", model.tags[tags.CHECKPOINT_STEP],
                      *(values.get(f"eval/tuned/{m}") for m in metrics), values.get("train/loss"),
                      model.model_id,
                      f"{registered} v{model.tags.get(tags.REGISTERED_VERSION)}" if registered else "-"])
    return format_table(["rank", "step", *metrics, "train_loss", "model_id", "registered"], table)
