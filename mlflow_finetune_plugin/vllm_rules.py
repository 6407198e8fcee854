"""Which adapters vLLM can serve: the one place training (the `finetune.vllm_compatible` tag) and serving
(`mlflow-finetune serve --engine vllm`, the vllm playground engine) ask.

vLLM serves LoRA only: no DoRA, no trained biases, no whole modules trained beside the adapter, and only the ranks
its LoRA kernels are built for (vllm/config/lora.py); it refuses anything else when the adapter loads. Other
adapters are merged into the base first or served by the transformers engine. Bottom layer: imports nothing from
the package.
"""

from __future__ import annotations

# Ranks vLLM's LoRA kernels are built for; other ranks are refused at load time.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
SERVABLE = "LoRA without DoRA or biases, rank supported by vLLM"


def lora_servable(r: int, use_dora: bool = False, bias: str = "none", modules_to_save=None) -> tuple[bool, str]:
    """(whether vLLM serves a LoRA adapter of rank `r` with these options, the reason in words). The reason states
    the fact only: callers add what to do instead (the transformers engine, or merging the adapter)."""
    if use_dora:
        return False, "vLLM does not serve DoRA adapters"
    if r not in VLLM_LORA_RANKS:
        return False, f"vLLM serves LoRA ranks {list(VLLM_LORA_RANKS)}, this adapter has r={r}"
    if (bias or "none") != "none":
        return False, "vLLM does not serve LoRA adapters with trained biases (bias must be 'none')"
    if modules_to_save:
        return False, f"vLLM does not serve adapters that also train whole modules ({modules_to_save})"
    return True, SERVABLE


def adapter_servable(adapter_config: dict) -> tuple[bool, str]:
    """`lora_servable` for a saved PEFT adapter, from its adapter_config.json contents (any PEFT type)."""
    peft_type = adapter_config.get("peft_type", "?")
    if peft_type != "LORA":
        return False, f"vLLM serves LoRA adapters only; this is a {peft_type} adapter"
    return lora_servable(adapter_config.get("r"), bool(adapter_config.get("use_dora")),
                         adapter_config.get("bias", "none"), adapter_config.get("modules_to_save"))


def max_lora_rank(ranks) -> int:
    """The `--max-lora-rank` that serves adapters of `ranks`: the smallest supported rank at least as large as all."""
    largest = max(ranks, default=VLLM_LORA_RANKS[0])
    return min((r for r in VLLM_LORA_RANKS if r >= largest), default=VLLM_LORA_RANKS[-1])
