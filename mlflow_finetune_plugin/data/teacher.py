"""A row's `teacher`: the answer a larger model gave to the row's prompt, with what it cost, where a row
carries it (rows written for distillation, and chat rows made of traces: `trace_rows.py`).

    {"messages": [...], "teacher": {"answer": str, "model": str, "prompt_tokens": int | None,
                                    "completion_tokens": int | None, "latency_s": float | None,
                                    "params": int | None, "concurrency": int | None}}

`params` (the parameters that answered) is known where the teacher ran here (`-e distill` with a registered
teacher); a server or a trace does not say it, and `eval.teacher_params` gives it instead. `concurrency`: the
requests `-e distill` kept in flight when it asked a server; `latency_s` is then a round trip that also waited
for the others (a trace's is one request of the application's, as its user waited for it).

Training ignores it (the rows are trained on their `messages`); the evaluation scores the teacher as a
contender of its own, its answers as logged (`evaluate/teacher.py`). The row's target is its last assistant
message: the teacher's answer, or an expectation that replaced it.
"""

from __future__ import annotations

import json

TEACHER_KEY = "teacher"
_NUMBERS = {"prompt_tokens": int, "completion_tokens": int, "latency_s": (int, float), "params": int,
            "concurrency": int}


def check_teacher(value) -> list[str]:
    """What is wrong with a row's `teacher` value ([] when absent or well formed)."""
    if value is None:
        return []
    if not isinstance(value, dict):
        return [
            f"'{TEACHER_KEY}' must be an object {{answer, model, {', '.join(_NUMBERS)}}}, got "
            f"{type(value).__name__}"]
    errors = []
    if not isinstance(value.get("answer"), str):
        errors.append(f"'{TEACHER_KEY}.answer' must be a string (the teacher's answer)")
    if value.get("model") is not None and not isinstance(value["model"], str):
        errors.append(f"'{TEACHER_KEY}.model' must be a string (the teacher model's name)")
    for key, kind in _NUMBERS.items():
        v = value.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, kind) or v < 0):
            errors.append(f"'{TEACHER_KEY}.{key}' must be a number >= 0 or null, got {v!r}")
    return errors


def teacher_of(row) -> dict | None:
    """The `teacher` of a row (a dict, or the JSON text a dataset column keeps it as); None when the row has
    none."""
    value = row.get(TEACHER_KEY) if isinstance(row, dict) else None
    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, dict) and isinstance(value.get("answer"), str) else None


def teacher_column(records) -> list[str | None] | None:
    """The rows' `teacher` values as JSON text (one Arrow type whatever the fields), or None when no row has
    one."""
    values = [rec.get(TEACHER_KEY) if isinstance(rec, dict) else None for rec in records]
    if not any(v is not None for v in values):
        return None
    return [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]


def teachers(rows) -> list[dict | None]:
    """The `teacher` of each dataset row (a `datasets.Dataset` or dicts), None where a row has none."""
    if hasattr(rows, "column_names") and TEACHER_KEY not in rows.column_names:
        return [None] * len(rows)
    return [teacher_of(row) for row in rows]
