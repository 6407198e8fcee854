"""Tiny random models of the chat families: `tiny-llama3`, `tiny-qwen2.5`, `tiny-qwen3`, `tiny-gemma3`,
`tiny-mistral`, `tiny-phi3.5`, and those of late 2026: `tiny-gemma4`, `tiny-qwen3.5` (with its thinking
variant `tiny-qwen3.5-think`) and `tiny-gpt-oss`.

Each is built locally like the built-in tiny model (`tiny.py`: seeded random weights, a byte-level BPE trained
on the shipped corpus, byte-for-byte reproducible, cached) from its family's own config and model class, and
carries what makes the family behave as it does in training and serving: the real special tokens and their
roles (bos, eos, pad, unk: none where the real tokenizer has none), the turn tokens, whether the tokenizer
adds bos itself, the model config's and generation config's eos ids, and the family's chat template, verbatim
(`chat_templates.py`).

The roles are those of the hub files of Llama-3.2-1B-Instruct, Qwen2.5-0.5B-Instruct, Qwen3-0.6B,
gemma-3-1b-it, Mistral-7B-Instruct-v0.3, Phi-3.5-mini-instruct, gemma-4-*-it, Qwen3.5-0.8B/2B (non-thinking
template) and -4B and up (thinking template), and gpt-oss-20b (tokenizer_config.json, config.json,
generation_config.json). The special tokens come first in the vocabulary, in the real models' order, so the
ids differ from the real ones where those sit at the end of a large vocabulary (Llama, Qwen, Phi), and match
for Gemma's and Mistral's first ids. The generation configs keep the real eos/bos/pad ids but decode greedily,
as the tiny model does: the real ones sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PREFIX, REF_PREFIX = "tiny-", "builtin:tiny-"

# Bump when anything below changes what a build produces, so old caches are not reused.
_BUILD_VERSION = "v1"
_MAX_LENGTH = 1024
_SIZE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


@dataclass(frozen=True)
class Family:
    template: str                 # bundled chat template (chat_templates.BUNDLED)
    config_class: str             # transformers config class
    model_class: str              # transformers causal-LM class
    special: tuple[str, ...]      # special tokens, in the real vocabulary's order
    eos: str                      # the tokenizer's eos_token
    config_eos: tuple[str, ...]   # config.json eos_token_id (a list where the real one is a list)
    generation_eos: tuple[str, ...]  # generation_config.json eos_token_id
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    add_bos: bool = False         # the tokenizer prepends bos when it encodes text (add_special_tokens=True)
    # added tokens that are not special (Qwen's <think>): kept by skip_special_tokens
    plain: tuple[str, ...] = ()
    # saved as this class (the real one), where AutoTokenizer forces it anyway
    tokenizer_class: str | None = None
    split: str | None = None      # the tokenizer's word-split pattern where it is not GPT-2's (Qwen's)
    config: dict = field(default_factory=dict)  # the family's shape: heads, head_dim, rope, tied embeddings


_LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                   "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                   "<|eot_id|>", "<|python_tag|>")
_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_PHI_SPECIAL = ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|placeholder1|>",
                "<|placeholder2|>", "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>",
                "<|placeholder5|>", "<|placeholder6|>", "<|user|>")

# Qwen's word split (digits one by one), as in its tokenizer.json and transformers' Qwen2Tokenizer.
_QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+""")
# Qwen3.5's (its tokenizer's PRETOKENIZE_REGEX): letters may carry combining marks.
_QWEN3_5_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}|"""
                  r""" ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN3_PLAIN = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
# Gemma 4's control tokens, in the real vocabulary's order (ids 0-4, 46-52, 98, 100, 101, 105, 106).
_GEMMA4_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|tool>", "<tool|>", "<|tool_call>",
                   "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>', "<|think|>", "<|channel>",
                   "<channel|>", "<|turn>", "<turn|>")
# gpt-oss (o200k_harmony), ids 199998-200012.
_GPT_OSS_SPECIAL = ("<|startoftext|>", "<|endoftext|>", "<|reserved_200000|>", "<|reserved_200001|>",
                    "<|return|>", "<|constrain|>", "<|reserved_200004|>", "<|channel|>", "<|start|>",
                    "<|end|>", "<|message|>", "<|reserved_200009|>", "<|reserved_200010|>",
                    "<|reserved_200011|>", "<|call|>")
# Qwen3.5: Gated DeltaNet (linear attention, a convolution and a recurrent state in its cache) beside full
# attention, three to one in the real models; here one of each. The small checkpoints (0.8B, 2B) ship the
# non-thinking template, 4B and up the thinking one: the same model and tokenizer, two families here.
_QWEN3_5 = dict(
    config_class="Qwen3_5TextConfig", model_class="Qwen3_5ForCausalLM", special=_QWEN_SPECIAL,
    eos="<|im_end|>", pad="<|endoftext|>", tokenizer_class="Qwen3_5Tokenizer", split=_QWEN3_5_SPLIT,
    plain=_QWEN3_PLAIN, config_eos=("<|im_end|>",), generation_eos=("<|im_end|>", "<|endoftext|>"),
    config={"num_key_value_heads": 2, "head_dim": 32, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_conv_kernel_dim": 4,
            "layer_types": ["linear_attention", "full_attention"], "tie_word_embeddings": True,
            "max_position_embeddings": 262144})

