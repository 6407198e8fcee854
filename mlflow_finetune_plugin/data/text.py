"""Files of general text (no roles, no answers): paragraphs of a .txt file separated by blank lines, or the
`text` of each row of a .jsonl file. The forgetting check scores such a set (`eval.forgetting`) and replay
trains on one (`data.replay`); both read it here, and a bad file is reported by the recipe key that names it,
and by line."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError


def read_texts(path: str | Path, key: str) -> list[str]:
    """The texts of `path`; `key` (e.g. `eval.forgetting`) names the recipe key in errors."""
    path = Path(path)
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FinetuneError(f"{key}: cannot read {path}: {e}. Give a UTF-8 .txt or .jsonl file, or set "
                            f"{key}: false") from None
    if path.suffix == ".jsonl":
        texts = [_jsonl_text(path, n, line, key) for n, line in enumerate(content.splitlines(),
                                                                          1) if line.strip()]
    else:
        texts = [p.strip() for p in re.split(r"\n\s*\n", content) if p.strip()]
    if not texts:
        raise FinetuneError(
            f"{key}: {path} holds no text; write paragraphs separated by blank lines (.txt) or "
            f"{{\"text\": ...}} rows (.jsonl), or set {key}: false")
    return texts


def _jsonl_text(path: Path, n: int, line: str, key: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise FinetuneError(f"{path}:{n}: not valid JSON ({e.msg}); {key} rows are {{\"text\": "
                            "\"...\"}") from None
    if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
        raise FinetuneError(f"{path}:{n}: expected {{\"text\": \"...\"}} with non-empty text ({key})")
    return row["text"]
