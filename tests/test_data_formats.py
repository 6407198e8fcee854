"""The data users already have: ShareGPT, column mapping, the OpenAI format complete (weights, tool calls),
Hugging Face datasets by name, advice before training, and errors that diagnose (issue 16). Everything on the
tiny model."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.data.check import check_data
from mlflow_finetune_plugin.data.preflight import check_recipe_data
from mlflow_finetune_plugin.data.read import (
    DataError,
    detect_format,
    load_training_dataset,
    mlflow_dataset,
    read_records,
    read_records_lenient,
    to_messages,
    validate_records,
)
from mlflow_finetune_plugin.data.splits import load_splits
from mlflow_finetune_plugin.errors import FinetuneError, RecipeError


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(n, offset=0):
    return [{"messages": [{"role": "user", "content": f"What is {i} times three?"},
                          {"role": "assistant", "content": f"{i} times three is {3 * i}."}]}
            for i in range(offset, offset + n)]


def project(root, recipe: str, rows, eval_rows=None):
    jsonl(root / "data" / "train.jsonl", rows)
    if eval_rows is not None:
        jsonl(root / "data" / "eval.jsonl", eval_rows)
    (root / "finetune.yaml").write_text(recipe)
    return root


@pytest.fixture
def tokenizer(tiny_model_dir):
    from mlflow_finetune_plugin.models.base import load_tokenizer

    return load_tokenizer(None)  # a fresh copy: some tests give it another chat template


# A ChatML template that renders tools and tool calls, with generation markers (the tiny model's does
# neither).
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}<|im_start|>assistant\n{% generation %}"
    "{%- if message.content %}{{ message.content }}{% endif %}"
    "{%- for call in message.tool_calls or [] %}<tool_call>{{ call.function | tojson }}</tool_call>{% endfor "
    "%}<|im_end|>{% endgeneration %}\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}")

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}


def tool_row(city="Paris"):
    """OpenAI fine-tuning format: a tools list, an assistant tool call (arguments as JSON text), the tool's
    answer."""
    return {"tools": [WEATHER_TOOL], "messages": [
        {"role": "user", "content": f"Weather in {city}?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
        {"role": "assistant", "content": f"Sunny in {city}, 21 degrees."}]}


# ---------------------------------------------------------------- 1. ShareGPT


SHAREGPT = [
    {"conversations": [{"from": "system", "value": "You are the Ridgeway Cycles assistant."},
                       {"from": "human", "value": "Do you fix punctures?"},
                       {"from": "gpt", "value": "Yes, while you wait."}]},
    {"conversations": [{"from": "human", "value": "Is the shop open today?"},
                       {"from": "function_call", "value": json.dumps({"name": "opening_hours",
                                                                      "arguments": {"day": "today"}})},
                       {"from": "observation", "value": "9:00-18:00"},
                       {"from": "gpt", "value": "Yes, from 9 to 6."}],
     "tools": json.dumps([{"name": "opening_hours", "parameters": {"type": "object"}}])},
]


def test_sharegpt_is_detected_and_converted_with_every_role(tmp_path):
    path = jsonl(tmp_path / "sg.jsonl", SHAREGPT)
    records = read_records(path)
    assert detect_format(records, path) == "sharegpt"
    assert validate_records(records, "sharegpt", path) == []
    assert to_messages(records[0][1], "sharegpt") == [
        {"role": "system", "content": "You are the Ridgeway Cycles assistant."},
        {"role": "user", "content": "Do you fix punctures?"},
        {"role": "assistant", "content": "Yes, while you wait."}]
    assert to_messages(records[1][1], "sharegpt") == [
        {"role": "user", "content": "Is the shop open today?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "opening_hours", "arguments": {"day": "today"}}}]},
        {"role": "tool", "content": "9:00-18:00"}, {"role": "assistant", "content": "Yes, from 9 to 6."}]
    ds, fmt = load_training_dataset(path)
    assert fmt == "sharegpt" and ds.column_names == ["messages", "tools"]
    assert json.loads(ds[1]["tools"]) == [
        {"type": "function", "function": {"name": "opening_hours", "parameters": {"type": "object"}}}
    ]
    assert ds[0]["tools"] is None


def test_data_check_reports_sharegpt(tmp_path, monkeypatch, tokenizer):
    import mlflow_finetune_plugin.models.base as models

    tokenizer.chat_template = TOOLS_TEMPLATE
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: tokenizer)
    path = jsonl(tmp_path / "sg.jsonl", SHAREGPT)
    result = CliRunner().invoke(main, ["data", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert "format          sharegpt" in result.output


def test_sharegpt_role_tags_come_from_the_recipe(tmp_path):
    rows = [{"dialog": [{"speaker": "customer", "text": "Hi"}, {"speaker": "agent", "text": "Hello!"}]}
            for _ in range(2)]
    recipe = load_recipe(project(tmp_path, "data:\n  format: sharegpt\n  columns: {messages: dialog}\n"
                                           "  tags: {role_tag: speaker, content_tag: text, user_tag: "
                                           "customer, assistant_tag: agent}\n", rows))
    from mlflow_finetune_plugin.data.splits import load_splits

    data = load_splits(recipe)
    train, _, fmt = data.train, data.eval, data.fmt
    assert fmt == "sharegpt"
    assert train[0]["messages"] == [{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello!"}]
    # A `messages` list of {from, value} turns is ShareGPT too, by the look of its turns.
    path = jsonl(tmp_path / "m.jsonl", [{"messages": SHAREGPT[0]["conversations"]}])
    assert detect_format(read_records(path), path) == "sharegpt"


def test_sharegpt_errors_name_the_turn_and_the_valid_tags(tmp_path):
    rows = [{"conversations": [{"from": "user_1", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
            {"conversations": [{"from": "human", "value": "Hi"},
                               {"from": "function_call", "value": "call it"},
                               {"from": "observation", "value": "done"}, {"from": "gpt", "value": "Done."}]},
            {"conversations": [{"from": "human", "value": "Hi"}]}]
    path = jsonl(tmp_path / "sg.jsonl", rows)
    issues = [str(i) for i in validate_records(read_records(path), "sharegpt", path)]
    assert issues == [
        f"{path}:1: conversations[0]: unknown from 'user_1' (valid: system, human, gpt, function_call, "
        "observation; data.tags maps other names)",
        f"{path}:2: conversations[1] (function_call): value must be JSON {{\"name\": ..., \"arguments\": "
        "{...}} (Expecting value)",
        f"{path}:3: 'conversations' has no assistant message: there is nothing to learn from"]
    # chat rows that use ShareGPT's role names get pointed at the format and its tags
    chat_path = jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "human", "content": "Hi"},
                                                           {"role": "gpt", "content": "Yo"}]}])
    (issue,) = validate_records(read_records(chat_path), "chat", chat_path)
    assert "role 'human' is a ShareGPT name: set data.format: sharegpt" in issue.message


# ---------------------------------------------------------------- 2. column mapping


def test_columns_map_other_names_in_jsonl_and_csv(tmp_path):
    import pandas as pd

    rows = [{"question": "Do you rent bikes?", "answer": "Yes, by the day.", "persona": "Be brief."},
            {"question": "Do you sell helmets?", "answer": "Yes.", "persona": "Be brief."}]
    columns = {"prompt": "question", "completion": "answer", "system": "persona"}
    ds, fmt = load_training_dataset(jsonl(tmp_path / "qa.jsonl", rows), columns=columns)
    assert fmt == "prompt_completion"
    assert ds[0]["messages"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Do you rent bikes?"},
                                 {"role": "assistant", "content": "Yes, by the day."}]
    # in a CSV cell a message list is JSON text, in a mapped column too
    csv = tmp_path / "chat.csv"
    pd.DataFrame([{"dialog": json.dumps(r["messages"])} for r in qa_rows(2)]).to_csv(csv, index=False)
    ds, fmt = load_training_dataset(csv, columns={"messages": "dialog"})
    assert fmt == "chat" and ds[1]["messages"] == qa_rows(2)[1]["messages"]


def test_data_check_maps_columns_and_tags_from_the_command_line(tmp_path, monkeypatch, tokenizer):
    import mlflow_finetune_plugin.models.base as models

    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: tokenizer)
    path = jsonl(tmp_path / "d.jsonl", [{"dialog": [{"speaker": "customer", "text": "Hi"},
                                                    {"speaker": "agent", "text": "Hello!"}]}])
    args = ["data", "check", str(path), "--column", "messages=dialog", "--tag", "role_tag=speaker",
            "--tag", "content_tag=text", "--tag", "user_tag=customer", "--tag", "assistant_tag=agent",
            "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.output)
    assert report["format"] == "sharegpt" and report["errors"] == []
    result = CliRunner().invoke(main, ["data", "check", str(path), "--tag", "speaker=role"])
    assert result.exit_code == 2 and "'speaker' is not one of role_tag, content_tag" in result.output
    result = CliRunner().invoke(main, ["data", "check", str(path), "--format", "chat"])
    assert result.exit_code == 1
    assert (
        "no row has the keys of --format 'chat' (messages (a list of {role, content})); the rows have the "
        "keys ['dialog']. If they hold these fields under other names, map them (e.g. --column "
        "messages=dialog)") in result.output


def test_column_errors_name_the_missing_column_and_the_columns_that_exist(tmp_path):
    path = jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}, {"question": "q2", "reply": "a2"}])
    _, issues = read_records_lenient(path, {"prompt": "query", "completion": "answer"})
    assert [str(i) for i in issues] == [
        f"{path}: data.columns.prompt: no row has a column 'query'; the rows have: answer, question, reply"]
    _, issues = read_records_lenient(path, {"prompt": "question", "completion": "answer"})
    assert [str(i) for i in issues] == [f"{path}:2: missing column 'answer' (data.columns.completion)"]
    with pytest.raises(RecipeError, match=r"data.columns.promt: unknown key.*Did you mean `prompt`"):
        load_recipe(project(tmp_path / "p", "data:\n  columns: {promt: question}\n", qa_rows(2)))
    # through the backend's check, with the recipe key
    recipe = load_recipe(project(tmp_path / "p", "data:\n  columns: {prompt: query, completion: answer}\n",
                                 [{"question": "q", "answer": "a"}]))
    with pytest.raises(FinetuneError,
                       match=r"data.columns.prompt: no row has a column 'query'; the rows have: "
                             r"answer, question"):
        check_recipe_data(recipe, check_data)


# ---------------------------------------------------------------- 3. OpenAI format: weights


WEIGHTED = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is two plus two?"},
                  {"role": "assistant", "content": "Five.", "weight": 0},
                  {"role": "user", "content": "Are you sure?"},
                  {"role": "assistant", "content": "Sorry, it is four.", "weight": 1}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
    {"messages": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Hi there.",
                                                       "weight": 1}]},
]


def _labels_by_text(trainer, tokenizer):
    return {tokenizer.decode(row["input_ids"]): (row["input_ids"], row["labels"])
            for row in trainer.train_dataset}


def _expected_labels(tokenizer, text, trained: list[str]):
    """Labels from the rendered text alone: a token is labelled iff it lies inside one of the `trained`
    spans."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for piece in trained:
        start = text.index(piece)
        spans.append((start, start + len(piece)))
    labels = [tid if any(s <= a and b <= e for s, e in spans) else -100
              for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
    return enc["input_ids"], labels


@pytest.mark.parametrize("assistant_only_loss", [True, False])
def test_weight_zero_turns_get_no_loss_token_by_token(tmp_path, tokenizer, assistant_only_loss):
    from mlflow_finetune_plugin.config.schema import Recipe
    from mlflow_finetune_plugin.data.splits import load_splits
    from mlflow_finetune_plugin.models.base import load_base_model
    from mlflow_finetune_plugin.train.objectives import sft
    from mlflow_finetune_plugin.train.trainers import training_arguments

    path = jsonl(tmp_path / "train.jsonl", WEIGHTED)
    recipe = Recipe.model_validate({"data": {"train": str(path), "max_length": 256, "packing": False,
                                             "assistant_only_loss": assistant_only_loss},
                                    "train": {"max_steps": 1}, "eval": {"enabled": False}})
    data = load_splits(recipe)
    train_ds, eval_ds, fmt = data.train, data.eval, data.fmt
    assert fmt == "chat" and train_ds[0]["messages"][2]["weight"] == 0
    trainer = sft.build_trainer(recipe, load_base_model(recipe.model), tokenizer, train_ds, eval_ds,
                                training_arguments(recipe, f"weights-{assistant_only_loss}", None), [])
    rows = _labels_by_text(trainer, tokenizer)
    assert len(rows) == 3
    for row in WEIGHTED:
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        ids, labels = rows[text]
        kept = [m for m in row["messages"] if m["role"] == "assistant" and m.get("weight", 1) == 1]
        if assistant_only_loss:
            trained = [m["content"] + "<|im_end|>" for m in kept]
        else:  # every token but those of the weight-0 turns
            trained = (
                [text[: text.index("Five.")], text[text.index("Five.<|im_end|>") + len("Five.<|im_end|>") :]]
                if "Five." in text
                else [text]
            )
        expected_ids, expected = _expected_labels(tokenizer, text, [t for t in trained if t])
        assert ids == expected_ids
        assert labels == expected, text  # token by token
    ids, labels = rows[tokenizer.apply_chat_template(WEIGHTED[0]["messages"], tokenize=False)]
    trained_text = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert "Five." not in trained_text and "Sorry, it is four.<|im_end|>" in trained_text


def test_weights_are_checked(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q", "weight": 0},
                          {"role": "assistant", "content": "a"}]}, {"messages": [{"role": "user",
                                                                                  "content": "q"},
                                                                                 {"role": "assistant",
                                                                                  "content": "a",
                                                                                  "weight": 0.5}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a",
                                                             "weight": 0}]}]
    path = jsonl(tmp_path / "w.jsonl", rows)
    assert [str(i) for i in validate_records(read_records(path), "chat", path)] == [
        f"{path}:1: messages[0]: 'weight' applies to assistant messages only (the loss is on their tokens)",
        f"{path}:2: messages[1]: weight must be 0 (no loss on this turn) or 1, got 0.5",
        f"{path}:3: every assistant message in 'messages' has weight 0: there is nothing to learn from; give "
        "at least one weight 1 (or no weight)"]


