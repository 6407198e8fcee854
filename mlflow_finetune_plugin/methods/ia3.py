"""IA3: trained vectors that rescale the keys, values and feed-forward activations; the weights stay frozen.

The fewest trainable parameters of the adapter methods (one vector per targeted layer), and mergeable.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from mlflow_finetune_plugin.recipe_base import Section

ARTIFACT = "adapter"


class Config(Section):
    target_modules: str | list[str] | None = Field(
        None, description="Layers to rescale; empty: PEFT's default for the architecture (Llama: k_proj, v_proj, "
                          "down_proj).")
    feedforward_modules: str | list[str] | None = Field(
        None, description="Which of those are feed-forward (their input is rescaled, not their output); empty: "
                          "PEFT's default (Llama: down_proj).")

    @model_validator(mode="after")
    def _check_subset(self):
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules {extra} are not in target_modules; add them to "
                                 "ia3.target_modules or remove them from ia3.feedforward_modules")
        return self


def peft_config(cfg: Config):
    from peft import IA3Config, TaskType

    return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=cfg.target_modules,
                     feedforward_modules=cfg.feedforward_modules)


def model_kwargs(cfg: Config) -> dict:
    return {}


def apply(model, cfg: Config):
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg))


def vllm_compatible(cfg: Config) -> tuple[bool, str]:
    return False, ("vLLM serves LoRA adapters only; merge the IA3 vectors into the base (merge_and_unload) and "
                   "serve the merged folder, or use the transformers engine")
