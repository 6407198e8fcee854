"""The data formats: what a row looks like in each (detection), and the one converter to chat messages; the
row checks are in `data_validation`, the reader in `data`, the report in `data_check`.

chat (OpenAI fine-tuning format: `messages`, per-turn `weight`, `tool_calls`, `tool` turns, a `tools` list),
sharegpt (`conversations` of {from, value}, LLaMA-Factory's role tags), alpaca, prompt_completion, preference
and prompt_only (TRL's prompt-only data for GRPO: a `prompt` and no answer to imitate; the row's other
columns, such as `answer`, are kept for the reward functions) and unpaired_preference (TRL's unpaired
preference data for KTO: one answer per row, `prompt`, `completion` and a boolean `label`, true for a
desirable answer). A file's own column names are mapped to these by the reader (`data.columns`); everything
after that sees one shape.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from mlflow_finetune_plugin.errors import FinetuneError

FORMATS = ("chat", "sharegpt", "alpaca", "prompt_completion", "preference", "prompt_only",
           "unpaired_preference")
ROLES = ("system", "user", "assistant", "tool")
# The fields `data.columns` can point at another column of the file (LLaMA-Factory's `columns`).
COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected", "label", "system", "tools",
           "instruction", "input", "output", "images")
# ShareGPT role tags, as LLaMA-Factory's dataset_info.json names them (`data.tags` overrides them).
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
# The keys that name each format, and how the format is described to a user whose rows fit none.
_KEYS = {"chat": (("messages",), "messages (a list of {role, content})"),
         "sharegpt": (("conversations",), "conversations (a list of {from, value}: ShareGPT)"),
         "alpaca": (("instruction", "output"), "instruction, output (input optional)"),
         "prompt_completion": (("prompt", "completion"), "prompt, completion (strings or message lists)"),
         "preference": (("chosen", "rejected"),
                        "prompt, chosen, rejected (or chosen/rejected as message lists)"),
         "prompt_only": (("prompt",),
                         "prompt alone (a string or messages ending in a user turn; no completion: "
                         "for grpo, other columns such as answer reach the reward functions)"),
         "unpaired_preference": (("prompt", "completion", "label"),
                                 "prompt, completion, label (true: a desirable answer, false: an undesirable "
                                 "one)")}
# A row with one of these has an answer to learn from: it is not prompt-only data.
_ANSWER_KEYS = ("completion", "chosen", "rejected")
_DETECT_ROWS = 200
_MAX_LISTED = 20
_LINES_SHOWN = 5


@dataclass
class DataIssue:
    """One problem in a data file, located by line where the format has lines. Issues with the same `group`
    (else the same message) in one file are one problem on many rows: reports show them as one line with the
    count."""

    path: str
    line: int | None
    message: str
    severity: str = "error"  # "error" | "warning"
    group: str | None = None

    def __str__(self):
        return (f"{self.path}:{self.line}: "
                f"{self.message}") if self.line is not None else f"{self.path}: {self.message}"


def summarize(issues: list[DataIssue]) -> list[str]:
    """One line per problem: a problem found on several rows is one line with the count and the first few
    lines."""
    groups: dict[tuple, list[DataIssue]] = {}
    for issue in issues:
        groups.setdefault((issue.path, issue.severity, issue.group or issue.message), []).append(issue)
    out = []
    for (path, _, text), items in groups.items():
        if len(items) == 1:
            out.append(str(items[0]))
            continue
        lines = [str(i.line) for i in items if i.line is not None]
        more = f" and {len(lines) - _LINES_SHOWN} more" if len(lines) > _LINES_SHOWN else ""
        out.append(f"{path}: {text} ({len(items)} rows: lines {', '.join(lines[:_LINES_SHOWN])}{more})")
    return out


class DataError(FinetuneError):
    """Bad training data; the message lists every problem found (one line per problem, the first ~20 of
    them)."""

    def __init__(self, issues: list[DataIssue]):
        self.issues = list(issues)
        lines = summarize(self.issues)
        n = len(lines)
        shown = lines[:_MAX_LISTED]
        if n > _MAX_LISTED:
            shown.append(
                f"... and {n - _MAX_LISTED} more (run `mlflow-finetune data check FILE` for all of them)")
        super().__init__("\n".join([f"{n} problem{'s' if n != 1 else ''} in the data:",
                                    *("  " + s for s in shown)]))


def json_type(value) -> str:
    names = {str: "a string", dict: "an object", list: "a list", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def sharegpt_tags(tags=None) -> dict:
    """LLaMA-Factory's ShareGPT tags, with the recipe's (`data.tags`, a dict or its section) over the
    defaults."""
    given = tags.model_dump(exclude_none=True) if hasattr(tags, "model_dump") else dict(tags or {})
    return {**SHAREGPT_TAGS, **given}


# ---------------------------------------------------------------- format


def _is_sharegpt_list(value, tags: dict) -> bool:
    first = next((m for m in value if isinstance(m, dict)), None) if isinstance(value, list) else None
    return first is not None and tags["role_tag"] in first and "role" not in first


def row_formats(rec: dict, tags: dict) -> list[str]:
    """Every format whose keys the row has; a `messages` list of {from, value} turns is ShareGPT, not chat,
    and a prompt with an answer (completion, chosen/rejected) is not prompt-only."""
    found = [f for f, (keys, _) in _KEYS.items() if all(k in rec for k in keys)
             and not (f == "prompt_only" and any(k in rec for k in _ANSWER_KEYS))
             and not (f == "prompt_completion" and "label" in rec)]
    if "chat" in found and _is_sharegpt_list(rec["messages"], tags):
        found = ["sharegpt" if f == "chat" else f for f in found if f != "sharegpt"]
    return found


def detect_format(records, path, tags=None) -> str:
    """The one format the rows' keys name; DataError (keys found vs. keys expected) when unknown or
    ambiguous."""
    tags = sharegpt_tags(tags)
    single, ambiguous, first_line = Counter(), [], {}
    for line, rec in records[:_DETECT_ROWS]:
        found = row_formats(rec, tags)
        if len(found) == 1:
            single[found[0]] += 1
            first_line.setdefault(found[0], line)
        elif found:
            ambiguous.append((line, rec, found))
    how = "pass the format explicitly (--format, or data.format in finetune.yaml)"
    if len(single) == 1:
        fmt = next(iter(single))
        if all(fmt in found for _, _, found in ambiguous):
            return fmt
    if len(single) > 1:
        seen = ", ".join(f"{f} ({n} rows, first at line {first_line[f]})" for f, n in single.most_common())
        raise DataError([DataIssue(str(path), None,
                                   f"rows are in different formats: {seen}. Use one format per "
                                   f"file. Expected keys: {expected_keys()}")])
    if ambiguous:
        line, rec, found = ambiguous[0]
        raise DataError([DataIssue(str(path), line, f"ambiguous format: keys {sorted(rec)} fit "
                                                    f"{' and '.join(found)}; {how}. Expected keys: "
                                                    f"{expected_keys()}")])
    line, rec = records[0] if records else (None, {})
    raise DataError([DataIssue(str(path), line, f"unknown format: keys found {sorted(rec)}; expected keys: "
                                                f"{expected_keys()}. If your columns have other names, map "
                                                "them (data.columns in finetune.yaml, --column with data "
                                                "check), e.g. columns: {prompt: question, completion: "
                                                "answer}")])


def expected_keys() -> str:
    return "; ".join(f"{f}: {text}" for f, (_, text) in _KEYS.items())


def resolve_format(records, fmt, path, tags=None, key: str = "--format", accepts=()) -> tuple[str,
                                                                                              str | None]:
    """(format to read the rows in, what the rows look like or None) of ONE file: `fmt`, or for auto the
    format detected from this file's rows. Training and the pre-flight check both call it per file (train,
    eval, each task), so a recipe's train and eval files may be in different formats.

    `accepts`: the formats the objective trains on; a declared format outside them gives way to the rows' own
    format when that one is accepted (`-e dpo` on preference rows of a `format: chat` recipe). A declared
    format that no row fits while the rows clearly are in another one is one error naming both and the key to
    change (`key`: data.format, --format), not the same missing field reported on every row.
    """
    try:
        seen = detect_format(records, path, tags)
    except DataError:
        if fmt in (None, "auto"):
            raise
        seen = None
    if fmt in (None, "auto") or accepts and fmt not in accepts and seen in accepts:
        return seen, seen
    if fmt not in FORMATS:
        raise DataError([DataIssue(str(path), None,
                                   f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")])
    tags = sharegpt_tags(tags)
    head = records[:_DETECT_ROWS]
    if seen == fmt or any(fmt in row_formats(rec, tags) for _, rec in head):
        return fmt, seen
    if seen is None:
        found = sorted(set().union(*(rec.keys() for _, rec in head)))
        field, column = _KEYS[fmt][0][0], found[0] if found else "COLUMN"
        mapping = (f"--column {field}={column}" if key.startswith("--") else
                   f"{key.rsplit('format', 1)[0]}columns: {{{field}: {column}}}")
        message = (
            f"no row has the keys of {key} {fmt!r} ({_KEYS[fmt][1]}); the rows have the keys {found}. If "
            f"they hold these fields under other names, map them (e.g. {mapping}); else set {key} to the "
            "rows' format")
    else:
        n = sum(seen in row_formats(rec, tags) for _, rec in head)
        message = (
            f"the rows are {seen} data ({_KEYS[seen][1]}; {n} of the first {len(head)} rows), but {key} is "
            f"{fmt!r}, which needs {_KEYS[fmt][1]}. Set {key}: {seen} (or auto, which detects it)")
    raise DataError([DataIssue(str(path), None, message, group="format")])


# ---------------------------------------------------------------- conversion


def _turns(value, role: str) -> list[dict]:
    return [dict(m) for m in value] if isinstance(value, list) else [{"role": role, "content": value}]


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and not any(m.get("role") == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def to_messages(record: dict, fmt: str, system_prompt: str | None = None, tags=None) -> list[dict]:
    """OpenAI-style messages for a chat/sharegpt/alpaca/prompt_completion row (a preference row: prompt +
    chosen; a prompt_only row: the prompt alone).

    Tool-call arguments become objects (what chat templates render); a row's own system message wins over its
    `system` column, which wins over `system_prompt`.
    """
    if fmt == "chat":
        messages = [_openai_message(m) for m in record["messages"]] if isinstance(record["messages"], list) \
            else _turns(record["messages"], "user")
    elif fmt == "sharegpt":
        messages, _ = sharegpt_messages(conversation_of(record), sharegpt_tags(tags))
    elif fmt == "alpaca":
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    elif fmt == "prompt_completion":
        messages = _turns(record["prompt"], "user") + _turns(record["completion"], "assistant")
    elif fmt == "preference":
        row = preference_row(record, conversational=True)
        messages = row["prompt"] + row["chosen"]
    elif fmt == "prompt_only":
        messages = _turns(record["prompt"], "user")
    elif fmt == "unpaired_preference":
        messages = _turns(record["prompt"], "user") + _turns(record["completion"], "assistant")
    else:
        raise DataError([DataIssue("<record>", None,
                                   f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")])
    return _with_system(messages, _row_system(record) or system_prompt)


def prompt_only_row(record: dict, system_prompt: str | None = None) -> dict:
    """A prompt_only row as TRL's GRPOTrainer takes it: `prompt` as messages (with the system prompt, as every
    format gets it) and the row's other columns as they are (they reach the reward functions by name)."""
    extra = {k: v for k, v in record.items() if k not in ("prompt", "system")}
    return {"prompt": to_messages(record, "prompt_only", system_prompt), **extra}


