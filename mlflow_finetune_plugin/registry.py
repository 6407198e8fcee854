"""The model registry: every fine-tune becomes a version; aliases mark the ones to use."""

from __future__ import annotations

import logging

import mlflow
from mlflow import MlflowClient

_logger = logging.getLogger(__name__)

TAG_PREFIX = "finetune."


def register(model_uri: str, name: str, tags: dict[str, str], alias: str | None = "challenger"):
    """Register `model_uri` as a new version of `name` with lineage `tags`; point `alias` at it. Returns the version."""
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version.version)
    return version


def lineage_tags(**values) -> dict[str, str]:
    """`finetune.<key>` tags, dropping empty values."""
    return {TAG_PREFIX + k: str(v) for k, v in values.items() if v is not None and v != ""}
