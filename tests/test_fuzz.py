"""Bad input, fuzzed: generated recipe files, `-P` overrides and data files (wrong types, missing fields,
broken YAML/JSON, empty files, huge lines, wrong encodings) go through the validation the backend runs before
any run exists. Each either passes or ends in a FinetuneError; never another exception. The error is read,
problem by problem: the place it names must be the right one (a line of the file that holds the key, a -P flag
that was given, rows that are wrong the way it says) and it must say what to do (the valid keys and the
nearest one for a typo, the type expected, re-saving as UTF-8, the `data check` command). A table of cases
pins the exact words; some of them run end to end through `mlflow run`: non-zero exit, no traceback, no
RUNNING run. The number of cases tried is printed (and recorded as a property of each test)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import mlflow
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient

from mlflow_finetune_plugin.backend import resolve_entry_point
from mlflow_finetune_plugin.config.presets import PRESETS
from mlflow_finetune_plugin.config.schema import SHORT_KEYS, Recipe
from mlflow_finetune_plugin.errors import FinetuneError, RecipeError
from tests.helpers import REPO, chat_rows

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=bool(os.environ.get("CI")),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
VALID_RECIPE = {"train": {"max_steps": 2, "batch_size": 2}, "eval": {"enabled": False}}
GOOD_ROWS = chat_rows(4)


def _dotted_keys(node: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in node.items():
        if isinstance(value, dict):
            out += _dotted_keys(value, f"{prefix}{key}.")
        elif key != "project_dir":
            out.append(f"{prefix}{key}")
    return out


KEYS = _dotted_keys(Recipe().model_dump())
SECTIONS = sorted({k.split(".")[0] for k in KEYS if "." in k})

# ------------------------------------------------------------------------------------------------ strategies

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=30), st.sampled_from(["", "-1", "0", "1e-3", "true", "null", "[q, v]",
                                                           "~"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(SECTIONS),
                 st.sampled_from(["train.lerning_rate", "lora.rank", "data.trian", "modle.name",
                                  "train.max_steps.x", "data.columns.prompt", "data.columns.messages",
                                  "data.columns.promt", "data.tags.role_tag", "data.tags.user_tag",
                                  "data.tags.speaker"]), st.text(alphabet="abcdefghij._", min_size=1,
                                                                 max_size=15))


@st.composite
def mutated_recipe(draw) -> dict:
    """A valid recipe with 1-4 keys set to values of any type, or whole sections replaced or dropped."""
    raw = json.loads(json.dumps(VALID_RECIPE))
    for _ in range(draw(st.integers(1, 4))):
        key = draw(keys)
        value = draw(json_values)
        parts = [p for p in key.split(".") if p] or ["x"]
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if draw(st.booleans()) and parts[-1] in node:
            del node[parts[-1]]  # a missing field
        else:
            node[parts[-1]] = value
    return raw


def _yaml(raw) -> bytes:
    return yaml.safe_dump(raw, allow_unicode=True).encode("utf-8")


recipe_files = st.one_of(
    mutated_recipe().map(_yaml),
    st.text(max_size=300).map(lambda t: t.encode("utf-8")),                        # mostly broken YAML
    st.binary(max_size=300),                                                       # not text at all
    st.just(b""),                                                                  # empty file
    st.sampled_from(["utf-16", "latin-1", "cp1252"]).map(                          # wrong encodings
        lambda enc: ("# réglages\n" + _yaml(VALID_RECIPE).decode()).encode(enc)),
    st.integers(10_000, 300_000).map(lambda n: _yaml(VALID_RECIPE) + b"# " + b"x" * n + b"\n"),  # huge line
    st.integers(10_000, 300_000).map(lambda n: _yaml({**VALID_RECIPE, "data": {"system_prompt": "y" * n}})),
    json_values.map(_yaml),                                                        # not a mapping of sections
)
overrides = st.dictionaries(keys, json_values.map(lambda v: v if isinstance(v, str) else json.dumps(v)),
                            max_size=3)


def _row_line(kind_and_value) -> str:
    kind, value = kind_and_value
    if kind == "json":
        return json.dumps(value)
    if kind == "text":
        return value
    if kind == "huge":
        return json.dumps({"messages": [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "a" * value}]})
    if kind == "messages":
        return json.dumps({"messages": value})
    if kind == "message":
        return json.dumps({"messages": [{"role": "user", "content": "q"}, value]})
    if kind == "conversations":
        return json.dumps({"conversations": value})
    if kind == "turn":
        return json.dumps({"conversations": [{"from": "human", "value": "q"}, value]})
    if kind == "tools":
        return json.dumps({**GOOD_ROWS[0], "tools": value})
    return json.dumps(value)


# The formats users bring besides plain chat: ShareGPT (with a tool call), OpenAI weights and tool calls, and
# rows whose fields have other names (the recipes below map some of them).
NEW_FORMAT_ROWS = [
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "q"},
                       {"from": "gpt", "value": "a"}]},
    {"conversations": [{"from": "human", "value": "weather?"},
                       {"from": "function_call",
                        "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
                       {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}],
     "tools": '[{"name": "get_weather", "parameters": {"type": "object"}}]'},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "wrong", "weight": 0},
                  {"role": "user", "content": "again"}, {"role": "assistant", "content": "right",
                                                         "weight": 1}]},
    {"messages": [{"role": "user", "content": "weather?"},
                  {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                      "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                  {"role": "assistant", "content": "Sunny."}],
     "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]},
    {"question": "q", "answer": "a", "persona": "Be brief."},
    {"dialog": [{"speaker": "customer", "text": "q"}, {"speaker": "agent", "text": "a"}]},
]
DATA_RECIPES = [
    VALID_RECIPE,
    {**VALID_RECIPE, "data": {"columns": {"prompt": "question", "completion": "answer",
                                          "system": "persona"}}},
    {**VALID_RECIPE, "data": {"format": "sharegpt", "columns": {"messages": "dialog"},
                              "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "customer",
                                       "assistant_tag": "agent"}}},
    {**VALID_RECIPE, "data": {"format": "chat", "strict": True}},
]


lines = st.one_of(
    st.sampled_from(GOOD_ROWS).map(lambda r: ("row", r)),
    st.sampled_from([{"instruction": "i", "output": "o"}, {"prompt": "p", "completion": "c"},
                     {"prompt": "p", "chosen": "c", "rejected": "r"}]).map(lambda r: ("row", r)),
    json_values.map(lambda v: ("json", v)),                                        # wrong types
    st.text(max_size=80).map(lambda t: ("text", t.replace("\n", " "))),            # broken JSON
    st.integers(10_000, 500_000).map(lambda n: ("huge", n)),                       # huge line
    json_values.map(lambda v: ("messages", v)),                                    # wrong `messages`
    st.dictionaries(st.sampled_from(["role", "content", "name", "weight", "tool_calls", "tool_call_id"]),
                    json_values, max_size=3).map(lambda m: ("message", m)),        # missing/odd fields
    # ShareGPT, OpenAI, other names
    st.sampled_from(NEW_FORMAT_ROWS).map(lambda r: ("row", r)),
    json_values.map(lambda v: ("conversations", v)),                               # wrong ShareGPT turns
    st.dictionaries(st.sampled_from(["from", "value", "weight"]), json_values, max_size=3).map(
        lambda t: ("turn", t)),                                                    # odd ShareGPT turn
    json_values.map(lambda v: ("tools", v)),                                       # wrong `tools`
)


@st.composite
def data_files(draw) -> bytes:
    body = "\n".join(_row_line(x) for x in draw(st.lists(lines, max_size=8)))
    if draw(st.booleans()):
        body += "\n"
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16", "latin-1", "binary", "empty"]))
    if encoding == "binary":
        return draw(st.binary(max_size=300))
    if encoding == "empty":
        return b"" if draw(st.booleans()) else b"\n\n"
    return (body + ("é" if encoding == "latin-1" else "")).encode(encoding, errors="replace")


# ------------------------------------------------------------------------------------------------ the
# property


def _validate(recipe_bytes: bytes, data_bytes: bytes, params: dict, entry_point: str = "lora") -> str:
    """Run the backend's validation on a fresh project; 'ok', or 'refused' with a FinetuneError that names the
    place and says what to do (checked by `_says_where_and_what`). Anything else fails the test (hypothesis
    shrinks it to a minimal example)."""
    with tempfile.TemporaryDirectory() as tmp:
        proj = Path(tmp) / "proj"
        (proj / "data").mkdir(parents=True)
        (proj / "finetune.yaml").write_bytes(recipe_bytes)
        (proj / "data" / "train.jsonl").write_bytes(data_bytes)
        try:
            recipe, _ = resolve_entry_point(str(proj), entry_point, params)
        except FinetuneError as e:
            _says_where_and_what(e, recipe_bytes, data_bytes, params, proj)
            return "refused"
        # Passed: the training process's first step, reading the data for real, must agree.
        from mlflow_finetune_plugin.data.splits import load_splits

        try:
            load_splits(recipe)
        except FinetuneError as e:
            path = str(proj / "data" / "train.jsonl")
            _data_problems_say_where(_data_problems(str(e).split("\n", 1)[1], path), data_bytes, path)
            return "refused when training starts"
        return "ok"


# ------------------------------------------------------------------------------------------------ reading the
# error

# A problem's place, where it has one: the YAML line (and column) or the -P flag; the rest names the recipe
# key.
YAML_LINE = re.compile(r"line (\d+)(?:, column \d+)?: ")
UNKNOWN_KEY = re.compile(
    r"(?P<key>.*): unknown key\. Valid keys(?: in `(?P<section>[^`]*)`(?: \(\w+ adapter\))?)?: "
    r"(?P<valid>[\w, ()]+?)(?:\. Did you mean `(?P<guess>\w+)`\?)?", re.S)
WRONG_VALUE = re.compile(r"(?P<key>.+?): (?P<expected>[A-Z].*) \(got (?P<got>.*)\)", re.S)
# Problems of the whole file, or of a key, worded by the loader; each ends with the fix or the valid choices.
WHOLE_FILE = re.compile(r"not valid UTF-8 \(.+ at byte (?P<byte>\d+)\); save the file as UTF-8"
                        r"|invalid YAML: .+"
                        r"|the top level must be a mapping of sections, got (?P<type>\w+)", re.S)
KEY_PROBLEMS = [re.compile(pattern, re.S) for pattern in (
    r"(?P<key>\w+): must be a mapping of keys \(got .*\)",
    r"(?P<key>method): unknown method .+\. Valid methods: \w+(, \w+)*.*",
    r"(?P<key>adapter\.type): unknown adapter .+\. Valid adapters: \w+(, \w+)*.*",
    r"(?P<key>[\w.]+): file not found: .+ \(looked in .+\).*",
)]
# The deliberate typos of the `keys` strategy and the key each must be told about.
TYPOS = {"lerning_rate": "learning_rate", "trian": "train", "modle": "model", "promt": "prompt"}
# What a key named in a problem may start with: a recipe section, or one of the older per-method sections.
SECTION_NAMES = {*Recipe.model_fields, *PRESETS}
# What the rest of a problem must offer where it is none of the shapes above (the combination checks): the
# fix.
REMEDY = re.compile(r"\b(Set|set|Use|use|give|raise|lower|move|write|add|e\.g\.|needs|must)\b")


def _says_where_and_what(error: FinetuneError, recipe_bytes: bytes, data_bytes: bytes, params: dict,
                         proj) -> None:
    message = str(error)
    assert message.strip() and "Traceback" not in message
    if isinstance(error, RecipeError):
        n = len(error.problems)
        assert n and error.source.endswith("finetune.yaml")
        assert message.splitlines()[0] == f"{error.source}: {n} problem{'s' if n != 1 else ''} in the recipe:"
        for problem in error.problems:
            _recipe_problem_says_where_and_what(problem, recipe_bytes, params)
        return
    path = str(proj / "data" / "train.jsonl")
    fix = f"Run `mlflow-finetune data check {path}` for the full report."
    head, body = message.split("\n", 1)
    n = int(re.fullmatch(r"(\d+) problems? in the data; nothing was started:", head)[1])
    assert body.endswith("\n" + fix), message
    problems = _data_problems(body[:-len(fix) - 1], path)
    assert len(problems) == min(n, 20) + (n > 20), message
    _data_problems_say_where(problems, data_bytes, path)


def _data_problems(body: str, path: str) -> list[str]:
    """The problem lines of a data error (a problem may quote a column name with a line break in it)."""
    return re.split(rf"\n(?=  {re.escape(path)}:|  \.\.\. and )", body)


def _recipe_problem_says_where_and_what(problem: str, recipe_bytes: bytes, params: dict) -> None:
    """One problem of a RecipeError: where it is (a YAML line holding the key, the -P flag that set it, or the
    key itself) and what to do (the valid keys or choices, the type expected, the fix)."""
    rest, line, flag = problem, None, None
    if m := YAML_LINE.match(problem):
        line, rest = int(m[1]), problem[m.end():]
    elif flag := next((k for k, v in params.items() if problem.startswith(f"-P {k}={v}: ")), None):
        rest = problem[len(f"-P {flag}={params[flag]}: "):]
    key = None
    if m := WHOLE_FILE.fullmatch(rest):
        assert flag is None, problem
        if m["byte"]:
            with pytest.raises(UnicodeDecodeError) as bad:
                recipe_bytes.decode("utf-8")
            assert bad.value.start == int(m["byte"]), problem
        if m["type"]:
            assert type(yaml.safe_load(recipe_bytes.decode("utf-8"))).__name__ == m["type"], problem
    elif m := UNKNOWN_KEY.fullmatch(rest):
        key, valid = m["key"], m["valid"].split(", ")
        assert valid == ["(none)"] or key.rsplit(".", 1)[-1] not in valid, problem
        assert not m["section"] or key.startswith(m["section"] + "."), problem
        assert not m["guess"] or m["guess"] in valid, problem
        if key.rsplit(".", 1)[-1] in TYPOS:
            assert m["guess"] == TYPOS[key.rsplit(".", 1)[-1]], f"no `Did you mean`: {problem}"
    elif m := WRONG_VALUE.fullmatch(rest) or next(filter(None, (p.fullmatch(rest) for p in KEY_PROBLEMS)),
                                                  None):
        key = m["key"]
        assert key.split(".")[0] in SECTION_NAMES, problem
    elif flag and re.fullmatch(r"`.+` is a value, not a section", rest, re.S):
        pass
    else:  # a combination of keys: it names the first and says what to change
        key = re.match(r"[\w./]*", rest)[0]
        assert key.split(".")[0] in SECTION_NAMES and REMEDY.search(rest), ("says neither where nor what: "
                                                                            f"{problem}")
    if line is not None:
        _names_a_line_of_the_file(line, key, recipe_bytes, problem)
    if flag is not None and key is not None:
        assert key.split(".")[0] == SHORT_KEYS.get(flag, flag).split(".")[0], problem
    # Without a line or a flag the key is the place; an empty one (`-P .=x`) shows as nothing before the
    # colon.
    assert line is not None or flag is not None or key or WHOLE_FILE.fullmatch(rest) or \
        key == "" and any(k.split(".")[0] == "" for k in params), f"says not where: {problem}"


def _names_a_line_of_the_file(line: int, key: str | None, recipe_bytes: bytes, problem: str) -> None:
    """The line is in the file (YAML counts every kind of line break), and holds the key where it is written
    plainly (a key of other characters may be quoted and escaped there)."""
    lines = re.split(r"\r\n|[\n\r\x85\u2028\u2029]", recipe_bytes.decode("utf-8"))
    assert 1 <= line <= len(lines), problem
    parts = key.split(".") if key else []
    if parts and all(re.fullmatch(r"[A-Za-z_]\w*", p) for p in parts):
        assert any(p in lines[line - 1] for p in parts), f"line {line} is {lines[line - 1]!r}: {problem}"


def _data_problems_say_where(problems: list[str], data_bytes: bytes, path: str) -> None:
    """Each line of a data error names the file, and the rows it blames are rows of it that are wrong that
    way."""
    rows = data_bytes.split(b"\n")
    for problem in problems:
        if problem.strip().startswith("... and "):
            continue
        assert problem.startswith(f"  {path}:"), problem
        rest = problem[len(f"  {path}:"):]
        if m := re.match(r"(\d+): ", rest):
            blamed, rest = [int(m[1])], rest[m.end():]
        else:  # a problem of the file, or of several rows: `PATH: what (N rows: lines a, b, c)`
            rest = rest.removeprefix(" ")
            many = re.search(r" \(\d+ rows: lines ([\d, ]+)(?: and \d+ more)?\)$", rest)
            blamed = [int(n) for n in many[1].split(", ")] if many else []
        for n in blamed:
            assert 1 <= n <= len(rows) and rows[n - 1].strip(), problem
            _row_is_wrong_that_way(rows[n - 1], n, rest, problem)


def _row_is_wrong_that_way(row: bytes, n: int, rest: str, problem: str) -> None:
    """Row `n` holds what the problem says of it: the byte it names where it names one, broken JSON, or JSON
    that is not an object."""
    if m := re.match(r"not valid UTF-8 \(byte 0x([0-9a-f]{2}) at column (\d+)\); re-save the file as UTF-8",
                     rest):
        assert row[int(m[2]) - 1] == int(m[1], 16), problem
        return
    if rest.startswith(("invalid JSON", "expected a JSON object")):
        text = row.decode("utf-8-sig" if n == 1 else "utf-8")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            assert rest.startswith("invalid JSON") and ("each line must be one complete JSON "
                                                        "object") in rest, problem
        else:
            assert rest.startswith("expected a JSON object") and not isinstance(value, dict), problem


def _report(counts: Counter, what: str, capsys, record_property) -> None:
    total = sum(counts.values())
    record_property("fuzz_cases", total)
    with capsys.disabled():
        print(f"\n[fuzz] {what}: {total} cases tried ({dict(counts)})")


def test_fuzzed_recipes_and_overrides_end_in_a_clear_error(capsys, record_property):
    counts = Counter()
    valid_data = "".join(json.dumps(r) + "\n" for r in GOOD_ROWS).encode()

    @FUZZ
    @given(recipe=recipe_files, params=st.one_of(st.just({}), overrides),
           entry_point=st.sampled_from(["lora", "lora", *PRESETS]))
    def check(recipe, params, entry_point):
        counts[_validate(recipe, valid_data, params, entry_point)] += 1

    check()
    _report(counts, "recipe files and -P overrides", capsys, record_property)
    assert counts["refused"] > EXAMPLES // 2  # the generators really do produce bad input


def test_a_method_that_is_no_name_beside_an_untyped_adapter_section_is_a_clear_error(tmp_path):
    # Found by the fuzzer in CI: `method: []` with an `adapter:` section without a type raised TypeError (a
    # list is no key of the presets) inside the recipe loader instead of the recipe's own error.
    recipe = b"adapter: {}\neval:\n  enabled: false\nmethod: []\ntrain:\n  batch_size: 2\n  max_steps: 2\n"
    valid_data = "".join(json.dumps(r) + "\n" for r in GOOD_ROWS).encode()
    assert _validate(recipe, valid_data, {}, "lora") in ("ok", "refused", "refused when training starts")


def test_fuzzed_data_files_end_in_a_clear_error(capsys, record_property):
    counts = Counter()

    @FUZZ
    @given(data=data_files(), recipe=st.sampled_from(DATA_RECIPES))
    def check(data, recipe):
        counts[_validate(_yaml(recipe), data, {})] += 1

    check()
    _report(counts, "data files", capsys, record_property)
    assert counts["refused"] > EXAMPLES // 2


# ------------------------------------------------------------------------------------------------ case by
# case

# Bad input and what the error must say: the place (file, line, recipe key or -P flag) and the fix. -P
# overrides:
# none in these, which also run end to end through `mlflow run`.
E2E_CASES = {
    "broken YAML": (b"train:\n  max_steps: [2\n", None, {}, [
        "finetune.yaml: 1 problem in the recipe:",
        "  - line 3, column 1: invalid YAML: expected ',' or ']'"]),
    "wrong types, missing field": (_yaml({"train": {"batch_size": "eight", "max_steps": None},
                                          "lora": {"r": [1]}}), None, {},
                                   ["finetune.yaml: 3 problems in the recipe:",
                                    "  - line 2: lora.r: Input should be a valid integer (got [1])",
                                    "  - line 5: train.batch_size: Input should be a whole number greater "
                                    'than 0, or `auto` (got "eight")',
                                    "  - line 6: train.max_steps: Input should be a valid integer (got "
                                    "null)"]),
    "recipe in UTF-16": (("# réglages\n" + _yaml(VALID_RECIPE).decode()).encode("utf-16"), None, {},
                         ["finetune.yaml: 1 problem in the recipe:",
                          "  - not valid UTF-8 (invalid start byte at byte 0); save the file as UTF-8"]),
    "broken JSON line": (None, (json.dumps(GOOD_ROWS[0]) + "\n{\"messages\": [\n").encode(), {},
                         ["1 problem in the data; nothing was started:",
                          "train.jsonl:2: invalid JSON: Expecting value (column 15); each line must be one "
                          "complete JSON object",
                          "Run `mlflow-finetune data check "]), "empty data file": (None, b"", {}, [
                              "train.jsonl: file is empty (no rows); add training examples to it",
                              "Run `mlflow-finetune data check "]),
    "rows in another format than declared": (_yaml({**VALID_RECIPE, "data": {"format": "alpaca"}}), None, {},
                                             ["train.jsonl: the rows are chat data",
                                              "but data.format is 'alpaca', which needs instruction, output",
                                              "Set data.format: chat (or auto, which detects it)"]),
    "huge line, wrong encoding": (None, (json.dumps(GOOD_ROWS[0]) + "\n"
                                         + json.dumps({"messages": [{"role": "user",
                                                                     "content": "q" * 200_000},
                                                                    {"role": "assistant", "content": "é"}]},
                                                      ensure_ascii=False) + "\n").encode("latin-1"), {}, [
                                                          "train.jsonl:2: not valid UTF-8 (byte 0xe9 at "
                                                          "column 200082); re-save the file as UTF-8"]),
}
MORE_CASES = {
    "a typo in -P": (None, None, {"train.lerning_rate": "0.1"}, [
        "  - -P train.lerning_rate=0.1: train.lerning_rate: unknown key. Valid keys in `train`: epochs, "
        "max_steps,",
        "Did you mean `learning_rate`?"]),
    "-P into a key that -P set to a "
    "value": (None, None, {"registry.name": "bot", "registry.name.first": "x"}, [
        "  - -P registry.name.first=x: `name` is a value, not a section"]),
    "a key of another adapter": (_yaml({**VALID_RECIPE, "lora": {"rank": 8}}), None, {}, [
        "  - line 4: lora.rank: unknown key. Valid keys in `lora`: "]),
    "an unknown section": (_yaml({**VALID_RECIPE, "modle": {"name": "tiny"}}), None, {}, [
        "  - line 3: modle: unknown key. Valid keys: method, model, adapter,", "Did you mean `model`?"]),
    "a data file that is not "
    "there": (_yaml({**VALID_RECIPE, "data": {"eval": "data/nope.jsonl"}}), None, {}, [
        "  - data.eval: file not found: data/nope.jsonl (looked in "]),
    "rows of the wrong type": (None, b'[1, 2]\n{"messages": "hi"}\n', {}, [
        "2 problems in the data; nothing was started:", "train.jsonl:1: expected a JSON object, got a list",
        "train.jsonl:2: 'messages' must be a list of {role, content} messages"]),
}


def _project(root: Path, recipe: bytes | None, data: bytes | None) -> Path:
    """A project of the case's files, or valid ones where the case gives none."""
    (root / "data").mkdir(parents=True)
    (root / "finetune.yaml").write_bytes(recipe if recipe is not None else _yaml(VALID_RECIPE))
    (root / "data" / "train.jsonl").write_bytes(
        data if data is not None else "".join(json.dumps(r) + "\n" for r in GOOD_ROWS).encode())
    return root


