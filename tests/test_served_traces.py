"""The loop closes (docs/traces.md): `mlflow-finetune serve --trace EXPERIMENT` records each chat completion
it answers as an MLflow trace under the served version's logged model, takes feedback on it (`POST
/v1/feedback`), and that traffic is read back by `mlflow.search_traces` and by the project's own `traces:`
reader as the next fine-tune's rows; a tracking store that fails never fails an answer."""

from __future__ import annotations

import httpx
import mlflow
import pytest
from click.testing import CliRunner

from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.data.traces import DEFAULT_EXPECTATIONS, DEFAULT_FEEDBACK, query_of, read_traces
from mlflow_finetune_plugin.registry.versions import logged_model_id
from mlflow_finetune_plugin.serving.tracing import (
    EXPECTATION,
    FEEDBACK,
    TRACE_HEADER,
    Feedback,
    Tracer,
    served_choice,
)
from tests.helpers import (
    cli_process,
    drain,
    forget_active_experiment,
    free_port,
    register_version,
    stop,
    use_store,
    wait_for_http,
)

EXPERIMENT = "support-traffic"
# Greedy, ending at the first space: the tiny model's answers stop (finish_reason stop), not cut at the limit.
ASK = {"max_tokens": 16, "stop": [" "], "temperature": 0.0}


def user(text):
    return {"role": "user", "content": text}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """bot v1 served by `serve --trace support-traffic` on a sqlite store: (base URL, version, the server's
    log)."""
    root = tmp_path_factory.mktemp("served-traces")
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, root)
        version = register_version(seed=0)
        port = free_port()
        server = cli_process("serve", f"bot/{version}", "--engine", "transformers", "--port", str(port),
                             "--trace", EXPERIMENT)
        log = drain(server)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health", server)
            yield f"http://127.0.0.1:{port}/v1", version, log
        finally:
            stop(server)
            forget_active_experiment()
            mlflow.set_tracking_uri(None)


@pytest.mark.integration
def test_served_answers_are_traces_of_the_version_with_feedback_read_back_as_training_rows(served):
    import openai

    url, version, log = served
    name = f"bot-v{version}"
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    assert any(f"experiment '{EXPERIMENT}'" in line and "prompts and answers" in line for line in log)

    # One answer whole, one streamed: each carries its trace id.
    raw = client.chat.completions.with_raw_response.create(model=name, messages=[user("Where is my order?")],
                                                           **ASK)
    corrected, answer = raw.headers[TRACE_HEADER], raw.parse()
    with client.chat.completions.with_streaming_response.create(
            model=name, messages=[user("How do I reset my password?")], stream=True, **ASK) as stream:
        liked = stream.headers[TRACE_HEADER]
        chunks = list(stream.parse())
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed and len({c.id for c in chunks}) == 1
    disliked = client.chat.completions.with_raw_response.create(
        model=name, messages=[user("What are your opening hours?")], **ASK).headers[TRACE_HEADER]
    assert len({corrected, liked, disliked}) == 3

    def feedback(body):
        return httpx.post(f"{url}/feedback", json=body, timeout=60, trust_env=False)

    said = feedback({"trace_id": corrected, "thumbs": "down", "correction": "It ships tomorrow.",
                     "user": "alice"})
    assert said.status_code == 200, said.text
    assert [a["name"] for a in said.json()["assessments"]] == [FEEDBACK, EXPECTATION]
    by_id = feedback({"id": chunks[0].id, "thumbs": "up", "rating": 5})  # the answer's own id names it too
    assert by_id.status_code == 200 and by_id.json()["trace_id"] == liked, by_id.text
    assert feedback({"trace_id": disliked, "thumbs": False, "comment": "wrong hours"}).status_code == 200
    refused = feedback({"trace_id": liked, "thumbs": "maybe", "rating": 7})
    assert refused.status_code == 400 and "thumbs 'maybe'" in refused.text and "rating 7" in refused.text
    assert feedback({"trace_id": "tr-0123456789abcdef", "thumbs": "up"}).status_code == 404

    # Read back with MLflow: one trace per answer, a CHAT_MODEL span in OpenAI's shape, the version's logged
    # model.
    registered = mlflow.MlflowClient().get_model_version("bot", version)
    model_id = logged_model_id(registered)
    assert mlflow.get_logged_model(model_id).source_run_id == registered.run_id
    assert any(f"data.traces.model_id={model_id}" in line for line in log)  # `serve` says how to select them
    experiment = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    traces = {t.info.trace_id: t for t in mlflow.search_traces(locations=[experiment], model_id=model_id,
                                                                return_type="list")}
    assert set(traces) == {corrected, liked, disliked}  # the server's start-up check goes round the front
    (span,) = [s for s in traces[corrected].data.spans if str(s.span_type) == "CHAT_MODEL"]
    assert span.inputs["messages"] == [user("Where is my order?")] and span.inputs["model"] == name
    assert span.outputs["choices"][0]["message"]["content"] == answer.choices[0].message.content
    assert traces[corrected].info.tags["finetune.served.model"] == f"bot/{version}"
    (stream_span,) = [s for s in traces[liked].data.spans if str(s.span_type) == "CHAT_MODEL"]
    assert stream_span.outputs["choices"][0]["message"]["content"] == streamed  # the stream joined
    assessments = {(a.name, str(a.value)) for a in traces[corrected].info.assessments}
    assert assessments >= {(FEEDBACK, "False"), (EXPECTATION, "It ships tomorrow.")}
    assert next(a for a in traces[corrected].info.assessments if a.name
                == FEEDBACK).source.source_id == "alice"

    # Read back as the next fine-tune's data: the version's own traffic, its feedback applied.
    got = read_traces(query_of(f"traces:{EXPERIMENT}", {"model_id": model_id}))
    assert not got.issues, got.issues
    rows = [rec["messages"] for _, rec in got.records]
    assert [user("Where is my order?"), {"role": "assistant", "content": "It ships tomorrow."}] in rows
    assert [user("How do I reset my password?"), {"role": "assistant", "content": streamed}] in rows
    assert not any(m[0] == user("What are your opening hours?")
                   for m in rows) and got.left_out["negative feedback"]


