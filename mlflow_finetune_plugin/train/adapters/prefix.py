"""Prefix tuning: trained key/value vectors prepended to every attention layer; the model's weights stay
frozen.

Not compatible with gradient checkpointing (see `apply`).
"""

from __future__ import annotations

from mlflow_finetune_plugin.config.schema import PrefixAdapter
from mlflow_finetune_plugin.errors import FinetuneError

ARTIFACT = "adapter"


def peft_config(cfg: PrefixAdapter, model=None):
    from peft import PrefixTuningConfig, TaskType

    hidden = cfg.encoder_hidden_size or (model.config.hidden_size if model is not None else None)
    return PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=cfg.num_virtual_tokens,
        prefix_projection=cfg.prefix_projection,
        encoder_hidden_size=hidden,
    )


def apply(model, cfg: PrefixAdapter):
    from peft import get_peft_model

    model = get_peft_model(model, peft_config(cfg, model))
    # The prefix rides in `past_key_values`, which transformers drops inside checkpointed layers: training
    # would die on a shape mismatch deep in attention. Refuse it where the trainer turns checkpointing on.
    model.activation_checkpointing_enable = _refuse_checkpointing
    model.gradient_checkpointing_enable = _refuse_checkpointing
    return model


def _refuse_checkpointing(*args, **kwargs):
    raise FinetuneError(
        "prefix tuning cannot train with gradient checkpointing (transformers drops the prefix "
        "keys/values inside checkpointed layers). Set train.gradient_checkpointing: false, or use "
        "the `prompt` or `lora` method to save memory")


def vllm_compatible(cfg: PrefixAdapter) -> tuple[bool, str]:
    return False, ("vLLM serves LoRA adapters only, and a prefix cannot be merged into the weights; "
                   "serve it with the transformers engine")
