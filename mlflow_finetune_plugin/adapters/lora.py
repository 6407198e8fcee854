"""LoRA: low-rank updates beside the linear layers; the base stays frozen. Options: DoRA, rsLoRA.

On a 4/8-bit base (`model.quantization`) this is QLoRA: the adapter is still a plain LoRA adapter, logged without
the base and served on the full-precision base.
"""

from __future__ import annotations

from mlflow_finetune_plugin.recipe import LoraAdapter

ARTIFACT = "adapter"
PACKING_SAFE, NOT_PACKABLE = True, ""
QUANTIZABLE, NOT_QUANTIZABLE = True, ""
# Ranks vLLM's punica kernels are built for (vllm/config/lora.py); other ranks are refused at load time.
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


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
    if cfg.use_dora:
        return False, "vLLM does not serve DoRA adapters; merge the adapter or use the transformers engine"
    if cfg.r not in VLLM_RANKS:
        return False, f"vLLM serves LoRA ranks {list(VLLM_RANKS)}, this adapter has r={cfg.r}"
    if cfg.bias != "none":
        return False, "vLLM does not serve LoRA adapters with trained biases (bias must be 'none')"
    return True, "LoRA without DoRA or biases, rank supported by vLLM"
