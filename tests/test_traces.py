"""Traces as a data source (docs/traces.md): CHAT_MODEL spans read as rows of each format, assessments, what
is left out, the errors before any model loads, held-out rows by conversation; and end to end, an application
with the real `openai` client and `mlflow.openai.autolog()` calling a model `mlflow-finetune serve` serves,
then a fine-tune from its traces (`-P data=traces:...`) with the lineage back to them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.entities import SpanType

from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.data.check import check_data
from mlflow_finetune_plugin.data.preflight import check_recipe_data
from mlflow_finetune_plugin.data.splits import hold_out_groups, load_splits
from mlflow_finetune_plugin.data.traces import READ_FORMATS, query_of, read_traces
from mlflow_finetune_plugin.errors import FinetuneError
from tests.helpers import (
    FAST_OVERRIDES,
    cli_process,
    forget_active_experiment,
    free_port,
    register_version,
    stop,
    subprocess_env,
    wait_for_http,
    write_project,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "order_status",
            "parameters": {"type": "object", "properties": {"order": {"type": "string"}}},
        },
    }
]


def user(text):
    return {"role": "user", "content": text}


def bot(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def completion(message, finish="stop"):
    return {"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": message,
                                                                 "finish_reason": finish}]}


def call(messages, answer, finish="stop", tools=None, outputs=None, app=True):
    """One traced model call as autolog records it (a CHAT_MODEL span), inside an app span of its own."""
    def model_span():
        with mlflow.start_span("Completions", span_type=SpanType.CHAT_MODEL) as span:
            span.set_inputs({"messages": messages, "model": "m", **({"tools": tools} if tools else {})})
            span.set_outputs(outputs if outputs is not None else completion(answer, finish))

    if not app:
        with mlflow.start_span("Completions", span_type=SpanType.CHAT_MODEL) as span:
            span.set_inputs({"messages": messages})
            span.set_outputs(outputs if outputs is not None else completion(answer, finish))
        return span.trace_id
    with mlflow.start_span("support_app", span_type=SpanType.CHAIN) as root:
        model_span()
    return root.trace_id


def synthetic_traffic(experiment="app"):
    """Traces of every case, by name: {case: trace id}."""
    mlflow.set_experiment(experiment)
    call_ = {"type": "function", "id": "c1", "function": {"name": "order_status",
                                                          "arguments": '{"order": "7"}'}}
    t = {"turn1": call([user("hi")], bot("hello")),
         "turn2": call([user("hi"), bot("hello"), user("where is order 7?")], bot(None, tool_calls=[call_]),
                       tools=TOOLS),
         "turn3": call([user("hi"), bot("hello"), user("where is order 7?"), bot(None, tool_calls=[call_]),
                        {"role": "tool", "tool_call_id": "c1", "content": "shipped"}], bot("It has shipped."),
                       tools=TOOLS),
         "corrected": call([user("capital of France?")], bot("Lyon")),
         "down": call([user("2+2?")], bot("5")),
         "up": call([user("2+2?")], bot("4")),
         "cut": call([user("a story")], bot("Once upon"), finish="length"),
         "empty": call([user("anything?")], bot("  ")),
         "bare": call([user("bye")], bot("goodbye"), app=False),
         "unknown": call([user("?")], None, outputs={"generations": ["x"]})}
    with pytest.raises(RuntimeError), mlflow.start_span("support_app"):
        call([user("boom")], bot("never"))
        raise RuntimeError("the app failed")
    mlflow.flush_trace_async_logging()
    mlflow.log_expectation(trace_id=t["corrected"], name="expected_response", value="Paris")
    mlflow.log_feedback(trace_id=t["down"], name="user_feedback", value=False)
    mlflow.log_feedback(trace_id=t["up"], name="user_feedback", value="thumbs up")
    mlflow.log_feedback(trace_id=t["turn1"], name="relevance", value=False)  # a judge's: not a user's verdict
    forget_active_experiment()
    return t


def rows(fmt, **config):
    got = read_traces(query_of("traces:app", config or None, fmt))
    assert not got.issues, got.issues
    return got, [rec for _, rec in got.records]


def test_traces_become_rows_of_each_format_and_what_is_left_out_is_counted(tracking_uri):
    t = synthetic_traffic()
    got, chat = rows("chat")
    # one row per conversation: turn1 and turn2 are inside turn3's row, tools and tool calls kept
    assert chat[0]["messages"][-1] == bot("It has shipped.") and len(chat[0]["messages"]) == 6
    assert (
        chat[0]["tools"] == TOOLS
        and chat[0]["messages"][3]["tool_calls"][0]["function"]["name"] == "order_status"
    )
    assert [{"messages": r["messages"]} for r in chat[1:]] == [
        {"messages": [user("capital of France?"), bot("Paris")]}, {"messages": [user("2+2?"), bot("4")]},
        {"messages": [user("bye"), bot("goodbye")]}]
    # each chat row keeps the answer the traced model gave (the teacher's: an expectation replaced "Lyon")
    assert [(r["teacher"]["answer"], r["teacher"]["model"]) for r in chat[1:]] == [
        ("Lyon", "m"), ("4", "m"), ("goodbye", None)]
    assert got.row_traces[0] == sorted([t["turn1"], t["turn2"], t["turn3"]])
    assert got.summary()["read"] == 11 and got.used == 6 and dict(got.left_out) == {
        "negative feedback": 1, "answer cut off at the length limit (finish_reason length)": 1,
        "empty answer": 1, "model calls in a message format not read here": 1,
        "failed (trace state ERROR)": 1}

    _, pairs = rows("preference")
    assert pairs == [{"prompt": [user("capital of "
                                      "France?")], "chosen": [bot("Paris")], "rejected": [bot("Lyon")]},
                     {"prompt": [user("2+2?")], "chosen": [bot("4")], "rejected": [bot("5")]}]
    _, thumbs = rows("unpaired_preference")
    assert [(r["completion"][0]["content"], r["label"]) for r in thumbs] == [
        ("Paris", True), ("Lyon", False), ("5", False), ("4", True)]
    _, prompts = rows("prompt_only")
    assert prompts[0] == {"prompt": [user("hi")]} and len(prompts) == 7  # failed and unreadable calls: none
    # only rated answers; other feedback names
    assert [r["messages"][-1]["content"] for r in rows("chat", unrated=False)[1]] == ["Paris", "4"]
    judged = rows("chat", feedback=["relevance"])[1]  # the judge's verdict on turn1 counts: weight 0 there
    assert judged[0]["messages"][1] == bot("hello", weight=0) and [r["messages"][-1]["content"]
                                                                   for r in judged][1:] == ["Paris", "5", "4",
                                                                                            "goodbye"]


def test_a_corrected_earlier_turn_is_its_own_row_and_weight_zero_in_the_conversation(tracking_uri):
    mlflow.set_experiment("app")
    first = call([user("hi")], bot("yo"))
    call([user("hi"), bot("yo"), user("price?")], bot("10 euros"))
    mlflow.flush_trace_async_logging()
    mlflow.log_expectation(trace_id=first, name="expected_response", value="Hello, how can I help?")
    got, chat = rows("chat")
    assert [r["messages"] for r in chat] == [[user("hi"), bot("Hello, how can I help?")],
                                             [user("hi"), bot("yo", weight=0), user("price?"),
                                              bot("10 euros")]]
    assert [r["teacher"]["answer"] for r in chat] == ["yo", "10 euros"]  # what the traced model answered
    assert got.groups[0] == got.groups[1]  # one conversation: held out together
    groups = ["a", "a", "b", "c", "c", "d"]
    train, held = hold_out_groups(groups, 0.5, seed=1)
    assert sorted(train + held) == list(range(6)) and len({groups[i] for i in held}) == 2
    assert not {groups[i] for i in train} & {groups[i] for i in held}


def test_bad_trace_sources_are_refused_before_any_model_loads(tracking_uri, tmp_path):
    project = write_project(tmp_path / "p", "eval:\n  enabled: false\n")

    def refused(overrides, method="lora"):
        with pytest.raises(FinetuneError) as err:
            recipe = load_recipe(project, method=method, overrides=overrides)
            check_recipe_data(recipe, check_data)
        return str(err.value)

    with pytest.raises(FinetuneError, match="data.train: 'traces:' names no experiment"):
        load_recipe(write_project(tmp_path / "q", "data:\n  train: 'traces:'\n"), method="lora")
    assert "data.traces: narrows a traces: source" in refused({"data.traces.since": "7d"})
    assert "data.traces.since" in refused({"data": "traces:app", "data.traces.since": "last tuesday"})
    assert "no experiment named 'app'" in refused({"data": "traces:app"})
    mlflow.set_experiment("app")
    forget_active_experiment()
    assert "experiment 'app' has no traces" in refused({"data": "traces:app"})
    mlflow.set_experiment("app")
    call([user("?")], None, outputs={"generations": ["x"]})
    mlflow.flush_trace_async_logging()
    forget_active_experiment()
    message = refused({"data": "traces:app"})
    assert "1 model call in a message format not read here" in message and "'Completions'" in message
    assert all(f in message for f in READ_FORMATS)
    mlflow.set_experiment("app")
    call([user("2+2?")], bot("4"))
    mlflow.flush_trace_async_logging()
    forget_active_experiment()
    assert "matches data.traces (filter \"tags.app = 'x'\")" in refused(
        {"data": "traces:app", "data.traces.filter": "tags.app = 'x'"})
    assert "not a trace filter" in refused({"data": "traces:app", "data.traces.filter": "nonsense here"})
    assert "none of the 2 traces makes a preference row" in refused({"data": "traces:app"}, method="dpo")
    recipe = load_recipe(project, method="lora", overrides={"data": "traces:app", "data.traces.since": "1d"})
    assert len(load_splits(recipe).train) == 1


# ------------------------------------------------------------------------------ end to end, real components

APP = textwrap.dedent('''
    """A support app: the real openai client, autologged, calling the served model; assessments on some \
