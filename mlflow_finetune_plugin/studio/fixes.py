"""The fix of each problem the page lists, as its own column. The checks word most fixes into their message
already ("...; check the path", "... Set data.packing: auto"): that part is the fix. Where a message only says
what is wrong (a value out of range, an unknown key, a broken line), the fix is made from what the key accepts
(the reference's type column, or the schema's constraint) and where it is."""

from __future__ import annotations

import re

from mlflow_finetune_plugin.config.schema import ADAPTER_CONFIGS
from mlflow_finetune_plugin.studio.reference import reference_row

# Words a fix starts with in the checks' messages ("use one of", "Set data.packing: auto", "re-save the
# file").
_VERBS = ("use", "set", "give", "clear", "drop", "remove", "add", "raise", "lower", "put", "point", "run",
          "rename", "install", "pass", "write", "move", "keep", "choose", "pick", "fix", "check", "save",
          "re-save", "make", "name", "shorten", "merge", "leave", "map", "try", "upload", "delete", "replace",
          "start", "split")
_SUGGEST = re.compile(r"Did you mean `([^`]+)`\?")
_VALID = re.compile(r"Valid (\w+)(?: in `([^`]+)`)?[^:]*: (.+?)(?:\. Did you mean|$)")
_NOT_FOUND = re.compile(r"file not found: (.+?) \(looked in (.+?)\)")


def stated_fix(message: str) -> str | None:
    """The fix the message itself states: from the first clause after the first that starts with a fix's
    verb."""
    for match in re.finditer(r"(?:[.;:]\s+|,\s+(?=or\s|and\s)|\(\s*|\bIf [^,.;]+,\s+)", message):
        rest = message[match.end():]
        rest = re.sub(r"^(?:or|and)\s+", "", rest)
        word = rest.split(" ", 1)[0].lower().rstrip(",:")
        if word in _VERBS:
            fix = rest.rstrip(" .")
            while fix.endswith(")") and fix.count(")") > fix.count("("):
                fix = fix[:-1].rstrip(" .")
            return fix[0].upper() + fix[1:]
    return None


def recipe_fix(message: str, key: str | None) -> str:
    """The fix of one of the recipe loader's problems about `key`."""
    if key and (suggest := _SUGGEST.search(message)):
        section = key.rsplit(".", 1)[0] if "." in key else ""
        return f"Rename `{key}` to `{section + '.' if section else ''}{suggest.group(1)}`"
    if key and "unknown key" in message and (valid := _VALID.search(message)):
        return f"Remove `{key}`; {'`' + valid.group(2) + '`' if valid.group(2) else 'the recipe'} takes: " \
               f"{valid.group(3).rstrip('.')}"
    if "invalid YAML" in message:
        return "Fix the YAML at that line (indentation, an unclosed [ or {, a missing space after a colon)"
    if found := _NOT_FOUND.search(message):
        return (f"Put {found.group(1)} in {found.group(2)}, or point {key or 'the key'} at an existing file "
                "(upload one, or type its path)")
    if stated := stated_fix(message):
        return stated
    if key and ("Input should" in message or "valid" in message):
        accepts, default = _accepts(key)
        return (f"Give {key} a value that fits: {accepts}" + (f" (default {default})" if default else "")
                if accepts else f"Give {key} a value of the right type")
    return f"Change {key} on the page (or in finetune.yaml) and check again" if key else \
        "Change the recipe (finetune.yaml) and check again"


def data_fix(message: str, label: str, line: int | None) -> str:
    """The fix of one of the data check's problems in the file of `label` (data.train, ...), at `line`."""
    if message.startswith("invalid JSON"):
        return (f"Make line {line} one complete JSON object (quotes, commas, braces), or delete the line"
                if line is not None else "Make the file valid JSON")
    if message.startswith("expected a JSON object"):
        return f"Make line {line} a JSON object ({{...}}), or delete it" if line is not None else \
            "Give one JSON object per row"
    if stated := stated_fix(message):
        return stated
    if line is not None:
        return f"Fix or remove line {line} of {label}'s file"
    return f"Fix {label}'s file (or point {label} at another) and check again"


def _accepts(key: str) -> tuple[str, str]:
    """(type, default) of a recipe key as the reference writes them; the schema's where it has no row."""
    parts = key.split(".")
    if parts[0] == "adapter":
        for adapter in ADAPTER_CONFIGS:
            if row := reference_row(key, adapter):
                return row[0], row[1]
    elif row := reference_row(key):
        return row[0], row[1]
    from mlflow_finetune_plugin.studio.recipe_form import constraint, field_info

    info = field_info(key)
    if info is None:
        return "", ""
    default = info.get_default(call_default_factory=True)
    return constraint(info), "" if default is None else str(default)
