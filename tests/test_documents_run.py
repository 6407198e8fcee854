"""A fine-tune that starts from documents, as a user runs it: `mlflow run DIR --backend finetune` on a folder
of documents and question rows naming their source, one document held out (docs/documents.md). The tiny
model's answers are noise; what is checked is that every part runs and records what it says: the documents as
an input, the RAFT rows, the four contenders on both held-out sets with retrieval's recall, the verdict on
what to deploy, and the logged model that carries its chunks and retrieves when it answers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import pytest

from tests.helpers import FAST_OVERRIDES, free_port, send_json, subprocess_env, use_store

DOCS = {
    "returns.md": "# Returns\n\nRefunds are issued within 17 business days.\n\n## Receipts\n\n"
                  "Every return needs the receipt code RX-4471.\n",
    "warranty.txt": "The warranty on the Velmo kettle lasts 29 months.\n\nRepairs go to the Dunmore "
                    "workshop.\n",
    "offices.md": "# Offices\n\nThe Quarnby office opens at 7:40 on weekdays.\n\nParking at Quarnby costs 3 "
                  "tokens.\n",
}
FACTS = [("returns.md", "When are refunds issued?", "How long until I get my refund?",
          "Refunds are issued within 17 business days."),
         ("returns.md", "What does a return need?", "Which code must come with a return?",
          "Every return needs the receipt code RX-4471."),
         ("warranty.txt", "How long is the kettle warranty?", "For how many months is the kettle covered?",
          "The warranty on the Velmo kettle lasts 29 months."),
         ("warranty.txt", "Where do repairs go?", "Which workshop does repairs?",
          "Repairs go to the Dunmore workshop."), ("offices.md", "When does the Quarnby office open?",
                                                   "What time does Quarnby open?",
                                                   "The Quarnby office opens at 7:40 on weekdays."),
         ("offices.md", "What does parking cost at Quarnby?", "How much is Quarnby parking?",
          "Parking at Quarnby costs 3 tokens.")]
SENTENCES = [s for text in DOCS.values() for s in re.findall(r"[A-Z][^.#]*\.", text)]


class Teacher(BaseHTTPRequestHandler):
    """A loopback OpenAI-compatible teacher (`questions.teacher`): for each chunk it is asked about, one
    question on the first document sentence the chunk holds, quoting it, with a second wording."""

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        send_json(self, {"object": "list", "data": [{"id": "teacher", "object": "model"}]})

    def do_POST(self):  # noqa: N802
        prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
        sentence = next(s for s in SENTENCES if s in prompt)
        rows = [{"question": f"What do the documents say after '{sentence[:12]}'?",
                 "rephrased": "Tell me more.", "answer": sentence, "quote": sentence}]
        send_json(self, {"id": "c", "object": "chat.completion", "model": "teacher", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": json.dumps(rows)},
             "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}})


RECIPE = """data:
  train: data/train.jsonl
  eval: data/eval.jsonl
  documents: docs/
  documents_holdout: [offices.md]
  chunk_tokens: 32
  max_length: 256
  packing: false
retrieval:
  k: 2
questions:
  teacher: http://127.0.0.1:{port}/v1
  per_chunk: 1
