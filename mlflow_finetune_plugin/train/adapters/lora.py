"""LoRA: low-rank updates beside the linear layers; the base stays frozen. Options: DoRA, rsLoRA.

On a 4/8-bit base (`model.quantization`) this is QLoRA: the adapter is still a plain LoRA adapter, logged
without the base and served on the full-precision base.
"""

from __future__ import annotations

from mlflow_finetune_plugin.config.schema import LoraAdapter
from mlflow_finetune_plugin.vllm_rules import lora_servable

ARTIFACT = "adapter"


def peft_config(cfg: LoraAdapter, model=None):
    from peft import LoraConfig, TaskType

    from mlflow_finetune_plugin.models.moe_parts import parts
    from mlflow_finetune_plugin.models.vision import lora_target_modules, takes_images

    target_modules, layers = cfg.target_modules, None
    parameters = target_parameters(cfg, model)
    if cfg.layers is not None and model is None:
        raise ValueError("lora.layers needs the model to count its layers")
    moe = parts(model) if model is not None else []
    if moe:
        target_modules, parameters = _expert_targets(cfg, model, moe, parameters)
    elif cfg.layers is not None:
        target_modules, layers = _top_layers(model, cfg)
    if model is not None and cfg.target_modules == "all-linear" and takes_images(model.config):
        # a vision-language model: the language model's layers (and the tower's with lora.vision)
        target_modules = lora_target_modules(model, cfg.vision)
    elif model is not None and cfg.target_modules == "all-linear":
        target_modules = _without_refused(model, target_modules)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        # PEFT's LoRA on a parameter takes no dropout: auto's experts win over it (train/reach.py says so)
        lora_dropout=0.0 if parameters else cfg.dropout,
        target_modules=target_modules,
        layers_to_transform=layers,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        bias=cfg.bias,
        target_parameters=parameters or None,
    )


def target_parameters(cfg: LoraAdapter, model=None) -> list[str]:
    """`lora.target_parameters`: `auto` gives the model's fused 3-D expert weights (which `all-linear` misses,
    as no nn.Linear wraps them: `models.architecture.fused_expert_parameters`), a list is taken as written.
    PEFT's LoRA on a parameter takes no dropout: auto then runs without `lora.dropout` (the run says so,
    `train/reach.py`), and a list next to a dropout is refused."""
    from mlflow_finetune_plugin.errors import FinetuneError
    from mlflow_finetune_plugin.models.architecture import fused_expert_parameters

    if cfg.target_parameters != "auto":
        if cfg.target_parameters and cfg.dropout:
            raise FinetuneError(
                f"lora.target_parameters {cfg.target_parameters}: PEFT's LoRA on parameters takes no "
                f"dropout, and lora.dropout is {cfg.dropout:g}; set lora.dropout: 0")
        return list(cfg.target_parameters)
    if model is None:
        return []
    return list(fused_expert_parameters(model))


def _expert_targets(cfg: LoraAdapter, model, moe, parameters: list[str]) -> tuple[list[str], list[str]]:
    """A mixture of experts' targets as explicit names (`models/moe_parts.py`): `all-linear` is every linear
    of attention and of the dense and shared-expert MLPs, no router; a list or pattern is matched by PEFT's
    own rule against the model's parts, and a router it names is adapted through its weight (LoRA cannot wrap
    a router's forward: Llama 4's returns a tuple). PEFT keeps these names (`models/peft_targets.py`). With
    `lora.layers` both the modules and the experts' parameters are those of the top layers."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from mlflow_finetune_plugin.models.moe_parts import in_layers
    from mlflow_finetune_plugin.models.peft_targets import keep_module_targets

    keep_module_targets()
    asked = cfg.target_modules
    linears = [part for part in moe if part.linear and part.kind != "router"]
    if asked == "all-linear":
        matched, unmatched = linears, []
    else:
        # a list may hold 'all-linear' beside other names (`[all-linear, router]` adds the routers)
        named = [t for t in asked if t != "all-linear"] if isinstance(asked, list) else asked
        matched = [part for part in moe if named
                   and check_target_module_exists(LoraConfig(target_modules=named), part.name)]
        if isinstance(asked, list) and "all-linear" in asked:
            matched = [*linears, *(part for part in matched if part not in linears)]
        # names of no part (an output head, a module of the model's own kind) go to PEFT as written: it
        # matches them or says what it cannot adapt
        unmatched = [] if isinstance(asked, str) else [
            t for t in named if not any(check_target_module_exists(LoraConfig(target_modules=[t]), p.name)
                                        for p in moe)]
    modules = [part.name for part in matched if part.linear and part.kind != "router"] + unmatched
    routers = [f"{part.name}.weight" for part in matched if part.kind == "router"]
    if cfg.layers is not None:
        total = _layer_count(model, cfg)
        top = set(range(total - cfg.layers, total))
        modules = [name for name in modules if in_layers(name, top)]
        routers = [name for name in routers if in_layers(name, top)]
        parameters = [part.name for part in moe if not part.linear and part.kind == "experts"
                      and in_layers(part.name, top) and any(part.name.endswith("." + p) for p in parameters)]
    if not modules and isinstance(asked, str) and asked != "all-linear":
        return asked, parameters + routers  # a pattern that names no part: PEFT's own error says so
    return modules, parameters + routers


def _layer_count(model, cfg: LoraAdapter) -> int:
    from mlflow_finetune_plugin.errors import FinetuneError

    total = getattr(model.config, "num_hidden_layers", None)
    if not total:
        raise FinetuneError("lora.layers: this model's config has no num_hidden_layers; remove lora.layers")
    if cfg.layers > total:
        raise FinetuneError(
            f"lora.layers: {cfg.layers} is more than the model's {total} layers; give at most "
            f"{total}, or remove it to adapt them all")
    return total


def _top_layers(model, cfg: LoraAdapter) -> tuple[list[str], list[int]]:
    """`lora.layers: N`: the top N decoder layers' indices, and the target modules as names (PEFT takes a
    layer list with named modules only; 'all-linear' becomes every linear layer's name but the output
    head)."""

    total = _layer_count(model, cfg)
    names = cfg.target_modules
    if names == "all-linear":
        names = _linear_names(model)
    return ([names] if isinstance(names, str) else list(names)), list(range(total - cfg.layers, total))


def _linear_names(model) -> list[str]:
    """Every linear layer's name (its last part) but the output head's: what PEFT's 'all-linear' takes."""
    import torch

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})


