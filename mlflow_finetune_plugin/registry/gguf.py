"""The GGUF writer of `mlflow-finetune export --gguf`: a Llama model folder (safetensors + tokenizer) as one GGUF file
that llama.cpp and transformers' GGUF loader read.

It follows what llama.cpp's `convert_hf_to_gguf.py` writes for a Llama model with a byte-level BPE (GPT-2 style)
vocabulary: gguf's tensor name map for `MODEL_ARCH.LLAMA`, the `llama.*` hyperparameter keys, tokens, token types,
merges, special token ids and chat template, and the Q/K rows permuted into the interleaved rope order llama.cpp
computes with. Tensors stream from the safetensors files one at a time, so memory stays at one tensor. Anything else
(another architecture, tokenizer or rope type) is refused with llama.cpp's converter as the way out.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError

GGUF_TYPES = ("f32", "f16")


def check_gguf_support(model_config: dict, tokenizer_dir: Path) -> str:
    """The llama.cpp pre-tokenizer name for this model's tokenizer; FinetuneError when no GGUF can be written."""
    fix = ("Export without --gguf and convert the folder with llama.cpp's convert_hf_to_gguf.py, which knows more "
           "architectures and tokenizers.")
    model_type = model_config.get("model_type")
    if model_type != "llama":
        raise FinetuneError(f"--gguf writes Llama-architecture models (model_type llama, e.g. the built-in tiny and "
                            f"smollm2); this model is {model_type!r}. {fix}")
    rope = model_config.get("rope_parameters") or model_config.get("rope_scaling") or {}
    unsupported = [f"{key}={model_config[key]}" for key in ("attention_bias", "mlp_bias") if model_config.get(key)]
    if rope.get("rope_type", "default") != "default":
        unsupported.append(f"rope_type={rope['rope_type']}")
    if unsupported:
        raise FinetuneError(f"--gguf writes plain Llama models; this one has {', '.join(unsupported)}. {fix}")
    return _pre_tokenizer(tokenizer_dir, fix)


def _pre_tokenizer(tokenizer_dir: Path, fix: str) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json: `gpt-2` for GPT-2's split (ByteLevel
    with its own regex), else the name transformers' GGUF reader maps to the same split regex, so a reader rebuilds
    the tokenizer that was trained with."""
    path = tokenizer_dir / "tokenizer.json"
    spec = json.loads(path.read_text()) if path.is_file() else {}
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer"):
        raise FinetuneError(f"--gguf writes byte-level BPE (GPT-2 style) vocabularies; {path} is "
                            f"{model.get('type') or 'missing'}{' with byte fallback' if model.get('byte_fallback') else ''}"
                            f"{' with a normalizer' if spec.get('normalizer') else ''}. {fix}")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if split == regex:
                return name
    raise FinetuneError(f"--gguf: the pre-tokenizer of {path} ({json.dumps(pre)[:200]}) is not one llama.cpp "
                        f"names. {fix}")


def write_gguf(model_dir: Path, dest: Path, gguf_type: str, label: str, base_ref: str | None = None,
               echo=print) -> Path:
    """Write the Llama model folder `model_dir` (safetensors + tokenizer) as GGUF file `dest` in f32 or f16."""
    import gguf
    from tqdm.auto import tqdm

    config = json.loads((model_dir / "config.json").read_text())
    pre = check_gguf_support(config, model_dir)
    echo(f"Writing GGUF ({gguf_type}) to {dest}")
    writer = gguf.GGUFWriter(dest, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_llama_metadata(writer, config, gguf_type, label, base_ref)
    _add_vocab(writer, model_dir, config["vocab_size"], pre)
    plan = _tensor_plan(model_dir, config, gguf_type)
    for gguf_name, _, _, shape, dtype in plan:
        writer.add_tensor_info(gguf_name, shape, dtype, _nbytes(shape, dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        with tqdm(total=sum(_nbytes(s, d) for _, _, _, s, d in plan), unit="B", unit_scale=True,
                  desc="GGUF tensors") as bar:
            for _, file, hf_name, _, dtype in plan:
                array = _gguf_tensor(file, hf_name, config, dtype)
                writer.write_tensor_data(array)
                bar.update(array.nbytes)
    finally:
        writer.close()
    return dest


def _add_llama_metadata(writer, config: dict, gguf_type: str, label: str, base_ref: str | None) -> None:
    """The `general.*` and `llama.*` keys llama.cpp writes for a Llama model, read back by transformers' GGUF
    loader as the config."""
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer.add_name(label)
    if base_ref:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_ref)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if gguf_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab(writer, model_dir: Path, vocab_size: int, pre: str) -> None:
    """Tokens and their types as llama.cpp's converter lists a GPT-2 style vocabulary (ids without a token become
    `[PAD<id>]`, added tokens are CONTROL when special), then merges, special ids and chat template through gguf's
    SpecialVocab, which reads them from the saved tokenizer files."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise FinetuneError(f"the tokenizer in {model_dir} has token id {max(by_id)}, beyond the model's "
                            f"vocab_size {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[i].special or (token.startswith("<|") and token.endswith("|>")):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.add_special_token.setdefault("bos", False)  # the tokenizer adds no BOS unless its config says so
    special.add_to_gguf(writer, quiet=True)
    if not special.merges:
        raise FinetuneError(f"the tokenizer in {model_dir} has no BPE merges; a GGUF without them cannot tokenize")


def _tensor_plan(model_dir: Path, config: dict, gguf_type: str) -> list[tuple[str, Path, str, tuple, object]]:
    """(GGUF name, safetensors file, HF name, shape, numpy dtype) of every tensor, in file order. f16 keeps 1-D
    tensors (the norms) in f32, as llama.cpp does."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    plan = []
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for hf_name in f.keys():
                if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue  # tied: llama.cpp reads the output projection from token_embd
                gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise FinetuneError(f"{file.name}: tensor {hf_name!r} has no GGUF name for a Llama model; export "
                                        "without --gguf and convert with llama.cpp's convert_hf_to_gguf.py")
                shape = tuple(f.get_slice(hf_name).get_shape())
                dtype = np.float16 if gguf_type == "f16" and len(shape) > 1 else np.float32
                plan.append((gguf_name, file, hf_name, shape, dtype))
    if not plan:
        raise FinetuneError(f"no safetensors weights in {model_dir}")
    return plan


def _nbytes(shape: tuple, dtype) -> int:
    import numpy as np

    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _gguf_tensor(file: Path, hf_name: str, config: dict, dtype):
    """One tensor as GGUF stores it: Q and K rows permuted for llama.cpp's rope, in the file's dtype."""
    import torch
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        weight = f.get_tensor(hf_name).to(torch.float32)
    heads = config["num_attention_heads"]
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        weight = rope_permute(weight, heads)
    elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        weight = rope_permute(weight, config.get("num_key_value_heads") or heads)
    return weight.numpy().astype(dtype)


def rope_permute(weight, n_head: int):
    """HF Llama keeps each head's rotary pairs as two halves (x_i, x_{i+d/2}); llama.cpp rotates adjacent pairs
    (x_2i, x_2i+1). Reorder the output rows of each head from halves to interleaved, as convert_hf_to_gguf.py does
    (transformers' GGUF loader applies the inverse)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))
