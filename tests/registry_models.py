"""A tiny random model of every text-generation architecture transformers registers (`AutoModelForCausalLM`'s
mapping), built from the architecture's own config class with its defaults shrunk: hidden size 64, 2 layers, 4
experts where it has experts, the project's tiny byte-level tokenizer's vocabulary.

The shrinking is generic: the config class's defaults are read, every size it has is made small, every
per-layer list is cut to two layers keeping both kinds where there are two (a hybrid keeps one
linear-attention and one attention layer, a mixture of experts one dense and one sparse layer), and the model
is built by transformers. A model is kept only when transformers alone can run a training step on it (a
forward with labels on a padded batch, a backward); where its validation refuses the tiny sizes, a few
variants are tried (`VARIANTS`). No family is named here: a new architecture in the next transformers release
goes through the same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal

LAYERS = 2
# Each size a config may have, and its tiny value. Kept consistent with one another: 4 heads of 16 make the
# hidden size 64; experts' own MLPs are half the dense one.
SIZES = {
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "dim": 64, "embedding_size": 64,
    "word_embed_proj_dim": 64,
    "emb_dim": 64, "n_heads": 4,
    "intermediate_size": 128, "ffn_hidden_size": 128, "ffn_dim": 128, "decoder_ffn_dim": 128,
    "encoder_ffn_dim": 128,
    "n_inner": 128, "dim_ff": 128, "dff": 128, "d_ff": 128, "dense_intermediate_size": 128,
    "intermediate_size_mlp": 128,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "head_dim": 16, "attention_head_dim": 16, "kv_channels": 16,
    "attention_head_size": 16, "dim_head": 16, "d_head": 16, "rotary_dim": 8, "attention_hidden_size": 64,
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "num_layers": LAYERS, "decoder_layers": LAYERS,
    "encoder_layers": LAYERS,
    "max_position_embeddings": 512, "n_positions": 512, "n_ctx": 512, "max_seq_len": 512,
    "max_target_positions": 512, "max_source_positions": 512,
    # mixtures of experts
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2, "top_k_experts": 2, "moe_intermediate_size": 32, "expert_ffn_hidden_size": 32,
    "shared_expert_intermediate_size": 64, "shared_intermediate_size": 64,
    "shared_experts_intermediate_size": 64,
    "moe_shared_expert_intermediate_size": 64, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    # multi-head latent attention
    "q_lora_rank": 32, "kv_lora_rank": 16, "o_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "qk_head_dim": 16, "v_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
    # linear attention, state spaces
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_head_dim": 16, "mamba_n_heads": 8, "mamba_num_heads": 8, "mamba_d_head": 16, "mamba_head_dim": 16,
    "mamba_headdim": 16, "mamba_d_state": 16, "ssm_state_size": 16, "state_size": 16, "time_step_rank": 8,
    "mamba_dt_rank": 8, "mamba_chunk_size": 16, "chunk_size": 16, "mamba_d_ssm": 128,
    "sliding_window": 64, "sliding_window_size": 64, "attention_window_size": 64, "swa_head_dim": 16,
    "swa_num_attention_heads": 4, "vocab_size_per_layer_input": None, "hidden_size_per_layer_input": 8,
    "moe_k": 2, "num_experts_per_token": 2, "moe_num_shared_experts": 1, "num_shared_experts": 1,
    "n_shared_experts": 1, "num_expert_group": 1, "moe_layer_start_index": 1,
    "moe_layer_end_index": LAYERS - 1,
    "linear_num_heads": 4, "mamba_n_groups": 1, "num_kv_shared_layers": 0, "max_window_layers": LAYERS,
    "model_max_length": 512, "layer_group_size": LAYERS, "decoder_vocab_size": None, "embedding_dim": 64,
    # a layer kind every n-th layer from an offset: every other layer, from the second
    "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
}
# What a config's validation may still refuse in the tiny sizes, tried in turn (transformers says which in its
# error, in words only): key/value heads equal to the query heads, one expert a token.
VARIANTS = ({}, {"num_key_value_heads": 4}, {"num_experts_per_tok": 1})
# Sizes a config leaves None by default and a checkpoint sets: expert counts (None: a dense model), so the
# tiny model has the experts its real checkpoints have, and a head size some models' code reads without a
# fallback.
FILLED_WHEN_NONE = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok",
                    "top_k_experts", "moe_intermediate_size", "n_shared_experts", "head_dim")
# Per-layer lists are cut to the kept layers; these hold layer indices instead, and keep the kept ones,
# renumbered.
INDEX_LISTS = ("moe_layers", "full_attn_idxs", "hybrid_layer_ids", "attn_layers", "attention_layers",
               "mlp_only_layers", "attn_layer_indices", "no_rope_layers_idx")


@dataclasses.dataclass
class Built:
    model_type: str
    class_name: str
    model: object = None
    config: object = None
    error: str = ""          # why it could not be built (transformers' own error)
    raised_in: str = ""      # the file the error was raised in
    multimodal: bool = False  # an image-text (or audio) model: the vision issue's, not this table's


def tiny_config(model_type: str, vocab_size: int, special: dict, variant: dict | None = None):
    """The config class of `model_type` with its defaults shrunk (see the module docstring)."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    values = config_class().to_dict()
    layers = _layer_count(values)
    keep = _kept_layers(values, layers) if layers else []
    overrides = {}
    for key, value in values.items():
        if key in SIZES and (_is_int(value) or value is None and key in FILLED_WHEN_NONE):
            overrides[key] = SIZES[key] if SIZES[key] is not None else vocab_size
        elif key in INDEX_LISTS and isinstance(value, list) and all(_is_int(i) for i in value):
            overrides[key] = [keep.index(i) for i in value if i in keep]
        # none of that kind by default: the second layer is, as in a
        elif key in INDEX_LISTS and value is None:
            overrides[key] = [LAYERS - 1]             # checkpoint that mixes both
        elif key == "per_layer_config" and isinstance(value, dict):
            overrides[key] = {new: value[old] for new, old in enumerate(keep) if old in value}
        elif layers and _per_layer(value, layers):
            cut = [value[i] for i in keep]
            overrides[key] = "".join(cut) if isinstance(value, str) else cut
    if isinstance(values.get("qk_rope_head_dim"), int):  # multi-head latent attention: RoPE's dim is head_dim
        overrides["head_dim"] = SIZES["qk_rope_head_dim"]
    if _is_int(values.get("expand")) and _is_int(values.get("num_heads")) and _is_int(values.get("head_dim")):
        # state-space heads
        overrides["num_heads"] = SIZES["hidden_size"] * values["expand"] // SIZES["head_dim"]
    if "vocab_size" in values:
        overrides["vocab_size"] = vocab_size
    if "is_decoder" in values:
        overrides["is_decoder"] = True
    overrides.update(special)
    overrides.update({k: v for k, v in (variant or {}).items() if k in values})
    return config_class(**{**values, **overrides})


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_count(values: dict) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers", "decoder_layers"):
        if _is_int(values.get(key)):
            return values[key]
    return 0


