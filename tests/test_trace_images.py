"""Traces with images (docs/traces.md, "Images"): an application's image requests, traced by
`mlflow.openai.autolog()` with the real `openai` client, read back by `traces:` into rows whose images are the
bytes the user sent (MLflow keeps them as attachments of the trace); feedback filters them as it filters text;
an image the trace no longer holds leaves its call out, counted. End to end: a tiny LLaVA version served by
`serve --trace` records image requests the same way, and its traces read back into rows with their images."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import SpanType

from mlflow_finetune_plugin.data import trace_images
from mlflow_finetune_plugin.data.read import load_training_dataset
from mlflow_finetune_plugin.data.trace_rows import IMAGE
from mlflow_finetune_plugin.data.traces import query_of, read_traces
from mlflow_finetune_plugin.errors import FinetuneError
from tests.helpers import (
    REPO,
    cli_process,
    drain,
    forget_active_experiment,
    free_port,
    stop,
    train_in_process,
    use_store,
    wait_for_http,
)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}


def png(colour: str, side: int = 12) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), COLOURS[colour]).save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def asking(raw: bytes, text: str = "What colour is the shape?") -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": data_url(raw)}}]}


def bytes_of(url: str) -> bytes:
    assert url.startswith("data:image/png;base64,"), url[:40]
    return base64.b64decode(url.split(",", 1)[1])


@pytest.fixture
def echo_server():
    """A loopback OpenAI-compatible server that answers every chat completion with the `model` it was asked
    for (so a test says the answer): its /v1 URL."""
    class Answer(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            asked = json.loads(self.rfile.read(int(self.headers["content-length"])))
            body = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                               "model": asked["model"], "choices": [{"index": 0, "finish_reason": "stop",
                                                                     "message": {"role": "assistant",
                                                                                 "content": asked["model"]}}],
                               "usage": {"prompt_tokens": 9, "completion_tokens": 1,
                                         "total_tokens": 10}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def rows(fmt="chat", experiment="app", **config):
    got = read_traces(query_of(f"traces:{experiment}", config or None, fmt))
    assert not got.issues, got.issues
    return got, [rec for _, rec in got.records]


def test_autologged_image_requests_come_back_as_rows_with_the_same_images(tracking_uri, echo_server,
                                                                          monkeypatch):
    import openai

    red, green, blue, big = png("red"), png("green"), png("blue"), png("blue", side=64)
    mlflow.set_experiment("app")
    mlflow.openai.autolog()
    try:
        client = openai.OpenAI(base_url=echo_server, api_key="unused", max_retries=0)

        def ask(messages, answer):
            client.chat.completions.create(model=answer, messages=messages)
            return mlflow.get_last_active_trace_id()

        t = {"red": ask([asking(red)], "red"),
             # the conversation goes on: the same image is sent again (another attachment), one row
             "red2": ask([asking(red), {"role": "assistant", "content": "red"},
                          {"role": "user", "content": "Sure?"}],
                         "yes"),
             "green": ask([asking(green)], "blue"),        # corrected by an expectation
             "blue_down": ask([asking(blue)], "purple"),   # thumbs down
             "blue_up": ask([asking(blue)], "blue"),       # thumbs up: with the one above, a preference pair
             "text": ask([{"role": "user", "content": "hi"}], "hello")}
        monkeypatch.setenv("MLFLOW_TRACE_MAX_ATTACHMENT_SIZE", str(len(big) - 1))  # MLflow drops the image
        t["dropped"] = ask([asking(big)], "blue")
        monkeypatch.delenv("MLFLOW_TRACE_MAX_ATTACHMENT_SIZE")
    finally:
        mlflow.openai.autolog(disable=True)
    mlflow.flush_trace_async_logging()
    mlflow.log_expectation(trace_id=t["green"], name="expected_response", value="green")
    mlflow.log_feedback(trace_id=t["blue_down"], name="user_feedback", value=False)
    mlflow.log_feedback(trace_id=t["blue_up"], name="user_feedback", value=True)
    forget_active_experiment()

    # What autolog stored: a reference to an attachment in place of each image (docs/traces.md).
    span = next(s for s in mlflow.get_trace(t["red"]).data.spans if str(s.span_type) == "CHAT_MODEL")
    assert span.inputs["messages"][0]["content"][1]["image_url"]["url"].startswith("mlflow-attachment://")

    got, chat = rows()
    assert [r["messages"][-1]["content"] for r in chat] == ["yes", "green", "blue", "hello"]
    assert got.row_traces[0] == sorted([t["red"], t["red2"]])  # the image re-sent: the same conversation
    # MLflow marks the span whose image it dropped for its size failed (the image gone, said in the span's
    # status)
    assert dict(got.left_out) == {"negative feedback": 1, "failed (trace state ERROR)": 1}
    first = chat[0]["messages"]
    assert first[0]["content"][0] == {"type": "text", "text": "What colour is the shape?"}
    assert bytes_of(first[0]["content"][1]["image_url"]["url"]) == red  # the bytes the user sent
    assert [m["content"] for m in first[1:]] == ["red", "Sure?", "yes"]
    assert bytes_of(chat[1]["messages"][0]["content"][1]["image_url"]["url"]) == green
    assert chat[1]["teacher"]["answer"] == "blue"  # what the traced model answered, before the correction

    # Read into the canonical form training reads: placeholders and an `images` column, the same pixels.
    from PIL import Image

    ds, fmt = load_training_dataset("traces:app", records=got.records)
    assert fmt == "chat" and ds[0]["messages"][0]["content"] == [
        {"type": "text", "text": "What colour is the shape?"}, {"type": "image"}]
    assert [len(images) for images in ds["images"]] == [1, 1, 1, 0]
    pixels = Image.open(io.BytesIO(bytes_of(ds[2]["images"][0]))).convert("RGB").getpixel((5, 5))
    assert pixels == COLOURS["blue"]

    _, pairs = rows("preference")
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("green", "blue"), ("blue", "purple")]
    assert bytes_of(pairs[1]["prompt"][0]["content"][1]["image_url"]["url"]) == blue
    ds, _ = load_training_dataset("traces:app", records=rows("preference")[0].records)
    assert all(len(images) == 1 for images in ds["images"])
    _, prompts = rows("prompt_only")
    assert len(prompts) == 5 and sum(trace_images.has_image(p["prompt"]) for p in prompts) == 4


def synthetic_call(inputs: dict, outputs: dict) -> str:
    with mlflow.start_span("Completions", span_type=SpanType.CHAT_MODEL) as span:
        span.set_inputs(inputs)
        span.set_outputs(outputs)
    return span.trace_id


def answer(text):
    return {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                                                                          "content": text}}]}


def test_inline_and_http_images_responses_parts_and_a_missing_attachment(tracking_uri, monkeypatch):
    red = png("red")
    mlflow.set_experiment("app")
    # The Responses API's parts, extracted by MLflow like autolog's
    responses = synthetic_call({"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "colour?"}, {"type": "input_image", "image_url": data_url(red)}]}]},
        {"output": [{"type": "message", "content": [{"type": "output_text", "text": "red"}]}]})
    monkeypatch.setenv("MLFLOW_TRACE_EXTRACT_ATTACHMENTS", "false")  # MLflow keeps the data URL in the span
    synthetic_call({"messages": [asking(red, "inline?")]}, answer("inline"))
    monkeypatch.delenv("MLFLOW_TRACE_EXTRACT_ATTACHMENTS")
    url = "https://example.com/red.png"
    synthetic_call({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                               "image_url": {"url": url}}]}]},
                   answer("remote"))
    synthetic_call({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/tmp/gone.png"}}]}]}, answer("a path"))
    lost = synthetic_call({"messages": [asking(png("green"), "lost?")]}, answer("lost"))
    # an image in an assistant's or a tool's message is not OpenAI's: the call is not read
    synthetic_call({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {
        "url": url}}]}, {"role": "user", "content": "?"}]}, answer("odd"))
    mlflow.flush_trace_async_logging()
    forget_active_experiment()
    ref = next(s for s in mlflow.get_trace(lost).data.spans).inputs["messages"][0]["content"][1]["image_url"][
        "url"]
    attachments = next(Path().glob(f"mlruns/*/traces/{lost}/artifacts/attachments"))
    (attachments / ref.split("://")[1].split("?")[0]).unlink()

    traced = next(s for s in mlflow.get_trace(responses).data.spans).inputs["input"][0]["content"][1][
        "image_url"]
    assert traced.startswith("mlflow-attachment://")
    got, chat = rows()
    by_answer = {r["messages"][-1]["content"]: r["messages"][0]["content"] for r in chat}
    assert set(by_answer) == {"red", "inline", "remote"}
    assert by_answer["red"] == [{"type": "text", "text": "colour?"},
                                {"type": "image_url", "image_url": {"url": data_url(red)}}]
    assert bytes_of(by_answer["inline"][1]["image_url"]["url"]) == red
    assert by_answer["remote"] == [{"type": "image_url", "image_url": {"url": url}}]
    assert dict(got.left_out) == {IMAGE: 2, "model calls in a message format not read here": 1}
    assert responses in got.trace_ids

    # A later mlflow without the private call: said, not a silent loss of every image
    from mlflow.tracing.client import TracingClient

    monkeypatch.delattr(TracingClient, "_get_artifact_repo_for_trace")
    with pytest.raises(FinetuneError, match="does not read trace attachments"):
        read_traces(query_of("traces:app"))


def test_image_references_as_rows_hold_them():
    assert trace_images.content_parts(
        [{"type": "input_text", "text": "a"}, {"type": "input_image", "image_url": "https://x/y.png"}]
    ) == [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]
    assert trace_images.content_parts([{"type": "input_audio", "input_audio": {"data": "..."}}]) is None
    for held in (
        "[Attachment too large: 5000 bytes exceeds 10 bytes limit]",
        "/tmp/x.png",
        "mlflow-attachment://0b0f2c1e-0000-4000-8000-000000000000?content_type=audio%2Fwav&trace_id=tr-1",
    ):
        with pytest.raises(trace_images.NoImage):
            trace_images.image_url(held, None)


# ------------------------------------------------------------------------------ end to end: served, traced,
# read


@pytest.fixture(scope="module")
def vision_version(tmp_path_factory):
    """recipes/vision-colors trained on the built-in tiny LLaVA and registered (vision-colors/1), in a sqlite
    store of its own: (store folder, version). 60 steps (5 s): enough to end its answer (finish_reason stop,
    not cut at max_tokens, which no chat row is made of), not to read the colour."""
    root = tmp_path_factory.mktemp("vision-traces")
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, root)
        code, run = train_in_process(REPO / "recipes" / "vision-colors", root,
                                     {"train.max_steps": 60, "eval.enabled": False}, "vision-colors")
        assert code == 0 and run.info.status == "FINISHED"
        (version,) = mlflow.MlflowClient().search_model_versions("name='vision-colors'")
        yield root, version.version
        forget_active_experiment()
        mlflow.set_tracking_uri(None)


@pytest.mark.integration
def test_a_served_vision_model_traces_image_requests_read_back_with_their_images(vision_version, monkeypatch):
    import httpx
    import openai

    root, version = vision_version
    use_store(monkeypatch, root)
    port = free_port()
    server = cli_process("serve", f"vision-colors/{version}", "--engine", "transformers", "--port", str(port),
                         "--trace", "vision-traffic")
    log = drain(server)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        images = {name: (REPO / "recipes" / "vision-colors" / "data" / "images" / name).read_bytes()
                  for name in ("eval-000-red-square.png", "eval-002-blue-circle.png")}
        traced = {}
        for name, raw in images.items():
            reply = client.chat.completions.with_raw_response.create(
                model=f"vision-colors-v{version}", messages=[asking(raw)], max_tokens=8, temperature=0.0)
            choice = reply.parse().choices[0]
            assert choice.finish_reason == "stop", choice
            traced[name] = reply.headers["x-mlflow-trace-id"]
        said = httpx.post(f"http://127.0.0.1:{port}/v1/feedback", json={
            "trace_id": traced["eval-002-blue-circle.png"], "thumbs": "down", "correction": "blue"},
            timeout=60, trust_env=False)
        assert said.status_code == 200, said.text
    finally:
        stop(server)
    assert not any("Traceback" in line for line in log), "".join(log)[-3000:]
    forget_active_experiment()

    # The server stored each image as MLflow stores autolog's: an attachment, never a path
    trace = mlflow.get_trace(traced["eval-000-red-square.png"])
    url = trace.data.spans[0].inputs["messages"][0]["content"][1]["image_url"]["url"]
    assert url.startswith("mlflow-attachment://") and "/tmp" not in json.dumps(trace.data.spans[0].inputs)

    got, chat = rows(experiment="vision-traffic")
    assert got.used == 2 and len(chat) == 2
    by_trace = dict(zip([ids[0] for ids in got.row_traces], chat))
    for name, trace_id in traced.items():
        assert bytes_of(by_trace[trace_id]["messages"][0]["content"][1]["image_url"]["url"]) == images[name]
    assert by_trace[traced["eval-002-blue-circle.png"]]["messages"][-1] == {"role": "assistant",
                                                                            "content": "blue"}
    ds, _ = load_training_dataset("traces:vision-traffic", records=got.records)
    assert [len(i) for i in ds["images"]] == [1, 1]

    # and the next fine-tune trains on them
    code, run = train_in_process(REPO / "recipes" / "vision-colors", root, {
        "data": "traces:vision-traffic", "train.max_steps": 2, "eval.enabled": False,
        "registry.enabled": False},
        "from-vision-traffic")
    assert code == 0 and run.info.status == "FINISHED" and "train/loss" in run.data.metrics
    (source,) = [json.loads(i.dataset.source) for i in run.inputs.dataset_inputs
                 if i.dataset.source_type == "mlflow_traces"]
    assert sorted(source["trace_ids"]) == sorted(traced.values())  # the ids, not the images


def test_a_template_with_nothing_closing_the_reply_gets_no_response_template():
    """LLaVA-1.5's template ends no turn: a response template would need a close literal transformers can use,
    so none is given and `transformers serve` reads the raw decode (with one, it answered 500 to every
    request)."""
    from transformers import AutoTokenizer

    from mlflow_finetune_plugin.models.answers import response_template
    from mlflow_finetune_plugin.models.base import resolve_model_path

    assert response_template(AutoTokenizer.from_pretrained(resolve_model_path("tiny-llava"))) is None
    smolvlm = response_template(AutoTokenizer.from_pretrained(resolve_model_path("tiny-smolvlm")))
    assert smolvlm["fields"]["content"]["close"] == ["<end_of_utterance>"]
