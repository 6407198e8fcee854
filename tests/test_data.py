"""Data reading, format detection, validation, conversion, loading and `data check` reports."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.data.check import check_data
from mlflow_finetune_plugin.data.read import (
    DataError,
    DataIssue,
    detect_format,
    load_training_dataset,
    mlflow_dataset,
    read_records,
    to_messages,
    validate_records,
)


def chat(user, answer, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return {"messages": msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


SAMPLES = {
    "chat": [chat("Hi", "Hello!"), chat("2+2?", "4", system="Be brief.")],
    "alpaca": [{"instruction": "Translate", "input": "bonjour", "output": "hello"},
               {"instruction": "Say hi", "input": "", "output": "hi"}],
    "prompt_completion": [{"prompt": "The sky is", "completion": " blue."},
                          {"prompt": "Grass is", "completion": " green."}],
    "preference": [{"prompt": "Best pet?", "chosen": "A cat.", "rejected": "A rock."},
                   {"prompt": "2+2?", "chosen": "4", "rejected": "5"}],
}


def write(path, rows):
    """Write rows as JSONL / JSON / CSV (message lists as JSON text) / parquet, by suffix."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    elif suffix == ".csv":
        import pandas as pd

        pd.DataFrame([{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]
                     ).to_csv(path, index=False)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


class FakeTokenizer:
    """One token per word plus one per message (a `<m>` marker); renders and tokenizes through the calls
    `models.chat_format` makes, with character offsets."""

    chat_template = "<m> per message, then its words"
    eos_token = None

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, **kwargs):
        return "".join(f"<m> {m['content']} " for m in messages) + ("<m> " if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        import re

        spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        return {"input_ids": [0] * len(spans), "offset_mapping": spans}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet", ".json"])
@pytest.mark.parametrize("fmt", list(SAMPLES))
def test_each_format_detected_from_each_file_type(tmp_path, fmt, suffix):
    path = write(tmp_path / f"data{suffix}", SAMPLES[fmt])
    records = read_records(path)
    first_line = {".jsonl": 1, ".csv": 2, ".parquet": 1, ".json": 2}[suffix]
    assert [line for line, _ in records] == [first_line, first_line + 1]
    assert [r for _, r in records] == SAMPLES[fmt]
    assert detect_format(records, path) == fmt
    assert validate_records(records, fmt, path) == []


def test_chat_lists_round_trip_through_csv_and_parquet(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant",
                                                                            "content": "Yo"}]}]
    for suffix in (".csv", ".parquet"):
        path = write(tmp_path / f"pc{suffix}", rows)
        ds, fmt = load_training_dataset(path)
        assert fmt == "prompt_completion"
        assert ds[0]["messages"] == [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Yo"}]


def test_json_object_with_data_key_gives_each_objects_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"meta": {"data": 1},\n "data": [\n  {"prompt": "a", "completion": "b"},\n\n'
                    '  {"prompt": "c",\n   "completion": "d"}\n]}\n')
    assert [line for line, _ in read_records(path)] == [3, 5]


def test_alpaca_and_prompt_completion_to_messages():
    row = {"instruction": "Translate to English", "input": "bonjour", "output": "hello"}
    assert to_messages(row, "alpaca") == [{"role": "user", "content": "Translate to English\n\nbonjour"},
                                          {"role": "assistant", "content": "hello"}]
    assert to_messages({"instruction": "Hi", "output": "Yo"}, "alpaca", system_prompt="Be kind.") == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"}]
    assert to_messages({"prompt": "The sky is", "completion": " blue."}, "prompt_completion") == [
        {"role": "user", "content": "The sky is"}, {"role": "assistant", "content": " blue."}]
    conv = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
            "completion": [{"role": "assistant", "content": "A"}]}
    assert to_messages(conv, "prompt_completion",
                       system_prompt="other") == conv["prompt"] + conv["completion"]


def test_broken_json_lines_are_all_reported_with_line_numbers(tmp_path):
    lines = [json.dumps(chat(f"q{i}", f"a{i}")) for i in range(10)]
    lines[2] = '{"messages": [{"role": "user", "content": "q2"}'
    lines[6] = "not json at all"
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_records(path)
    assert [(i.line, i.severity) for i in err.value.issues] == [(3, "error"), (7, "error")]
    assert f"{path}:3: invalid JSON" in str(err.value) and f"{path}:7: invalid JSON" in str(err.value)
    assert "2 problems" in str(err.value)


