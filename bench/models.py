"""Model folders for the benchmarks: the built-in tiny model's tokenizer and chat template on a Llama of any size.

Random weights from a seeded init, saved with `save_pretrained`: no download, and the plugin loads it like any
local model (`-P model=DIR`). The plain baseline loads the very same folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# name -> LlamaConfig overrides of the tiny model's config.json ("tiny" is the built-in model itself).
SIZES = {
    "tiny": {},
    # ~6M parameters: enough work per step that framework overheads do not dominate on 2 CPU cores.
    "small": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 6, "num_attention_heads": 8,
              "num_key_value_heads": 4, "head_dim": 32},
    # ~77M parameters (~300 MB in fp32): big enough that memory figures are not lost in process noise.
    "medium": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
               "num_key_value_heads": 4, "head_dim": 64},
    # ~1.0B parameters (TinyLlama-like width, 16 layers, 32k vocabulary): the GPU benchmark's model.
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 32, "head_dim": 64, "vocab_size": 32000, "max_position_embeddings": 4096,
           "tie_word_embeddings": False, "initializer_range": 0.02},
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                    "generation_config.json")


def model_dir(size: str, tiny_dir: Path, root: Path, dtype: str = "float32", device: str = "cpu") -> Path:
    """The folder of model `size` (built once under `root`); the tiny model's own folder for "tiny".

    `device` is only where the random init runs (a 1B init is much faster on a GPU)."""
    if size == "tiny":
        return Path(tiny_dir)
    out = Path(root) / f"llama-{size}-{dtype}"
    if (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((Path(tiny_dir) / "config.json").read_text())
    config.update(SIZES[size])
    config["dtype"] = dtype
    config = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "transformers_version")})
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        if (Path(tiny_dir) / name).exists():
            shutil.copy(Path(tiny_dir) / name, tmp / name)
    tmp.rename(out)
    return out


def n_params(path: Path) -> int:
    """Parameters of a saved model, from its safetensors headers (no load)."""
    import struct

    total = 0
    for f in Path(path).glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for key, meta in header.items():
            if key != "__metadata__":
                n = 1
                for d in meta["shape"]:
                    n *= d
                total += n
    return total
