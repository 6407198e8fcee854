"""The GGUF file of `mlflow-finetune export --gguf`, written by llama.cpp's own converter
(`convert_hf_to_gguf.py`), as Unsloth does: whatever architecture, tokenizer and rope that converter knows is
exported the way llama.cpp reads it, and what it does not know is refused with its reason.

The converter runs in a process of its own (`llama_cpp_convert.py`) on the finished, merged export folder.
Before any weights load, `check_gguf_support` finds the converter (`llama_cpp.find_llama_cpp`), checks that it
registers the model's architecture and that the modules it imports are installed.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.registry.llama_cpp import CONVERTER, supported_architectures

# The converter's --outtype values offered: f32 keeps the weights exactly, f16 halves the file, q8_0 (8-bit
# blocks with one scale per 32 weights) quarters it.
GGUF_TYPES = ("f32", "f16", "q8_0")
_RUNNER = Path(__file__).with_name("llama_cpp_convert.py")
_NOTE = "mlflow-finetune:"  # llama_cpp_convert.NOTE; that file is run by path, never imported
# Modules the converter imports, by the pip package that provides them. sentencepiece only for a
# tokenizer.model.
_NEEDS = {"numpy": "numpy", "torch": "torch", "transformers": "transformers", "yaml": "pyyaml",
          "tqdm": "tqdm"}
_PIP_NAMES = {**_NEEDS, "sentencepiece": "sentencepiece", "google": "protobuf",
              "mistral_common": "mistral-common", "safetensors": "safetensors"}
_ERROR_LINE = re.compile(r"^(?:[\w.]+(?:Error|Exception)|ERROR:hf-to-gguf): ?(.*)$")


def architecture(model_config: dict) -> str:
    """The architecture the converter dispatches on: config.json's first `architectures` entry."""
    names = model_config.get("architectures") or (model_config.get("text_config") or {}).get("architectures")
    if not names:
        raise FinetuneError(f"--gguf: the model's config.json names no architectures (model_type "
                            f"{model_config.get('model_type')!r}), which llama.cpp's converter dispatches "
                            "on. Add `architectures` to the base model's config.json, or export without "
                            "--gguf.")
    return names[0]


def check_gguf_support(model_config: dict, tokenizer_dir: Path, llama_cpp: Path) -> None:
    """FinetuneError, before any weights load, when the converter in `llama_cpp` cannot convert this model."""
    arch = architecture(model_config)
    known = supported_architectures(llama_cpp)
    if known and arch not in known:
        near = difflib.get_close_matches(arch, sorted(known), n=3, cutoff=0.6)
        raise FinetuneError(
            f"--gguf: llama.cpp's converter ({llama_cpp / CONVERTER}) has no conversion for {arch} "
            "(model_type "
            f"{model_config.get('model_type')!r}){'; it knows ' + ', '.join(near) if near else ''}. A newer "
            "llama.cpp may (--llama-cpp DIR); the transformers folder exports without --gguf.")
    needed = dict(_NEEDS)
    if (tokenizer_dir / "tokenizer.model").is_file():  # a SentencePiece vocabulary is read with sentencepiece
        needed["sentencepiece"] = "sentencepiece"
    missing = sorted({pip for module, pip in needed.items() if importlib.util.find_spec(module) is None})
    if missing:
        raise FinetuneError(f"--gguf: llama.cpp's converter needs {', '.join(missing)}, not installed here: "
                            f"pip install {' '.join(missing)}  (or, from the project's clone, "
                            "pip install -e '.[gguf-export]')")


def write_gguf(model_dir: Path, dest: Path, gguf_type: str, label: str, llama_cpp: Path,
               base_ref: str | None = None, echo=print) -> Path:
    """Convert the transformers folder `model_dir` into the GGUF file `dest` with the converter in
    `llama_cpp`."""
    echo(f"Writing GGUF ({gguf_type}) to {dest} with {llama_cpp / CONVERTER}")
    with tempfile.TemporaryDirectory() as tmp:
        # The converter's metadata override: our name for the file and the base model's reference as its
        # lineage.
        metadata = Path(tmp) / "metadata.json"
        metadata.write_text(json.dumps({"general.name": label, **(
            {"general.base_models": [{"name": base_ref}]} if base_ref else {})}))
        command = [sys.executable, str(_RUNNER), str(llama_cpp), str(model_dir), "--outfile", str(dest),
                   "--outtype", gguf_type, "--metadata", str(metadata)]
        code, tail = _run(command, echo)
    if code != 0 or not dest.is_file():
        raise FinetuneError(_failure(code, tail, llama_cpp))
    return dest


def _run(command: list[str], echo) -> tuple[int, list[str]]:
    """Run the converter; repeat its notes to the user and keep the last lines of its log for an error."""
    tail: deque[str] = deque(maxlen=60)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", bufsize=1) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if line.startswith(_NOTE):
                echo(line.removeprefix(_NOTE).strip())
    return proc.returncode, list(tail)


def _failure(code: int, tail: list[str], llama_cpp: Path) -> str:
    """The converter's own reason (its last error line), what to do where that is known, and its last
    lines."""
    reasons = [m.group(0) for m in map(_ERROR_LINE.match, tail) if m]
    reason = reasons[-1] if reasons else f"it exited with status {code}"
    missing = re.search(r"No module named '([\w.]+)'", reason)
    fix = ""
    if missing:
        module = missing.group(1).split(".")[0]
        fix = f" Install it: pip install {_PIP_NAMES.get(module, module)}"
    elif re.search(r"Missing .*tokenizer\.model", reason):
        fix = (
            " This architecture's conversion reads a SentencePiece tokenizer.model, and the exported "
            "tokenizer has only tokenizer.json.")
    elif "Cannot find Llama BPE tokenizer" in reason:
        fix = (" This architecture's conversion (Gemma 4's, in llama.cpp 0.3.36) reads the vocabulary as a "
               "SentencePiece-style BPE with byte fallback (tokenizer.json with `byte_fallback: true`), as "
               "the released checkpoints ship it; this tokenizer is a byte-level BPE without byte fallback.")
    elif "pre-tokenizer was not recognized" in reason:
        fix = (
            " llama.cpp names a tokenizer's pre-tokenizer by a hash of its output, and this tokenizer is "
            "neither in its table nor split by a regex llama.cpp implements; a newer llama.cpp may know it "
            "(--llama-cpp).")
    shown = "\n".join(f"    {line}" for line in tail[-15:])
    return (
        f"--gguf: llama.cpp's converter ({llama_cpp / CONVERTER}) could not convert the exported model: "
        f"{reason}.{fix}\n  The transformers folder exports without --gguf. The converter's last "
        f"lines:\n{shown}")
