"""The built-in reward functions a recipe names in `grpo.rewards`: `exact_answer`, `regex` and `json_schema`,
the answer matching they share, and the checks of the parameters a recipe gives them.

Each has TRL's signature, `fn(prompts, completions, **kwargs) -> list[float | None]` (see `calling`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def completion_text(completion) -> str:
    """A completion as text: the string itself, or the content of its (last) assistant message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        contents = [m.get("content") for m in completion if isinstance(m, dict) and m.get("role")
                    == "assistant"]
        content = contents[-1] if contents else None
        if isinstance(content, list):  # content parts
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content or ""
    return "" if completion is None else str(completion)


def _as_number(text: str) -> float | None:
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    return float(text.replace(",", ""))


def _plain(text: str) -> str:
    """Case folded, whitespace collapsed, a final full stop dropped: 'Paris.' equals 'paris'."""
    return " ".join(text.split()).casefold().removesuffix(".").strip()


def final_answer(text: str) -> str:
    """The part of a completion that is its final answer: the last <answer>...</answer>, else the whole
    text."""
    tagged = _ANSWER_TAG.findall(text)
    return (tagged[-1] if tagged else text).strip()


def answer_matches(completion: str, reference) -> bool:
    """Whether `completion`'s final answer equals `reference`.

    The final answer is the last <answer>...</answer> of the completion, else the whole completion. A numeric
    reference (`68`, `-3.5`, `1,234`) matches when the LAST number in the final answer equals it (so "23 + 45
    = 68" and "The answer is 68." match 68, "68 or 69" does not); any other reference matches the whole final
    answer, compared case-insensitively with whitespace collapsed and a trailing full stop ignored.
    """
    answer = final_answer(completion)
    expected = _as_number(str(reference))
    if expected is not None:
        numbers = _NUMBER.findall(answer)
        if not numbers:
            return False
        got = float(numbers[-1].replace(",", ""))
        return math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9)
    return _plain(answer) == _plain(str(reference))


def exact_answer(prompts, completions, answer, **kwargs) -> list[float | None]:
    """1.0 when the completion's final answer equals the row's `answer` column (see `answer_matches`), else
    0.0; None for a row without an answer."""
    return [None if ref is None else float(answer_matches(completion_text(c), ref))
            for c, ref in zip(completions, answer)]


def regex(prompts, completions, pattern: str, fullmatch: bool = False, **kwargs) -> list[float]:
    """1.0 when the completion matches `pattern` (Python `re`, `.` matching newlines too), else 0.0. With
    `fullmatch: true` the whole completion (stripped) must match; else a match anywhere counts, so anchor the
    pattern (^...$) for a format rule."""
    compiled = re.compile(pattern, re.DOTALL)
    match = compiled.fullmatch if fullmatch else compiled.search
    return [float(match(completion_text(c).strip() if fullmatch else completion_text(c)) is not None)
            for c in completions]


def json_schema(prompts, completions, schema=None, **kwargs) -> list[float | None]:
    """1.0 when the completion parses as JSON (a single ```json fenced block is unwrapped) and conforms to
    `schema`: the recipe's (one for every row), else the row's `schema` column (an object, or its JSON text);
    with neither, any valid JSON scores 1.0. The same check as the evaluation's `json_valid` metric
    (`eval.json_schema`): the shipped module, with `jsonschema` where installed."""
    from mlflow_finetune_plugin.metrics import load_metric

    schemas = schema if isinstance(schema, list) else [schema] * len(completions)
    texts = [completion_text(c) for c in completions]
    out: list[float | None] = [None] * len(texts)
    groups: dict[str, list[int]] = {}
    for i, value in enumerate(schemas):
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else None
            except json.JSONDecodeError:
                continue  # an unreadable schema cannot score the answer: None
        if value is not None and not isinstance(value, dict):
            continue
        groups.setdefault(json.dumps(value, sort_keys=True), []).append(i)
    metric = load_metric("json_valid")
    for key, rows in groups.items():
        scores = metric.compute(predictions=[texts[i] for i in rows], schema=json.loads(key),
                                per_example=True)["json_valid_per_example"]
        for i, s in zip(rows, scores):
            out[i] = float(s)
    return out


BUILTINS: dict[str, Callable] = {"exact_answer": exact_answer, "regex": regex, "json_schema": json_schema}
# Each built-in's recipe parameters: name -> required (True) or optional (False).
_BUILTIN_PARAMS = {"exact_answer": {}, "regex": {"pattern": True, "fullmatch": False},
                   "json_schema": {"schema": False}}


def check_builtin_params(builtin: str, params: dict, where: str) -> str | None:
    """The problem with the recipe's parameters for a built-in (unknown or missing ones, a pattern that does
    not compile, a schema that is not a schema), or None."""
    allowed = _BUILTIN_PARAMS[builtin]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        valid = ", ".join(["weight", *allowed])
        return (f"{where} ({builtin}): unknown parameter{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(unknown)}; valid: {valid}")
    missing = [p for p, required in allowed.items() if required and p not in params]
    if missing:
        return f"{where} ({builtin}): needs {', '.join(missing)}, e.g. {{name: regex, pattern: '^\\d+$'}}"
    return _check_builtin_values(builtin, params, where)


def _check_builtin_values(builtin: str, params: dict, where: str) -> str | None:
    if builtin == "regex":
        if not isinstance(params["pattern"], str):
            return f"{where} (regex): pattern must be text, got {type(params['pattern']).__name__}"
        try:
            re.compile(params["pattern"])
        except re.error as e:
            return f"{where} (regex): pattern {params['pattern']!r} is not a valid regular expression: {e}"
        if not isinstance(params.get("fullmatch", False), bool):
            return f"{where} (regex): fullmatch must be true or false"
    if builtin == "json_schema" and params.get("schema") is not None:
        if not isinstance(params["schema"], dict):
            return (f"{where} (json_schema): schema must be a mapping (a JSON Schema), got "
                    f"{type(params['schema']).__name__}")
        try:
            import jsonschema
        except ImportError:
            return None
        try:
            jsonschema.validators.validator_for(params["schema"]).check_schema(params["schema"])
        except jsonschema.SchemaError as e:
            return f"{where} (json_schema): schema is not a valid JSON Schema: {e.message}"
    return None
