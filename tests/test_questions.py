"""Questions from the user's documents (`questions:`): a teacher writes question rows from each chunk, and
only the rows whose quote is in their chunk survive. The teacher here is a loopback OpenAI-compatible server
whose canned reply is chosen by the chunk's source in the prompt: good rows, a made-up quote, a
near-duplicate, a reply that is not JSON, a fenced reply, one cut at max_tokens, and a 500."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import mlflow
import pytest

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.config.documents import QuestionsConfig
from mlflow_finetune_plugin.distill import teacher as teacher_module
from mlflow_finetune_plugin.distill.estimate import approximate_tokens
from mlflow_finetune_plugin.distill.questions import (
    parsed_items,
    prompt_of,
    questions_from_chunks,
    written_questions,
)
from mlflow_finetune_plugin.distill.teacher import LocalTeacher, teacher_of
from mlflow_finetune_plugin.errors import FinetuneError
from tests.helpers import free_port, send_json


def _chunk(name: str, text: str, n: int = 0) -> dict:
    return {"id": f"docs/{name}.md#{n}", "source": f"docs/{name}.md", "text": text, "line": 1,
            "heading": None}


GOOD = _chunk("good",
              "The store opens at nine in the morning.\nReturns are accepted   within\n30 days of purchase.")
MADE_UP = _chunk("madeup", "Shipping to Canada takes five to seven business days.")
FENCED = _chunk("fenced", "Gift cards never expire and can be used online.")
SINGLE = _chunk("single", "Support is reachable by phone on weekdays.")
NOT_JSON = _chunk("notjson", "Our founder started the company in a garage.")
CUT = _chunk("cut", "Prices include sales tax in every state.")
DOWN = _chunk("down", "The warehouse is in Ohio.")
UNUSED = _chunk("unused", "This chunk is past questions.max_chunks.")
CHUNKS = [GOOD, MADE_UP, FENCED, SINGLE, NOT_JSON, CUT, DOWN, UNUSED]


def _qa(question, answer, quote, rephrased=None) -> dict:
    return {"question": question, "rephrased": rephrased, "answer": answer, "quote": quote}


REPLIES = {  # source -> (content, finish_reason)
    "good": (json.dumps([
        _qa("When does the store open?", "The store opens at nine in the morning.",
            "the store OPENS at nine in the morning.", "At what time does the shop open?"),
        # the quote's line break and spaces differ from the chunk's, and its case: it still is in the chunk
        _qa("How long do I have to return an item?", "Returns are accepted within 30 days of purchase.",
            "Returns are accepted within 30   days\tof purchase", "How long do I have to return an item?")]),
             "stop"),
    "madeup": ("Here are the questions:\n" + json.dumps([
        _qa("How long does shipping to Canada take?", "It takes five to seven business days.",
            "five to seven business days"),
        _qa("Is shipping to Canada free?", "Yes, shipping to Canada is free.", "shipping to Canada is free"),
        {"question": "Who ships to Canada?", "answer": "We do."}]) + "\nHope this helps!", "stop"),
    "fenced": ("```json\n" + json.dumps([
        _qa("When does the store open?", "At nine.", "Gift cards never expire"),
        _qa("Do gift cards expire?", "No, gift cards never expire.", "Gift cards never expire")]) + "\n```",
               "stop"),
    "single": (json.dumps(_qa("When is support reachable by phone?",
                              "Support is reachable by phone on weekdays.",
                              "reachable by phone on weekdays", "On which days can I phone support?")),
               "stop"),
    "notjson": ("I cannot write questions about this excerpt.", "stop"),
    "cut": ('[{"question": "Do prices include tax?", "answer": "Yes, prices incl', "length"),
    "down": (json.dumps([_qa("Where is the warehouse?", "The warehouse is in "
                                                        "Ohio.", "warehouse is in Ohio")]),
             "stop"),  # answers 500 while `failing` holds it
}


class Teacher:
    """The loopback teacher: records every request (method, path, the chunk's source)."""

    def __init__(self):
        self.requests: list[tuple[str, str, str | None]] = []
        self.failing = {"down"}
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                teacher.requests.append(("GET", self.path, None))
                send_json(self, {"object": "list", "data": [{"id": "canned", "object": "model"}]})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                source = next(s for s in REPLIES if f"Source: docs/{s}.md" in prompt)
                teacher.requests.append(("POST", self.path, source))
                if source in teacher.failing:
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                content, finish = REPLIES[source]
                send_json(self, {"id": "x", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": finish,
                                              "message": {"role": "assistant", "content": content}}],
                                 "usage": {"prompt_tokens": 100, "completion_tokens": 20,
                                           "total_tokens": 120}})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def asked(self) -> list[str]:
        return [source for method, _, source in self.requests if method == "POST"]