def _without_refused(model, targets):
    """`all-linear` (or the names it was resolved to) less the layers PEFT refuses to adapt on this model,
    asked of PEFT's own check (on Mamba-style models it refuses `out_proj`, which the CUDA kernels read as a
    weight past any LoRA). Printed when any is left out; unchanged where PEFT takes them all."""
    import sys

    from peft import LoraConfig
    from peft.tuners import tuners_utils

    check = getattr(tuners_utils, "_check_lora_target_modules_mamba", None)
    names = _linear_names(model) if targets == "all-linear" else list(targets)
    if check is None:
        return targets
    refused, probe = set(), LoraConfig(target_modules=["probe"])
    for name in names:
        try:
            check(probe, model, name.rsplit(".", 1)[-1])
        except ValueError:
            refused.add(name.rsplit(".", 1)[-1])
    if not refused:
        return targets
    print(f"Note: LoRA leaves out {', '.join(sorted(refused))}: PEFT refuses them on this architecture "
          f"({model.config.model_type}); lora.target_modules lists what to adapt", file=sys.stderr)
    return [name for name in names if name.rsplit(".", 1)[-1] not in refused]


def apply(model, cfg: LoraAdapter):
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg, model))


def vllm_compatible(cfg: LoraAdapter) -> tuple[bool, str]:
    """Whether vLLM's multi-LoRA serving accepts this adapter, with the reason when it does not."""
    ok, reason = lora_servable(cfg.r, cfg.use_dora, cfg.bias)
    return ok, reason if ok else f"{reason}; merge the adapter or use the transformers engine"


def no_casts_under_autocast(model) -> int:
    """Let each plain LoRA layer skip PEFT's cast of its input to the adapter's dtype while autocast is on;
    returns how many layers got the hook.

    PEFT keeps LoRA weights in fp32 on a bf16 base and casts every LoRA layer's input to fp32 before `lora_A`;
    under autocast `lora_A` then casts it back to bf16 for its matmul. The round trip is exact (bf16 -> fp32
    -> bf16), so without dropout skipping it changes no number (with dropout the masks are the same, and CPU's
    bf16 dropout rounds the scaled input once more: tests/test_kernels.py). It cost two full-size copies per
    LoRA layer per pass and kept a second bf16 copy of every layer's input for the backward pass:
    `aten::copy_` was 21% of a LoRA step's GPU time on an H200 (docs/benchmarks-history.md, 7a). PEFT's own
    4-bit LoRA layers already skip the cast under autocast (`requires_conversion = not
    torch.is_autocast_enabled()`); this does the same for the others. Outside autocast (evaluation,
    generation, a CPU fp32 run) the cast stays. Layers with a variant (DoRA) keep PEFT's behaviour."""
    import torch
    from peft.tuners.lora import LoraLayer

    def before_forward(layer, args):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        layer.cast_input_dtype_enabled = (x is None or bool(layer.lora_variant)
                                          or not torch.is_autocast_enabled(x.device.type))

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)
              and hasattr(m, "cast_input_dtype_enabled")]
    for layer in layers:
        layer.register_forward_pre_hook(before_forward)
    return len(layers)
