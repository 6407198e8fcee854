"""What a model's architecture can do, asked of the model or its config, never looked up by family name.

Three questions that used to be assumptions (every model was a Llama):

- Its cache (`cache_abilities`): the fast paths of evaluation and serving reuse a KV cache: they repeat a
shared
  prefix's cache per row (`batch_repeat_interleave`), cut it back after scoring (`crop`), select rows
  (`batch_select_indices` / `reorder_cache`) or concatenate rows' keys and values. transformers' cache layers
  say which they can do: a linear-attention, convolution or Mamba layer (Qwen3.5's Gated DeltaNet, LFM2,
  Nemotron-H) keeps a recurrent state that cannot be cut back ("does not track past states") and whose conv
  state a prefix repeat would miss; a sliding-window layer (Gemma 3/4, gpt-oss) forgets what falls out of its
  window, so a crop can go back past what it still holds. Where the cache lacks an ability the caller takes
  its plain path.
- Its layers' shapes (`attention_layers`): per-layer attributes read per layer. Gemma 4's full-attention
layers have
  another `head_dim` than its sliding ones, and its config raises on `config.head_dim`.
- Its experts (`moe_of`): a mixture of experts returns router logits (its config has `output_router_logits`,
TRL's
  test too) and may keep its experts as fused 3-D parameters (gpt-oss), which PEFT reaches with
  `target_parameters` only; which of its linear layers are attention, dense or shared-expert MLPs and routers
  is `models/moe_parts.py`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheAbilities:
    """What a model's KV cache supports. `crop`: cut back to fewer tokens; `repeat`: one row's cache repeated
    for several (a shared prefix); `select`: rows kept, dropped or reordered; `concat`: its layers are plain
    key/value tensors `[rows, heads, length, dim]` that can be padded and concatenated (continuous batching).
    `why` names the layers that lack something, for the line a caller prints."""
    crop: bool
    repeat: bool
    select: bool
    concat: bool
    why: str = ""


NOTHING = CacheAbilities(False, False, False, False, "no transformers Cache")


def cache_abilities(model_or_config) -> CacheAbilities:
    """The abilities of the cache `model_or_config` decodes with: the layers of `DynamicCache(config=...)`,
    the cache transformers builds from the config's layer types, each asked what its class supports."""
    try:
        from transformers import DynamicCache
    except ImportError:
        return NOTHING
    config = getattr(model_or_config, "config", model_or_config)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return NOTHING
    try:
        cache = DynamicCache(config=config)
    except Exception as e:  # noqa: BLE001 - a config transformers' cache cannot read: every fast path is off
        return CacheAbilities(False, False, False, False, f"DynamicCache cannot read this config ({e})")
    if not cache.layers:
        return NOTHING
    return _abilities(cache.layers)


def _abilities(layers) -> CacheAbilities:
    from transformers.cache_utils import DynamicLayer

    try:
        from transformers.cache_utils import LinearAttentionCacheLayerMixin as Recurrent
    except ImportError:  # transformers before its linear-attention layers: no such layers then
        Recurrent = ()  # noqa: N806
    recurrent = [type(layer).__name__ for layer in layers if isinstance(layer, Recurrent)]
    sliding = [type(layer).__name__ for layer in layers if getattr(layer, "is_sliding", False)]
    plain = all(type(layer) is DynamicLayer for layer in layers)
    # A recurrent state cannot go back (crop), and the hybrid layers' repeat is DynamicLayer's, which repeats
    # the keys and values and not the conv/recurrent states; rows can still be selected (`reorder_cache`
    # covers them).
    crop = not recurrent and not sliding and all(hasattr(layer, "crop") for layer in layers)
    repeat = not recurrent and all(hasattr(layer, "batch_repeat_interleave") for layer in layers)
    select = all(hasattr(layer, "reorder_cache") for layer in layers)
    why = "; ".join(part for part in (
        f"{len(recurrent)} recurrent-state layer(s) ({', '.join(sorted(set(recurrent)))}) cannot be cut back "
        f"or share a prefix" if recurrent else "",
        f"{len(sliding)} sliding-window layer(s) ({', '.join(sorted(set(sliding)))}) forget what falls out "
        f"of their window" if sliding else "") if part)
    return CacheAbilities(crop=crop, repeat=repeat, select=select, concat=plain, why=why)


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer as the packing estimate costs it: `attention` is False for
    linear-attention/conv/Mamba layers, whose cost does not grow with the row's length."""
    heads: int
    kv_heads: int
    head_dim: int
    attention: bool


# Layer types whose cost per token grows with the tokens before it (transformers' `layer_types` names).
ATTENTION_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "indexed_attention", "hybrid",
                   "hybrid_sliding")