def test_blank_lines_skipped_but_counted(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(chat("a", "b")) + "\n\n  \n" + json.dumps(chat("c", "d")) + "\n")
    assert [line for line, _ in read_records(path)] == [1, 4]


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="empty"):
        read_records(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        (tmp_path / "a.txt").write_text("x")
        read_records(tmp_path / "a.txt")


def test_error_listing_is_capped(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(" " * n + "{oops\n" for n in range(30)))  # 30 different messages (column numbers)
    with pytest.raises(DataError) as err:
        read_records(path)
    assert len(err.value.issues) == 30
    assert "... and 10 more" in str(err.value)
    assert f"{path}:21:" not in str(err.value)


def test_the_same_problem_on_many_rows_is_one_line_with_count_and_first_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{oops\n" * 30)
    with pytest.raises(DataError) as err:
        read_records(path)
    assert len(err.value.issues) == 30
    assert str(err.value).splitlines() == [
        "1 problem in the data:",
        f"  {path}: invalid JSON: Expecting property name enclosed in double quotes (column 2); each line "
        "must be one complete JSON object (30 rows: lines 1, 2, 3, 4, 5 and 25 more)"]
    rows = [{"instruction": f"i{n}", "output": ""} for n in range(41)]
    report = check_data(write(tmp_path / "a.jsonl", rows))
    assert len(report.errors) == 41
    assert (f"{tmp_path / 'a.jsonl'}: 'output' is empty (41 rows: lines 1, 2, 3, 4, 5 and 36 "
            "more)") in report.render()


def test_wrong_types_and_roles_reported_per_row(tmp_path):
    rows = [
        chat("ok", "fine"),
        {"messages": "hello"},
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"},
                      {"role": "user", "content": "and?"}]},
        {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]},
    ]
    path = write(tmp_path / "t.jsonl", rows)
    issues = validate_records(read_records(path), "chat", path)
    by_line = {i.line: i.message for i in issues}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7]
    assert "'messages' must be a list" in by_line[2] and "got a string" in by_line[2]
    assert "messages[0]: content must be a string, got a number" == by_line[3]
    assert "unknown role 'bot' (valid: system, user, assistant, tool)" in by_line[4]
    assert "no assistant message" in by_line[5]
    assert "ends with a 'user' message" in by_line[6]
    assert "empty content" in by_line[7]

    alpaca = validate_records([(1, {"instruction": "x", "output": 3}),
                               (2, {"instruction": "", "output": "y"}), (3, {"output": "y"})], "alpaca",
                              "a.jsonl")
    assert [str(i) for i in alpaca] == ["a.jsonl:1: 'output' must be a string, got a number",
                                        "a.jsonl:2: 'instruction' is empty",
                                        "a.jsonl:3: missing 'instruction'"]


def test_ambiguous_and_unknown_formats_list_expected_keys(tmp_path):
    path = write(tmp_path / "amb.jsonl", [{"messages": [], "prompt": "p", "completion": "c"}])
    with pytest.raises(DataError) as err:
        detect_format(read_records(path), path)
    text = str(err.value)
    assert "ambiguous" in text and "chat and prompt_completion" in text
    assert "['completion', 'messages', 'prompt']" in text
    for expected in ("messages", "instruction, output", "prompt, completion", "prompt, chosen, rejected"):
        assert expected in text
    path = write(tmp_path / "unk.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"keys found \['answer', 'question'\].*instruction, output"):
        detect_format(read_records(path), path)
    mixed = write(tmp_path / "mixed.jsonl", [chat("a", "b"), {"instruction": "i", "output": "o"}])
    with pytest.raises(DataError, match="different formats"):
        detect_format(read_records(mixed), mixed)


def test_preference_forms_load_as_trl_expects(tmp_path):
    strings = write(tmp_path / "s.jsonl", SAMPLES["preference"])
    ds, fmt = load_training_dataset(strings)
    assert fmt == "preference" and ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds[0] == {"prompt": "Best pet?", "chosen": "A cat.", "rejected": "A rock."}

    user = {"role": "user", "content": "Best pet?"}
    implicit = write(tmp_path / "c.jsonl", [{"chosen": [user, {"role": "assistant", "content": "A cat."}],
                                             "rejected": [user,
                                                          {"role": "assistant", "content": "A rock."}]}])
    assert detect_format(read_records(implicit), implicit) == "preference"
    ds, _ = load_training_dataset(implicit, system_prompt="Be nice.")
    assert ds[0]["prompt"] == [{"role": "system", "content": "Be nice."}, user]
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "A cat."}]
    assert ds[0]["rejected"] == [{"role": "assistant", "content": "A rock."}]

    mixed = write(tmp_path / "m.jsonl", [SAMPLES["preference"][0], {"prompt": [user], "chosen": "Dog.",
                                                                    "rejected": "x"}])
    # one chat-form row makes every row chat-form (one Arrow type per column)
    ds, _ = load_training_dataset(mixed)
    assert ds[0]["prompt"] == [user] and ds[1]["chosen"] == [{"role": "assistant", "content": "Dog."}]


