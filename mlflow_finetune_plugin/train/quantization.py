"""The quantization axis: the frozen base loaded in 4-bit (NF4/FP4, QLoRA) or 8-bit (LLM.int8) by
bitsandbytes.

`model.quantization: none | 4bit | 8bit`, with `model.quant_type`, `model.double_quant` and
`model.compute_dtype`. Any adapter not in `config/checks.py: NOT_QUANTIZABLE` trains on such a base; the
adapter is logged without the base and served on the full-precision one (its outputs then differ from training
time only by the base's quantization error).
"""

from __future__ import annotations

import os

from mlflow_finetune_plugin.config.schema import ModelConfig
from mlflow_finetune_plugin.errors import FinetuneError


def _compute_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def quantization_config(cfg: ModelConfig):
    """transformers' BitsAndBytesConfig for the recipe's model section, or None for a full-precision base."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=_compute_dtype(cfg.compute_dtype),
    )


def model_kwargs(cfg: ModelConfig) -> dict:
    """Extra `from_pretrained` kwargs that load the base quantized (none for a full-precision base)."""
    config = quantization_config(cfg)
    if config is None:
        return {}
    import torch

    kwargs = {"quantization_config": config}
    if torch.cuda.is_available():
        # Quantized weights cannot be moved after loading: under torchrun each rank loads onto its own GPU
        # (transformers' default, the current device, is GPU 0 for every rank).
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return kwargs


def check_precision(recipe) -> None:
    """Refuse CPU bf16 autocast over a quantized base before anything loads: bitsandbytes' CPU layers compute
    in fp32, and the adapter's matmuls beside them then meet bf16 activations (torch: "expected m1 and m2 to
    have the same dtype"). `train.precision: auto` never picks it; only an explicit `bf16` on a CPU gets
    here."""
    from mlflow_finetune_plugin.models.precision import recipe_autocast_bf16

    if recipe.model.quantization != "none" and recipe_autocast_bf16(recipe):
        raise FinetuneError(
            f"train.precision: bf16 on a CPU means bf16 autocast, which a {recipe.model.quantization} base "
            "(model.quantization) cannot train under: bitsandbytes' CPU layers compute in fp32. Set "
            "train.precision: auto (fp32 on this CPU) or fp32, or train on a GPU.")


def prepare(model, cfg: ModelConfig):
    """Get a quantized base ready for adapter training (PEFT's `prepare_model_for_kbit_training`: norms in
    fp32, input gradients on); a full-precision base is returned as it is."""
    if cfg.quantization == "none":
        return model
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        raise FinetuneError(
            f"model.quantization is {cfg.quantization}, but the base model is not quantized; load "
            "it with `from_pretrained(..., **quantization.model_kwargs(recipe.model))`")
    from peft import prepare_model_for_kbit_training

    # Gradient checkpointing stays the trainer's decision (train.gradient_checkpointing), not a side effect
    # here.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
