"""Grouped-query attention without copying keys and values, on CPU, when nothing needs a gradient.

transformers' SDPA attention hands `enable_gqa=True` to `torch.nn.functional.scaled_dot_product_attention`
only where no attention mask is given (CUDA) or on XPU/MPS (`integrations.sdpa_attention.use_gqa_in_sdpa`).
Everywhere else it first copies every key/value head `num_attention_heads / num_key_value_heads` times
(`repeat_kv`). On CPU a batch of prompts always carries a padding mask, so every decoding step copies the
whole KV cache of every layer: SmolLM2-135M (9 query heads, 3 KV heads) answering 30 prompts spent more time
in that copy than in attention itself. PyTorch's CPU kernels take the mask and `enable_gqa` together and give
bit-identical outputs (the same sums in the same order; `tests/test_attention.py` checks greedy answers token
for token), so inference on CPU now passes the flag. Training keeps transformers' path: the backward pass sums
the key/value gradients of a group in another order (float rounding apart), for about 3% of a step
(docs/benchmarks.md).

`native_gqa_on_cpu()` is called by the model loaders (`models.base.load_base_model`, `logged_model`); it is
idempotent, and a no-op where transformers no longer has the hook (then its own choice stands).
"""

from __future__ import annotations

_PATCHED = "_finetune_cpu_gqa"


def native_gqa_on_cpu() -> bool:
    """Let SDPA broadcast KV heads itself (`enable_gqa`) on CPU under `torch.no_grad()`/`inference_mode()`.
    Returns whether the hook is in place."""
    import torch

    try:
        from transformers.integrations import sdpa_attention
    except ImportError:
        return False
    stock = getattr(sdpa_attention, "use_gqa_in_sdpa", None)
    if stock is None:
        return False
    if getattr(stock, _PATCHED, False):
        return True

    def use_gqa_in_sdpa(attention_mask, key, *args, **kwargs):
        if key.device.type == "cpu" and not torch.is_grad_enabled() and not _tracing(key):
            return True
        return stock(attention_mask, key, *args, **kwargs)

    setattr(use_gqa_in_sdpa, _PATCHED, True)
    use_gqa_in_sdpa.__wrapped__ = stock
    sdpa_attention.use_gqa_in_sdpa = use_gqa_in_sdpa
    return True


def _tracing(key) -> bool:
    """Under torch.jit/fx tracing or export keep transformers' own decision (the flag is a graph-level
    choice)."""
    import torch

    return torch.jit.is_tracing() or isinstance(key, torch.fx.Proxy) or torch.compiler.is_compiling()