traces."""
    import json, sys
    import mlflow, openai

    url, model = sys.argv[1], sys.argv[2]
    mlflow.set_experiment("support-app")
    mlflow.openai.autolog()
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)

    @mlflow.trace(name="support_app")
    def ask(messages, name=model, temperature=0.0, **kw):
        out = client.chat.completions.create(model=name, messages=messages, temperature=temperature, **kw)
        return out.choices[0].message.content

    def traced(*args, **kw):
        answer = ask(*args, **kw)
        return answer, mlflow.get_last_active_trace_id()

    q1 = [{"role": "user", "content": "How do I reset my password?"}]
    a1, t1 = traced(q1, max_tokens=16, stop=[" "])
    q2 = q1 + [{"role": "assistant", "content": a1}, {"role": "user", "content": "And my username?"}]
    a2, t2 = traced(q2, max_tokens=16, stop=[" "])
    _, corrected = traced([{"role": "user", "content": "Where is my order?"}], max_tokens=16, stop=[" "])
    refund = [{"role": "user", "content": "Can I get a refund?"}]
    down_answer, down = traced(refund, max_tokens=32, stop=[" "], temperature=1.0)  # sampled: another answer
    up_answer, up = traced(refund, max_tokens=16, stop=[" "])
    _, cut = traced([{"role": "user", "content": "Tell me a long story."}], max_tokens=3)
    _, again = traced(q1, max_tokens=16, stop=[" "])  # the same conversation again: in the same row
    _, plain = traced([{"role": "user", "content": "What are your opening hours?"}], max_tokens=16, stop=[" \
"])
    try:
        ask(q1, name="no-such-model", max_tokens=4)
    except openai.NotFoundError:
        pass
    failed = mlflow.get_last_active_trace_id()
    mlflow.flush_trace_async_logging()
    mlflow.log_expectation(trace_id=corrected, name="expected_response", value="It ships tomorrow.")
    mlflow.log_feedback(trace_id=down, name="user_feedback", value=False)
    mlflow.log_feedback(trace_id=up, name="user_feedback", value=True)
    mlflow.log_feedback(trace_id=plain, name="relevance", value=False)  # an LLM judge's, not a user's
    print(json.dumps({"t1": t1, "t2": t2, "corrected": corrected, "down": down, "up": up, "cut": cut,
                      "again": again, "plain": plain, "failed": failed, "a1": a1,
                      "differ": down_answer != up_answer}))
''')


@pytest.fixture(scope="module")
def support_app(tmp_path_factory):
    """A registered tiny model served by `mlflow-finetune serve`, an app's traffic to it traced in a sqlite
    store: (store folder, tracking uri, {case: trace id})."""
    root = tmp_path_factory.mktemp("support-app")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        forget_active_experiment()
        version = register_version(seed=0)
        port = free_port()
        server = cli_process("serve", f"bot/{version}", "--engine", "transformers", "--port", str(port))
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health", server)
            (root / "app.py").write_text(APP)
            app = subprocess.run([sys.executable, "app.py", f"http://127.0.0.1:{port}/v1", f"bot-v{version}"],
                                 cwd=root, env=subprocess_env(uri), capture_output=True, text=True,
                                 timeout=300)
        finally:
            stop(server)
        assert app.returncode == 0, app.stderr[-3000:]
        forget_active_experiment()
    return root, uri, json.loads(app.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_a_fine_tune_from_an_apps_traces_trains_on_its_conversations_with_lineage(support_app, tmp_path,
                                                                                  monkeypatch):
    root, uri, t = support_app
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    forget_active_experiment()
    runner = CliRunner()
    out = runner.invoke(main, ["data", "from-traces", "support-app", "-o", str(tmp_path / "rows.jsonl")])
    assert out.exit_code == 0, out.output
    assert "9 traces read, 6 used (4 chat rows), 3 left out" in out.output
    for reason in ("1 negative feedback", "1 answer cut off", "1 failed"):
        assert reason in out.output
    chat = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert chat[0]["messages"][:3] == [{"role": "user", "content": "How do I reset my password?"},
                                       {"role": "assistant", "content": t["a1"]},
                                       {"role": "user", "content": "And my username?"}]
    assert chat[1]["messages"][-1] == {"role": "assistant", "content": "It ships tomorrow."}
    # each row keeps what the served model answered and its cost, as the autologged span has them (the
    # teacher)
    assert chat[1]["teacher"]["answer"] != "It ships tomorrow." and chat[1]["teacher"]["latency_s"] > 0
    assert all(row["teacher"]["model"].startswith("bot-v") for row in chat), [row["teacher"] for row in chat]
    assert [m["content"] for m in chat[3]["messages"]][0] == "What are your opening hours?"
    for fmt, n in (("preference", 1 + t["differ"]), ("unpaired_preference", 4)):
        out = runner.invoke(main, ["data", "from-traces", "traces:support-app", "--format", fmt, "-o",
                                   str(tmp_path / f"{fmt}.jsonl")])
        assert out.exit_code == 0 and f"({n} {fmt} rows)" in out.output, out.output

    project = write_project(tmp_path / "project", "data:\n  max_length: 64\n  packing: false\n")
    overrides = {**FAST_OVERRIDES, "data": "traces:support-app", "data.eval_split": 0.25,
                 "eval.max_examples": 1}
    cmd = [sys.executable, "-m", "mlflow", "run", str(project), "-e", "lora", "--backend", "finetune",
           "--experiment-name", "from-traces"] + [a for k, v in overrides.items() for a in ("-P", f"{k}={v}")]
    proc = subprocess.run(cmd, cwd=root, env=subprocess_env(uri), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traces (data.train traces:support-app): 9 traces read, 6 used (4 chat rows)" in proc.stderr

    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("from-traces").experiment_id])
    assert run.info.status == "FINISHED"
    # the held-out conversation's logged answers are the teacher contender; the verdict weighs the student
    # against it
    assert "eval/teacher/rougeL" in run.data.metrics and "Student vs teacher:" in run.data.tags[
        "finetune.verdict"]
    inputs = {i.dataset.name + ":" + next(tag.value for tag in i.tags if tag.key == "mlflow.data.context"): i
              for i in run.inputs.dataset_inputs}
    train, held = inputs["traces-support-app:training"], inputs["traces-support-app-eval:eval"]
    sources = [json.loads(i.dataset.source) for i in (train, held)]
    assert all(i.dataset.source_type == "mlflow_traces" for i in (train, held))
    assert sources[0]["experiment"] == "support-app" and sources[0]["rows"] == "chat"
    used = {t[k] for k in ("t1", "t2", "again", "corrected", "up", "plain")}
    assert set(sources[0]["trace_ids"]) | set(sources[1]["trace_ids"]) == used
    assert not set(sources[0]["trace_ids"]) & set(sources[1]["trace_ids"])  # whole conversations held out
    conversation = {t["t1"], t["t2"], t["again"]}
    assert conversation <= set(sources[0]["trace_ids"]) or conversation <= set(sources[1]["trace_ids"])
    for i in (train, held):  # the query and the ids, never the texts
        assert "password" not in i.dataset.source and "tomorrow" not in i.dataset.source
        assert "password" not in (i.dataset.profile or "") and "tomorrow" not in (i.dataset.schema or "")
