"""The base model's answers, kept on this machine from one run to the next (`eval.reuse_answers`).

Zero-shot, few-shot, retrieval and the prompt search's candidates are the base model answering prompts that do
not depend on what was trained: a rerun, another seed or learning rate, every trial of a sweep asks them again
and gets the same answers. Each call of `answering.answer_all_ended` with the base model is kept in a file of
its own under `paths.cache_root()/answers`, named by a digest of everything that decides its answers: the base
weights (`weights_digest`: each tensor's name, shape, dtype, sum and sum of squares, not a file name), the
model's config and generation config, the tokenizer (class, vocabulary size, special tokens, chat template),
the prompts and references, the generation settings (`answering.generation_settings`: length, beams, batch
size, output format, stop tokens), the dtype and device it ran on, this package's, torch's and transformers'
versions with the source of the answering code, and the machine (the answers' seconds are costs on it). Any
change there answers again. The tuned model is never taken from it.

A file holds the answers, how each ended, the references' summed loss and each answer's seconds: what the
run's evaluation table logs anyway, and no prompt. Prompts with images are not kept.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

from mlflow_finetune_plugin import paths

VERSION = 1  # bump when what decides an answer changes in a way the key does not see


def cache_folder() -> Path:
    return paths.cache_root() / "answers"


def weights_digest(model, base_model=None) -> str | None:
    """A digest of the base weights the prompt-only contenders answer with: `base_model`'s, else `model`'s
    without its adapter's own parameters (a PEFT tuner's `lora_`-style prefix, modules_to_save copies,
    trainable token rows; prompt encoders live outside the base). None where a weight is not in memory (meta
    or offloaded)."""
    import torch

    peft = base_model is None and hasattr(model, "get_base_model")
    target = model.get_base_model() if peft else (base_model if base_model is not None else model)
    prefix = getattr(getattr(model, "base_model", None), "prefix", None) if peft else None
    skip = tuple(s for s in (prefix, "modules_to_save.", "trainable_tokens_") if s) if peft else ()
    config = target.config.to_dict() if hasattr(target, "config") else {}
    config.pop("_name_or_path", None)
    digest = hashlib.sha256(json.dumps([type(target).__name__, config], sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in target.named_parameters():
            if skip and any(s in name for s in skip):
                continue
            if param.device.type == "meta":
                return None
            values = param.detach().as_subclass(torch.Tensor).float()  # a quantized weight's stored values
            digest.update(
                f"{name}|{tuple(param.shape)}|{param.dtype}|{values.sum(dtype=torch.float64).item()!r}|"
                f"{values.square().sum(dtype=torch.float64).item()!r}".encode())
    return digest.hexdigest()


class AnswerCache:
    """The base model's answers in files keyed by everything that decides them (`answering.answer_all_ended`
    looks there first, and keeps what it answered)."""

    def __init__(self, weights: str, folder: Path | None = None):
        self.weights, self.folder = weights, folder or cache_folder()
        self.reused: list[str] = []  # the contenders and candidates whose answers came from the cache

    def key(self, model, tokenizer, prompts, references, cfg) -> str | None:
        """The file name of these answers, or None where they are not kept (images in a prompt)."""
        import torch
        import transformers

        from mlflow_finetune_plugin import __version__
        from mlflow_finetune_plugin.evaluate.answering import generation_settings
        from mlflow_finetune_plugin.models.vision import processor_of

        if processor_of(tokenizer) is not None:
            return None
        generation = getattr(model, "generation_config", None)
        spec = {
            "v": VERSION,
            "versions": [__version__, _code_digest(), torch.__version__, transformers.__version__],
            "machine": [platform.node(), _cpu_name(), os.cpu_count()],
            "weights": self.weights,
            "dtype": str(getattr(model, "dtype", "")),
            "device": str(getattr(model, "device", "")),
            "generation_config": generation.to_diff_dict() if generation is not None else None,
            "tokenizer": [
                type(tokenizer).__name__,
                len(tokenizer),
                tokenizer.special_tokens_map,
                getattr(tokenizer, "chat_template", None),
            ],
            "settings": generation_settings(cfg, model, tokenizer),
            "prompts": prompts,
            "references": references,
        }
        try:
            text = json.dumps(spec, sort_keys=True)
        except TypeError:  # something in a prompt that is not plain JSON (an image object): not kept
            return None
        return hashlib.sha256(text.encode()).hexdigest()

    def lookup(self, model, tokenizer, prompts, references, cfg, name):
        """(key, the kept (answers, endings, nll, counted, seconds) or None); key None: these are not kept."""
        key = self.key(model, tokenizer, prompts, references, cfg)
        kept = self._read(key) if key else None
        if kept is not None and len(kept[0]) != len(prompts):
            kept = None  # not these prompts' answers after all: answer again
        if kept is not None:
            self.reused.append(name)
        return key, kept

    def keep(self, key: str | None, result) -> None:
        if key:
            self._write(key, result)

    def _read(self, key: str):
        try:
            got = json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8"))
            return got["answers"], got["endings"], float(got["nll"]), int(got["counted"]), got["seconds"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not there, or a file cut short: answer again

    def _write(self, key: str, result) -> None:
        answers, endings, nll, counted, seconds = result
        text = json.dumps({"answers": answers, "endings": endings, "nll": nll, "counted": counted,
                           "seconds": seconds}, ensure_ascii=False)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.folder / f"{key}.json")  # whole or not at all, also beside a parallel run
        except OSError as e:
            print(
                f"Note: could not keep the base model's answers in {self.folder} ({e}); the next run answers "
                "again")


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """The source of the modules that turn prompts into answers and scores (an editable install changes them
    without a new version number)."""
    from mlflow_finetune_plugin.evaluate import answering, scoring
    from mlflow_finetune_plugin.models import answers, chat_format, generation

    digest = hashlib.sha256()
    for module in (answering, scoring, answers, chat_format, generation):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def answer_cache(cfg, model, base_model=None) -> AnswerCache | None:
    """The cache for this evaluation's base model, or None: `eval.reuse_answers` off, or weights not in
    memory."""
    if not getattr(cfg, "reuse_answers", False):
        return None
    try:
        weights = weights_digest(model, base_model)
    except Exception as e:  # a weight type this cannot read: answer as if nothing were kept, say why
        print(
            "Note: the base model's answers are not kept for later runs (its weights could not be read for "
            f"the cache's key: {type(e).__name__}: {e})")
        return None
    return AnswerCache(weights) if weights else None
