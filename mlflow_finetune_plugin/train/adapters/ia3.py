"""IA3: trained vectors that rescale the keys, values and feed-forward activations; the weights stay frozen.

The fewest trainable parameters of the adapter methods (one vector per targeted layer), and mergeable.
"""

from __future__ import annotations

from mlflow_finetune_plugin.config.schema import IA3Adapter

ARTIFACT = "adapter"


def peft_config(cfg: IA3Adapter, model=None):
    from peft import IA3Config, TaskType

    return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=cfg.target_modules,
                     feedforward_modules=cfg.feedforward_modules)


def apply(model, cfg: IA3Adapter):
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg))


def vllm_compatible(cfg: IA3Adapter) -> tuple[bool, str]:
    return False, (
        "vLLM serves LoRA adapters only; merge the IA3 vectors into the base (merge_and_unload) and "
        "serve the merged folder, or use the transformers engine")