def test_preference_chosen_equal_rejected_is_an_error(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "same", "rejected": "same"},
                                        {"prompt": "q2", "chosen": "a", "rejected": "b"}])
    report = check_data(path, tokenizer=FakeTokenizer())
    assert report.format == "preference" and not report.ok
    assert [(i.line, "identical" in i.message) for i in report.errors] == [(1, True)]
    # prompt + longer of chosen/rejected, one token per word and message
    assert report.token_stats["max"] == 4
    with pytest.raises(DataError, match="identical"):
        load_training_dataset(path)


def test_duplicates_and_contradictions_counted_with_lines(tmp_path):
    rows = [chat("capital of France?", "Paris"), chat("2+2?", "4"), chat("capital of France?", "Paris"),
            chat("2+2?", "5"), chat("hello", "hi"), chat("2+2?", "4")]
    report = check_data(write(tmp_path / "d.jsonl", rows))
    assert report.ok and report.rows == 6
    assert report.duplicates == 2 and report.contradictions == 1
    texts = [str(w) for w in report.warnings]
    assert any(t.endswith(":3: duplicate of line 1 (identical row)") for t in texts)
    assert any(t.endswith(":6: duplicate of line 2 (identical row)") for t in texts)
    assert any(":2: same prompt with 2 different answers on lines 2, 4, 6" in t for t in texts)
    assert report.token_stats is None


def test_too_long_rows_flagged_with_length(tmp_path):
    rows = [chat("short", "ok"), chat("word " * 50, "ok"), chat("a b", "c")]
    report = check_data(write(tmp_path / "l.jsonl", rows), tokenizer=FakeTokenizer(), max_length=20)
    assert report.too_long == 1 and report.ok
    assert [(w.line, w.message.split(",")[0]) for w in report.warnings if w.line] == [(2, "53 tokens")]
    assert report.token_stats == {"min": 4, "mean": 20.7, "p50": 5, "p95": 53, "max": 53}


def test_check_data_counts_empty_fields_and_keeps_going_past_broken_lines(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([json.dumps({"instruction": "a", "output": ""}), "{broken",
                               json.dumps({"instruction": "b", "output": "c"}),
                               json.dumps({"instruction": "b", "output": "d"})]) + "\n")
    report = check_data(path)
    assert report.format == "alpaca" and report.rows == 3
    assert [(i.line, i.message.split(":")[0]) for i in report.errors] == [(1, "'output' is empty"),
                                                                          (2, "invalid JSON")]
    assert report.empty_fields == 1 and report.contradictions == 1
    assert "errors:" in report.render() and f"{path}:2: invalid JSON" in report.render()


