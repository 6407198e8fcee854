"""Training data: the one reader (JSONL/JSON/CSV/parquet files with line numbers, or `hf:` Hugging Face
datasets), then the formats (`data_formats`: detect, convert to chat; `data_validation`: row checks), and the
loader that gives training a Dataset."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from pathlib import Path

from mlflow_finetune_plugin.data.formats import (  # noqa: F401 - re-exported: the data layer's public names
    FORMATS,
    ROLES,
    DataError,
    DataIssue,
    column_map,
    detect_format,
    json_type,
    map_columns,
    preference_row,
    prompt_only_row,
    resolve_format,
    to_messages,
    tools_of,
    unpaired_row,
)
from mlflow_finetune_plugin.data.images import canonical_rows, has_images, text_contents
from mlflow_finetune_plugin.data.teacher import TEACHER_KEY, teacher_column
from mlflow_finetune_plugin.data.traces import TraceQuery, is_traces, query_of, read_traces
from mlflow_finetune_plugin.data.validation import validate_records  # noqa: F401 - re-exported

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
HF_PREFIX = "hf:"
# Fields whose value may be a list: a CSV cell can only hold text, so lists arrive there as JSON arrays.
_LIST_FIELDS = ("messages", "conversations", "prompt", "completion", "chosen", "rejected", "tools", "images")
_BLANK = re.compile(r"[ \t\r\n]*")
_json_type = json_type


# ---------------------------------------------------------------- reading


def read_records(path, columns=None) -> list[tuple[int, dict]]:
    """(line_number, record) for every row of a file or `hf:` dataset, its columns renamed per `columns`;
    DataError lists all problems."""
    records, issues = read_records_lenient(path, columns)
    if issues:
        raise DataError(issues)
    return records


def read_records_lenient(path, columns=None, columns_key: str = "data.columns"
                         ) -> tuple[list[tuple[int, dict]], list[DataIssue]]:
    """Like read_records, but returns (the rows that could be read, the problems) instead of raising."""
    # CSV cells hold text only: a list arrives as a JSON array, in a field's own column or in the one mapped
    # to it
    lists = _LIST_FIELDS + tuple(col for field, col in column_map(columns).items() if field in _LIST_FIELDS)
    records, issues = _read_source(path, lists)
    if not records:
        return records, issues
    mapped, column_issues = map_columns(records, columns, path, columns_key)
    return mapped, issues + column_issues


def _read_source(path, lists=_LIST_FIELDS) -> tuple[list[tuple[int, dict]], list[DataIssue]]:
    if is_hf(path):
        return _read_hf(str(path))
    if is_traces(path):  # `traces:EXPERIMENT`, or its query with the recipe's data.traces
        got = read_traces(path if isinstance(path, TraceQuery) else query_of(path))
        return got.records, got.issues
    p, name = Path(path), str(path)
    if not p.exists():
        return [], [DataIssue(name, None, f"file not found (looked in {Path.cwd()}); check the path")]
    if p.is_dir():
        return [], [DataIssue(name, None,
                              "is a folder; name a data file (.jsonl, .json, .csv or .parquet), or a "
                              "dataset folder as hf:" + name)]
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
            records, issues = _read_csv(_decode(p.read_bytes(), name), name, lists), []
    except DataError as e:
        return [], e.issues
    if not records and not issues:
        issues = [DataIssue(name, None, "file is empty (no rows); add training examples to it")]
    return records, issues


# ---------------------------------------------------------------- Hugging Face datasets


def is_hf(path) -> bool:
    return isinstance(path, str) and path.startswith(HF_PREFIX)


def parse_hf(spec: str) -> tuple[str, str | None, str]:
    """`hf:ORG/NAME[@REVISION][:SPLIT]` as (name, revision or None, split; default `train`)."""
    rest = spec[len(HF_PREFIX):]
    rest, _, split = rest.partition(":")
    name, _, revision = rest.partition("@")
    return name.strip(), revision.strip() or None, split.strip() or "train"


def _read_hf(spec: str) -> tuple[list[tuple[int, dict]], list[DataIssue]]:
    """Rows of a dataset loaded with `datasets.load_dataset` (the hub, or a local dataset folder); row n is
    line n."""
    import os

    import datasets

    name, revision, split = parse_hf(spec)
    if not name:
        return [], [DataIssue(spec, None, "no dataset named; write hf:ORG/NAME, hf:ORG/NAME:SPLIT or "
                                          "hf:ORG/NAME@REVISION:SPLIT")]
    try:
        ds = datasets.load_dataset(name, split=split, revision=revision)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (hub, network, split, format)
        return [], [DataIssue(spec, None, _hf_problem(name, revision, split, e, os.environ))]
    if not isinstance(ds, datasets.Dataset):
        return [], [DataIssue(spec, None, f"{name!r} did not load as one split; name it: hf:{name}:train")]
    rows = _drop_null_message_keys(ds.to_list())
    if not rows:
        return [], [DataIssue(spec, None, f"split {split!r} of {name!r} has no rows")]
    return [(i + 1, row) for i, row in enumerate(rows)], []


def _hf_problem(name: str, revision: str | None, split: str, err: Exception, env) -> str:
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if env.get(v, "").lower() in ("1", "true",
                                                                                                  "yes")]
    local = (f"datasets.load_dataset({name!r}, split={split!r}"
             f"{f', revision={revision!r}' if revision else ''}).to_json('{name.rsplit('/', 1)[-1]}-{split}"
             ".jsonl')")
    save = (
        f"Load it where the hub is reachable and save it as a local file:\n    python -c \"import datasets; "
        f"{local}\"\nthen point data.train (or data.eval) at that file.")
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, ValueError) and "split" in text.lower():
        return f"the Hugging Face dataset {name!r} has no split {split!r} ({text}); name one: hf:{name}:SPLIT"
    if isinstance(err, ConnectionError) or "offline" in text.lower():
        why = f" ({' and '.join(v + '=1' for v in offline)}: offline mode)" if offline else " (no network?)"
        return f"cannot load the Hugging Face dataset {name!r}: the hub is not reachable{why}. {save}"
    if type(err).__name__ == "DatasetNotFoundError" or isinstance(err, FileNotFoundError):
        return (
            f"the Hugging Face dataset {name!r} was not found ({text}): check the name (ORG/NAME), and "
            f"HF_TOKEN for a private or gated dataset. {save}")
    return f"cannot load the Hugging Face dataset {name!r}: {type(err).__name__}: {text}. {save}"


def _drop_null_message_keys(rows: list[dict]) -> list[dict]:
    """Arrow gives every message the union of all messages' keys, missing ones as null: drop those again."""
    for row in rows:
        for key in _LIST_FIELDS:
            if isinstance(row.get(key), list):
                row[key] = [{k: v for k, v in m.items() if v is not None or k == "content"}
                            if isinstance(m, dict) else m for m in row[key]]
    return rows


