"""Full fine-tuning: every weight trains; the result is a complete model folder, not an adapter.

Needs memory for the weights, their gradients and the optimizer state (about 4x the weights with AdamW, before
activations); `train.gradient_checkpointing: true` trades compute for activation memory.
"""

from __future__ import annotations

from mlflow_finetune_plugin.config.schema import FullAdapter

ARTIFACT = "full"


def peft_config(cfg: FullAdapter, model=None):
    return None  # no PEFT: every weight trains


def apply(model, cfg: FullAdapter):
    model.requires_grad_(True)
    return model


def vllm_compatible(cfg: FullAdapter) -> tuple[bool, str]:
    return True, "a full fine-tune is a plain model folder; vLLM serves it like any model of its architecture"
