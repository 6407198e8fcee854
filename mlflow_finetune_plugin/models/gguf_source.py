"""Reading a built-in model out of a GGUF file: what `smollm2` and `gemma3` share in their one-time
conversion.

transformers dequantizes GGUF on every load (slow), keeps a `quantization_config` (gguf) that training
refuses, and refuses to `save_pretrained` a GGUF-loaded model: so the weights go into a fresh model of the
same config, which is saved as safetensors once and cached.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path


def plain_copy(loaded, name_or_path: str):
    """A float32 model of `loaded`'s config holding its (dequantized) weights, with no
    `quantization_config`."""
    import torch
    from transformers import AutoModelForCausalLM

    config = loaded.config
    del config.quantization_config  # the saved weights are plain float32, not GGUF
    config.name_or_path = name_or_path
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return model


@contextlib.contextmanager
def parsed_once():
    """Three things transformers redoes or does slowly while reading one GGUF file, changed for the conversion
    (all only read the file):
    - `GGUFReader(path)`, built three times (tokenizer, config, weights), each parsing the vocabulary: once
    instead,
      17.0 s -> 11.5 s for smollm2's whole conversion (quiet 2-core machine);
    - the reader slices its file once per string and number it parses (a million slices for gemma3's 262k-word
      vocabulary), and a slice of a numpy memmap costs several times one of an array in memory (its
      `__array_finalize__` runs in Python): the file is read into memory instead (the weights are all read
      anyway);
    - gguf's `get_tensor_name_map(arch, n_blocks)`, called once per module (397 times for smollm2), each
      rebuilding the same table: the load took 10.7-14.5 s instead of 22.2 s (measured on a loaded
      machine)."""
    import functools

    import gguf as gguf_package
    import gguf.gguf_reader as reader_module

    originals = {name: getattr(gguf_package, name) for name in ("GGUFReader", "get_tensor_name_map")}
    for name, original in originals.items():
        setattr(gguf_package, name, functools.lru_cache(maxsize=None)(original))
    numpy = reader_module.np
    reader_module.np = _NumpyReadingIntoMemory(numpy)
    try:
        yield
    finally:
        reader_module.np = numpy
        for name, original in originals.items():
            setattr(gguf_package, name, original)


class _NumpyReadingIntoMemory:
    """numpy, as gguf's reader module sees it, whose `memmap(path)` reads the whole file into an array
    instead."""

    def __init__(self, numpy):
        self._numpy = numpy

    def __getattr__(self, name):
        return getattr(self._numpy, name)

    def memmap(self, path, mode="r"):
        if mode != "r":  # the reader writes through r+ and c maps: leave those to numpy
            return self._numpy.memmap(path, mode=mode)
        return self._numpy.fromfile(path, dtype=self._numpy.uint8)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
