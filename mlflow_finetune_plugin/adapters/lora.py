"""LoRA: low-rank updates beside the linear layers; the base stays frozen. Options: DoRA, rsLoRA.

On a 4/8-bit base (`model.quantization`) this is QLoRA: the adapter is still a plain LoRA adapter, logged without
the base and served on the full-precision base.
"""

from __future__ import annotations

from mlflow_finetune_plugin.recipe import LoraAdapter
from mlflow_finetune_plugin.vllm_rules import lora_servable

ARTIFACT = "adapter"
PACKING_SAFE, NOT_PACKABLE = True, ""
QUANTIZABLE, NOT_QUANTIZABLE = True, ""



def peft_config(cfg: LoraAdapter, model=None):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        bias=cfg.bias,
    )


def apply(model, cfg: LoraAdapter):
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg))


def vllm_compatible(cfg: LoraAdapter) -> tuple[bool, str]:
    """Whether vLLM's multi-LoRA serving accepts this adapter, with the reason when it does not."""
    ok, reason = lora_servable(cfg.r, cfg.use_dora, cfg.bias)
    return ok, reason if ok else f"{reason}; merge the adapter or use the transformers engine"
