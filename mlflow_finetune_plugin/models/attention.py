"""Attention on CPU: grouped-query attention without copying keys and values when nothing needs a gradient, and
padding-free packed rows attended one example at a time while training (`segment_attention`, at the end).

transformers' SDPA attention hands `enable_gqa=True` to `torch.nn.functional.scaled_dot_product_attention` only
where no attention mask is given (CUDA) or on XPU/MPS (`integrations.sdpa_attention.use_gqa_in_sdpa`). Everywhere
else it first copies every key/value head `num_attention_heads / num_key_value_heads` times (`repeat_kv`). On CPU a
batch of prompts always carries a padding mask, so every decoding step copies the whole KV cache of every layer:
SmolLM2-135M (9 query heads, 3 KV heads) answering 30 prompts spent more time in that copy than in attention itself.
PyTorch's CPU kernels take the mask and `enable_gqa` together and give bit-identical outputs (the same sums in the
same order; `tests/test_attention.py` checks greedy answers token for token), so inference on CPU now passes the
flag. Training keeps transformers' path: the backward pass sums the key/value gradients of a group in another order
(float rounding apart), for about 3% of a step (docs/benchmarks.md).

`native_gqa_on_cpu()` is called by the model loaders (`models.base.load_base_model`, `logged_model`); it is
idempotent, and a no-op where transformers no longer has the hook (then its own choice stands).
"""

from __future__ import annotations

import contextlib

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
    """Under torch.jit/fx tracing or export keep transformers' own decision (the flag is a graph-level choice)."""
    import torch

    return torch.jit.is_tracing() or isinstance(key, torch.fx.Proxy) or torch.compiler.is_compiling()


SEGMENTS = "sdpa_segments"  # the attention implementation's name while a trainer's packed rows train (below)
_SPECIAL = ("softcap", "s_aux", "sinks", "position_bias")  # terms plain causal SDPA over a segment does not apply


def segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """transformers' SDPA attention for padding-free packed rows on CPU: one causal SDPA call per packed example.

    A padding-free batch is one row of the batch's examples end to end, with `cu_seq_lens_q` marking where each
    starts (TRL's collator). transformers' SDPA path attends over the whole row under a block-diagonal mask; here
    each example attends over itself only, so the work is the sum of the examples' squares, not the row's, and the
    key/value heads are not copied for grouped-query attention (`enable_gqa`). Anything else (no boundaries, a
    batch of rows, a cache, a sliding window shorter than an example, soft-capping, sinks, a position bias, a
    non-causal layer) takes transformers' SDPA path with its mask, which is exact for all of them."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    plain = (bounds is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
             and kwargs.get("cu_seq_lens_k") is not None and torch.equal(kwargs["cu_seq_lens_k"], bounds)
             and getattr(module, "is_causal", True) and is_causal is not False
             and all(kwargs.get(name) is None for name in _SPECIAL))
    if plain:
        bounds = bounds.tolist()
        if bounds[-1] < query.shape[2]:
            bounds.append(query.shape[2])
        window = getattr(module, "sliding_window", None)
        plain = not window or max(b - a for a, b in zip(bounds, bounds[1:])) <= window
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    dropout = dropout if module.training else 0.0
    parts = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout,
                                            is_causal=True, scale=scaling, enable_gqa=gqa)
             for a, b in zip(bounds, bounds[1:]) if b > a]
    return torch.cat(parts, 2).transpose(1, 2).contiguous(), None


def segments_fit(model) -> bool:
    """Whether a trainer's packed rows train padding-free with `segment_attention`: a model on CPU whose attention
    is transformers' SDPA (measured there: docs/benchmarks-history.md)."""
    config = getattr(model, "config", None)
    device = next((p.device for p in model.parameters()), None)
    return config is not None and getattr(config, "_attn_implementation", None) == "sdpa" \
        and device is not None and device.type == "cpu"


@contextlib.contextmanager
def segments(model, enabled: bool):
    """Within it the model attends with `segment_attention` (registered with transformers once); SDPA again after,
    for evaluation and generation. With `enabled` false nothing changes."""
    if not enabled:
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SEGMENTS, segment_attention)
    AttentionMaskInterface.register(SEGMENTS, sdpa_mask)  # the fallback's mask: SDPA's own
    model.set_attn_implementation(SEGMENTS)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")
