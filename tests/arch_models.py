"""Tiny random models of the architectures whose abilities differ from Llama's, built in tests straight from
transformers' config classes with the project's tiny ChatML tokenizer (models/tiny.py): a hybrid cache
(Qwen3.5's Gated DeltaNet layers beside full attention), a mixture of experts with fused 3-D expert weights
(gpt-oss) and per-layer attention shapes (Gemma 4), and mixtures of experts whose layers mix experts with
dense, shared-expert MLPs and routers of several shapes (Llama 4, Qwen2-MoE, DeepSeek V3, Qwen3-MoE, Mixtral;
transformers saves their fused experts one tensor per expert and fuses them again on load, so the saved names
are not the model's). Small on purpose: hidden 64, 2 layers.

The built-in `tiny-qwen3.5`, `tiny-gpt-oss` and `tiny-gemma4` families (models/tiny_families.py) are the
polished versions with each family's own tokenizer and template; these exercise what the model can do, not its
template.
"""

from __future__ import annotations

from pathlib import Path

_SIZE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 1024, "initializer_range": 0.1}

CONFIGS = {
    # one Gated DeltaNet (linear-attention) layer, then one full-attention layer
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM",
                {"head_dim": 16, "layer_types": ["linear_attention", "full_attention"],
                 "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
                 "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "tie_word_embeddings": True}),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 64,
                 "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": False}),
    # Mixtures of experts whose parts differ (tests/test_moe_reach.py): a dense first layer, shared experts, a
    # router that subclasses nn.Linear with a forward of its own (Llama 4's returns a tuple)
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM",
               {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 1,
                "intermediate_size_mlp": 128,
                "moe_layers": [1], "no_rope_layers": [1, 1], "attention_chunk_size": 64,
                "tie_word_embeddings": False}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 64, "mlp_only_layers": [0],
                   "tie_word_embeddings": False}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                     "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                     "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                     "v_head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                     "tie_word_embeddings": False}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "mlp_only_layers": [0],
                   "head_dim": 16, "tie_word_embeddings": False}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
                 "tie_word_embeddings": False}),
    # Gemma 4: sliding layers of one head size, full-attention layers of another (config.head_dim is
    # ambiguous)
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM",
               {"head_dim": 16, "global_head_dim": 32, "sliding_window": 64,
                "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": True,
                "vocab_size_per_layer_input": 2048, "hidden_size_per_layer_input": 8}),
}


def model_of(kind: str, **overrides):
    """A tiny random `kind` model (a key of CONFIGS) and the tiny tokenizer, in memory."""
    import torch
    import transformers

    from mlflow_finetune_plugin.models.tiny import _build_tokenizer

    config_class, model_class, extra = CONFIGS[kind]
    tokenizer = _build_tokenizer()
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|pad|>"])
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), **{**_SIZE, **extra, **overrides},
                                                 bos_token_id=None, eos_token_id=eos, pad_token_id=pad)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, model_class)(config).to(torch.float32)
    return model, tokenizer


def build(kind: str, out: Path, **overrides) -> Path:
    """A tiny random `kind` model (a key of CONFIGS) with the tiny tokenizer, saved into `out`."""
    import transformers

    model, tokenizer = model_of(kind, **overrides)
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|pad|>"])
    model.generation_config = transformers.GenerationConfig(eos_token_id=eos, pad_token_id=pad,
                                                            do_sample=False, max_new_tokens=16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
