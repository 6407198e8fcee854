"""What a fine-tune reaches in the model, said once per run: the share of the parameters that train (a param and a
metric on every run), whether an adapter reaches a mixture of experts' fused experts, and the weight of the router's
load-balancing loss. The model's abilities come from `models/architecture.py`; this module applies them to a run.
"""

from __future__ import annotations

import dataclasses
import sys

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.models.architecture import moe_of, trainable_share

# What the run logs: the trained parameters, all of them, and the share (metric, 0..1).
TRAINABLE_PARAM, TOTAL_PARAM, SHARE_METRIC = "trainable_parameters", "total_parameters", "trainable_share"


def report(recipe, model, main: bool = True) -> None:
    """Print and log what trains: the share of the parameters, and for a mixture of experts whether the experts do
    (`finetune.lora_experts`)."""
    import mlflow

    trainable, total = trainable_share(model)
    share = trainable / total if total else 0.0
    logging = main and mlflow.active_run() is not None
    if main:
        print(f"Trainable parameters: {trainable:,} of {total:,} ({share:.2%})")
    if logging:
        mlflow.log_params({TRAINABLE_PARAM: trainable, TOTAL_PARAM: total})
        mlflow.log_metric(SHARE_METRIC, share)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    experts = moe_of(base)
    if experts is None or not experts.fused:
        return
    line = _experts_line(recipe, model, experts)
    if main:
        print(line)
    if logging:
        mlflow.set_tag(tags.LORA_EXPERTS, line.split(": ", 1)[1][:5000])


def _experts_line(recipe, model, experts) -> str:
    fused = ", ".join(experts.fused)
    if recipe.adapter.type == "full":
        return f"Mixture of experts: trained with every other weight (full fine-tune; fused experts {fused})"
    config = getattr(model, "active_peft_config", None)
    reached = [p for p in (getattr(config, "target_parameters", None) or []) if p in experts.fused]
    if reached:
        dropped = (f"; lora.dropout {recipe.adapter.dropout:g} is not applied (PEFT's LoRA on parameters takes none; "
                   "lora.target_parameters: [] keeps it and leaves the experts out)") if recipe.adapter.dropout else ""
        return (f"Mixture of experts: LoRA reaches the {experts.total} experts through PEFT's target_parameters "
                f"({', '.join(reached)}){dropped}")
    return (f"Mixture of experts: the {recipe.adapter.type} adapter trains attention (and the router) only: the "
            f"{experts.total} experts are fused 3-D parameters ({fused}) that no linear layer wraps"
            + _lora_hint(recipe))


def _lora_hint(recipe) -> str:
    """How a LoRA run would reach the experts."""
    return "; lora.target_parameters: auto adapts them" if recipe.adapter.type == "lora" else ""


def aux_loss_arguments(recipe, model, config_class, generates: bool = False) -> dict:
    """TRL's `router_aux_loss_coef` for the objective's config class: `train.router_aux_loss`, else the model
    config's own coefficient (TRL's default). Printed and tagged for a mixture of experts; {} for other models (TRL
    refuses the coefficient there) and for trainers that take none (said so). `generates`: the trainer decodes with
    the training model (GRPO), where TRL's switch (`output_router_logits` in the config) breaks transformers' MoE
    forwards (`architecture.for_generation`): the loss is off there, said so."""
    import mlflow

    experts = moe_of(model.get_base_model() if hasattr(model, "get_base_model") else model)
    asked = recipe.train.router_aux_loss
    if experts is None or not experts.router_logits:
        if asked:
            print(f"Note: train.router_aux_loss={asked:g} is ignored: this model is no mixture of experts with a "
                  "router", file=sys.stderr)
        return {}
    if "router_aux_loss_coef" not in {f.name for f in dataclasses.fields(config_class)}:
        value = f"off: the {recipe.objective} trainer ({config_class.__name__}) adds no load-balancing loss"
        coef = None
    elif generates:
        value = (f"off: {recipe.objective} decodes with the training model, and transformers' MoE forward fails "
                 "computing that loss while decoding a padded batch")
        coef = 0.0
    else:
        coef = experts.aux_coef if asked is None else asked
        source = "the model config's router_aux_loss_coef" if asked is None else "train.router_aux_loss"
        value = f"{coef:g} ({source})" if coef else f"off ({source} is 0)"
    hint = "" if generates or coef is None else "; train.router_aux_loss sets its weight, 0 turns it off"
    print(f"Mixture of experts ({experts.total} experts, {experts.active} a token): router load-balancing loss "
          f"{value}{hint}")
    if mlflow.active_run() is not None:
        mlflow.set_tag(tags.ROUTER_AUX_LOSS, value)
    return {} if coef is None else {"router_aux_loss_coef": coef}
