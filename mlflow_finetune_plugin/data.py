"""Training data: read JSONL/JSON/CSV/parquet with line numbers, detect the format, validate, convert to chat."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError

FORMATS = ("chat", "alpaca", "prompt_completion", "preference")
ROLES = ("system", "user", "assistant", "tool")
SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
# The keys that name each format, and how the format is described to a user whose rows fit none.
_KEYS = {"chat": (("messages",), "messages (a list of {role, content})"),
         "alpaca": (("instruction", "output"), "instruction, output (input optional)"),
         "prompt_completion": (("prompt", "completion"), "prompt, completion (strings or message lists)"),
         "preference": (("chosen", "rejected"), "prompt, chosen, rejected (or chosen/rejected as message lists)")}
_CHAT_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected")
_BLANK = re.compile(r"[ \t\r\n]*")
_MAX_LISTED = 20
_DETECT_ROWS = 200


@dataclass
class DataIssue:
    """One problem in a data file, located by line where the format has lines."""

    path: str
    line: int | None
    message: str
    severity: str = "error"  # "error" | "warning"

    def __str__(self):
        return f"{self.path}:{self.line}: {self.message}" if self.line is not None else f"{self.path}: {self.message}"


class DataError(FinetuneError):
    """Bad training data; the message lists every issue found (the first ~20 of them)."""

    def __init__(self, issues: list[DataIssue]):
        self.issues = list(issues)
        n = len(self.issues)
        shown = [str(i) for i in self.issues[:_MAX_LISTED]]
        if n > _MAX_LISTED:
            shown.append(f"... and {n - _MAX_LISTED} more (run `mlflow-finetune data check FILE` for all of them)")
        super().__init__("\n".join([f"{n} problem{'s' if n != 1 else ''} in the data:", *("  " + s for s in shown)]))


def _json_type(value) -> str:
    names = {str: "a string", dict: "an object", list: "a list", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------- reading


def read_records(path) -> list[tuple[int, dict]]:
    """(line_number, record) for every row of a .jsonl/.ndjson/.json/.csv/.parquet file; DataError lists all problems."""
    records, issues = read_records_lenient(path)
    if issues:
        raise DataError(issues)
    return records


def read_records_lenient(path) -> tuple[list[tuple[int, dict]], list[DataIssue]]:
    """Like read_records, but returns (the rows that could be read, the problems) instead of raising."""
    p, name = Path(path), str(path)
    if not p.exists():
        return [], [DataIssue(name, None, f"file not found (looked in {Path.cwd()}); check the path")]
    if p.is_dir():
        return [], [DataIssue(name, None, "is a folder; name a data file (.jsonl, .json, .csv or .parquet)")]
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        return [], [DataIssue(name, None, f"unsupported file type {suffix or '(no suffix)'!r}; use one of "
                                          f"{', '.join(SUFFIXES)} (JSONL: one JSON object per line)")]
    try:
        if suffix == ".parquet":
            records, issues = _read_parquet(p, name), []
        elif suffix in (".jsonl", ".ndjson"):
            records, issues = _read_jsonl(p.read_bytes(), name)
        elif suffix == ".json":
            records, issues = _read_json(_decode(p.read_bytes(), name), name)
        else:
            records, issues = _read_csv(_decode(p.read_bytes(), name), name), []
    except DataError as e:
        return [], e.issues
    if not records and not issues:
        issues = [DataIssue(name, None, "file is empty (no rows); add training examples to it")]
    return records, issues


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError([DataIssue(name, line, f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file "
                                               "as UTF-8")]) from None


def _read_jsonl(raw: bytes, name: str) -> tuple[list[tuple[int, dict]], list[DataIssue]]:
    records, issues = [], []
    for n, chunk in enumerate(raw.split(b"\n"), 1):
        try:
            line = chunk.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            issues.append(DataIssue(name, n, f"not valid UTF-8 (byte 0x{chunk[e.start]:02x} at column {e.start + 1}); "
                                             "re-save the file as UTF-8"))
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            issues.append(DataIssue(name, n, f"invalid JSON: {e.msg} (column {e.colno}); each line must be one "
                                             "complete JSON object"))
            continue
        if isinstance(value, dict):
            records.append((n, value))
        else:
            issues.append(DataIssue(name, n, f"expected a JSON object, got {_json_type(value)}"))
    return records, issues


def _read_json(text: str, name: str) -> tuple[list[tuple[int, dict]], list[DataIssue]]:
    try:
        doc = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
        raise DataError([DataIssue(name, e.lineno, f"invalid JSON: {e.msg} (column {e.colno})")]) from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        items = doc["data"]
    elif isinstance(doc, list):
        items = doc
    else:
        got = f"an object with keys {sorted(doc)}" if isinstance(doc, dict) else _json_type(doc)
        raise DataError([DataIssue(name, 1, f"a .json file must hold a list of objects (or {{\"data\": [...]}}), got "
                                            f"{got}; for one object per line, name the file .jsonl")])
    lines = _item_lines(text, data_key=isinstance(doc, dict)) if items else []
    records, issues = [], []
    for line, item in zip(lines, items):
        if isinstance(item, dict):
            records.append((line, item))
        else:
            issues.append(DataIssue(name, line, f"expected a JSON object, got {_json_type(item)}"))
    return records, issues


def _item_lines(text: str, data_key: bool) -> list[int]:
    """Line where each item of the top-level array (or of the "data" array) starts; the text is valid JSON."""
    raw_decode = json.JSONDecoder().raw_decode

    def ws(i):  # index of the next non-blank character
        return _BLANK.match(text, i).end()

    i = ws(0) + 1
    while data_key:  # walk the object's members up to "data"
        key, i = raw_decode(text, ws(i))
        i = ws(ws(i) + 1)  # past ':'
        if key == "data":
            i += 1
            break
        i = ws(raw_decode(text, i)[1]) + 1  # past ','
    lines, line, prev, i = [], 1, 0, ws(i)
    while text[i] != "]":
        line, prev = line + text.count("\n", prev, i), i
        lines.append(line)
        i = ws(raw_decode(text, i)[1])
        i = ws(i + 1) if text[i] == "," else i
    return lines


def _read_csv(text: str, name: str) -> list[tuple[int, dict]]:
    import pandas as pd

    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return []
    except (pd.errors.ParserError, ValueError) as e:
        raise DataError([DataIssue(name, None, f"not a readable CSV file: {e}")]) from None
    records = []
    for idx, row in enumerate(df.to_dict(orient="records")):
        for key in _CHAT_FIELDS:  # CSV cells can only hold text: message lists arrive as JSON arrays
            value = row.get(key)
            if isinstance(value, str) and value.lstrip().startswith("["):
                with contextlib.suppress(json.JSONDecodeError):
                    row[key] = json.loads(value)
        records.append((idx + 2, row))
    return records


def _read_parquet(p: Path, name: str) -> list[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError([DataIssue(name, None, f"not a readable parquet file: {e}")]) from None
    for row in rows:  # parquet gives every message the union of all messages' keys, missing ones as null
        for key in _CHAT_FIELDS:
            if isinstance(row.get(key), list):
                row[key] = [{k: v for k, v in m.items() if v is not None or k == "content"} if isinstance(m, dict)
                            else m for m in row[key]]
    return [(i + 1, row) for i, row in enumerate(rows)]


# ---------------------------------------------------------------- format


def detect_format(records, path) -> str:
    """The one format the rows' keys name; DataError (keys found vs. keys expected) when unknown or ambiguous."""
    single, ambiguous, first_line = Counter(), [], {}
    for line, rec in records[:_DETECT_ROWS]:
        found = [f for f, (keys, _) in _KEYS.items() if all(k in rec for k in keys)]
        if len(found) == 1:
            single[found[0]] += 1
            first_line.setdefault(found[0], line)
        elif found:
            ambiguous.append((line, rec, found))
    expected = "; ".join(f"{f}: {text}" for f, (_, text) in _KEYS.items())
    how = "pass the format explicitly (--format, or data.format in finetune.yaml)"
    if len(single) == 1:
        fmt = next(iter(single))
        if all(fmt in found for _, _, found in ambiguous):
            return fmt
    if len(single) > 1:
        seen = ", ".join(f"{f} ({n} rows, first at line {first_line[f]})" for f, n in single.most_common())
        raise DataError([DataIssue(str(path), None, f"rows are in different formats: {seen}. Use one format per "
                                                    f"file. Expected keys: {expected}")])
    if ambiguous:
        line, rec, found = ambiguous[0]
        raise DataError([DataIssue(str(path), line, f"ambiguous format: keys {sorted(rec)} fit "
                                                    f"{' and '.join(found)}; {how}. Expected keys: {expected}")])
    line, rec = records[0] if records else (None, {})
    raise DataError([DataIssue(str(path), line, f"unknown format: keys found {sorted(rec)}; expected keys: "
                                                f"{expected}")])