@pytest.mark.parametrize("name", [*E2E_CASES, *MORE_CASES])
def test_each_bad_input_is_refused_naming_the_place_and_the_fix(name, tmp_path):
    recipe, data, params, expected = {**E2E_CASES, **MORE_CASES}[name]
    proj = _project(tmp_path / "proj", recipe, data)
    with pytest.raises(FinetuneError) as refused:
        resolve_entry_point(str(proj), "lora", params)
    message = str(refused.value)
    assert [text for text in expected if text not in message] == [], message
    _says_where_and_what(refused.value, (proj / "finetune.yaml").read_bytes(), (proj / "data" / "train.jsonl")
                         .read_bytes(), params, proj)


@pytest.mark.stress
@pytest.mark.integration
def test_fuzz_cases_end_to_end_through_mlflow_run(tmp_path, tracking_uri, capsys, record_property):
    mlflow.set_experiment("fuzz")  # create the store first: two processes migrating one sqlite file race
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    for i, (name, (recipe, data, _, expected)) in enumerate(E2E_CASES.items()):
        proj = _project(tmp_path / f"case{i}", recipe, data)
        proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(proj), "-e", "lora", "--backend",
                               "finetune", "--experiment-name", "fuzz"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0, name
        assert "Traceback" not in proc.stderr, f"{name}: {proc.stderr[-3000:]}"
        assert [text for text in expected if text not in proc.stderr] == [], f"{name}: {proc.stderr[-3000:]}"
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name("fuzz").experiment_id])
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    assert runs == []  # every case was refused before a run existed
    _report(Counter(end_to_end=len(E2E_CASES)), "mlflow run end to end", capsys, record_property)
