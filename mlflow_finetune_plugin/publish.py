"""What a run records and publishes: the resolved recipe and lineage before training; after it, the model logged
in the run, registered, aliased, and promoted when its gates pass."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import mlflow

from mlflow_finetune_plugin import tags as tag
from mlflow_finetune_plugin.logged_model import log_finetuned_model
from mlflow_finetune_plugin.models import compute_precision
from mlflow_finetune_plugin.promotion import maybe_auto_promote
from mlflow_finetune_plugin.recipe import flat_params, recipe_hash, to_yaml
from mlflow_finetune_plugin.registry import lineage_tags, register


def log_recipe(recipe, run_id: str, base_ref: str, vllm: tuple[bool, str]) -> dict:
    """Params (the resolved recipe, flattened), `recipe.yaml`, and the lineage tags known before training."""
    # MLflow's local backend has already logged the raw `-P` strings ('1e-3'); keep those rather than clash
    # with the typed value ('0.001'): MLflow refuses to change a logged param.
    logged = mlflow.MlflowClient().get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in flat_params(recipe).items() if k not in logged})
    mlflow.log_text(to_yaml(recipe), "recipe.yaml")
    precision = compute_precision(recipe.train.precision, recipe.model.dtype)
    print(f"Base model: {base_ref}; training precision: {precision}", file=sys.stderr)
    tags = lineage_tags(method=recipe.method, adapter=recipe.adapter.type, objective=recipe.objective,
                        quantization=recipe.model.quantization, base_model=base_ref,
                        base_revision=recipe.model.revision, recipe_hash=recipe_hash(recipe), source_run=run_id,
                        precision=precision, vllm_compatible=str(vllm[0]).lower(), vllm_reason=vllm[1])
    mlflow.set_tags(tags)
    return tags


def log_and_register(recipe, model, tokenizer, config: dict, tags: dict, name: str = "model",
                     registered_name: str | None = None) -> None:
    """Log the model in the active run and register it (alias, lineage tags, auto-promotion per the recipe)."""
    info = log_finetuned_model(model, tokenizer, config=config, name=name)
    mlflow.set_tags(tags)
    if recipe.registry.enabled:
        registered_name = registered_name or recipe.registry.name
        version = register(info.model_uri, registered_name, tags, recipe.registry.alias)
        mlflow.set_tags({tag.REGISTERED_MODEL: registered_name, tag.REGISTERED_VERSION: version.version})
        alias = f" (alias @{recipe.registry.alias})" if recipe.registry.alias else ""
        print(f"Registered {registered_name} version {version.version}{alias}")
        maybe_auto_promote(registered_name, version.version, recipe)


def log_per_task(recipe, model, tokenizer, config: dict, tags: dict, system_prompts: dict) -> None:
    """One adapter per task: each logged as `model-<task>` and registered as `<registry.name>-<task>`, with the
    system prompt of the rows it saw."""
    for name in recipe.data.tasks:
        log_and_register(recipe, _OneAdapter(model, name), tokenizer,
                         {**config, "task": name, "system_prompt": system_prompts.get(name)},
                         {**tags, tag.TASK: name}, name=f"model-{name}",
                         registered_name=f"{recipe.registry.name}-{name}")


class _OneAdapter:
    """A view of one named adapter of a multi-adapter PeftModel that saves as a plain adapter folder."""

    def __init__(self, model, name: str):
        self.model, self.name = model, name

    def save_pretrained(self, path, **kwargs):
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp, selected_adapters=[self.name], **kwargs)
            src = Path(tmp) / self.name if (Path(tmp) / self.name).is_dir() else Path(tmp)
            shutil.copytree(src, path, dirs_exist_ok=True)