def _turns(value, role: str) -> list[dict]:
    return [dict(m) for m in value] if isinstance(value, list) else [{"role": role, "content": value}]


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and not any(m.get("role") == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def to_messages(record: dict, fmt: str, system_prompt: str | None = None) -> list[dict]:
    """OpenAI-style messages for a chat/alpaca/prompt_completion row (a preference row: prompt + chosen)."""
    if fmt == "chat":
        messages = _turns(record["messages"], "user")
    elif fmt == "alpaca":
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    elif fmt == "prompt_completion":
        messages = _turns(record["prompt"], "user") + _turns(record["completion"], "assistant")
    elif fmt == "preference":
        row = preference_row(record, conversational=True)
        messages = row["prompt"] + row["chosen"]
    else:
        raise DataError([DataIssue("<record>", None, f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")])
    return _with_system(messages, system_prompt)


def preference_row(record: dict, system_prompt: str | None = None, conversational: bool = False) -> dict:
    """prompt/chosen/rejected as TRL's DPOTrainer takes them: all strings, or all message lists (when any field is
    one, with a system prompt, or when asked); a chat-only row's shared leading turns become the prompt."""
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    if prompt is None:  # chat-only form: the shared leading turns are the prompt
        n = _common_prefix(chosen, rejected)
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if conversational or system_prompt or any(isinstance(v, list) for v in (prompt, chosen, rejected)):
        prompt = _with_system(_turns(prompt, "user"), system_prompt)
        chosen, rejected = _turns(chosen, "assistant"), _turns(rejected, "assistant")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---------------------------------------------------------------- validation


def validate_records(records, fmt, path) -> list[DataIssue]:
    """Every problem of every row, with its line: missing/empty fields, wrong types, roles, conversation shape."""
    if fmt not in FORMATS:
        raise DataError([DataIssue(str(path), None, f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")])
    check = {"chat": lambda rec: _check_messages(rec.get("messages"), "messages"), "alpaca": _check_alpaca,
             "prompt_completion": _check_prompt_completion, "preference": _check_preference}[fmt]
    return [DataIssue(str(path), line, msg) for line, rec in records for msg in check(rec)]


def _check_text(rec: dict, key: str) -> list[str]:
    value = rec.get(key)
    if value is None:
        return [f"missing '{key}'"]
    if not isinstance(value, str):
        return [f"'{key}' must be a string, got {_json_type(value)}"]
    return [] if value.strip() else [f"'{key}' is empty"]


def _check_messages(msgs, field: str, end_with_assistant: bool = True) -> list[str]:
    if msgs is None:
        return [f"missing '{field}'"]
    if not isinstance(msgs, list):
        return [f"'{field}' must be a list of {{role, content}} messages (in a CSV cell: a JSON array), got "
                f"{_json_type(msgs)}"]
    if not msgs:
        return [f"'{field}' is an empty list"]
    errors = []
    for i, m in enumerate(msgs):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            errors.append(f"{where} must be an object with 'role' and 'content', got {_json_type(m)}")
            continue
        role = m.get("role")
        if role not in ROLES:
            errors.append(f"{where}: missing 'role'" if role is None else
                          f"{where}: unknown role {role!r} (valid: {', '.join(ROLES)})")
        content = m.get("content")
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            errors.append(f"{where}: missing 'content'")
        elif content is not None and not isinstance(content, str):
            errors.append(f"{where}: content must be a string, got {_json_type(content)}")
        elif isinstance(content, str) and not content.strip() and not m.get("tool_calls"):
            errors.append(f"{where} ({role}): empty content")
    roles = [m.get("role") for m in msgs if isinstance(m, dict)]
    if end_with_assistant and roles:
        if "assistant" not in roles:
            errors.append(f"'{field}' has no assistant message: there is nothing to learn from")
        elif roles[-1] != "assistant":
            errors.append(f"'{field}' ends with a {roles[-1]!r} message: training learns the assistant's replies, "
                          "so end with an assistant message (or drop the trailing turns)")
    return errors


def _check_text_or_messages(rec: dict, key: str, end_with_assistant: bool) -> list[str]:
    if isinstance(rec.get(key), list):
        return _check_messages(rec[key], key, end_with_assistant)
    return _check_text(rec, key)


def _check_alpaca(rec: dict) -> list[str]:
    errors = _check_text(rec, "instruction") + _check_text(rec, "output")
    if rec.get("input") is not None and not isinstance(rec["input"], str):
        errors.append(f"'input' must be a string, got {_json_type(rec['input'])}")
    return errors


def _check_prompt_completion(rec: dict) -> list[str]:
    return _check_text_or_messages(rec, "prompt", False) + _check_text_or_messages(rec, "completion", True)


def _check_preference(rec: dict) -> list[str]:
    if rec.get("prompt") is None:
        if not (isinstance(rec.get("chosen"), list) and isinstance(rec.get("rejected"), list)):
            return ["missing 'prompt': add it, or give chosen and rejected as full conversations (message lists) "
                    "that share the prompt turns"]
        errors = _check_messages(rec["chosen"], "chosen") + _check_messages(rec["rejected"], "rejected")
        if not errors and _common_prefix(rec["chosen"], rec["rejected"]) == 0:
            errors.append("chosen and rejected share no leading turns, so there is no prompt; add a 'prompt' field")
    else:
        errors = (_check_text_or_messages(rec, "prompt", False) + _check_text_or_messages(rec, "chosen", True)
                  + _check_text_or_messages(rec, "rejected", True))
    if not errors and rec["chosen"] == rec["rejected"]:
        errors.append("chosen and rejected are identical: the pair teaches nothing; fix or drop the row")
    return errors


# ---------------------------------------------------------------- loading


def load_training_dataset(path, fmt="auto", system_prompt=None):
    """(datasets.Dataset, format): a `messages` column, or prompt/chosen/rejected for preference data.

    Validates every row first and raises DataError listing all problems; row order is kept.
    """
    from datasets import Dataset

    records = read_records(path)
    fmt = detect_format(records, path) if fmt in (None, "auto") else fmt
    issues = [i for i in validate_records(records, fmt, path) if i.severity == "error"]
    if issues:
        raise DataError(issues)
    if fmt == "preference":
        # one Arrow column cannot hold both strings and message lists: one chat-form row makes them all chat-form
        chat = any(isinstance(rec.get(k), list) for _, rec in records for k in ("prompt", "chosen", "rejected"))
        rows = [preference_row(rec, system_prompt, conversational=chat) for _, rec in records]
    else:
        rows = [{"messages": to_messages(rec, fmt, system_prompt)} for _, rec in records]
    try:
        return Dataset.from_list(rows), fmt
    except (TypeError, ValueError) as e:  # pyarrow's ArrowInvalid/ArrowTypeError subclass these
        raise DataError([DataIssue(str(path), None, f"rows do not share one structure ({e}); give every message "
                                                    "the same keys with the same value types")]) from None


def mlflow_dataset(ds, path, name):
    """An MLflow dataset for `mlflow.log_input`: source = the absolute file path, digest = sha256 (16 hex).

    The digest covers the file's bytes and the rows as loaded: MLflow keeps one input per (name, digest) and run,
    so an eval split of the same file needs a digest of its own to be logged at all.
    """
    import warnings

    import mlflow.data
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    file = Path(path).resolve()
    h = hashlib.sha256(file.read_bytes())
    for batch in ds.iter(batch_size=1000):
        h.update(json.dumps(batch, sort_keys=True, default=str).encode())
    with warnings.catch_warnings():
        # two LocalArtifactDatasetSource classes (schemes "" and "file") both claim a local path: same result
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(file))
    return mlflow.data.from_huggingface(ds, source=source, name=name, digest=h.hexdigest()[:16])