def unpaired_row(record: dict, system_prompt: str | None = None, conversational: bool = False) -> dict:
    """prompt/completion/label as TRL's KTOTrainer takes them: strings, or message lists (when either field is
    one, with a system prompt, or when asked)."""
    prompt, completion = record["prompt"], record["completion"]
    system_prompt = _row_system(record) or system_prompt
    if conversational or system_prompt or isinstance(prompt, list) or isinstance(completion, list):
        prompt = _with_system(_turns(prompt, "user"), system_prompt)
        completion = _turns(completion, "assistant")
    return {"prompt": prompt, "completion": completion, "label": bool(record["label"])}


def _row_system(record: dict) -> str | None:
    value = record.get("system")
    return value if isinstance(value, str) and value.strip() else None


def tools_of(record: dict) -> list[dict] | None:
    """The row's `tools` as OpenAI tool objects ({type: function, function: {...}}); None when it has none."""
    tools, _ = parse_tools(record.get("tools"))
    return tools or None


def conversation_of(record: dict):
    return record["conversations"] if "conversations" in record else record.get("messages")


def _openai_message(m) -> dict:
    if not isinstance(m, dict):
        return m
    out = dict(m)
    if isinstance(m.get("tool_calls"), list):
        out["tool_calls"] = [parse_tool_call(c)[0] for c in m["tool_calls"]]
    return out