"""


def chat(question, answer, source):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "source": source, "quote": answer}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("documents")
    project = root / "project"
    (project / "docs").mkdir(parents=True)
    (project / "data").mkdir()
    for name, text in DOCS.items():
        (project / "docs" / name).write_text(text)
    teacher = ThreadingHTTPServer(("127.0.0.1", free_port()), Teacher)
    threading.Thread(target=teacher.serve_forever, daemon=True).start()
    (project / "finetune.yaml").write_text(RECIPE.replace("{port}", str(teacher.server_port)))
    train = [chat(q, a, s) for s, q, _, a in FACTS]
    held = [chat(q2, a, s) for s, _, q2, a in FACTS if s != "offices.md"]
    (project / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (project / "data" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    mp = pytest.MonkeyPatch()
    uri = use_store(mp, root)
    overrides = {**FAST_OVERRIDES, "eval.max_examples": 4, "eval.fewshot_k": 0}
    args = [a for k, v in overrides.items() for a in ("-P", f"{k}={v}")]
    done = subprocess.run([sys.executable, "-m", "mlflow", "run", str(project), "-e", "lora", "--backend",
                           "finetune", "--experiment-name", "documents", *args], cwd=root,
                          env=subprocess_env(uri), capture_output=True, text=True, timeout=900)
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("documents").experiment_id])
    yield done, runs[0]  # the rehearsal leaves no run of its own
    teacher.shutdown()
    mp.undo()


def test_a_documents_run_scores_four_contenders_on_known_and_unseen_documents(run):
    done, finished = run
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert finished.info.status == "FINISHED"
    assert "3 files read, 6 chunks" in out  # the documents' report, printed before training
    assert "Documents: 4 question rows are on held-out documents" in out
    # the user's rows beside the teacher's: one per chunk of the two training documents (4 chunks), the
    # held-out document's chunks writing unseen questions
    assert "Questions from documents: 6 rows written from 6 chunks" in out
    assert "Documents: 8 training questions, 4 held out on known documents, 4 on unseen documents; " \
           "1 of 3 documents held out; RAFT training rows: " in out
    assert "Retrieval: the chunk holding the answer was among the 2 retrieved for " in out
    metrics = finished.data.metrics
    for contender in ("base", "rag", "tuned", "tuned-rag"):
        assert f"eval/{contender}/rougeL" in metrics and f"eval/unseen/{contender}/rougeL" in metrics
    # retrieval's recall is measured, not assumed: the chunk holding each answer among the 2 retrieved
    assert 0.0 <= metrics["eval/rag/recall_at_k"] <= 1.0 and "eval/unseen/rag/recall_at_k" in metrics
    assert metrics["eval/rag/prompt_tokens"] > metrics["eval/base/prompt_tokens"]
    tags = finished.data.tags
    assert tags["finetune.served_as"] == "tuned-rag" and tags["finetune.data_format"] == "chat"
    assert tags["finetune.dataset_digest"] == next(d.dataset.digest for d in finished.inputs.dataset_inputs
                                                   if d.dataset.name == "documents-train")
    assert tags["finetune.verdict.deploy"] in ("base", "rag", "tuned", "tuned-rag")
    assert tags["finetune.verdict"].startswith(("deploy ", "no verdict"))
    assert "Verdict: " in out and "Cost per answer: with retrieval an answer reads" in out
    names = {d.dataset.name for d in finished.inputs.dataset_inputs}
    assert {"documents", "questions", "documents-train", "documents-known"} <= names


def test_the_logged_model_carries_its_chunks_and_retrieves(run):
    _, finished = run
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(finished.info.run_id, "documents")}
    assert "documents/sets.json" in artifacts
    (model,) = [m for m in mlflow.search_logged_models(
        experiment_ids=[finished.info.experiment_id], output_format="list",
        filter_string=f"source_run_id = '{finished.info.run_id}'") if m.name == "model"]
    local = mlflow.artifacts.download_artifacts(model.artifact_location)
    from pathlib import Path

    chunks = (Path(local) / "artifacts" / "retrieval" / "chunks.jsonl").read_text().splitlines()
    assert {json.loads(c)["source"] for c in chunks} == set(DOCS)  # held-out documents are retrieved from too
    assert "bm25s" in (Path(local) / "requirements.txt").read_text()


def test_evaluate_scores_a_retrieving_version_as_its_run_did(run):
    from click.testing import CliRunner

    from mlflow_finetune_plugin.cli import main

    _, finished = run
    got = CliRunner().invoke(main, ["evaluate", "models:/project/1", "--max-new-tokens", "4"])
    assert got.exit_code == 0, got.output
    assert "Verdict: deploy " in got.output and "Cost per answer: with retrieval" in got.output
    (evaluation,) = [r for r in mlflow.MlflowClient().search_runs([finished.info.experiment_id])
                     if r.data.tags.get("finetune.evaluated_model") == "models:/project/1"]
    metrics = evaluation.data.metrics
    # the same sets as the training run: known rows from its data.eval, unseen ones from what it logged
    assert metrics["eval/n_examples"] == 4 and metrics["eval/unseen/n_examples"] == 4
    assert "eval/tuned-rag/rougeL" in metrics and "eval/unseen/rag/recall_at_k" in metrics
    assert evaluation.data.tags["finetune.verdict.deploy"] in ("base", "rag", "tuned", "tuned-rag")


def test_promote_checks_a_retrieving_version_by_its_answers_with_retrieval(run):
    from click.testing import CliRunner

    from mlflow_finetune_plugin.cli import main

    got = CliRunner().invoke(main, ["promote", "project", "--version", "1"])
    # the gates can be checked (lineage, the contenders a documents run does not score said why), on
    # tuned-rag's scores; the default gate follows the run's verdict on what to deploy, which a tiny run does
    # not earn
    assert "cannot check the gates" not in got.output, got.output
    assert "tuned-rag" in got.output or "not scored in its run: a documents recipe" in got.output, got.output
    deploy = mlflow.MlflowClient().get_run(run[1].info.run_id).data.tags["finetune.verdict.deploy"]
    if deploy not in ("tuned", "tuned-rag"):
        verdict_row = next(line for line in got.output.splitlines() if " verdict " in line)
        assert "FAIL" in verdict_row and "not paid off" in verdict_row and got.exit_code == 1, got.output
        got = CliRunner().invoke(main, ["promote", "project", "--version", "1", "--force", "--reason",
                                        "a tiny run: parity is what is checked here"])
    # serving parity asks the version with its chunks as `serve` would
    assert "parity" in got.output.lower(), got.output