@pytest.fixture
def teacher(monkeypatch):
    monkeypatch.setattr(teacher_module, "_RETRIES", (0.0, 0.0))  # the 500 is retried at once
    server = Teacher()
    yield server
    server.server.shutdown()


def _config(teacher, **kw) -> QuestionsConfig:
    return QuestionsConfig(teacher=teacher.url, max_chunks=7, dedupe=0.8, concurrency=2, **kw)


def test_rows_are_verified_against_their_chunk_and_every_drop_is_counted(teacher, tmp_path):
    said = []
    rows, summary = questions_from_chunks(_config(teacher), CHUNKS, tmp_path,
                                          echo=lambda m: said.append((len(teacher.requests), m)))
    assert summary["dropped"] == {"quote not in chunk": 1, "missing question, answer or quote": 1,
                                  "near-duplicate question": 1, "unparsable reply": 1, "cut at max_tokens": 1,
                                  "teacher error": 1}
    assert {k: summary[k] for k in ("chunks", "chunks_asked", "cached", "replies", "rows_written")} == {
        "chunks": 7, "chunks_asked": 7, "cached": 0, "replies": 6, "rows_written": 5}
    assert summary["teacher"] == f"{teacher.url} (canned)"
    assert (summary["prompt_tokens"], summary["completion_tokens"]) == (600, 120)  # 6 replies' usage
    assert "unused" not in teacher.asked() and teacher.asked().count("down") == 3  # asked, then retried twice
    assert rows[0] == {"messages": [{"role": "user", "content": "When does the store open?"},
                                    {"role": "assistant",
                                     "content": "The store opens at nine in the morning."}],
                       "source": "docs/good.md", "chunk": "docs/good.md#0",
                       "quote": "the store OPENS at nine in the morning.",
                       "rephrased": "At what time does the shop open?"}
    # whitespace and case differ from the chunk: kept; a rephrasing equal to the question is none
    assert rows[1]["quote"] == ("Returns are accepted within 30   days\tof "
                                "purchase") and rows[1]["rephrased"] is None
    assert [r["messages"][0]["content"] for r in rows] == [
        "When does the store open?", "How long do I have to return an item?",
        "How long does shipping to Canada take?", "Do gift cards expire?",
        "When is support reachable by phone?"]
    assert [r["chunk"] for r in rows] == ["docs/good.md#0"] * 2 + ["docs/madeup.md#0", "docs/fenced.md#0",
                                                                   "docs/single.md#0"]
    assert all(set(r) == {"messages", "source", "chunk", "quote", "rephrased"} for r in rows)
    # the plan, before any request: chunks to ask, estimated prompt tokens, the most reply tokens
    (before, plan), = said
    tokens = approximate_tokens(prompt_of(c, 3) for c in CHUNKS[:7])
    assert before == 0 and summary["estimate"]["prompt_tokens"] == tokens
    assert (
        f"questions from 7 of the 8 chunks (questions.max_chunks 7); 7 to ask, 0 cached: about {tokens:,} "
        "prompt tokens (approximated as 4 characters a token) and at most 3,584 reply tokens" in plan
    )