def parse_tool_call(call) -> tuple[dict, str | None]:
    """An OpenAI tool call with its JSON-text arguments parsed (chat templates render them as objects), or an
    error."""
    if not isinstance(call, dict):
        return call, ("must be an object {type: function, function: {name, arguments}}, got "
                      f"{json_type(call)}")
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    name, args = fn.get("name"), fn.get("arguments", {})
    if not isinstance(name, str) or not name.strip():
        return call, "has no function name ('function': {'name': ..., 'arguments': ...})"
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return call, f"arguments of {name!r} are not valid JSON ({e.msg})"
    if not isinstance(args, dict):
        return call, f"arguments of {name!r} must be a JSON object, got {json_type(args)}"
    out = {"type": "function", "function": {"name": name, "arguments": args}}
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out, None


def parse_tools(value) -> tuple[list[dict], str | None]:
    """A `tools` value (a list, or its JSON text as LLaMA-Factory stores it) as OpenAI tool objects, or an
    error."""
    if value is None or value == "":
        return [], None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            return [], f"'tools' is not valid JSON ({e.msg})"
    if not isinstance(value, list):
        return [], ("'tools' must be a list of {type: function, function: {name, parameters}}, got "
                    f"{json_type(value)}")
    tools = []
    for i, tool in enumerate(value):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            return [], f"tools[{i}] must be an object {{type: function, function: {{name, parameters}}}}"
        tools.append({"type": "function", "function": fn})
    return tools, None


