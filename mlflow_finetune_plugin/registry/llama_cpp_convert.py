"""Run llama.cpp's convert_hf_to_gguf.py as it is, in a process of its own:

    python llama_cpp_convert.py LLAMA_CPP_DIR MODEL_DIR --outfile F --outtype f32 ...

It is started by path and imports nothing of this plugin: the converter puts its own `gguf-py` first on
sys.path and imports a `gguf` that is not the installed one, which must not meet this plugin's process.

One thing is added. llama.cpp names the pre-tokenizer (the regex that splits text before BPE) by the sha256 of
the token ids of a fixed text, and refuses a tokenizer whose hash it has not seen: every hub tokenizer it
supports is in its table, but a tokenizer trained or rebuilt locally (the built-in tiny models) never is. When
the hash is unknown and the tokenizer's split, as transformers loads it, is the very regex llama.cpp
implements under one of the names the converter writes, that name is written (with a line saying so). Any
other tokenizer keeps the converter's own error.

And one thing is written that the converter leaves out: Gemma 3's layer pattern. llama.cpp runs every 6th
Gemma 3 layer as global attention and the others as sliding, as the released models are built, unless the file
lists each layer's kind; the converter never lists it. A Gemma 3 whose `layer_types` follow another pattern (a
small or pruned one) gets the list written (with a line saying so), so that llama.cpp runs each layer as
transformers does. A model that follows the pattern converts unchanged. (Gemma 4's conversion, a subclass,
writes its own list: left alone.)

And one flag is given where a model needs it: `--no-mtp` for an architecture whose conversion expects a
multi-token prediction head (Qwen3.5's, registered with `supports_mtp_export`) when the folder holds none of
its tensors. transformers loads such checkpoints without their `mtp.*` weights and saves them so, and without
the flag the converter stops on a bare `assert self.opt_num_mtp_layers != 0`.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import sys
from pathlib import Path

NOTE = "mlflow-finetune:"  # lines the export repeats to the user


def main() -> None:
    llama_cpp = Path(sys.argv[1]).resolve()
    script = llama_cpp / "convert_hf_to_gguf.py"
    sys.argv = [str(script), *sys.argv[2:]]
    # sys.path[0] is this file's folder, registry/, whose gguf.py would shadow the converter's gguf: replaced.
    sys.path[0:1] = [str(llama_cpp), str(llama_cpp / "gguf-py")]
    import convert_hf_to_gguf as converter

    owner = _vocab_owner(converter)
    if owner is not None:
        owner.get_vocab_base_pre = _with_fallback(owner.get_vocab_base_pre)
    gemma3 = _class(converter, "gemma", "Gemma3Model")
    if gemma3 is not None:
        gemma3.set_gguf_parameters = _with_layer_pattern(gemma3.set_gguf_parameters, gemma3)
    _no_mtp_without_its_tensors(converter, Path(sys.argv[1]))
    converter.main()


def _no_mtp_without_its_tensors(converter, model_dir: Path) -> None:
    """Add `--no-mtp` where the model's conversion expects an MTP head and the folder's weights hold none."""
    if "--no-mtp" in sys.argv or "--mtp" in sys.argv or "--no-mtp" not in inspect.getsource(converter):
        return
    try:
        hparams = json.loads((model_dir / "config.json").read_text())
        model_class = converter.get_model_class(hparams["architectures"][0])
    except Exception:  # noqa: BLE001 - anything unusual: the converter decides, and says why
        return
    if not getattr(model_class, "supports_mtp_export", False) or any(
            ".mtp." in f".{name}" for name in _tensor_names(model_dir)):
        return
    print(f"{NOTE} the model has no multi-token prediction (MTP) weights (transformers does not keep them): "
          "converted with --no-mtp", file=sys.stderr, flush=True)
    sys.argv.append("--no-mtp")


def _tensor_names(model_dir: Path) -> list[str]:
    """The tensor names of the folder's safetensors files (read from their headers)."""
    import struct

    names = []
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            names += [k for k in json.loads(f.read(size)) if k != "__metadata__"]
    return names


