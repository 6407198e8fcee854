"""The activations a training step keeps, traced on the meta device: copies of the model with one and two
decoder layers run forward on meta tensors (no memory, no compute), and every tensor autograd saves for the
backward pass recorded once per storage (parameters aside). The difference between the two copies is one
layer's share; the rest is the embedding, the final norm, and the LM head with its loss. Whatever the
architecture does (its norms' fp32 upcasts, rotary tables, gated MLPs, the adapter's dropout) is counted as
the model's own code does it, not from a table of families.

Attention kernels are the one part a meta trace cannot choose: on meta tensors PyTorch takes the math path,
which keeps the (tokens x tokens) scores. For `sdpa` and the flash-attention kernels the trace runs a stand-in
that keeps what a fused kernel keeps (queries, keys, values, the output and its log-sum-exp); `eager` is
traced as it is.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

_FUSED = "mlflow_finetune_fused"
_TRACED: dict = {}  # one trace per model, adapter, dtype and kernel in a process (the fit asks many times)


@dataclass
class Activations:
    """Bytes autograd keeps for `tokens` tokens: per decoder layer, the decoder's rest (embedding, final
    norm), the LM head with its loss, and one layer's input (what checkpointing keeps per layer)."""

    tokens: int
    per_layer: int
    decoder_rest: int
    head: int
    layer_input: int


def _fused_attention():
    import torch

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = torch.empty_like(q)
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):  # never run: the trace stops after the forward pass
            raise NotImplementedError

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return Fused.apply(query, key, value).transpose(1, 2).contiguous(), None

    return attention


def _register():
    from transformers import AttentionInterface

    if _FUSED not in AttentionInterface._global_mapping:
        AttentionInterface.register(_FUSED, _fused_attention())


def _saved(model, tokens: int, decoder_only: bool) -> int:
    import torch

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage.nbytes()
        return t

    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if decoder_only:
            model.get_decoder()(input_ids=ids)
        else:
            model(input_ids=ids, labels=ids)
    return sum(seen.values())


def _as_under_autocast(model, dtype) -> None:
    """A half-precision step runs under autocast (the Trainer's bf16/fp16), which meta tensors do not take:
    PEFT's fp32 adapter casts its input to fp32 and autocast casts that back for the adapter's matmul, a new
    half-precision copy per adapted layer that the matmul keeps. Traced as that: the adapter in `dtype`, and
    its input cast into a copy of its own."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module._cast_input_dtype = lambda x, _dtype: None if x is None else x.to(dtype, copy=True)


def _as_quantized(model, dtype) -> None:
    """A 4-bit or 8-bit base after PEFT's `prepare_model_for_kbit_training` (train/quantization.py): every
    unquantized weight (embeddings, norms, the LM head) in fp32, so the residual stream is fp32; each
    quantized layer casts its input to the compute dtype and bitsandbytes keeps that copy for the backward
    pass, trainable weight or not. Traced as that, on the meta device."""
    import torch

    class Quantized(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):
            ctx.save_for_backward(x)
            return torch.nn.functional.linear(x, weight)

        @staticmethod
        def backward(ctx, grad):  # never run: the trace stops after the forward pass
            raise NotImplementedError

    head = model.get_output_embeddings()
    quantized = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    for p in model.parameters():
        if not any(p is m.weight for m in quantized):
            p.data = p.data.to(torch.float32)
    for m in quantized:
        m.forward = (lambda layer: lambda x: Quantized.apply(x.to(dtype), layer.weight))(m)


def _with_layers(config, n: int):
    config = copy.deepcopy(config)
    text = getattr(config, "text_config", None) or config
    text.num_hidden_layers = n
    for key in ("layer_types", "mlp_only_layers"):  # per-layer lists follow the layer count
        value = getattr(text, key, None)
        if isinstance(value, list) and len(value) > n:
            setattr(text, key, value[:n])
    return config


def traced(config, recipe, dtype, attention: str, tokens: int = 512) -> Activations:
    """The activations of one row of `tokens` tokens for `config`'s model under `recipe`'s adapter, computed
    in `dtype` with the `attention` kernel (`eager` traced as it is; anything else as a fused kernel)."""
    import torch

    from mlflow_finetune_plugin.memory.shape import empty_model
    from mlflow_finetune_plugin.train.adapters import adapter_of

    key = (config.to_json_string(), recipe.adapter.model_dump_json(), recipe.model.quantization, str(dtype),
           attention, tokens)
    if key in _TRACED:
        return _TRACED[key]
    _register()
    module = adapter_of(recipe)
    totals = {}
    for n in (1, 2):
        cfg = _with_layers(config, n)
        cfg._attn_implementation = "eager" if attention == "eager" else _FUSED
        model = empty_model(cfg).to(dtype)
        if module.ARTIFACT != "full":
            for p in model.parameters():
                p.requires_grad_(False)
            if recipe.model.quantization != "none":
                _as_quantized(model, dtype)
            with torch.device("meta"):
                model = module.apply(model, recipe.adapter)
            if dtype.itemsize < 4 or recipe.model.quantization != "none":
                _as_under_autocast(model, dtype)
        model.train()
        totals[n] = (_saved(model, tokens, decoder_only=False), _saved(model, tokens, decoder_only=True))
    per_layer = totals[2][1] - totals[1][1]
    decoder_rest = totals[1][1] - per_layer
    head = totals[1][0] - totals[1][1]
    hidden = int((getattr(config, "text_config", None) or config).hidden_size)
    stream = 4 if recipe.model.quantization != "none" else dtype.itemsize  # k-bit: an fp32 residual stream
    _TRACED[key] = Activations(tokens, per_layer, decoder_rest, head, tokens * hidden * stream)
    return _TRACED[key]