def sharegpt_messages(turns, tags: dict, field: str = "conversations") -> tuple[list[dict], list[str]]:
    """ShareGPT turns as chat messages (human -> user, gpt -> assistant, function_call -> an assistant tool
    call, observation -> tool; names per `tags`), and the problems found; one message per turn, in order."""
    roles = {"user": "user", "assistant": "assistant", "system": "system", "tool": "tool",
             tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system",
             tags["observation_tag"]: "tool", tags["function_tag"]: "function_call"}
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    valid = ", ".join(tags[t] for t in ("system_tag", "user_tag", "assistant_tag", "function_tag",
                                        "observation_tag"))
    messages, errors = [], []
    for i, turn in enumerate(turns if isinstance(turns, list) else []):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            errors.append(
                f"{where} must be an object with '{role_tag}' and '{content_tag}', got {json_type(turn)}")
            messages.append(turn)
            continue
        tag, value = turn.get(role_tag), turn.get(content_tag)
        role = roles.get(tag) if isinstance(tag, str) else None
        if role is None:
            errors.append(f"{where}: missing '{role_tag}'" if tag is None else
                          f"{where}: unknown {role_tag} {tag!r} (valid: {valid}; data.tags maps other names)")
            role = tag
        message = {"role": role, "content": value}
        if role == "function_call":
            calls, error = _function_calls(value)
            if error:
                errors.append(f"{where} ({tag}): {error}")
            message = {"role": "assistant", "content": None, "tool_calls": calls}
        if "weight" in turn:
            message["weight"] = turn["weight"]
        messages.append(message)
    return messages, errors


def _function_calls(value) -> tuple[list[dict], str | None]:
    """A ShareGPT function_call turn's value: JSON {"name": ..., "arguments": {...}} (or a list of them)."""
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as e:
        return [], f"value must be JSON {{\"name\": ..., \"arguments\": {{...}}}} ({e.msg})"
    calls = []
    for call in parsed if isinstance(parsed, list) else [parsed]:
        out, error = parse_tool_call(call)
        if error:
            return [], f"tool call {error}"
        calls.append(out)
    return calls, None if calls else "value holds no tool call"


def preference_row(record: dict, system_prompt: str | None = None, conversational: bool = False) -> dict:
    """prompt/chosen/rejected as TRL's DPOTrainer takes them: all strings, or all message lists (when any
    field is one, with a system prompt, or when asked); a chat-only row's shared leading turns become the
    prompt."""
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    system_prompt = _row_system(record) or system_prompt
    if prompt is None:  # chat-only form: the shared leading turns are the prompt
        n = common_prefix(chosen, rejected)
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if conversational or system_prompt or any(isinstance(v, list) for v in (prompt, chosen, rejected)):
        prompt = _with_system(_turns(prompt, "user"), system_prompt)
        chosen, rejected = _turns(chosen, "assistant"), _turns(rejected, "assistant")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---------------------------------------------------------------- columns


def column_map(columns) -> dict[str, str]:
    """`data.columns` (a dict or its section) as {field: column of the file}, fields named as themselves left
    out."""
    given = columns.model_dump(exclude_none=True) if hasattr(columns, "model_dump") else dict(columns or {})
    return {field: col for field, col in given.items() if col and col != field}


def map_columns(records, columns, path, key: str = "data.columns") -> tuple[list[tuple[int, dict]],
                                                                            list[DataIssue]]:
    """Rows with the file's columns renamed to the fields they hold (`columns`: {field: column of the file}).

    A column no row has is one error naming it and the columns that exist; a column some rows lack is an error
    on those rows (the optional `system`, `tools`, `input` and `images` may be absent from some).
    """
    given = column_map(columns)
    if not given or not records:
        return records, []
    name, issues = str(path), []
    present = set().union(*(rec.keys() for _, rec in records))
    for field, col in given.items():
        if field not in COLUMNS:
            issues.append(DataIssue(name, None, f"{key}.{field}: not a field; valid: {', '.join(COLUMNS)}"))
        elif col not in present:
            issues.append(DataIssue(name, None, f"{key}.{field}: no row has a column {col!r}; the rows have: "
                                                f"{', '.join(sorted(present))}"))
    if issues:
        return [], issues
    out = []
    for line, rec in records:
        rec = dict(rec)
        for field, col in given.items():
            if col in rec:
                rec[field] = rec.pop(col)
            elif field not in ("system", "tools", "input", "images"):
                issues.append(DataIssue(name, line, f"missing column {col!r} ({key}.{field})"))
        out.append((line, rec))
    return out, issues
