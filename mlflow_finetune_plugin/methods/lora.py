"""LoRA: low-rank updates beside the linear layers; the base stays frozen. Options: DoRA, rsLoRA."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mlflow_finetune_plugin.recipe_base import Section

ARTIFACT = "adapter"
# Ranks vLLM's punica kernels are built for (vllm/config/lora.py); other ranks are refused at load time.
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class Config(Section):
    r: int = Field(16, gt=0, description="Rank of the update matrices.")
    alpha: int = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or a list of module names.")
    use_dora: bool = False
    use_rslora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"


def peft_config(cfg: Config):
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


def model_kwargs(cfg: Config) -> dict:
    return {}


def apply(model, cfg: Config):
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg))


def vllm_compatible(cfg: Config) -> tuple[bool, str]:
    """Whether vLLM's multi-LoRA serving accepts this adapter, with the reason when it does not."""
    if cfg.use_dora:
        return False, "vLLM does not serve DoRA adapters; merge the adapter or use the transformers engine"
    if cfg.r not in VLLM_RANKS:
        return False, f"vLLM serves LoRA ranks {list(VLLM_RANKS)}, this adapter has r={cfg.r}"
    if cfg.bias != "none":
        return False, "vLLM does not serve LoRA adapters with trained biases (bias must be 'none')"
    return True, "LoRA without DoRA or biases, rank supported by vLLM"