def _class(converter, module: str, name: str):
    """The converter's class `name`: in conversion/<module>.py in newer trees, in the script itself in older
    ones."""
    try:
        return getattr(__import__(f"conversion.{module}", fromlist=[name]), name)
    except (ImportError, AttributeError):
        return getattr(converter, name, None)


def _with_layer_pattern(original, gemma3, period: int = 6):
    """Gemma 3's set_gguf_parameters, plus the per-layer sliding-window list where `layer_types` differs from
    what llama.cpp assumes without one (layer i global when (i + 1) % period == 0: load_swa_pattern(ml, 6)).
    Subclasses of another architecture (Gemma 4) write their own list after calling it: not a second time
    here."""
    def set_gguf_parameters(self) -> None:
        original(self)
        if self.model_arch != gemma3.model_arch:
            return
        kinds = self.hparams.get("layer_types")
        if not kinds or not self.hparams.get("sliding_window"):
            return  # no sliding window written: llama.cpp runs every layer global, as transformers does
        sliding = [kind == "sliding_attention" for kind in kinds]
        if sliding != [(i + 1) % period != 0 for i in range(len(kinds))]:
            print(
                f"{NOTE} this Gemma 3's layers are not llama.cpp's default (every {period}th global): their "
                "kinds are written as attention.sliding_window_pattern", file=sys.stderr, flush=True)
            self.gguf_writer.add_sliding_window_pattern(sliding)

    return set_gguf_parameters


def _vocab_owner(converter):
    """The class that defines get_vocab_base_pre: conversion.base.TextModel in newer trees, the script's own
    TextModel (or Model, before 2024-07) in older ones."""
    candidates = [getattr(converter, name, None) for name in ("TextModel", "Model")]
    try:
        from conversion.base import TextModel
        candidates.insert(0, TextModel)
    except ImportError:
        pass
    return next((c for c in candidates if isinstance(c, type) and "get_vocab_base_pre" in vars(c)), None)


def _with_fallback(original):
    known = set(re.findall(r'res = "([^"]+)"', inspect.getsource(original)))
    logger = logging.getLogger("hf-to-gguf")

    def get_vocab_base_pre(self, tokenizer) -> str:
        level = logger.level
        logger.setLevel(logging.ERROR)  # the converter's unknown-hash banner, repeated below if it stands
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            pass
        finally:
            logger.setLevel(level)
        name = _pre_tokenizer_name(tokenizer, known)
        if name is None:
            return original(self, tokenizer)  # the converter's own warning and error
        print(
            f"{NOTE} llama.cpp does not know this tokenizer by its hash; its pre-tokenizer is the split "
            f"llama.cpp implements as {name!r}, written as tokenizer.ggml.pre", file=sys.stderr, flush=True)
        return name

    return get_vocab_base_pre


def _pre_tokenizer_name(tokenizer, known: set[str]) -> str | None:
    """llama.cpp's name for the split of this byte-level BPE tokenizer (`tokenizer` as the converter loaded
    it), or None. GPT-2's ByteLevel regex is `gpt-2`; a Split regex followed by a ByteLevel without its own
    regex is the name transformers' GGUF reader maps to that same regex (so the reader rebuilds the tokenizer
    that was trained), when the converter also writes that name."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # a transformers without the table: GPT-2's split only
        GGUF_PRE_TOKENIZER_SPLITS = {}

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    # No normalizer, or NFC: transformers gives Qwen2's tokenizers NFC, and llama.cpp converts those under its
    # name.
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("normalizer") or {}).get(
            "type", "NFC") != "NFC":
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2" if "gpt-2" in known else None
    steps = pre.get("pretokenizers") or []
    if not (pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)
            and not steps[1].get("add_prefix_space")):
        return None
    regex = (steps[0].get("pattern") or {}).get("Regex")
    return next((name for name,
                 split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == regex and name in known), None)


if __name__ == "__main__":
    main()
