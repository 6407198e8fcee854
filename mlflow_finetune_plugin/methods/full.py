"""Full fine-tuning: every weight trains; the result is a complete model folder, not an adapter.

Needs memory for the weights, their gradients and the optimizer state (about 4x the weights with AdamW, before
activations); `train.gradient_checkpointing: true` trades compute for activation memory.
"""

from __future__ import annotations

from mlflow_finetune_plugin.recipe_base import Section

ARTIFACT = "full"


class Config(Section):
    """No knobs of its own: the learning rate and gradient checkpointing live in `train:`."""


def model_kwargs(cfg: Config) -> dict:
    return {}


def apply(model, cfg: Config):
    model.requires_grad_(True)
    return model


def vllm_compatible(cfg: Config) -> tuple[bool, str]:
    return True, "a full fine-tune is a plain model folder; vLLM serves it like any model of its architecture"
