"""Row checks of each data format: every problem of every row, with its line, before anything trains."""

from __future__ import annotations

import json

from mlflow_finetune_plugin.data.formats import (
    FORMATS,
    ROLES,
    SHAREGPT_TAGS,
    DataError,
    DataIssue,
    common_prefix,
    json_type,
    parse_tool_call,
    parse_tools,
    sharegpt_messages,
    sharegpt_tags,
)
from mlflow_finetune_plugin.data.images import part_problem
from mlflow_finetune_plugin.data.teacher import TEACHER_KEY, check_teacher
from mlflow_finetune_plugin.messages import image_count, text_of


def validate_records(records, fmt, path, tags=None) -> list[DataIssue]:
    """Every problem of every row, with its line: missing/empty fields, wrong types, roles, conversation
    shape."""
    if fmt not in FORMATS:
        raise DataError([DataIssue(str(path), None,
                                   f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")])
    tags = sharegpt_tags(tags)
    check = {"chat": _check_chat, "sharegpt": lambda rec: _check_sharegpt(rec, tags), "alpaca": _check_alpaca,
             "prompt_completion": _check_prompt_completion, "preference": _check_preference,
             "prompt_only": _check_prompt_only, "unpaired_preference": _check_unpaired}[fmt]
    return [DataIssue(str(path), line, msg) for line,
            rec in records for msg in check(rec) + _check_row_fields(rec)]


def _check_row_fields(rec: dict) -> list[str]:
    """The optional per-row columns every format may carry: `system` (text), `tools` and `teacher`
    (`data/teacher.py`)."""
    errors = []
    if rec.get("system") is not None and not isinstance(rec["system"], str):
        errors.append(f"'system' must be a string, got {json_type(rec['system'])}")
    _, tools_error = parse_tools(rec.get("tools"))
    return errors + ([tools_error] if tools_error else []) + check_teacher(rec.get(TEACHER_KEY))


def _check_text(rec: dict, key: str) -> list[str]:
    value = rec.get(key)
    if value is None:
        return [f"missing '{key}'"]
    if not isinstance(value, str):
        return [f"'{key}' must be a string, got {json_type(value)}"]
    return [] if value.strip() else [f"'{key}' is empty"]


def _check_chat(rec: dict) -> list[str]:
    msgs = rec.get("messages")
    if isinstance(msgs, list):
        for i, m in enumerate(msgs):
            if isinstance(m, dict) and m.get("role") in (SHAREGPT_TAGS["user_tag"],
                                                         SHAREGPT_TAGS["assistant_tag"]):
                return [
                    f"messages[{i}]: role {m['role']!r} is a ShareGPT name: set data.format: sharegpt "
                    "(--format sharegpt) and data.tags: {role_tag: role, content_tag: content}, or rename "
                    "the roles to user/assistant"]
    return _check_messages(msgs, "messages")


def _check_sharegpt(rec: dict, tags: dict) -> list[str]:
    field = "conversations" if "conversations" in rec else "messages"
    turns = rec.get(field)
    if not isinstance(turns, list):
        return _check_messages(turns, field)
    messages, errors = sharegpt_messages(turns, tags, field)
    if errors:
        return errors
    return _check_messages(messages, field, content=tags["content_tag"])


def _check_messages(msgs, field: str, end_with_assistant: bool = True, content: str = "content") -> list[str]:
    if msgs is None:
        return [f"missing '{field}'"]
    if not isinstance(msgs, list):
        return [f"'{field}' must be a list of {{role, content}} messages (in a CSV cell: a JSON array), got "
                f"{json_type(msgs)}"]
    if not msgs:
        return [f"'{field}' is an empty list"]
    errors = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            errors.append(f"{field}[{i}] must be an object with 'role' and '{content}', got {json_type(m)}")
        else:
            errors += _check_message(m, f"{field}[{i}]", content)
    roles = [m.get("role") for m in msgs if isinstance(m, dict)]
    if end_with_assistant and roles:
        trained = [m for m in msgs if isinstance(m, dict) and m.get("role") == "assistant" and m.get("weight")
                   != 0]
        if "assistant" not in roles:
            errors.append(f"'{field}' has no assistant message: there is nothing to learn from")
        elif not trained:
            errors.append(
                f"every assistant message in '{field}' has weight 0: there is nothing to learn from; "
                "give at least one weight 1 (or no weight)")
        elif roles[-1] != "assistant":
            errors.append(
                f"'{field}' ends with a {roles[-1]!r} message: training learns the assistant's replies, "
                "so end with an assistant message (or drop the trailing turns)")
    return errors


def _check_message(m: dict, where: str, content_key: str) -> list[str]:
    errors = []
    role, content, calls = m.get("role"), m.get("content"), m.get("tool_calls")
    if role not in ROLES:
        errors.append(f"{where}: missing 'role'" if role is None else
                      f"{where}: unknown role {role!r} (valid: {', '.join(ROLES)})")
    if content is None and not (role == "assistant" and calls):
        errors.append(f"{where}: missing '{content_key}'")
    elif isinstance(content, list):  # parts: text and images (`data/images.py` reads every form)
        errors += [f"{where}.{content_key}[{j}]: {p}" for j,
                   part in enumerate(content) if (p := part_problem(part))]
        if not errors and not image_count(content) and not text_of(content).strip() and not calls:
            errors.append(f"{where} ({role}): empty {content_key}")
    elif content is not None and not isinstance(content, str):
        errors.append(f"{where}: {content_key} must be a string, got {json_type(content)}")
    elif isinstance(content, str) and not content.strip() and not calls:
        errors.append(f"{where} ({role}): empty {content_key}")
    if calls is not None:
        if role != "assistant":
            errors.append(
                f"{where}: only assistant messages make tool calls ('tool_calls' on a {role!r} message)")
        elif not isinstance(calls, list) or not calls:
            errors.append(f"{where}: 'tool_calls' must be a non-empty list of "
                          "{type: function, function: {name, arguments}}")
        else:
            errors += [f"{where}.tool_calls[{j}] "
                       f"{e}" for j, c in enumerate(calls) if (e := parse_tool_call(c)[1])]
    if "weight" in m and m["weight"] is not None:
        if role != "assistant":
            errors.append(
                f"{where}: 'weight' applies to assistant messages only (the loss is on their tokens)")
        elif isinstance(m["weight"], str) or m["weight"] not in (0, 1):
            errors.append(
                f"{where}: weight must be 0 (no loss on this turn) or 1, got {json.dumps(m['weight'])}")
    return errors


def _check_text_or_messages(rec: dict, key: str, end_with_assistant: bool) -> list[str]:
    if isinstance(rec.get(key), list):
        return _check_messages(rec[key], key, end_with_assistant)
    return _check_text(rec, key)


def _check_alpaca(rec: dict) -> list[str]:
    errors = _check_text(rec, "instruction") + _check_text(rec, "output")
    if rec.get("input") is not None and not isinstance(rec["input"], str):
        errors.append(f"'input' must be a string, got {json_type(rec['input'])}")
    return errors


def _check_prompt_completion(rec: dict) -> list[str]:
    return _check_text_or_messages(rec, "prompt", False) + _check_text_or_messages(rec, "completion", True)


def _check_preference(rec: dict) -> list[str]:
    if rec.get("prompt") is None:
        if not (isinstance(rec.get("chosen"), list) and isinstance(rec.get("rejected"), list)):
            return [
                "missing 'prompt': add it, or give chosen and rejected as full conversations (message lists) "
                "that share the prompt turns"]
        errors = _check_messages(rec["chosen"], "chosen") + _check_messages(rec["rejected"], "rejected")
        if not errors and common_prefix(rec["chosen"], rec["rejected"]) == 0:
            errors.append(
                "chosen and rejected share no leading turns, so there is no prompt; add a 'prompt' field")
    else:
        errors = (_check_text_or_messages(rec, "prompt", False) + _check_text_or_messages(rec, "chosen", True)
                  + _check_text_or_messages(rec, "rejected", True))
    if not errors and rec["chosen"] == rec["rejected"]:
        errors.append("chosen and rejected are identical: the pair teaches nothing; fix or drop the row")
    return errors


def _check_prompt_only(rec: dict) -> list[str]:
    """A prompt for the model to answer: non-empty text, or messages whose last turn is the user's."""
    prompt = rec.get("prompt")
    if not isinstance(prompt, list):
        return _check_text(rec, "prompt")
    errors = _check_messages(prompt, "prompt", end_with_assistant=False)
    last = prompt[-1] if prompt and isinstance(prompt[-1], dict) else None
    if not errors and last is not None and last.get("role") != "user":
        errors.append(
            f"'prompt' ends with a {last.get('role')!r} message: the model answers the last user turn, so "
            "end the prompt with a user message")
    return errors


def _check_unpaired(rec: dict) -> list[str]:
    """One answer and its thumb: prompt and completion as for prompt_completion, and `label` a JSON boolean (a
    thumbs-up `true` is desirable, `false` undesirable); text such as "yes" or 1 is refused, not guessed."""
    errors = _check_text_or_messages(rec, "prompt", False) + _check_text_or_messages(rec, "completion", True)
    label = rec.get("label")
    if label is None:
        errors.append("missing 'label': true for a desirable answer, false for an undesirable one")
    elif not isinstance(label, bool):
        errors.append(
            f"'label' must be true (desirable) or false (undesirable), got {json_type(label)} {label!r}")
    return errors