# ---------------------------------------------------------------- files


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError([DataIssue(name, line, f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); re-save the "
                                               "file as UTF-8")]) from None


def _read_jsonl(raw: bytes, name: str) -> tuple[list[tuple[int, dict]], list[DataIssue]]:
    records, issues = [], []
    for n, chunk in enumerate(raw.split(b"\n"), 1):
        try:
            line = chunk.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            issues.append(DataIssue(name, n,
                                    f"not valid UTF-8 (byte 0x{chunk[e.start]:02x} at column {e.start + 1}); "
                                    "re-save the file as UTF-8"))
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            issues.append(DataIssue(name, n,
                                    f"invalid JSON: {e.msg} (column {e.colno}); each line must be one "
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
        raise DataError([DataIssue(name, 1,
                                   f"a .json file must hold a list of objects (or {{\"data\": [...]}}), got "
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


def _read_csv(text: str, name: str, lists=_LIST_FIELDS) -> list[tuple[int, dict]]:
    import pandas as pd

    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return []
    except (pd.errors.ParserError, ValueError) as e:
        raise DataError([DataIssue(name, None, f"not a readable CSV file: {e}")]) from None
    records = []
    for idx, row in enumerate(df.to_dict(orient="records")):
        for key in lists:
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
        rows = _drop_null_message_keys(pq.read_table(p).to_pylist())
    except (pa.ArrowException, OSError) as e:
        raise DataError([DataIssue(name, None, f"not a readable parquet file: {e}")]) from None
    return [(i + 1, row) for i, row in enumerate(rows)]


# ---------------------------------------------------------------- loading


def load_training_dataset(path, fmt="auto", system_prompt=None, columns=None, tags=None,
                          format_key="data.format", accepts=(), records=None):
    """(datasets.Dataset, format): a `messages` column (and `tools` where rows have them),
    prompt/chosen/rejected for preference data, or `prompt` (messages) and the rows' other columns for
    prompt_only data (GRPO); with images, message contents as parts and an `images` column (`data/images.py`
    describes the form).

    Reads with `columns` mapped, resolves this file's format (`resolve_format`: auto detects it from these
    rows; `accepts`, the objective's formats), validates every row first and raises DataError listing all
    problems; row order is kept. Messages keep their OpenAI keys (`weight`, `tool_calls`, `tool_call_id`,
    `name`) for the chat template. `records`: rows already read (from traces), named by `path` in messages.
    """
    from datasets import Dataset

    if records is None:
        records = read_records(path, columns)
    fmt, _ = resolve_format(records, fmt, path, tags, format_key, accepts)
    issues = [i for i in validate_records(records, fmt, path, tags) if i.severity == "error"]
    if issues:
        raise DataError(issues)
    rows, _, issues = training_rows(records, fmt, path, system_prompt, tags)
    if issues:
        raise DataError(issues)
    try:
        # Tool-call arguments differ from call to call: Arrow stores such values as JSON instead of one struct
        # that would give every call every other call's argument names, as nulls. The same keeps a prompt_only
        # column whose values differ in type or shape (a JSON schema per row, answers as numbers and text) as
        # written, and content parts as written ({"type": "image"} beside {"type": "text", "text": ...}).
        return Dataset.from_list(rows, on_mixed_types="use_json"), fmt
    except (TypeError, ValueError) as e:  # pyarrow's ArrowInvalid/ArrowTypeError subclass these
        raise DataError([DataIssue(str(path), None,
                                   f"rows do not share one structure ({e}); give every message "
                                   "the same keys with the same value types")]) from None


# The message fields of each format's rows, and those images may stand in (None: all of them).
_FIELDS = {"preference": (("prompt", "chosen", "rejected"), ("prompt",)),
           "unpaired_preference": (("prompt", "completion"), ("prompt",)), "prompt_only": (("prompt",), None)}


def training_rows(records, fmt: str, path, system_prompt=None, tags=None
                  ) -> tuple[list[dict], list[list[str]], list[DataIssue]]:
    """(the rows training reads, one per valid record in order; where each row's images were written; the
    image problems by line). With any image in the data, every row's messages are parts and it has
    `images`."""
    images = has_images(records)
    if fmt == "preference":
        # one Arrow column cannot hold both strings and message lists: one chat-form row makes them all
        # chat-form, and placeholders need messages
        chat = images or any(isinstance(rec.get(k), list) for _, rec in records for k in ("prompt", "chosen",
                                                                                          "rejected"))
        rows = [preference_row(rec, system_prompt, conversational=chat) for _, rec in records]
    elif fmt == "unpaired_preference":
        chat = images or any(isinstance(rec.get(k), list) for _, rec in records for k in ("prompt",
                                                                                          "completion"))
        rows = [unpaired_row(rec, system_prompt, conversational=chat) for _, rec in records]
    elif fmt == "prompt_only":
        rows = [prompt_only_row(rec, system_prompt) for _, rec in records]
    else:
        rows = [{"messages": to_messages(rec, fmt, system_prompt, tags)} for _, rec in records]
        tools = [tools_of(rec) for _, rec in records]
        # TRL hands a row's `tools` (JSON text here: one Arrow type for any schema) to the template
        if any(tools):
            rows = [{**row, "tools": json.dumps(t) if t else None} for row, t in zip(rows, tools)]
        # for evaluation, as JSON text
        if (teachers := teacher_column([rec for _, rec in records])) is not None:
            rows = [{**row, TEACHER_KEY: t} for row, t in zip(rows, teachers)]
    fields, image_fields = _FIELDS.get(fmt, (("messages",), None))
    wheres, issues = [[] for _ in rows], []
    if images:
        rows, wheres, issues = canonical_rows(rows, records, path, fields, data_folder(path), image_fields)
    else:
        rows = [text_contents(row, fields) for row in rows]
    if fmt == "prompt_only":
        # Dataset.from_list takes its columns from the first row: every row gets every column (None where
        # absent)
        names = list(dict.fromkeys(k for row in rows for k in row))
        rows = [{k: row.get(k) for k in names} for row in rows]
        _numbers_among_text_as_text(rows, names)
    return rows, wheres, issues


def data_folder(path) -> Path:
    """The folder relative image paths are read from: the data file's, a local `hf:` dataset folder, else the
    working folder (a hub dataset, rows from traces)."""
    if is_hf(path):
        local = Path(parse_hf(path)[0]).expanduser()
        return local.absolute() if local.is_dir() else Path.cwd()
    if isinstance(path, (str, Path)) and not is_traces(path) and Path(path).suffix:
        return Path(path).expanduser().absolute().parent
    return Path.cwd()


def _numbers_among_text_as_text(rows: list[dict], names: list[str]) -> None:
    """A column mixing text with numbers or booleans (answers `68` and `"n/a"`) becomes text ("68"): Arrow's
    JSON fallback for mixed columns would read text that parses as JSON ("68", "null", "{}") back as that
    value."""
    for name in names:
        kinds = {type(row[name]) for row in rows if row[name] is not None}
        if str in kinds and len(kinds) > 1 and kinds <= {str, int, float, bool}:
            for row in rows:
                if row[name] is not None and not isinstance(row[name], str):
                    row[name] = json.dumps(row[name])


def mlflow_dataset(ds, path, name):
    """An MLflow dataset for `mlflow.log_input`: source = the absolute file path (or the `hf:` dataset, its
    split and revision), digest = sha256 (16 hex).

    The digest covers the file's bytes and the rows as loaded: MLflow keeps one input per (name, digest) and
    run, so an eval split of the same file needs a digest of its own to be logged at all.
    """
    import warnings

    import mlflow.data
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    if is_hf(path):
        hf_name, revision, split = parse_hf(path)
        h = hashlib.sha256(path.encode())
        source = HuggingFaceDatasetSource(path=hf_name, split=split, revision=revision)
    else:
        file = Path(path).resolve()
        h = hashlib.sha256(file.read_bytes())
        with warnings.catch_warnings():
            # two LocalArtifactDatasetSource classes (schemes "" and "file") both claim a local path: same
            # result
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(file))
    for batch in ds.iter(batch_size=1000):
        h.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return mlflow.data.from_huggingface(ds, source=source, name=name, digest=h.hexdigest()[:16])
