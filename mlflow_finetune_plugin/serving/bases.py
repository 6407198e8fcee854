"""Base models served by their own name (`openai-api`: the models it fine-tunes answer at /v1/chat/completions
beside their fine-tunes, so both are compared through one endpoint).

A base is served as runs train it: with the chat template a run picks over the tokenizer's own
(`model.chat_template`, or the built-in default: gemma3's `gemma`), and stopping at its end of turn. Where the
run keeps the tokenizer's own template, that is the model's folder (a built-in model's cached folder, a local
folder) or hub id as it is; otherwise a copy made once in the cache whose tokenizer carries the chosen
template (the embeddings grown for the template's added tokens, as the fine-tunes' `:base` side is,
`logged_model.load_logged_base`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path


def served_base(model_cfg) -> str:
    """What `transformers serve` loads for base `model_cfg` (a recipe's `model:` section): a folder or a hub
    id."""
    from mlflow_finetune_plugin.models.base import chosen_chat_template, resolve_model_path

    path = resolve_model_path(model_cfg.name)
    template = chosen_chat_template(model_cfg)
    if template is None:
        return path
    from filelock import FileLock

    from mlflow_finetune_plugin.paths import cache_root

    digest = hashlib.sha256(f"{path}:{model_cfg.revision}:{template}".encode()).hexdigest()[:10]
    dest = cache_root() / "serving" / "bases" / digest / re.sub(r"[^A-Za-z0-9._-]+", "_",
                                                                model_cfg.name or "tiny")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if not (dest / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
            try:
                _write_base(model_cfg, template, tmp)
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def _write_base(model_cfg, template: str, out: Path) -> None:
    import torch

    from mlflow_finetune_plugin.logged_model import load_logged_base
    from mlflow_finetune_plugin.models.base import load_tokenizer
    from mlflow_finetune_plugin.models.generation import stop_at_every_end_of_turn

    tokenizer = load_tokenizer(model_cfg.name, model_cfg.revision, model_cfg.trust_remote_code, template)
    model = load_logged_base({"base_model": model_cfg.name, "base_revision": model_cfg.revision,
                              "vocab_size": len(tokenizer)}, torch.float32)
    stop_at_every_end_of_turn(model, tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