# ---------------------------------------------------------------- 3. OpenAI format: tool calls


def test_tool_calls_go_through_a_chat_template_that_supports_tools(tmp_path, tokenizer):
    from mlflow_finetune_plugin.config.schema import Recipe
    from mlflow_finetune_plugin.models.base import load_base_model
    from mlflow_finetune_plugin.train.objectives import sft
    from mlflow_finetune_plugin.train.trainers import training_arguments

    tokenizer.chat_template = TOOLS_TEMPLATE
    path = jsonl(tmp_path / "tools.jsonl", [tool_row("Paris"), tool_row("Oslo"), *qa_rows(1)])
    report = check_data(path, tokenizer=tokenizer, model_label="tools-model")
    assert report.ok and report.format == "chat", report.render()
    ds, _ = load_training_dataset(path)
    assert ds[0]["messages"][1]["tool_calls"] == [{"type": "function", "id": "call_1", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]  # arguments parsed: templates render objects
    assert json.loads(ds[0]["tools"]) == [WEATHER_TOOL] and ds[2]["tools"] is None
    recipe = Recipe.model_validate({"data": {"train": str(path), "max_length": 512},
                                    "train": {"max_steps": 1}})
    trainer = sft.build_trainer(recipe, load_base_model(recipe.model), tokenizer, ds, None,
                                training_arguments(recipe, "tools", None), [])
    paris = next(r for r in trainer.train_dataset if "Paris" in tokenizer.decode(r["input_ids"]))
    text = tokenizer.decode(paris["input_ids"])
    trained = tokenizer.decode([t for t, lab in zip(paris["input_ids"], paris["labels"]) if lab != -100])
    assert '"name": "get_weather"' in text.split("<|im_start|>user")[0]  # the tools list, in the prompt
    # This template has no generation prompt: after the tool's answer the model writes the assistant header
    # itself at inference, so the last reply trains it too (the prompt is the same in training and inference).
    assert trained == (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>'
        "<|im_start|>assistant\nSunny in Paris, 21 degrees.<|im_end|>")


def test_tool_rows_on_a_template_without_tools_are_errors_with_their_lines(tmp_path, tokenizer):
    path = jsonl(tmp_path / "tools.jsonl", [tool_row("Paris"), *qa_rows(1), tool_row("Oslo")])
    report = check_data(path, tokenizer=tokenizer, model_label="tiny")
    assert [i.line for i in report.errors] == [1, 3]
    assert report.errors[0].message == (
        "tool calls or tools (get_weather) that the chat template of tiny does not render: they would train "
        "on empty turns. Use a model whose chat template supports tools (check one with `mlflow-finetune "
        "data check --model NAME`), or leave these rows out")
    assert (
        f"{path}: rows with tool calls or tools that the chat template of tiny does not render: they would "
        "train on empty turns.") in report.render()
    assert "(2 rows: lines 1, 3)" in report.render()
    # and the backend refuses them before a run exists
    proj = project(tmp_path / "p", "data: {max_length: 256}\n", [tool_row("Paris"), *qa_rows(60)])
    with pytest.raises(FinetuneError,
                       match=r"train.jsonl:1: tool calls or tools \(get_weather\) that the chat "
                             r"template of tiny does not render"):
        check_recipe_data(load_recipe(proj), check_data)


# ---------------------------------------------------------------- 4. Hugging Face datasets


def test_hf_dataset_offline_error_names_it_and_suggests_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    records, issues = read_records_lenient("hf:ridgeway/bike-faq@v2:test")
    assert records == [] and len(issues) == 1
    message = str(issues[0])
    assert message.startswith("hf:ridgeway/bike-faq@v2:test: cannot load the Hugging Face dataset "
                              "'ridgeway/bike-faq': the hub is not reachable (HF_HUB_OFFLINE=1")
    assert (
        "datasets.load_dataset('ridgeway/bike-faq', split='test', "
        "revision='v2').to_json('bike-faq-test.jsonl')" in message)
    assert "then point data.train (or data.eval) at that file" in message
    # A recipe may name it (no file check); the pre-flight check stops with the same message.
    recipe = load_recipe(project(tmp_path, "data: {train: 'hf:ridgeway/bike-faq'}\n", qa_rows(2)))
    assert recipe.data.train == "hf:ridgeway/bike-faq"
    with pytest.raises(FinetuneError, match=r"hf:ridgeway/bike-faq: cannot load the Hugging Face dataset "
                                            r"'ridgeway/bike-faq': the hub is not reachable"):
        check_recipe_data(recipe, check_data)
    (tmp_path / "finetune.yaml").write_text("data: {train: 'hf:'}\n")
    with pytest.raises(RecipeError, match="data.train: 'hf:' names no dataset; write hf:ORG/NAME"):
        load_recipe(tmp_path)


def test_hf_dataset_loads_through_datasets_with_its_split(tmp_path, monkeypatch):
    """A dataset folder in the hub's layout goes through the same `datasets.load_dataset` call as a hub
    name."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "bike-faq"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list(qa_rows(3)).to_parquet(folder / "data" / "train-00000-of-00001.parquet")
    datasets.Dataset.from_list(qa_rows(2, 10)).to_parquet(folder / "data" / "test-00000-of-00001.parquet")
    ds, fmt = load_training_dataset(f"hf:{folder}:test")
    assert fmt == "chat" and ds["messages"] == [r["messages"] for r in qa_rows(2, 10)]
    assert len(load_training_dataset(f"hf:{folder}")[0]) == 3  # split default: train
    logged = mlflow_dataset(ds, f"hf:{folder}:test", name="bike-faq")
    source = json.loads(logged.source.to_json())
    assert source["path"] == str(folder) and source["split"] == "test" and len(logged.digest) == 16
    _, issues = read_records_lenient(f"hf:{folder}:validation")
    assert "has no split 'validation'" in issues[0].message and f"hf:{folder}:SPLIT" in issues[0].message
    # through a recipe: train and eval splits of the same dataset
    recipe = load_recipe(project(tmp_path / "p", f"data: {{train: 'hf:{folder}', eval: 'hf:{folder}:test'}}\n"
                                                 "eval: {enabled: true}\n", qa_rows(1)))
    from mlflow_finetune_plugin.data.splits import load_splits

    data = load_splits(recipe)
    train, held_out, _ = data.train, data.eval, data.fmt
    assert (len(train), len(held_out)) == (3, 2)


# ---------------------------------------------------------------- 5. advice before GPU time


def test_few_training_rows_advise_few_shot_prompting_first(tmp_path):
    few = check_data(jsonl(tmp_path / "few.jsonl", qa_rows(49)))
    (warning,) = few.warnings
    assert warning.line is None and warning.message.startswith(
        "only 49 training rows: with fewer than 50 examples, few-shot prompting (a few examples in the "
        "prompt, no training) often does as well, so try it first. The evaluation's `fewshot` contender")
    assert check_data(jsonl(tmp_path / "enough.jsonl", qa_rows(50))).warnings == []
    assert check_data(tmp_path / "few.jsonl", split="eval").warnings == []


def test_near_duplicates_after_normalizing_case_whitespace_and_punctuation(tmp_path):
    def row(q, a):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    rows = [row("Do you fix punctures?", "Yes, while you wait."), row("do you  fix "
                                                                      "punctures", "yes while you wait!"),
            row("Do you fix punctures?", "Yes, while you wait."), row("Do you fix brakes?", "Yes.")]
    report = check_data(jsonl(tmp_path / "d.jsonl", rows + qa_rows(50)))
    assert (report.duplicates, report.near_duplicates) == (1, 1)
    assert [(w.line, w.message) for w in report.warnings] == [
        (2, "near-duplicate of line 1 (the same text ignoring case, whitespace and punctuation)"),
        (3, "duplicate of line 1 (identical row)")]
    assert "near-duplicates 1" in report.render()


def test_train_eval_overlap_is_flagged_in_data_check_and_before_a_run(tmp_path, monkeypatch, tokenizer,
                                                                      capsys):
    import mlflow_finetune_plugin.models.base as models

    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: tokenizer)
    train = jsonl(tmp_path / "train.jsonl", qa_rows(60))
    held_out = jsonl(tmp_path / "eval.jsonl", [*qa_rows(2, 100), qa_rows(1, 7)[0],
                                               {"messages": [{"role": "user",
                                                              "content": "what is 9 times three"},
                                                             {"role": "assistant", "content": "27"}]}])
    result = CliRunner().invoke(main, ["data", "check", str(train), "--eval", str(held_out)])
    assert result.exit_code == 0, result.output
    assert "eval overlap    2" in result.output
    assert (
        f"{held_out}: prompts that are also in the training data ({train}): the evaluation scores the model "
        "on what it was trained on and looks better than it is; drop them from one split (2 rows: lines 3, "
        "4)") in result.output
    result = CliRunner().invoke(main, ["data", "check", str(train), "--eval", str(held_out), "--strict"])
    assert result.exit_code == 1
    # The backend's pre-flight check warns (and goes on); with data.strict it stops.
    proj = project(tmp_path / "p", "data: {eval: data/eval.jsonl}\n", qa_rows(60),
                   [*qa_rows(2, 100), qa_rows(1, 7)[0]])
    check_recipe_data(load_recipe(proj), check_data)
    err = capsys.readouterr().err
    assert "Data warnings (advice before training; `data.strict: true` makes them errors):" in err
    assert "eval.jsonl:3: same prompt as " in err and "train.jsonl:8" in err
    with pytest.raises(FinetuneError, match=r"eval.jsonl:3: same prompt as .*train.jsonl:8"):
        check_recipe_data(load_recipe(proj, overrides={"data.strict": "true"}), check_data)


def test_answers_cut_by_max_length_with_the_share_of_tokens_lost(tmp_path, tokenizer):
    long_answer = " ".join(["pedal"] * 60)
    rows = [*qa_rows(50), {"messages": [{"role": "user", "content": "Say pedal sixty times."},
                                        {"role": "assistant", "content": long_answer}]},
            {"messages": [{"role": "user", "content": "Again."},
                          {"role": "assistant", "content": long_answer}]}]
    path = jsonl(tmp_path / "long.jsonl", rows)
    report = check_data(path, tokenizer=tokenizer, max_length=32)
    assert report.ok and report.too_long == 2
    answers = []
    for row in rows:  # answer tokens per row, from the template's assistant masks
        out = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        answers.append(out["assistant_masks"])
    lost = sum(sum(mask[32:]) for mask in answers)
    total = sum(sum(mask) for mask in answers)
    assert lost > 0 and report.cut_share == pytest.approx(lost / total)
    assert (
        f"{path}: longer than max_length 32: the ends are cut, {lost} of the {total} answer tokens in this "
        f"file ({lost / total:.1%}) are lost; raise data.max_length (--max-length) or shorten these rows "
        "(2 rows: lines 51, 52)") in report.render()
    assert f"too long        2 ({lost / total:.1%} of the answer tokens cut)" in report.render()


# ---------------------------------------------------------------- 6. errors that diagnose


PREFS = [{"prompt": f"Can I return bike {i}?", "chosen": "Yes, within 30 days with the receipt.",
          "rejected": "No."} for i in range(41)]


def test_declared_format_and_rows_disagree_is_one_line_with_the_key_to_change(tmp_path):
    path = jsonl(tmp_path / "prefs.jsonl", PREFS)
    report = check_data(path, fmt="chat", format_key="data.format")
    assert [str(i) for i in report.errors] == [
        f"{path}: the rows are preference data (prompt, chosen, rejected (or chosen/rejected as message "
        "lists); 41 of the first 41 rows), but data.format is 'chat', which needs messages (a list of {role, "
        "content}). Set data.format: preference (or auto, which detects it)"]
    with pytest.raises(DataError, match=r"--format is 'chat'.*Set --format: preference"):
        load_training_dataset(path, fmt="chat", format_key="--format")
    # rows of no known format: one line naming the keys, the mapping to write, and the key
    other = jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}] * 3)
    (issue,) = check_data(other, fmt="chat", format_key="data.format").errors
    assert issue.message == (
        "no row has the keys of data.format 'chat' (messages (a list of {role, content})); the "
        "rows have the keys ['answer', 'question']. If they hold these fields under other names, "
        "map them (e.g. data.columns: {messages: answer}); else set data.format to the rows' "
        "format")


def test_dpo_with_a_chat_eval_file_says_how_to_fix_the_eval_split(tmp_path):
    """`-e dpo -P data=prefs.jsonl` on a recipe whose eval file is chat data (the support-bot recipe): one
    line saying which file, and the two ways out."""
    proj = project(tmp_path, "data:\n  format: chat\n  max_length: 64\n  eval: data/eval.jsonl\n",
                   qa_rows(60))
    jsonl(proj / "data" / "eval.jsonl", qa_rows(5))
    jsonl(proj / "prefs.jsonl", PREFS)
    with pytest.raises(FinetuneError) as e:
        check_recipe_data(load_recipe(proj, method="dpo", overrides={"data": "prefs.jsonl"}), check_data)
    line = str(e.value).splitlines()[1]
    assert "data/eval.jsonl: data.eval is chat data, but the `dpo` method trains on preference rows" in line
    assert "-P data.eval=FILE" in line and "clear it (-P data.eval=;" in line


def test_dpo_on_preference_rows_of_a_chat_recipe_infers_the_format(tmp_path, capsys):
    proj = project(tmp_path, "data:\n  format: chat\n  max_length: 64\n", qa_rows(60))
    jsonl(proj / "prefs.jsonl", PREFS)
    recipe = load_recipe(proj, method="dpo", overrides={"data": "prefs.jsonl"})
    check_recipe_data(recipe, check_data)
    # what the training process reads them as
    assert load_splits(recipe).formats == {"data.train": "preference"}
    err = capsys.readouterr().err
    assert (
        f"Note: data.format is 'chat', but -e dpo trains on preference rows and {proj / 'prefs.jsonl'} holds "
        "preference rows: reading them as preference.") in err
    assert "only 41 training rows" in err  # the advice, not an error
    # -e lora on the same rows: one line naming the entry point that takes them
    with pytest.raises(FinetuneError) as e:
        check_recipe_data(load_recipe(proj, method="lora", overrides={"data": "prefs.jsonl"}), check_data)
    assert str(e.value).splitlines()[:2] == [
        "1 problem in the data; nothing was started:",
        f"  {proj / 'prefs.jsonl'}: data.train is preference data, but the `lora` method trains on chat, "
        "sharegpt, alpaca or prompt_completion rows. Use the `dpo` method for preference pairs (prompt, "
        "chosen, rejected)."]
