"""LoRA: low-rank updates beside the linear layers; the base stays frozen. Options: DoRA, rsLoRA.

On a 4/8-bit base (`model.quantization`) this is QLoRA: the adapter is still a plain LoRA adapter, logged without
the base and served on the full-precision base.
"""

from __future__ import annotations

from mlflow_finetune_plugin.config.schema import LoraAdapter
from mlflow_finetune_plugin.vllm_rules import lora_servable

ARTIFACT = "adapter"


def peft_config(cfg: LoraAdapter, model=None):
    from peft import LoraConfig, TaskType

    target_modules, layers = cfg.target_modules, None
    parameters = target_parameters(cfg, model)
    if cfg.layers is not None:
        if model is None:
            raise ValueError("lora.layers needs the model to count its layers")
        target_modules, layers = _top_layers(model, cfg)
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
    """`lora.target_parameters`: `auto` gives the model's fused 3-D expert weights (which `all-linear` misses, as no
    nn.Linear wraps them: `models.architecture.fused_expert_parameters`), a list is taken as written. PEFT's LoRA on
    a parameter takes no dropout: auto then runs without `lora.dropout` (the run says so, `train/reach.py`), and a
    list next to a dropout is refused."""
    from mlflow_finetune_plugin.errors import FinetuneError
    from mlflow_finetune_plugin.models.architecture import fused_expert_parameters

    if cfg.target_parameters != "auto":
        if cfg.target_parameters and cfg.dropout:
            raise FinetuneError(f"lora.target_parameters {cfg.target_parameters}: PEFT's LoRA on parameters takes no "
                                f"dropout, and lora.dropout is {cfg.dropout:g}; set lora.dropout: 0")
        return list(cfg.target_parameters)
    if model is None:
        return []
    return list(fused_expert_parameters(model))


def _top_layers(model, cfg: LoraAdapter) -> tuple[list[str], list[int]]:
    """`lora.layers: N`: the top N decoder layers' indices, and the target modules as names (PEFT takes a layer
    list with named modules only; 'all-linear' becomes every linear layer's name but the output head)."""
    import torch

    from mlflow_finetune_plugin.errors import FinetuneError

    total = getattr(model.config, "num_hidden_layers", None)
    if not total:
        raise FinetuneError("lora.layers: this model's config has no num_hidden_layers; remove lora.layers")
    if cfg.layers > total:
        raise FinetuneError(f"lora.layers: {cfg.layers} is more than the model's {total} layers; give at most "
                            f"{total}, or remove it to adapt them all")
    names = cfg.target_modules
    if names == "all-linear":
        head = model.get_output_embeddings()
        names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                        if isinstance(module, torch.nn.Linear) and module is not head})
    return ([names] if isinstance(names, str) else list(names)), list(range(total - cfg.layers, total))


def apply(model, cfg: LoraAdapter):
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg, model))


def vllm_compatible(cfg: LoraAdapter) -> tuple[bool, str]:
    """Whether vLLM's multi-LoRA serving accepts this adapter, with the reason when it does not."""
    ok, reason = lora_servable(cfg.r, cfg.use_dora, cfg.bias)
    return ok, reason if ok else f"{reason}; merge the adapter or use the transformers engine"
