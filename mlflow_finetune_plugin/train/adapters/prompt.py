"""Prompt tuning and P-tuning: trained virtual-token embeddings prepended to the input; the model stays
frozen.

`kind: prompt_tuning` trains the embeddings directly (initialized at random or from the embeddings of
`init_text`); `kind: p_tuning` produces them with a small MLP prompt encoder.
"""

from __future__ import annotations

from mlflow_finetune_plugin.config.schema import PromptAdapter

ARTIFACT = "adapter"


def peft_config(cfg: PromptAdapter, model=None):
    from peft import PromptEncoderConfig, PromptTuningConfig, PromptTuningInit, TaskType

    if cfg.kind == "p_tuning":
        hidden = cfg.encoder_hidden_size or (model.config.hidden_size if model is not None else None)
        return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens,
                                   encoder_hidden_size=hidden)
    text = cfg.init == "text"
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=cfg.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=cfg.init_text if text else None,
        # The tokenizer is read only now, to embed init_text; loading the trained adapter does not need it.
        tokenizer_name_or_path=getattr(model.config, "_name_or_path",
                                       None) if text and model is not None else None,
    )


def apply(model, cfg: PromptAdapter):
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg, model))


def vllm_compatible(cfg: PromptAdapter) -> tuple[bool, str]:
    name = "P-tuning" if cfg.kind == "p_tuning" else "prompt tuning"
    return False, (
        f"vLLM serves LoRA adapters only, and {name} virtual tokens cannot be merged into the weights; "
        "serve it with the transformers engine")