@pytest.mark.parametrize("name,content", [
    ("bytes.jsonl", b'{"messages": []}\n\xff\xfe\xfa garbage\n'),
    ("bytes.json", b'[{"prompt": "\xc3\x28"}]'),
    ("bytes.csv", b"prompt,completion\n\xff,x\n"),
    ("bad.parquet", b"PAR1 definitely not parquet"),
    ("scalar.json", b"42"),
    ("numbers.json", b"[1, 2]"),
    ("trunc.json", b'[{"prompt": "x",'),
    ("array.jsonl", b"[1, 2]\nnull\n"),
    ("weird.jsonl", b'{"messages": [1, {"role": null}, {"content": []}]}\n{"chosen": 1, "rejected": 1}\n'),
    ("empty.csv", b""),
    ("notes.txt", b"hello"),
])
def test_check_data_never_raises_on_garbage(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    report = check_data(path, tokenizer=FakeTokenizer())
    assert not report.ok
    assert all(str(i).startswith(str(path)) for i in report.errors)
    json.dumps(report.to_dict())
    assert report.render()


def test_invalid_utf8_reported_at_its_line(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(json.dumps(chat("a", "b")).encode() + b"\n" + b'{"x": "\xff"}\n')
    report = check_data(path)
    assert [(i.line, "not valid UTF-8" in i.message) for i in report.errors] == [(2, True)]
    assert check_data(tmp_path / "missing.jsonl").errors[0].message.startswith("file not found")
    assert check_data(tmp_path).errors[0].message.startswith("is a folder")


def test_load_training_dataset_messages_column_in_order(tmp_path):
    rows = [{"instruction": f"i{n}", "input": "x" if n % 2 else "", "output": f"o{n}"} for n in range(5)]
    ds, fmt = load_training_dataset(write(tmp_path / "a.csv", rows), system_prompt="S")
    assert fmt == "alpaca" and ds.column_names == ["messages"] and len(ds) == 5
    assert [m[2]["content"] for m in ds["messages"]] == [f"o{n}" for n in range(5)]
    assert ds[1]["messages"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "i1\n\nx"},
                                 {"role": "assistant", "content": "o1"}]


def test_load_training_dataset_raises_with_every_issue(tmp_path):
    rows = [chat("a", "b"), {"messages": [{"role": "user", "content": "x"}]}, chat("c", ""), chat("d", "e")]
    with pytest.raises(DataError) as err:
        load_training_dataset(write(tmp_path / "t.jsonl", rows))
    assert [i.line for i in err.value.issues] == [2, 3]
    with pytest.raises(DataError, match="no assistant message"):
        load_training_dataset(write(tmp_path / "t2.jsonl", rows[1:2]), fmt="chat")


def test_mlflow_dataset_digest_follows_file_content(tmp_path):
    path = write(tmp_path / "train.jsonl", SAMPLES["chat"])
    ds, _ = load_training_dataset(path)
    a, b = mlflow_dataset(ds, path, name="train"), mlflow_dataset(ds, path, name="train")
    assert a.digest == b.digest and len(a.digest) == 16
    assert a.name == "train" and json.loads(a.source.to_json())["uri"] == str(path.resolve())
    assert a.to_dict()["source_type"] == "local"
    assert mlflow_dataset(ds.select([0]), path, name="train").digest != a.digest  # a split is its own input

    write(path, [*SAMPLES["chat"], chat("new", "row")])
    ds2, _ = load_training_dataset(path)
    assert mlflow_dataset(ds2, path, name="train").digest != a.digest


def word_tokenizer():
    """A real transformers tokenizer, built in memory: one token per word, <s>ROLE ... </s> per message."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "</s>": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>", eos_token="</s>",
        chat_template="{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }} </s>{% endfor %}")


def test_data_check_cli_exit_codes(tmp_path, monkeypatch):
    import mlflow_finetune_plugin.models.base as models

    asked = []
    monkeypatch.setattr(models, "load_tokenizer", lambda name, *a,
                        **k: asked.append(name) or word_tokenizer())
    good = write(tmp_path / "good.jsonl", SAMPLES["chat"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat("a", "b")) + "\n{nope\n")
    runner = CliRunner()

    result = runner.invoke(main, ["data", "check", str(good)])
    assert result.exit_code == 0, result.output
    assert "format          chat" in result.output
    assert "tokens          min 8  mean 10.5  p50 8  p95 13  max 13" in result.output  # 3 + words a message

    result = runner.invoke(main, ["data", "check", str(good), str(bad), "--max-length", "12", "--model",
                                  "my/tok"])
    assert result.exit_code == 1
    assert f"{bad}:2: invalid JSON" in result.output
    assert f"{good}:2: 13 tokens, more than max_length 12" in result.output

    result = runner.invoke(main, ["data", "check", str(good), "--json"])
    assert result.exit_code == 0
    (report,) = json.loads(result.output)
    assert report["ok"] and report["format"] == "chat" and report["token_stats"]["max"] == 13
    assert asked == [None, "my/tok", None]


def test_issue_str_and_data_error_message():
    assert str(DataIssue("a.jsonl", 3, "bad")) == "a.jsonl:3: bad"
    assert str(DataIssue("a.jsonl", None, "bad")) == "a.jsonl: bad"
    assert str(DataError([DataIssue("a.jsonl", 1, "x")])) == "1 problem in the data:\n  a.jsonl:1: x"