def _per_layer(value, layers: int) -> bool:
    """A list with one entry per layer, or a pattern string of a few letters (Nemotron-H's 'M-M*-...')."""
    if isinstance(value, list):
        return len(value) == layers and layers > 1
    return isinstance(value, str) and len(value) == layers and not value.isalpha() and len(set(value)) <= 4


def _kept_layers(values: dict, layers: int) -> list[int]:
    """The LAYERS layer indices the tiny model keeps: the first layer, and the one that differs from it in the
    most per-layer settings (its attention kind, dense or sparse MLP, ...), so a hybrid keeps both kinds."""
    lists = [v for k, v in values.items() if _per_layer(v, layers) and k not in INDEX_LISTS]
    indexed = [set(v) for k, v in values.items() if k in INDEX_LISTS and isinstance(v, list)]
    per_layer = values.get("per_layer_config") if isinstance(values.get("per_layer_config"), dict) else {}

    def differences(j):
        return (sum(v[j] != v[0] for v in lists) + sum((j in s) != (0 in s) for s in indexed)
                + ((j in per_layer) != (0 in per_layer)))
    best = max(range(1, layers), key=lambda j: (differences(j), -j)) if layers > 1 else 0
    return [0, best][:LAYERS] if layers > 1 else [0]


def build(model_type: str, class_name: str, tokenizer, seed: int = 0) -> Built:
    """A tiny random `class_name` model for `model_type` that transformers alone can train a step of (a
    forward with labels and a backward), or the error transformers raised building or stepping it (the first
    variant's)."""
    import torch
    import transformers

    built = Built(model_type, class_name, multimodal=is_multimodal(model_type))
    if built.multimodal:
        return built
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
               "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    ids = torch.randint(10, len(tokenizer) - 10, (2, 24), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 16:] = 0  # a padded row, as a batch of chat rows has
    for variant in VARIANTS:
        stage = "config"
        try:
            with deadline(BUILD_SECONDS):
                config = tiny_config(model_type, len(tokenizer), special, variant)
                stage = "model"
                with torch.device("meta"):  # counted before it takes memory: a default the shrink missed
                    size = sum(p.numel() for p in getattr(transformers, class_name)(config).parameters())
                if size > MAX_PARAMETERS:
                    raise ValueError(
                        f"the tiny config still makes {size:,} parameters (a size the shrink missed)")
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    model = getattr(transformers, class_name)(config).to(torch.float32)
                stage = "training step"
                model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0,
                                                                                 -100)).loss.backward()
                model.zero_grad(set_to_none=True)
        except Exception as e:  # noqa: BLE001 - transformers' own error is the row's reason
            if not built.error:
                built.error, built.raised_in = f"{stage}: {first_line(e)}", _raised_in(e)
            if isinstance(e, TimeoutError):  # a model of billions of parameters: no variant makes it small
                break
            continue
        built.model, built.config, built.error = model, config, ""
        break
    return built


BUILD_SECONDS = 30
MAX_PARAMETERS = 20_000_000


@contextlib.contextmanager
def deadline(seconds: int):
    """TimeoutError when the block takes more than `seconds` (a config whose defaults the shrink missed can
    build a model of billions of parameters)."""
    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def is_multimodal(model_type: str) -> bool:
    """Whether the architecture takes images or audio: transformers maps it to image-text-to-text too, or its
    config holds an encoder for them beside the text model (its sub-configs)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
    )

    if (
        model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        or model_type in MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES
    ):
        return True
    subs = getattr(CONFIG_MAPPING[model_type], "sub_configs", None) or {}
    return any(any(word in key for word in ("vision", "image", "audio", "vq", "speech", "encoder"))
               for key in subs)


def _raised_in(e: BaseException) -> str:
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    return frames[-1].filename if frames else ""


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def architectures() -> list[tuple[str, str]]:
    """(model_type, class name) of every entry in AutoModelForCausalLM's mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted((t, name if isinstance(name, str) else name[0])
                  for t, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())


