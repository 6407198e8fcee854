"""The built-in tiny model: a small Llama-architecture causal LM with random weights and a local tokenizer.

It lets every recipe, test and demo run on a fresh machine with no network and no GPU. Nothing is
downloaded: the byte-level BPE tokenizer is trained on a corpus shipped in `assets/`, and the weights
come from a seeded random init, so a build is reproducible byte for byte.
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path

TINY_MODEL_REF = "builtin:tiny-llama"

# Bump when anything below changes what a build produces, so old caches are not reused.
_CACHE_NAME = "tiny-llama-v2"  # v2: initializer_range 0.1 (v1 builds barely learn)

_VOCAB_SIZE = 2048
_MAX_LENGTH = 1024
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
_EOS, _PAD = "<|im_end|>", "<|pad|>"

def chatml_template(default_system: str | None = None) -> str:
    """ChatML. The `generation` block covers each assistant reply AND its <|im_end|>, so TRL's
    `assistant_only_loss=True` trains the model to emit the end-of-turn token, i.e. to stop. Content may be a
    string or a list of parts ({"type": "text", "text": ...}), as chat UIs send it. `default_system` is
    rendered when a conversation has no system message of its own (SmolLM2's template does that)."""
    default = ("{%- if loop.first and messages[0]['role'] != 'system' -%}"
               "{{ '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}"
               "{%- endif -%}") if default_system else ""
    return (
        "{%- macro render(content) -%}"
        "{%- if content is string -%}{{ content }}"
        "{%- else -%}{%- for part in content if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
        "{%- endif -%}"
        "{%- endmacro -%}"
        "{%- for message in messages -%}"
        + default +
        "{%- if message['role'] == 'assistant' -%}"
        "{{ '<|im_start|>assistant\\n' }}"
        "{%- generation -%}{{ render(message['content']) }}{{ '<|im_end|>' }}{%- endgeneration -%}"
        "{{ '\\n' }}"
        "{%- else -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}{{ render(message['content']) }}{{ '<|im_end|>\\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


CHAT_TEMPLATE = chatml_template()


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny model, tokenizer, chat template and generation config into `out_dir`.

    Deterministic: the same `seed` gives a byte-identical `model.safetensors` and `tokenizer.json`.
    Returns the absolute path of `out_dir`.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer()
    eos_id, pad_id = tokenizer.convert_tokens_to_ids([_EOS, _PAD])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=_MAX_LENGTH,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
        # Standard-scale init (about 1/sqrt(hidden)) instead of Llama's 0.02: with tied, frozen embeddings of
        # norm 0.02*sqrt(128) and the final RMSNorm fixing |h|, logits could never exceed ~2.6, so adapter
        # training on the random base stalled near uniform loss. At 0.1 the support-bot LoRA loss falls 8.3 ->
        # 4.2 in 100 steps.
        initializer_range=0.1,
    )
    # fork_rng: seed the init without changing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False, max_new_tokens=64)

    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def tiny_model_path() -> Path:
    """The cached tiny model folder (`$MLFLOW_FINETUNE_CACHE/tiny-llama-v2`, see `paths.cache_root`), built on
    first use: concurrent processes build it once and never see a partial folder."""
    from mlflow_finetune_plugin.paths import cached_build

    return cached_build(_CACHE_NAME, build_tiny_model)


def weights_digest(model_dir: str | os.PathLike) -> str:
    """SHA-256 (hex) of the content of the `*.safetensors` files in `model_dir`, in sorted filename order.

    For a single-file model this equals `sha256sum model.safetensors`.
    """
    files = sorted(Path(model_dir).glob("*.safetensors"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors file in {str(model_dir)!r}: save the model with "
            "`save_pretrained(..., safe_serialization=True)` before computing its digest.")
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def train_byte_bpe(special_tokens: list[str], vocab_size: int = _VOCAB_SIZE, split_regex: str | None = None):
    """A byte-level BPE (`tokenizers.Tokenizer`) trained on the shipped corpus, with `special_tokens` first
    (ids 0, 1, ... in that order). Deterministic: the same arguments give the same `tokenizer.json`. The tiny
    models of the chat families (`tiny_families.py`) are built with it too.

    `split_regex`: split words with this pattern (and NFC-normalize) instead of GPT-2's, as Qwen's tokenizer
    does.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    backend = Tokenizer(models.BPE())
    if split_regex:
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps a token's leading space in its offsets, so character-to-token lookups
    # (used for assistant masks) find every character of a message.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        # All 256 byte symbols, even those absent from the corpus, so any text encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = resources.files("mlflow_finetune_plugin") / "assets" / "tiny_corpus.txt"
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    backend.train_from_iterator(lines, trainer=trainer)
    return backend


def _build_tokenizer():
    """Train the byte-level BPE tokenizer on the shipped corpus and wrap it for transformers."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_byte_bpe(_SPECIAL_TOKENS),
        eos_token=_EOS,
        pad_token=_PAD,
        bos_token=None,
        unk_token=None,
        # Listed so `all_special_ids` (used to strip control tokens from generated text) has all four.
        extra_special_tokens=[t for t in _SPECIAL_TOKENS if t not in (_EOS, _PAD)],
        model_max_length=_MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
    )
