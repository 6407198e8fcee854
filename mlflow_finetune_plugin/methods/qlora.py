"""QLoRA: LoRA trained on a base loaded in 4-bit NF4 (double quantization) or 8-bit through bitsandbytes.

The adapter is an ordinary LoRA adapter: it is logged without the base and served on the full-precision base
(its outputs then differ from training time only by the base's quantization error).
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.methods import lora

ARTIFACT = "adapter"


class Config(lora.Config):
    bits: Literal[4, 8] = Field(4, description="Quantize the frozen base to 4 bits (QLoRA) or 8 bits (LLM.int8).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 suits normally distributed weights.")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too (~0.4 bit/param saved).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype of the 4-bit matmuls; auto: bfloat16 on CUDA, float32 on CPU.")


def _compute_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def quantization_config(cfg: Config):
    from transformers import BitsAndBytesConfig

    if cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=_compute_dtype(cfg.compute_dtype),
    )


def model_kwargs(cfg: Config) -> dict:
    import torch

    kwargs = {"quantization_config": quantization_config(cfg)}
    if torch.cuda.is_available():
        # Quantized weights cannot be moved after loading: under torchrun each rank loads onto its own GPU
        # (transformers' default, the current device, is GPU 0 for every rank).
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return kwargs


def apply(model, cfg: Config):
    from peft import get_peft_model, prepare_model_for_kbit_training

    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        raise FinetuneError("qlora: the base model is not quantized; load it with `from_pretrained(..., "
                         "**qlora.model_kwargs(cfg))`, or use the `lora` method for a full-precision base")
    # Gradient checkpointing stays the trainer's decision (train.gradient_checkpointing), not a side effect here.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lora.peft_config(cfg))


def vllm_compatible(cfg: Config) -> tuple[bool, str]:
    """A QLoRA adapter is a plain LoRA adapter once trained: vLLM serves it on the full-precision base."""
    ok, reason = lora.vllm_compatible(cfg)
    if ok:
        reason += "; served on the full-precision base (the 4/8-bit base was only for training)"
    return ok, reason
