"""What a fine-tune reaches in the model, said once per run: the share of the parameters that train (a param
and a metric on every run), what an adapter reaches of a mixture of experts and what it leaves out (attention,
dense and shared-expert MLPs, experts, routers), and the weight of the router's load-balancing loss. The
model's abilities come from `models/architecture.py` and `models/moe_parts.py`; this module applies them to a
run.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.models.architecture import moe_of, trainable_share
from mlflow_finetune_plugin.models.moe_parts import KINDS, adapted, parts

# What the run logs: the trained parameters, all of them, and the share (metric, 0..1).
TRAINABLE_PARAM, TOTAL_PARAM, SHARE_METRIC = "trainable_parameters", "total_parameters", "trainable_share"


def report(recipe, model, main: bool = True) -> str:
    """Print and log what trains: the share of the parameters, and for a mixture of experts what the adapter
    reaches and leaves out, by kind of module. Returns that line ('' for other models): it is tagged
    (`finetune.lora_experts`) by `Reached` once training has taken its first step, so a run that fails before
    training carries no tag saying what it trained (`callbacks.Reached`)."""
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
    if experts is None:
        return ""
    line = experts_line(recipe, model, experts)
    if main:
        print(line)
    return line


def tag(line: str) -> None:
    """`finetune.lora_experts`: `line` without its 'Mixture of experts: ' lead ('' tags nothing)."""
    import mlflow

    if line and mlflow.active_run() is not None:
        mlflow.set_tag(tags.LORA_EXPERTS, line.split(": ", 1)[1][:5000])


def experts_line(recipe, model, experts) -> str:
    """What the adapter reaches of a mixture of experts and what it leaves out, by kind of module
    (`KINDS`)."""
    if recipe.adapter.type == "full":
        return "Mixture of experts: trained with every other weight (full fine-tune: experts, router and all)"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    pieces, reached = parts(base), adapted(base)
    got, missed = Counter(), Counter()
    for piece in pieces:
        (got if piece.name in reached else missed)[piece.kind] += 1
    kinds = [kind for kind in KINDS if got[kind] or missed[kind]]
    fused = [piece.name.rsplit(".", 2)[-2] + "." + piece.name.rsplit(".", 1)[-1] for piece in pieces
             if piece.kind == "experts" and not piece.linear]
    fused = list(dict.fromkeys(fused))
    reaches = ", ".join(f"{_count(kind, got[kind], missed[kind])}" for kind in kinds
                        if got[kind]) or "no layer"
    routers = list(dict.fromkeys(piece.name.rsplit(".", 1)[-1] for piece in pieces
                                 if piece.kind == "router" and piece.name not in reached))
    left = "; ".join(f"{_count(kind, missed[kind], got[kind])}{_how(recipe, kind, fused, routers)}"
                     for kind in kinds if missed[kind])
    what = "LoRA" if recipe.adapter.type == "lora" else f"the {recipe.adapter.type} adapter"
    line = f"Mixture of experts ({experts.total} experts): {what} reaches {reaches}"
    if fused and got["experts"] and not any(p.linear for p in pieces if p.kind == "experts"):
        line += f" (the experts through PEFT's target_parameters: {', '.join(fused)})"
    line += f"; leaves out {left}" if left else "; leaves out nothing"
    config = getattr(model, "active_peft_config", None)
    if recipe.adapter.type == "lora" and recipe.adapter.dropout and getattr(config, "target_parameters",
                                                                            None):
        line += (
            f"; lora.dropout {recipe.adapter.dropout:g} is not applied (PEFT's LoRA on parameters takes "
            "none; lora.target_parameters: [] keeps it and leaves the experts out)")
    return line


def _count(kind: str, n: int, other: int) -> str:
    """'attention (8)': modules of that kind, '(4 of 8)' where the other side holds some of them too."""
    return f"{kind} ({n} of {n + other})" if other else f"{kind} ({n})"


def _how(recipe, kind: str, fused: list[str], routers: list[str]) -> str:
    """How a LoRA run would reach what it left out."""
    if recipe.adapter.type != "lora":
        return ""
    if kind == "router":
        return f": lora.target_modules [all-linear, {', '.join(routers)}] adds it"
    if kind == "experts" and fused:
        return (
            f": fused 3-D parameters ({', '.join(fused)}) that no linear layer wraps; "
            "lora.target_parameters: auto adapts them"
        )
    return ": lora.target_modules: all-linear adapts it"


def aux_loss_arguments(recipe, model, config_class, generates: bool = False) -> dict:
    """TRL's `router_aux_loss_coef` for the objective's config class: `train.router_aux_loss`, else the model
    config's own coefficient (TRL's default). Printed and tagged for a mixture of experts; {} for other models
    (TRL refuses the coefficient there) and for trainers that take none (said so). `generates`: the trainer
    decodes with the training model (GRPO), where TRL's switch (`output_router_logits` in the config) breaks
    transformers' MoE forwards (`architecture.for_generation`): the loss is off there, said so."""
    import mlflow

    experts = moe_of(model.get_base_model() if hasattr(model, "get_base_model") else model)
    asked = recipe.train.router_aux_loss
    if experts is None or not experts.router_logits:
        if asked:
            print(
                f"Note: train.router_aux_loss={asked:g} is ignored: this model is no mixture of experts with "
                "a router", file=sys.stderr)
        return {}
    if "router_aux_loss_coef" not in {f.name for f in dataclasses.fields(config_class)}:
        value = f"off: the {recipe.objective} trainer ({config_class.__name__}) adds no load-balancing loss"
        coef = None
    elif generates:
        value = (
            f"off: {recipe.objective} decodes with the training model, and transformers' MoE forward fails "
            "computing that loss while decoding a padded batch")
        coef = 0.0
    else:
        coef = experts.aux_coef if asked is None else asked
        source = "the model config's router_aux_loss_coef" if asked is None else "train.router_aux_loss"
        value = f"{coef:g} ({source})" if coef else f"off ({source} is 0)"
    hint = "" if generates or coef is None else "; train.router_aux_loss sets its weight, 0 turns it off"
    print(
        f"Mixture of experts ({experts.total} experts, {experts.active} a token): router load-balancing loss "
        f"{value}{hint}")
    if mlflow.active_run() is not None:
        mlflow.set_tag(tags.ROUTER_AUX_LOSS, value)
    return {} if coef is None else {"router_aux_loss_coef": coef}
