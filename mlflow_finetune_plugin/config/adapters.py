"""The adapter axis of a recipe: one section, `adapter:`, whose `type` picks lora, ia3, prefix, prompt,
bottleneck or full (a discriminated union). The schema (`schema.py`) holds it as `Recipe.adapter`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from mlflow_finetune_plugin.config.section import Section


# The adapter axis: one section, `adapter:`, whose `type` picks one of these (a discriminated union).
class LoraAdapter(Section):
    """LoRA: low-rank updates beside the linear layers (DoRA and rsLoRA as options)."""

    type: Literal["lora"] = "lora"
    r: int = Field(16, gt=0, description="rank of the update matrices")
    alpha: int = Field(32, gt=0, description="the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: str | list[str] = Field(
        "all-linear", description="every linear layer but the output head, or module names such as "
                                  "`[q_proj, v_proj]`; on a mixture of experts `all-linear` leaves the "
                                  "routers out, and a list may add them: `[all-linear, gate]`; `all-linear` "
                                  "also leaves out what PEFT's own check refuses on the architecture "
                                  "(Mamba-style `out_proj`), with a note")
    use_dora: bool = Field(
        False, description="DoRA: a trained magnitude per output feature on top of LoRA's update (not "
                           "served by vLLM)")
    use_rslora: bool = Field(
        False, description="rsLoRA: scale by alpha/sqrt(r), which keeps high ranks learning")
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="also train biases (not served by vLLM)")
    vision: bool = Field(
        False, description="a vision-language model: `all-linear` also adapts the vision tower and "
                           "projector (off: the language model only; vLLM serves LoRA on the language model "
                           "only)")
    target_parameters: Literal["auto"] | list[str] = Field(
        "auto", description="parameters LoRA adapts that no linear layer wraps (PEFT's "
                            "`target_parameters`), such as a mixture of experts' fused 3-D expert weights; "
                            "`auto`: those the model has (gpt-oss: `experts.gate_up_proj`, "
                            "`experts.down_proj`); `[]`: none (attention and router only)")
    layers: int | None = Field(
        None, gt=0, json_schema_extra={"default_text": "empty (all)"},
        description="adapt only the top N decoder layers: backpropagation stops at the lowest one, cheaper "
                    "steps at a cost in quality")


class IA3Adapter(Section):
    """IA3: trained vectors rescaling keys, values and feed-forward activations."""

    type: Literal["ia3"] = "ia3"
    target_modules: str | list[str] | None = Field(
        None, description="layers to rescale; empty: PEFT's default for the architecture (Llama: `k_proj`, "
                          "`v_proj`, `down_proj`)")
    feedforward_modules: str | list[str] | None = Field(
        None, description="which of those are feed-forward (input rescaled, not output); a subset of "
                          "`target_modules`; empty: PEFT's default")

    @model_validator(mode="after")
    def _check_subset(self):
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules {extra} are not in target_modules; add them to "
                                 "ia3.target_modules or remove them from ia3.feedforward_modules")
        return self


class PrefixAdapter(Section):
    """Prefix tuning: trained key/value vectors prepended in every attention layer."""

    type: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, gt=0, description="prefix length, in key/value positions per layer")
    prefix_projection: bool = Field(
        False, description="learn the prefix through a two-layer MLP (steadier, more parameters while "
                           "training)")
    encoder_hidden_size: int | None = Field(
        None, gt=0, json_schema_extra={"default_text": "empty (the model's hidden size)"},
        description="width of that MLP")


class PromptAdapter(Section):
    """Prompt tuning or P-tuning: trained virtual-token embeddings prepended to the input."""

    type: Literal["prompt"] = "prompt"
    kind: Literal["prompt_tuning", "p_tuning"] = Field(
        "prompt_tuning", description="embeddings trained directly, or made by an MLP prompt encoder")
    num_virtual_tokens: int = Field(20, gt=0, description="virtual tokens prepended to every input")
    init: Literal["random", "text"] = Field(
        "random", description="prompt tuning: start from random or from the embeddings of `init_text`")
    init_text: str | None = Field(None, description="with `init: text`, the words to start from")
    encoder_hidden_size: int | None = Field(
        None, gt=0, json_schema_extra={"default_text": "empty (the model's hidden size)"},
        description="P-tuning: the encoder MLP's width")

    @model_validator(mode="after")
    def _check_init(self):
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs `init_text` (the words to start the prompt from). "
                             "Set prompt.init_text, or use init: random")
        if self.init == "text" and self.kind == "p_tuning":
            raise ValueError("init: text applies to kind: prompt_tuning only; P-tuning's encoder starts at "
                             "random. Use kind: prompt_tuning, or init: random")
        return self


class BottleneckAdapter(Section):
    """Bottleneck adapter layers (down-projection, nonlinearity, up-projection) through PEFT's PEANuT tuner.
    """

    type: Literal["bottleneck"] = "bottleneck"
    bottleneck_size: int = Field(16, gt=0, description="width of the bottleneck (PEANuT's `r`)")
    depth: int = Field(0, ge=0, description="extra nonlinear encoder/decoder pairs inside the bottleneck")
    act_fn: Literal["relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "tanh", "sigmoid", "leaky_relu",
                    "mish"] = Field(
        "relu", description="the bottleneck's nonlinearity")
    scaling: float = Field(1.0, gt=0, description="multiplier of the adapter's output")
    target_modules: str | list[str] = Field(
        ["o_proj", "down_proj"], description="linear layers to put adapters beside")


class FullAdapter(Section):
    """Full fine-tuning: every weight trains (the learning rate and checkpointing live in `train:`)."""

    type: Literal["full"] = "full"


ADAPTER_CONFIGS = {c.model_fields["type"].default: c for c in (
    LoraAdapter, IA3Adapter, PrefixAdapter, PromptAdapter, BottleneckAdapter, FullAdapter)}
AdapterConfig = Annotated[
    LoraAdapter | IA3Adapter | PrefixAdapter | PromptAdapter | BottleneckAdapter | FullAdapter,
    Field(discriminator="type")]
