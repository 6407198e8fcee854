"""What a run records and publishes: the resolved recipe and lineage before training; after it, the model
logged in the run, registered, aliased, and promoted when its gates pass."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import mlflow

from mlflow_finetune_plugin import tags as tag
from mlflow_finetune_plugin.config.checks import SCORING
from mlflow_finetune_plugin.config.loading import flat_params, recipe_hash, to_yaml
from mlflow_finetune_plugin.data.splits import despite_race
from mlflow_finetune_plugin.logged_model import log_finetuned_model
from mlflow_finetune_plugin.models.precision import compute_precision, measured_for, precision_reason
from mlflow_finetune_plugin.registry import model_card
from mlflow_finetune_plugin.registry.promotion import maybe_auto_promote
from mlflow_finetune_plugin.registry.versions import register
from mlflow_finetune_plugin.reward_model import log_reward_model
from mlflow_finetune_plugin.tags import lineage_tags


def log_recipe(recipe, run_id: str, base_ref: str, vllm: tuple[bool, str]) -> dict:
    """Params (the resolved recipe, flattened), `recipe.yaml`, and the lineage tags known before training."""
    # MLflow's local backend has already logged the raw `-P` strings ('1e-3'); keep those rather than clash
    # with the typed value ('0.001'): MLflow refuses to change a logged param.
    logged = mlflow.MlflowClient().get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in flat_params(recipe).items() if k not in logged})
    mlflow.log_text(to_yaml(recipe), "recipe.yaml")
    precision = compute_precision(recipe.train.precision, recipe.model.dtype, measured_for(recipe))
    why = precision_reason(recipe.train.precision, recipe.model.dtype, measured_for(recipe))
    print(f"Base model: {base_ref}; training precision: {precision}" + (f" ({why})" if why else ""),
          file=sys.stderr)
    tags = lineage_tags(method=recipe.method, adapter=recipe.adapter.type, objective=recipe.objective,
                        quantization=recipe.model.quantization, base_model=base_ref,
                        base_revision=recipe.model.revision, recipe_hash=recipe_hash(recipe),
                        source_run=run_id, precision=precision, vllm_compatible=str(vllm[0]).lower(),
                        vllm_reason=vllm[1])
    mlflow.set_tags(tags)
    return tags


def log_and_register(recipe, model, tokenizer, config: dict, tags: dict, name: str = "model",
                     registered_name: str | None = None, retriever=None) -> None:
    """Log the model in the active run and register it (alias, lineage tags, auto-promotion per the recipe); a
    reward model is logged as a scorer of (prompt, answer) pairs. A model trained with retrieval carries its
    `retriever` (chunks and settings) and retrieves when it answers."""
    if recipe.objective in SCORING:
        info = log_reward_model(model, tokenizer, config=config, name=name)
    else:
        info = log_finetuned_model(model, tokenizer, config=config, name=name,
                                   **({"retriever": retriever} if retriever is not None else {}))
    mlflow.set_tags(tags)
    registered_name = registered_name or recipe.registry.name
    card = model_card.build(recipe, mlflow.active_run().info.run_id, config, registered_name)
    model_card.log(card, info.model_id)  # README.md beside MLmodel
    if recipe.registry.enabled:
        version = register(info.model_uri, registered_name, tags, recipe.registry.alias)
        model_card.describe(registered_name, version.version, card)  # shown on the version's page in the UI
        mlflow.set_tags({tag.REGISTERED_MODEL: registered_name, tag.REGISTERED_VERSION: version.version})
        alias = f" (alias @{recipe.registry.alias})" if recipe.registry.alias else ""
        print(f"Registered {registered_name} version {version.version}{alias}")
        auto_promote(registered_name, version.version, recipe)
        publish_prompt(recipe, registered_name, config.get("base_model") or "", version.version)


def auto_promote(name: str, version, recipe) -> None:
    """`registry.auto_promote`: the recipe's gates, and serving parity before the champion alias moves. Parity
    answers with the serving engine, which the training process never loads (docs/design.md: train/ imports no
    serving code), so where it applies the promotion is `mlflow-finetune promote` in a process of its own, as
    a user would run it; its report is printed here and its outcome tagged on the run."""
    import subprocess

    cfg = recipe.registry
    if not cfg.auto_promote or not cfg.promote_if or cfg.parity == "off":
        maybe_auto_promote(name, version, recipe)  # off, refused for want of gates, or no parity to check
        return
    code = "import sys; from mlflow_finetune_plugin.cli import main; sys.exit(main())"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env.update(MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(), MLFLOW_REGISTRY_URI=mlflow.get_registry_uri())
    done = subprocess.run([sys.executable, "-c", code, "promote", name, "--version", str(version), "--alias",
                           cfg.champion_alias], capture_output=True, text=True, env=env)
    print(done.stdout.rstrip() or done.stderr.strip()[-3000:])
    holder = mlflow.MlflowClient().get_registered_model(name).aliases.get(cfg.champion_alias)
    mlflow.set_tag(tag.AUTO_PROMOTED, str(str(holder) == str(version)).lower())


def publish_prompt(recipe, registered_name: str, base_ref: str, model_version=None):
    """The run's optimized prompt (`eval/optimized_prompt.json`, where the search ran) as a new version of
    `<registered_name>-prompt` with alias `candidate`; `champion` through the recipe's gates when
    `registry.auto_promote` is on (registry/prompts.py). Returns the prompt version, or None when there is
    none."""
    from mlflow_finetune_plugin.evaluate.report import OPTIMIZED_FILE
    from mlflow_finetune_plugin.registry import prompts

    run_id = mlflow.active_run().info.run_id
    folder = OPTIMIZED_FILE.rpartition("/")[0]
    if OPTIMIZED_FILE not in {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, folder)}:
        return None
    record = mlflow.artifacts.load_dict(f"runs:/{run_id}/{OPTIMIZED_FILE}")
    version = prompts.register_optimized(registered_name, record, run_id, base_ref, model_version)
    uri = f"{prompts.PREFIX}{prompts.prompt_name(registered_name)}/{version.version}"
    mlflow.set_tag(tag.REGISTERED_PROMPT, uri)
    print(f"Registered the optimized prompt as {uri} (alias @{prompts.CANDIDATE})")
    if recipe.registry.auto_promote and recipe.registry.promote_if:
        print(prompts.promote_prompt(registered_name, version.version, recipe.registry.promote_if,
                                     recipe.registry.champion_alias).report())
    return version


def log_per_task(recipe, model, tokenizer, config: dict, tags: dict, system_prompts: dict) -> None:
    """One adapter per task: each logged as `model-<task>` and registered as `<registry.name>-<task>`, with
    the system prompt of the rows it saw."""
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


# --- a checkpoint registered instead of the final model
# ---------------------------------------------------------

# Files of a checkpoint that only resuming needs; the rest is the model (adapter or weights) and its
# tokenizer.
_TRAINING_STATE = ("optimizer", "scheduler", "rng_state", "scaler", "trainer_state.json", "training_args.bin")


def register_checkpoint(name: str, ref: str, run_id: str | None = None):
    """Register a checkpoint (its model id, or its step in training run `run_id`) as a new version of `name`
    that loads and serves like a run's final model; returns the version.

    The checkpoint is packaged (its adapter or weights and tokenizer from the training run's `checkpoints/`,
    the final model's config) in a run of its own, nested under the training run, holding the recipe, the
    lineage and this checkpoint's evaluation (base / few-shot / tuned on the run's eval data). That run is the
    version's source run, so `mlflow-finetune promote` gates on the checkpoint's own scores, not the final
    model's.
    """
    from transformers import AutoTokenizer

    from mlflow_finetune_plugin.config.schema import RegistryConfig
    from mlflow_finetune_plugin.logged_model import chat_template_hash
    from mlflow_finetune_plugin.registry import versions as registry

    checkpoint = registry.find_checkpoint(ref, run_id)
    step, path, trained_by = (checkpoint.tags[tag.CHECKPOINT_STEP], checkpoint.tags[tag.CHECKPOINT_PATH],
                              checkpoint.source_run_id)
    client = mlflow.MlflowClient()
    run = client.get_run(trained_by)
    recipe = registry.source_recipe(trained_by) or {}
    lineage = {k: v for k, v in run.data.tags.items() if k in tag.LINEAGE.values()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = _checkpoint_files(trained_by, path, Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        config = {**_final_model_config(run, recipe),
                  "artifact": "adapter" if (folder / "adapter_config.json").is_file() else "full"}
        with mlflow.start_run(experiment_id=run.info.experiment_id, parent_run_id=trained_by,
                              run_name=f"{run.info.run_name or trained_by[:8]} "
                                       f"checkpoint-{step}") as packaging:
            lineage.update(lineage_tags(source_run=packaging.info.run_id, checkpoint_step=step,
                                        checkpoint_path=path, checkpoint_run=trained_by,
                                        checkpoint_model=checkpoint.model_id,
                                        chat_template_hash=chat_template_hash(tokenizer)))
            mlflow.set_tags(lineage)
            if recipe:
                mlflow.log_dict(recipe, "recipe.yaml")
            if run.inputs and run.inputs.dataset_inputs:
                # the store's dataset race (splits.despite_race): another run may log the same dataset now
                despite_race(lambda: client.log_inputs(packaging.info.run_id,
                                                       datasets=run.inputs.dataset_inputs))
            info = log_finetuned_model(_SavedFolder(folder), tokenizer, config=config,
                                       name=f"checkpoint-{step}", tags=lineage)
    alias = (recipe.get("registry") or {}).get("alias", RegistryConfig.model_fields["alias"].default)
    version = register(info.model_uri, name, lineage, alias)
    registered = {tag.REGISTERED_MODEL: name, tag.REGISTERED_VERSION: str(version.version)}
    client.set_logged_model_tags(checkpoint.model_id, registered)
    for key, value in registered.items():
        client.set_tag(packaging.info.run_id, key, value)
    print(f"Registered {name} version {version.version}{f' (alias @{alias})' if alias else ''}: checkpoint "
          f"step {step} of run {trained_by}")
    _evaluate_checkpoint(name, str(version.version), packaging.info.run_id)
    _checkpoint_card(name, str(version.version), packaging.info.run_id, info.model_id, recipe, config)
    return version


def _checkpoint_card(name: str, version: str, run_id: str, model_id: str, recipe: dict, config: dict) -> None:
    """The model card of a registered checkpoint, from its own run (its evaluation) and the training
    recipe."""
    from pydantic import ValidationError

    from mlflow_finetune_plugin.config.schema import Recipe

    try:
        resolved = Recipe.model_validate(recipe)
    except ValidationError:
        print(f"No model card for version {version}: the training run's recipe.yaml is missing or unreadable")
        return
    card = model_card.build(resolved, run_id, config, name)
    model_card.log(card, model_id)
    model_card.describe(name, version, card)


def _checkpoint_files(run_id: str, path: str, dest: Path) -> Path:
    """Download the model files of checkpoint folder `path` of run `run_id` (not the optimizer and trainer
    state)."""
    from mlflow_finetune_plugin.errors import FinetuneError

    files = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, path)
             if not a.is_dir and not a.path.rsplit("/", 1)[-1].startswith(_TRAINING_STATE)]
    folder = dest / Path(path).name
    for file in files:  # each lands in the folder under its own name
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=file, dst_path=str(folder))
    if not ((folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()):
        raise FinetuneError(
            f"checkpoint {path} of run {run_id} holds no adapter (adapter_config.json) or model "
            "(config.json) to register")
    return folder


def _final_model_config(run, recipe: dict) -> dict:
    """The config the run's final model was logged with (base, its revision, method, system prompt, ...); for
    a run that never got that far, the same from its lineage tags and recipe."""
    from mlflow.models import Model
    from mlflow.models.model import MODEL_CONFIG

    for output in run.outputs.model_outputs if run.outputs else []:
        model = mlflow.get_logged_model(output.model_id)
        if tag.CHECKPOINT_STEP not in model.tags:
            return dict(Model.load(model.model_uri).flavors["python_function"].get(MODEL_CONFIG) or {})
    t = run.data.tags
    return {"base_model": t.get(tag.BASE_MODEL), "base_revision": t.get(tag.BASE_REVISION),
            "method": t.get(tag.METHOD), "adapter": t.get(tag.ADAPTER), "objective": t.get(tag.OBJECTIVE),
            "system_prompt": (recipe.get("data") or {}).get("system_prompt"),
            "num_beams": (recipe.get("eval") or {}).get("num_beams")}


def _evaluate_checkpoint(name: str, version: str, run_id: str) -> None:
    """The run's own evaluation, on the checkpoint, into the checkpoint's run; a missing eval set is
    explained."""
    from mlflow_finetune_plugin.errors import FinetuneError
    from mlflow_finetune_plugin.evaluate.contenders import evaluate_model_uri
    from mlflow_finetune_plugin.metrics import comparison_table

    try:
        result, _ = evaluate_model_uri(f"models:/{name}/{version}", run_id=run_id)
    except FinetuneError as e:
        print(f"Not evaluated: {e}\n`mlflow-finetune promote` needs its metrics: `mlflow-finetune evaluate "
              f"models:/{name}/{version} --data FILE --run-id {run_id}`")
        return
    print(comparison_table(result.metrics))


class _SavedFolder:
    """A model already saved as a folder (a checkpoint's adapter or weights), as log_finetuned_model saves
    one."""

    def __init__(self, folder: Path):
        self.folder = folder

    def save_pretrained(self, path, **kwargs):
        shutil.copytree(self.folder, path, dirs_exist_ok=True)