def text_config(config):
    """The decoder's config (a multimodal config's `text_config`, or the config itself)."""
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter is not None else getattr(config, "text_config", None) or config


def attention_layers(config) -> list[LayerShape]:
    """Each decoder layer's attention shape, read from that layer's own config (`config.per_layer_config[i]`,
    where transformers keeps per-layer attributes such as Gemma 4's `head_dim`), falling back to the global
    value."""
    config = text_config(config)
    n = config.num_hidden_layers
    per_layer = getattr(config, "per_layer_config", None)
    layers = list(per_layer) if per_layer is not None and len(per_layer) == n else [config] * n
    types = getattr(config, "layer_types", None) or ["full_attention"] * n
    shapes = []
    for layer, kind in zip(layers, types):
        heads = _read(layer, "num_attention_heads")
        head_dim = _read(layer, "head_dim") or config.hidden_size // heads
        shapes.append(LayerShape(heads, _read(layer, "num_key_value_heads") or heads, head_dim,
                                 kind in ATTENTION_TYPES))
    return shapes


def _read(config, name: str):
    """`config.name`, or None where the config lacks it (a per-layer attribute read on a layer's own view)."""
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - transformers' AmbiguousGlobalPerLayerAttributeError on a global config
        return None


@dataclass(frozen=True)
class Experts:
    """A mixture of experts: `router_logits` (it returns them and takes a load-balancing loss), `aux_coef`
    (the config's own coefficient for that loss), `active`/`total` experts a token uses and holds, and
    `fused`: the names of fused 3-D expert parameters (as PEFT's `target_parameters` takes them, e.g.
    `experts.gate_up_proj`)."""
    router_logits: bool
    aux_coef: float
    active: int
    total: int
    fused: tuple[str, ...]


def moe_of(model) -> Experts | None:
    """The model's experts, or None when it is no mixture of experts (no router logits and no fused
    experts)."""
    config = text_config(model.config)
    router = "output_router_logits" in _config_keys(config)
    fused = fused_expert_parameters(model)
    if not router and not fused:
        return None
    active = next((v for k in ("num_experts_per_tok", "top_k_experts", "moe_topk")
                   if (v := _read(config, k))), 1)
    total = expert_count(config) or 1
    return Experts(router, float(_read(config, "router_aux_loss_coef") or 0.0), int(active), int(total),
                   fused)


def _config_keys(config) -> set[str]:
    return set(config.to_dict()) | set(vars(config))


# Where configs keep their number of experts.
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def expert_count(config) -> int | None:
    """The number of experts the config gives (None for a dense model)."""
    config = text_config(config)
    return next((int(v) for k in _EXPERT_COUNTS if isinstance(v := _read(config, k), int) and v > 1), None)


def fused_expert_parameters(model) -> tuple[str, ...]:
    """Parameters of three dimensions held by a module of the model's own code (not a torch layer such as a
    convolution), one slice per expert: experts stored as one `[experts, in, out]` tensor, which no
    `nn.Linear` wraps. Named by the holding module's name and the parameter's, without the layer index
    (`experts.gate_up_proj`). 3-D parameters that are no experts' (RWKV's time mixing, XLNet's attention
    projections) have no expert count for a first dimension, and are not counted."""
    import torch

    experts = expert_count(model.config) if getattr(model, "config", None) is not None else None
    if experts is None:
        return ()
    names = []
    for module_name, module in model.named_modules():
        if type(module).__module__.startswith("torch.") or isinstance(module, torch.nn.Embedding):
            continue
        # PEFT wraps an adapted parameter's module as `base_layer` (once per parameter): name the module
        # itself
        own = module_name.replace(".base_layer", "").rsplit(".", 1)[-1]
        for name, param in module.named_parameters(recurse=False):
            if param.dim() == 3 and param.shape[0] == experts and not own.isdigit():
                names.append(f"{own}.{name}")
    return tuple(dict.fromkeys(names))


def trainable_share(model) -> tuple[int, int]:
    """(trainable parameters, all parameters) of the model as it trains."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def for_generation(model) -> None:
    """Leave the model ready to decode: router logits off. TRL's trainers switch `output_router_logits` on in
    the config to add the load-balancing loss; transformers' MoE forwards then compute that loss on every
    decoding step from the one new token's router logits against the whole attention mask, which fails ("size
    of tensor a (8) must match the size of tensor b (1128)"), and a model saved so would carry the switch to
    every loader."""
    config = text_config(getattr(model, "config", None)) if getattr(model, "config",
                                                                    None) is not None else None
    if config is not None and getattr(config, "output_router_logits", False):
        config.output_router_logits = False
    if config is not None and config is not model.config and getattr(model.config, "output_router_logits",
                                                                     False):
        model.config.output_router_logits = False
