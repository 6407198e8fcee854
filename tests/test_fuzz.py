"""Bad input, fuzzed: generated recipe files, `-P` overrides and data files (wrong types, missing fields, broken
YAML/JSON, empty files, huge lines, wrong encodings) go through the validation the backend runs before any run
exists. Each either passes or ends in a FinetuneError naming the place (file, line, recipe key or -P flag); never
another exception. A handful of the same cases run end to end through `mlflow run`: non-zero exit, no traceback,
no RUNNING run. The number of cases tried is printed (and recorded as a property of each test)."""

from __future__ import annotations

import json
import os
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
from mlflow_finetune_plugin.config.recipe import Recipe
from mlflow_finetune_plugin.errors import FinetuneError
from tests.conftest import REPO, chat_rows

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=bool(os.environ.get("CI")),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
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
                    st.text(max_size=30), st.sampled_from(["", "-1", "0", "1e-3", "true", "null", "[q, v]", "~"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(SECTIONS),
                 st.sampled_from(["train.lerning_rate", "lora.rank", "data.trian", "modle.name", "train.max_steps.x",
                                  "data.columns.prompt", "data.columns.messages", "data.columns.promt",
                                  "data.tags.role_tag", "data.tags.user_tag", "data.tags.speaker"]),
                 st.text(alphabet="abcdefghij._", min_size=1, max_size=15))


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
overrides = st.dictionaries(keys, json_values.map(lambda v: v if isinstance(v, str) else json.dumps(v)), max_size=3)


def _row_line(kind_and_value) -> str:
    kind, value = kind_and_value
    if kind == "json":
        return json.dumps(value)
    if kind == "text":
        return value
    if kind == "huge":
        return json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * value}]})
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


# The formats users bring besides plain chat: ShareGPT (with a tool call), OpenAI weights and tool calls, and rows
# whose fields have other names (the recipes below map some of them).
NEW_FORMAT_ROWS = [
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "q"},
                       {"from": "gpt", "value": "a"}]},
    {"conversations": [{"from": "human", "value": "weather?"},
                       {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
                       {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}],
     "tools": '[{"name": "get_weather", "parameters": {"type": "object"}}]'},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "wrong", "weight": 0},
                  {"role": "user", "content": "again"}, {"role": "assistant", "content": "right", "weight": 1}]},
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
    {**VALID_RECIPE, "data": {"columns": {"prompt": "question", "completion": "answer", "system": "persona"}}},
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
    st.sampled_from(NEW_FORMAT_ROWS).map(lambda r: ("row", r)),                    # ShareGPT, OpenAI, other names
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


# ------------------------------------------------------------------------------------------------ the property


def _validate(recipe_bytes: bytes, data_bytes: bytes, params: dict, entry_point: str = "lora") -> str:
    """Run the backend's validation on a fresh project; 'ok', or 'refused' with a FinetuneError naming the place.
    Anything else fails the test (hypothesis shrinks it to a minimal example)."""
    with tempfile.TemporaryDirectory() as tmp:
        proj = Path(tmp) / "proj"
        (proj / "data").mkdir(parents=True)
        (proj / "finetune.yaml").write_bytes(recipe_bytes)
        (proj / "data" / "train.jsonl").write_bytes(data_bytes)
        try:
            recipe, _ = resolve_entry_point(str(proj), entry_point, params)
        except FinetuneError as e:
            message = str(e)
            assert message.strip() and "Traceback" not in message
            assert "finetune.yaml" in message or "train.jsonl" in message or "-P " in message or \
                "data." in message or entry_point in message, f"error does not say where: {message}"
            return "refused"
        # Passed: the training process's first step, reading the data for real, must agree.
        from mlflow_finetune_plugin.data.splits import load_splits

        try:
            load_splits(recipe)
        except FinetuneError as e:
            assert "Traceback" not in str(e) and str(e).strip()
            return "refused when training starts"
        return "ok"


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


def test_fuzzed_data_files_end_in_a_clear_error(capsys, record_property):
    counts = Counter()

    @FUZZ
    @given(data=data_files(), recipe=st.sampled_from(DATA_RECIPES))
    def check(data, recipe):
        counts[_validate(_yaml(recipe), data, {})] += 1

    check()
    _report(counts, "data files", capsys, record_property)
    assert counts["refused"] > EXAMPLES // 2


# ------------------------------------------------------------------------------------------------ end to end

E2E_CASES = {
    "broken YAML": (b"train:\n  max_steps: [2\n", None, "finetune.yaml: 1 problem"),
    "wrong types, missing field": (_yaml({"train": {"batch_size": "eight", "max_steps": None},
                                          "lora": {"r": [1]}}), None, "train.batch_size: Input should be a valid integer"),
    "recipe in UTF-16": (("# réglages\n" + _yaml(VALID_RECIPE).decode()).encode("utf-16"), None, "not valid UTF-8"),
    "broken JSON line": (None, (json.dumps(GOOD_ROWS[0]) + "\n{\"messages\": [\n").encode(), "train.jsonl:2"),
    "empty data file": (None, b"", "train.jsonl: file is empty"),
    "rows in another format than declared": (_yaml({**VALID_RECIPE, "data": {"format": "alpaca"}}), "".join(
        json.dumps(r) + "\n" for r in GOOD_ROWS).encode(), "the rows are chat data"),
    "huge line, wrong encoding": (None, (json.dumps(GOOD_ROWS[0]) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "q" * 200_000}, {"role": "assistant", "content": "é"}]},
        ensure_ascii=False) + "\n").encode("latin-1"), "train.jsonl:2: not valid UTF-8"),
}


@pytest.mark.integration
def test_fuzz_cases_end_to_end_through_mlflow_run(tmp_path, tracking_uri, capsys, record_property):
    mlflow.set_experiment("fuzz")  # create the store first: two processes migrating one sqlite file race
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    for i, (name, (recipe, data, expected)) in enumerate(E2E_CASES.items()):
        proj = tmp_path / f"case{i}"
        (proj / "data").mkdir(parents=True)
        (proj / "finetune.yaml").write_bytes(recipe if recipe is not None else _yaml(VALID_RECIPE))
        (proj / "data" / "train.jsonl").write_bytes(
            data if data is not None else "".join(json.dumps(r) + "\n" for r in GOOD_ROWS).encode())
        proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(proj), "-e", "lora", "--backend", "finetune",
                               "--experiment-name", "fuzz"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode != 0, name
        assert "Traceback" not in proc.stderr, f"{name}: {proc.stderr[-3000:]}"
        where = "train.jsonl" if data is not None else "finetune.yaml"
        assert expected in proc.stderr and where in proc.stderr, f"{name}: {proc.stderr[-3000:]}"
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name("fuzz").experiment_id])
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    assert runs == []  # every case was refused before a run existed
    _report(Counter(end_to_end=len(E2E_CASES)), "mlflow run end to end", capsys, record_property)