def test_feedback_names_are_those_the_traces_reader_counts_and_input_is_checked():
    assert FEEDBACK in DEFAULT_FEEDBACK and EXPECTATION in DEFAULT_EXPECTATIONS
    assert served_choice("bot-v3").key == "bot/3" and served_choice("my-bot-v12-base").key == "my-bot/12:base"
    assert served_choice("merged") is None
    f = Feedback.parse({"trace_id": "tr-1", "thumbs": "thumbs down", "comment": "no", "correction": "yes"})
    assert f.assessments() == [(FEEDBACK, False, "no"), (EXPECTATION, "yes", None)]
    assert Feedback.parse({"id": "c", "rating": 2, "comment": "meh"}).assessments() == [("user_rating", 2,
                                                                                         "meh")]
    with pytest.raises(Exception, match="nothing to log"):
        Feedback.parse({"trace_id": "tr-1"})
    with pytest.raises(Exception, match="rating True"):
        Feedback.parse({"trace_id": "tr-1", "rating": True})
    out = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200)
    assert "--trace EXPERIMENT" in out.output and "prompts and answers" in " ".join(out.output.split())


def test_a_failing_tracking_store_leaves_answers_untraced_and_warns_once(tracking_uri, monkeypatch):
    said = []
    tracer = Tracer("traffic", "serve", said.append)

    def broken(*args, **kwargs):
        raise ConnectionError("the tracking server is down")

    monkeypatch.setattr(mlflow, "start_span_no_context", broken)
    monkeypatch.setattr(mlflow, "flush_trace_async_logging", broken)
    assert tracer.start(served_choice("bot-v1-base"), "bot-v1-base", {"messages": [user("hi")]}) is None
    assert tracer.start(None, "x", {"messages": []}) is None
    assert tracer.log_quietly("tr-1", Feedback("tr-1", thumbs=True)) == []
    status, answer = tracer.answer_feedback({"trace_id": "tr-1", "thumbs": "up"})
    assert status == 503 and "the tracking store could not log the feedback" in answer["error"]["message"]
    assert len(said) == 1 and "starting a trace failed" in said[0] and "ConnectionError" in said[0]


def test_a_stream_is_joined_into_one_completion_and_a_cut_or_unreadable_one_is_a_failed_trace():
    import asyncio
    import json

    from mlflow_finetune_plugin.serving.tracing import TracedRequest, joined_stream

    def sse(*chunks):
        return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"

    call = {"index": 0, "id": "c1", "function": {"name": "order_", "arguments": '{"order"'}}
    raw = sse(
        {
            "id": "x",
            "model": "bot-v1",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "It "}}],
        },
        {"id": "x", "choices": [{"index": 0, "delta": {"content": "has", "tool_calls": [call]}}]},
        {
            "id": "x",
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [{"index": 0, "function": {"name": "status", "arguments": ': "7"}'}}]
                    },
                    "finish_reason": "stop",
                }
            ],
        },
        {"id": "x", "choices": [], "usage": {"completion_tokens": 3}},
    )
    joined = joined_stream(raw)
    assert joined["id"] == "x" and joined["usage"] == {"completion_tokens": 3}
    assert joined["choices"] == [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "It has", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "order_status",
                                                          "arguments": '{"order": "7"}'}}]}}]

    class Recorder:
        def end(self, span, outputs, error=None):
            self.got = (outputs, error)

    def traced(body: bytes, streamed=True, status=200):
        request = TracedRequest(Recorder(), type("Span", (), {"trace_id": "tr-1"})(), streamed)

        async def passing():
            async def chunks():
                yield body
            return [c async for c in request.watch(chunks(), status)]

        assert asyncio.run(passing()) == [body]  # the bytes pass untouched
        request.end()
        return request.tracer.got

    assert traced(raw) == (joined, None)
    # cut: no finish_reason
    assert "the stream ended before the answer did" in traced(raw.split(b"\n\n")[0])[1]
    assert "no answer could be read" in traced(b"<html>oops</html>", streamed=False)[1]
    assert "the server answered 400" in traced(b'{"error": "bad"}', streamed=False, status=400)[1]
    assert "could not be read" in traced(b'data: {"choices": [{"index": 0, "delta": 7}]}\n\n')[1]