FAMILIES: dict[str, Family] = {
    # Llama 3.2: no pad token (<|finetune_right_pad_id|> exists but is not the tokenizer's pad), eos
    # <|eot_id|>.
    "llama3": Family(
        template="llama3", config_class="LlamaConfig", model_class="LlamaForCausalLM",
        special=_LLAMA3_SPECIAL,
        bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True,
        config_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        config={"num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True,
                # Llama 3.2's own rope scaling; its original window (8192) must lie below
                # max_position_embeddings.
                "max_position_embeddings": 131072,
                "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                    "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                    "original_max_position_embeddings": 8192}}),
    # Qwen2.5: no bos, pad <|endoftext|>, eos <|im_end|>; q/k/v projections with bias (Qwen2's own).
    "qwen2.5": Family(
        template="qwen", config_class="Qwen2Config", model_class="Qwen2ForCausalLM", special=_QWEN_SPECIAL,
        eos="<|im_end|>", pad="<|endoftext|>", plain=("<tool_call>", "</tool_call>"),
        tokenizer_class="Qwen2Tokenizer",
        split=_QWEN_SPLIT, config_eos=("<|im_end|>",), generation_eos=("<|im_end|>", "<|endoftext|>"),
        config={"num_key_value_heads": 2, "tie_word_embeddings": True, "max_position_embeddings": 32768,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    # Qwen3: as Qwen2.5, plus q/k norms and a head_dim that is not hidden/heads (4 x 32 = 128 against 64, as
    # the real 0.6B has 16 x 128 against 1024); <think> and the tool tokens are added tokens that are not
    # special.
    "qwen3": Family(
        template="qwen3", config_class="Qwen3Config", model_class="Qwen3ForCausalLM", special=_QWEN_SPECIAL,
        eos="<|im_end|>", pad="<|endoftext|>", tokenizer_class="Qwen2Tokenizer", split=_QWEN_SPLIT,
        plain=_QWEN3_PLAIN, config_eos=("<|im_end|>",), generation_eos=("<|im_end|>", "<|endoftext|>"),
        config={"num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": True,
                "max_position_embeddings": 40960,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    # Gemma 3: eos <eos> is not the end of a turn (<end_of_turn>); the generation config stops on both. One
    # key/value head (the real 1B has 4 query heads over 1), a sliding-window layer and a global one (the real
    # pattern is five sliding to one global); a window of 128 so that the sliding path matters on the tests'
    # short rows (real: 512).
    "gemma3": Family(
        template="gemma", config_class="Gemma3TextConfig", model_class="Gemma3ForCausalLM",
        special=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                 "<start_of_image>", "<end_of_image>"),
        bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", add_bos=True,
        config_eos=("<eos>", "<end_of_turn>"), generation_eos=("<eos>", "<end_of_turn>"),
        config={"num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 128,
                "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": True,
                "max_position_embeddings": 32768}),
    # Mistral v0.3: no pad token, eos </s> ends a reply; no sliding window in v0.3; untied embeddings.
    "mistral": Family(
        template="mistral", config_class="MistralConfig", model_class="MistralForCausalLM",
        special=("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                 "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
        bos="<s>", eos="</s>", unk="<unk>", add_bos=True, config_eos=("</s>",), generation_eos=("</s>",),
        config={"num_key_value_heads": 2, "head_dim": 16, "sliding_window": None,
                "tie_word_embeddings": False,
                "max_position_embeddings": 32768,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    # Phi-3.5: eos <|endoftext|> is not the end of a turn (<|end|>); the generation config stops on <|end|>,
    # <|assistant|> and <|endoftext|>. The tokenizer adds no bos. No grouped-query attention, untied
    # embeddings; the default rope (the real model's longrope factors are left out).
    "phi3.5": Family(
        template="phi3", config_class="Phi3Config", model_class="Phi3ForCausalLM", special=_PHI_SPECIAL,
        bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>",
        config_eos=("<|endoftext|>",), generation_eos=("<|end|>", "<|assistant|>", "<|endoftext|>"),
        config={"num_key_value_heads": 4, "tie_word_embeddings": False, "max_position_embeddings": 4096,
                "original_max_position_embeddings": 4096}),
    # Gemma 4: eos is <turn|>, the end of a turn (Gemma 3's was <eos>); the generation config stops on <eos>,
    # <turn|> and <|tool_response>. Reasoning goes in a thought channel (<|channel>thought ... <channel|>).
    # head_dim is a per-layer attribute: `config.head_dim` raises. No per-layer input embeddings (the
    # E2B/E4B's), a sliding and a global layer.
    "gemma4": Family(
        template="gemma4", config_class="Gemma4TextConfig", model_class="Gemma4ForCausalLM",
        special=_GEMMA4_SPECIAL,
        bos="<bos>", eos="<turn|>", pad="<pad>", unk="<unk>", add_bos=True,
        config_eos=("<eos>", "<turn|>"), generation_eos=("<eos>", "<turn|>", "<|tool_response>"),
        config={"num_key_value_heads": 1, "head_dim": 16, "sliding_window": 128,
                "hidden_size_per_layer_input": 0,
                "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": True,
                "max_position_embeddings": 131072}),
    "qwen3.5": Family(template="qwen3_5", **_QWEN3_5),
    "qwen3.5-think": Family(template="qwen3_5_think", **_QWEN3_5),
    # gpt-oss: a mixture of experts (here 4 experts, 2 per token; the real 20B has 32 and 4), fused 3-D expert
    # weights, attention sinks, sliding and full layers, untied embeddings. Harmony format: eos <|return|>
    # ends the final answer, <|call|> a tool call, <|end|> every other message (not a stop: the final answer
    # follows it).
    "gpt-oss": Family(
        template="gptoss", config_class="GptOssConfig", model_class="GptOssForCausalLM",
        special=_GPT_OSS_SPECIAL,
        bos="<|startoftext|>", eos="<|return|>", pad="<|endoftext|>",
        config_eos=("<|return|>",), generation_eos=("<|return|>", "<|endoftext|>", "<|call|>"),
        config={"num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
                "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"],
                "tie_word_embeddings": False, "max_position_embeddings": 131072}),
}

BUILTIN_NAMES: tuple[str, ...] = tuple(PREFIX + name for name in FAMILIES)


def family_of(name: str | None) -> str | None:
    """The family a built-in name or reference names (`tiny-qwen3`, `builtin:tiny-qwen3` -> `qwen3`), else
    None."""
    return named_family(name, FAMILIES)


def named_family(name: str | None, families) -> str | None:
    """The one of `families` that `tiny-<family>` or `builtin:tiny-<family>` names, else None (also for the
    tiny vision families, `tiny_vision.py`)."""
    if not name:
        return None
    for prefix in (REF_PREFIX, PREFIX):
        if name.startswith(prefix) and name[len(prefix):] in families:
            return name[len(prefix):]
    return None


def reference(family: str) -> str:
    """How a logged model names this base: `builtin:tiny-qwen3`."""
    return REF_PREFIX + family


def family_model_path(family: str) -> Path:
    """The cached model folder of `family` (`$MLFLOW_FINETUNE_CACHE/tiny-<family>-v1`), built on first use."""
    from functools import partial

    from mlflow_finetune_plugin.paths import cached_build

    return cached_build(f"{PREFIX}{family}-{_BUILD_VERSION}", partial(build_family_model, family))


def build_family_model(family: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny model of `family` (weights, tokenizer, chat template, generation config) into `out_dir`.

    Deterministic: the same `seed` gives byte-identical `model.safetensors` and `tokenizer.json`. Returns the
    absolute path of `out_dir`.
    """
    import torch
    import transformers

    spec = FAMILIES[family]
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_family_tokenizer(family)

    def ids(tokens):
        found = tokenizer.convert_tokens_to_ids(list(tokens))
        return found[0] if len(found) == 1 else found

    config = getattr(transformers, spec.config_class)(
        vocab_size=len(tokenizer), **_SIZE, **spec.config, dtype="float32",
        bos_token_id=ids([spec.bos]) if spec.bos else None, eos_token_id=ids(spec.config_eos),
        pad_token_id=ids([spec.pad]) if spec.pad else None,
        # The tiny model's init scale (see tiny.py): at the families' own 0.02 a random base barely learns.
        initializer_range=0.1,
    )
    # fork_rng: seed the init without changing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, spec.model_class)(config).to(torch.float32)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=ids(spec.generation_eos),
        pad_token_id=config.pad_token_id, do_sample=False, max_new_tokens=64)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if spec.tokenizer_class:
        # AutoTokenizer rebuilds a Qwen tokenizer as Qwen2Tokenizer whatever the folder says (transformers 5
        # lists qwen2's hub class as unreliable): save it as that class, the real models' own, so every loader
        # agrees.
        tokenizer = getattr(transformers, spec.tokenizer_class).from_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def build_family_tokenizer(family: str):
    """The family's tokenizer: a byte-level BPE trained on the shipped corpus with the family's special
    tokens, roles and chat template."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    from mlflow_finetune_plugin.models.chat_templates import bundled_template
    from mlflow_finetune_plugin.models.tiny import train_byte_bpe

    spec = FAMILIES[family]
    backend = train_byte_bpe(list(spec.special), split_regex=spec.split)
    if spec.plain:
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.plain])
    if spec.add_bos:
        # As the real Llama 3 tokenizer.json does: the byte-level offsets step, then bos before the text.
        bos_id = backend.token_to_id(spec.bos)
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B",
                                          special_tokens=[(spec.bos, bos_id)])])
    named = {spec.bos, spec.eos, spec.pad, spec.unk}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad,
        unk_token=spec.unk,
        # Listed so that `all_special_ids` (used to strip control tokens from generated text) has every one.
        extra_special_tokens=[t for t in spec.special if t not in named],
        model_max_length=_MAX_LENGTH, chat_template=bundled_template(spec.template),
    )
