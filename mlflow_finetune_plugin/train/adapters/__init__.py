"""The adapter axis: what trains. One module per `adapter.type`, each with the same attributes (no optional
hooks):

  ARTIFACT            "adapter" (logged without the base, which is referenced) or "full" (complete weights)
  peft_config(cfg, model=None)  the PEFT config (None for `full`)
  apply(model, cfg)   the base wrapped for training (a PeftModel, or the model itself)
  vllm_compatible(cfg) -> (bool, reason)  whether vLLM's multi-LoRA serving takes it as it is

The recipe's `adapter:` section (`config.schema.LoraAdapter`, ...) is the typed config each module receives.
What an adapter cannot train with (packed rows, a 4/8-bit base) is a table of `config/checks.py`, which
refuses those combinations when the recipe loads.
"""

from __future__ import annotations

from mlflow_finetune_plugin.train.adapters import bottleneck, full, ia3, lora, prefix, prompt

ADAPTERS = {"lora": lora, "ia3": ia3, "prefix": prefix, "prompt": prompt, "bottleneck": bottleneck,
            "full": full}


def adapter_of(recipe):
    """The module of the recipe's adapter."""
    return ADAPTERS[recipe.adapter.type]


def attach(model, recipe, trainable_tokens: list[int] | None = None):
    """The base wrapped for training: the recipe's adapter, fresh, or the `model.init_adapter` to continue
    (its own saved configuration replaces `adapter:`). A mixture with `data.adapters: per_task` gets one
    adapter per task, named after it, in one PeftModel. `trainable_tokens`: embedding rows trained beside a
    fresh LoRA adapter (PEFT's `trainable_token_indices`; a chosen chat template's control tokens,
    `train/templates.py`)."""
    import sys

    from mlflow_finetune_plugin.config.checks import SCORING

    module = adapter_of(recipe)
    if recipe.objective in SCORING:
        return scoring_adapter(model, recipe)
    if trainable_tokens and recipe.adapter.type == "lora" and not recipe.model.init_adapter \
            and not (recipe.data.tasks and recipe.data.adapters == "per_task"):
        from peft import get_peft_model

        config = module.peft_config(recipe.adapter, model)
        config.trainable_token_indices = token_rows(model, trainable_tokens)
        return get_peft_model(model, config)
    if recipe.data.tasks and recipe.data.adapters == "per_task":
        from peft import get_peft_model

        first, *rest = recipe.data.tasks
        model = get_peft_model(model, module.peft_config(recipe.adapter, model), adapter_name=first)
        for name in rest:
            model.add_adapter(name, module.peft_config(recipe.adapter, model))
        return model
    if not recipe.model.init_adapter:
        return module.apply(model, recipe.adapter)
    from mlflow_finetune_plugin.models.peft_targets import load_adapter

    folder = resolve_adapter(recipe.model.init_adapter)
    print(f"Continuing the adapter {recipe.model.init_adapter}", file=sys.stderr)
    return load_adapter(model, folder, is_trainable=True)


def scoring_adapter(model, recipe):
    """A fresh adapter on a sequence-scoring model (`load_base_model(scoring=True)`): PEFT's
    sequence-classification task, which trains and saves the randomly initialised score head beside the
    adapter (`modules_to_save`); a full fine-tune trains it with everything else."""
    from peft import get_peft_model

    module = adapter_of(recipe)
    if module.ARTIFACT == "full":
        return module.apply(model, recipe.adapter)
    config = module.peft_config(recipe.adapter, model)
    config.task_type = "SEQ_CLS"
    config.modules_to_save = [*(config.modules_to_save or []), "score"]
    return get_peft_model(model, config)


def token_rows(model, ids) -> list[int] | dict[str, list[int]]:
    """PEFT's `trainable_token_indices` for these token ids: the input embedding's rows, and the LM head's too
    where it is not tied to the embedding (Mistral, Phi-3, larger Llamas and Qwens): a token the model must
    learn to write (its end of turn) needs its output row trained, and an added token's output row starts
    random."""
    ids = list(ids)
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None or outputs.weight is inputs.weight:
        return ids  # tied: PEFT trains the shared rows once
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    return {names[id(inputs)]: ids, names[id(outputs)]: ids}


def resolve_adapter(ref: str):
    """A local PEFT adapter folder for `ref`: an MLflow model URI of a logged adapter, or a folder."""
    import json
    from pathlib import Path

    from mlflow_finetune_plugin.errors import FinetuneError

    local = Path(ref).expanduser()
    if not local.exists():
        import mlflow

        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
        except Exception as e:  # noqa: BLE001 - MLflow raises several types for a bad URI
            raise FinetuneError(f"model.init_adapter: cannot resolve {ref!r} ({e}). Give a registered model "
                                "(models:/NAME@ALIAS or models:/NAME/VERSION) or an adapter folder") from None
    folder = local / "artifacts" / "adapter" if (local / "artifacts" / "adapter").is_dir() else local
    config = folder / "adapter_config.json"
    if not config.exists():
        raise FinetuneError(
            f"model.init_adapter: {ref!r} is not a LoRA adapter (no adapter_config.json in {folder}); "
            "a full fine-tune is continued by naming it as model.name instead")
    if json.loads(config.read_text()).get("peft_type") != "LORA":
        raise FinetuneError(
            f"model.init_adapter: {ref!r} is not a LoRA adapter; only LoRA adapters are continued")
    return folder