def test_a_rerun_asks_only_the_chunks_not_answered_yet(teacher, tmp_path):
    config = _config(teacher)
    questions_from_chunks(config, CHUNKS, tmp_path, echo=lambda m: None)
    teacher.requests.clear()
    teacher.failing = set()  # the teacher's 500 is over: the failed chunk is asked again, and only it
    rows, summary = questions_from_chunks(config, CHUNKS, tmp_path, echo=lambda m: None)
    assert teacher.asked() == ["down"] and (summary["chunks_asked"], summary["cached"]) == (1, 6)
    assert summary["dropped"]["unparsable reply"] == 1 and "teacher error" not in summary["dropped"]
    assert (summary["prompt_tokens"], summary["completion_tokens"]) == (100, 20)  # this call's request only
    teacher.requests.clear()
    said = []
    again, summary = questions_from_chunks(config, CHUNKS, tmp_path, echo=said.append)
    assert teacher.requests == [] and again == rows and summary["chunks_asked"] == 0  # not even /v1/models
    assert "every reply is cached: the teacher is not asked" in said[0]
    # other settings are another cache: asked again
    questions_from_chunks(_config(teacher, max_tokens=64), CHUNKS[:1], tmp_path, echo=lambda m: None)
    assert teacher.asked() == ["good"]


def test_a_teacher_that_is_down_at_start_stops_before_any_chunk(tmp_path):
    config = QuestionsConfig(teacher=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(FinetuneError, match=r"questions\.teacher http://127\.0\.0\.1:\d+/v1 does not answer.*"
                                            r"-P questions\.teacher=URL"):
        questions_from_chunks(config, CHUNKS, tmp_path, echo=lambda m: None)
    with pytest.raises(FinetuneError, match="questions.teacher is empty"):
        questions_from_chunks(QuestionsConfig(), CHUNKS, tmp_path)


def test_replies_are_parsed_leniently():
    row = {"question": "q", "answer": "a", "quote": "x"}
    assert parsed_items(json.dumps([row])) == [row]
    assert parsed_items(f"Sure!\n```json\n{json.dumps([row])}\n```\nAnything else?") == [row]
    assert parsed_items(f"```\n{json.dumps(row)}\n```") == [row]  # one object, unlabelled fence
    assert parsed_items(f"Here: {json.dumps({'questions': [row]})}. Done.") == [row]
    assert parsed_items("[]") == []
    assert parsed_items("no JSON here") is None and parsed_items('[{"question": "q"') is None


def test_a_registered_teacher_goes_through_teacher_of():
    config = QuestionsConfig(teacher="models:/teacher@champion")
    assert isinstance(teacher_of(config), LocalTeacher)


def test_written_questions_logs_rows_summary_and_the_dataset_input(teacher, tracking_uri, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_FINETUNE_CACHE", str(tmp_path / "cache"))
    recipe = SimpleNamespace(questions=_config(teacher))
    with mlflow.start_run() as run:
        rows = written_questions(recipe, CHUNKS, run.info.run_id, "docs-digest-1")
    assert len(rows) == 5
    assert ("Questions from documents: 5 rows written from 7 chunks; dropped: quote not in chunk 1, "
            in capsys.readouterr().err)
    client = mlflow.MlflowClient()
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "questions")}
    assert logged == {"questions/rows.jsonl", "questions/summary.json"}
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="questions/rows.jsonl")
    assert [json.loads(line) for line in open(local)] == rows
    summary = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/questions/summary.json")
    assert summary["rows_written"] == 5 and summary["documents_digest"] == "docs-digest-1"
    got = client.get_run(run.info.run_id)
    assert got.data.tags[tags.QUESTIONS_DOCUMENTS_DIGEST] == "docs-digest-1"
    assert got.data.tags[tags.QUESTIONS_TEACHER] == f"{teacher.url} (canned)"
    (logged_input,) = got.inputs.dataset_inputs
    assert logged_input.dataset.name == "questions"
    input_tags = {t.key: t.value for t in logged_input.tags}
    assert input_tags["documents_digest"] == "docs-digest-1" and input_tags["format"] == "chat"


def test_no_surviving_row_fails_with_the_reasons_and_what_to_do(teacher, tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_FINETUNE_CACHE", str(tmp_path / "cache"))
    recipe = SimpleNamespace(questions=_config(teacher))
    with mlflow.start_run() as run:
        with pytest.raises(FinetuneError,
                           match=r"no row survived from 2 chunks \(1 unparsable reply, 1 cut at "
                                 r"max_tokens\).*stronger teacher.*data\.train"):
            written_questions(recipe, [NOT_JSON, CUT], run.info.run_id, "d")
    assert mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/questions/summary.json")["rows_written"] == 0
    assert not mlflow.MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
