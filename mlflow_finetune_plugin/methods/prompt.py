"""Prompt tuning and P-tuning: trained virtual-token embeddings prepended to the input; the model stays frozen.

`kind: prompt_tuning` trains the embeddings directly (initialized at random or from the embeddings of `init_text`);
`kind: p_tuning` produces them with a small MLP prompt encoder.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mlflow_finetune_plugin.recipe_base import Section

ARTIFACT = "adapter"
PACKING_SAFE = False  # virtual tokens are prepended once per row, not once per packed sequence


class Config(Section):
    kind: Literal["prompt_tuning", "p_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(20, gt=0, description="Number of virtual tokens prepended to every input.")
    init: Literal["random", "text"] = Field("random", description="prompt_tuning: start from random or from init_text.")
    init_text: str | None = Field(None, description="With init: text, the text whose token embeddings start the prompt.")
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="p_tuning: hidden width of the prompt encoder MLP; empty: the model's hidden size.")

    @model_validator(mode="after")
    def _check_init(self):
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs `init_text` (the words to start the prompt from). "
                             "Set prompt.init_text, or use init: random")
        if self.init == "text" and self.kind == "p_tuning":
            raise ValueError("init: text applies to kind: prompt_tuning only; P-tuning's encoder starts at random. "
                             "Use kind: prompt_tuning, or init: random")
        return self


def peft_config(cfg: Config, model=None):
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
        tokenizer_name_or_path=getattr(model.config, "_name_or_path", None) if text and model is not None else None,
    )


def model_kwargs(cfg: Config) -> dict:
    return {}


def apply(model, cfg: Config):
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg, model))


def vllm_compatible(cfg: Config) -> tuple[bool, str]:
    name = "P-tuning" if cfg.kind == "p_tuning" else "prompt tuning"
    return False, (f"vLLM serves LoRA adapters only, and {name} virtual tokens cannot be merged into the weights; "
                   "serve it with the transformers engine")
