"""A version trained with retrieval carries its chunks and retriever with its logged model (docs/serving.md,
"Serving a version that retrieves"): its pyfunc, `serve` and the playground ask it each conversation with the
chunks retrieved for the last user turn, and a traced answer holds the search as a RETRIEVER span in MLflow's
document shape, where MLflow's retrieval judges read it. A deployed model retrieves without the plugin."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import SpanType

from mlflow_finetune_plugin.logged_model import requirements
from mlflow_finetune_plugin.retriever import CONTEXT_HEADER, Retriever
from mlflow_finetune_plugin.serving.base import Engine, ModelChoice
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

EXPERIMENT = "retrieving-traffic"
CHUNKS = [
    {"id": "refunds.md#0", "source": "refunds.md",
     "text": "Refunds are paid within 14 days to the original card.", "line": 1},
    {"id": "shipping.md#0", "source": "shipping.md",
     "text": "Parcels ship from Rotterdam every weekday morning.", "line": 1},
    {"id": "passwords.md#0", "source": "passwords.md",
     "text": "Reset a password from the login page with the "
             "emailed link.", "line": 3},
]
QUESTION = [{"role": "user", "content": "When are refunds paid?"}]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """bot v1, a tiny LoRA version that retrieves (BM25 over CHUNKS, k=1), in a sqlite store: (root,
    version)."""
    root = tmp_path_factory.mktemp("retrieving")
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, root)
        try:
            yield root, register_version(retriever=Retriever(CHUNKS, k=1))
        finally:
            forget_active_experiment()
            mlflow.set_tracking_uri(None)


def _retriever_spans(trace_id: str) -> list:
    mlflow.flush_trace_async_logging()
    return mlflow.get_trace(trace_id).search_spans(span_type=SpanType.RETRIEVER)


def test_the_pyfunc_retrieves_for_each_conversation_and_traces_the_chunks(store):
    from mlflow.genai.utils.trace_utils import extract_retrieval_context_from_trace

    _, version = store
    model = mlflow.pyfunc.load_model(f"models:/bot/{version}")
    assert model.metadata.signature.params.to_dict()[-1] == {"name": "retrieve", "type": "boolean",
                                                              "default": True, "shape": None}
    (answer,) = model.predict([{"messages": QUESTION}], params={"max_new_tokens": 4})
    assert isinstance(answer, str)
    trace_id = mlflow.get_last_active_trace_id()
    (span,) = _retriever_spans(trace_id)
    assert span.inputs == {"query": "When are refunds paid?"}
    assert span.outputs == [{"page_content": CHUNKS[0]["text"], "id": "refunds.md#0",
                             "metadata": {"doc_uri": "refunds.md", "chunk_id": "refunds.md#0", "line": 1,
                                          "score": span.outputs[0]["metadata"]["score"]}}]
    trace = mlflow.get_trace(trace_id)
    root = trace.data.spans[0]
    assert span.parent_id == root.span_id and root.span_type == SpanType.CHAT_MODEL
    assert root.inputs == {"messages": QUESTION} and root.outputs == answer
    # what MLflow's RetrievalGroundedness / RetrievalRelevance judges are given
    assert list(extract_retrieval_context_from_trace(trace).values()) == [
        [{"content": CHUNKS[0]["text"], "doc_uri": "refunds.md"}]]

    # Asked without retrieval: another prompt, and no trace at all (as a model that does not retrieve)
    (plain,) = model.predict([{"messages": QUESTION}], params={"max_new_tokens": 4, "retrieve": False})
    assert mlflow.get_last_active_trace_id() == trace_id
    assert isinstance(plain, str)


def test_the_logged_model_carries_the_chunks_and_requires_the_retriever(store):
    from mlflow.models import Model

    root, version = store
    local = Path(mlflow.artifacts.download_artifacts(f"models:/bot/{version}",
                                                     dst_path=str(root / "download")))
    config = Model.load(str(local / "MLmodel")).flavors["python_function"]["config"]
    assert config["retrieval"] == {"k": 1, "embedding": None}
    assert Retriever.load(local / "artifacts" / "retrieval").chunks == CHUNKS
    lines = (local / "requirements.txt").read_text().splitlines()
    assert "bm25s" in lines and "numpy" in lines
    assert (local / "code" / "mlflow_finetune_plugin" / "retriever.py").is_file()
    assert (local / "code" / "mlflow_finetune_plugin" / "models" / "retrieving.py").is_file()
    base = {"base_model": "builtin:tiny-llama", "artifact": "adapter"}
    assert "bm25s" not in requirements(base)
    assert requirements({**base, "retrieval": {"k": 2, "embedding": "all-MiniLM-L6-v2"}})[-1] == \
        "sentence-transformers"


PLAIN_LOAD = """
import importlib.util, json, sys
assert importlib.util.find_spec("mlflow_finetune_plugin") is None
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
print(json.dumps(model.predict([{"messages": json.loads(sys.argv[2])}], params={"max_new_tokens": 4})))
"""


@pytest.mark.integration
def test_a_retrieving_version_answers_alike_in_a_fresh_environment_without_the_plugin(store, tmp_path):
    from tests.test_deploy import DEPLOY_STACK, make_plain_env

    root, version = store
    uri = f"models:/bot/{version}"
    expected = mlflow.pyfunc.load_model(uri).predict([{"messages": QUESTION}], params={"max_new_tokens": 4})
    plain_bin = make_plain_env(tmp_path / "venv", (*DEPLOY_STACK, "bm25s"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{plain_bin}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([str(plain_bin / "python"), "-c", PLAIN_LOAD, uri, json.dumps(QUESTION)], env=env,
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected


@pytest.mark.integration
def test_serve_retrieves_for_the_version_and_traces_the_chunks_but_not_for_its_base(store):
    import openai

    from mlflow_finetune_plugin.serving.retrieving import rewrite_for
    from mlflow_finetune_plugin.serving.tracing import TRACE_HEADER

    _, version = store
    name = f"bot-v{version}"
    port = free_port()
    server = cli_process("serve", f"bot/{version}", "--engine", "transformers", "--port", str(port),
                         "--trace", EXPERIMENT)
    log = drain(server)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server)
        assert any(f"{name} retrieves" in line for line in log), "".join(log)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        raw = client.chat.completions.with_raw_response.create(model=name, messages=QUESTION, max_tokens=4,
                                                               temperature=0.0)
        assert raw.parse().choices[0].message.content is not None
        trace_id = raw.headers[TRACE_HEADER]
    finally:
        stop(server)
    (span,) = _retriever_spans(trace_id)
    assert [d["id"] for d in span.outputs] == ["refunds.md#0"]
    chat = mlflow.get_trace(trace_id).data.spans[0]
    assert span.parent_id == chat.span_id and chat.span_type == SpanType.CHAT_MODEL
    assert chat.inputs["messages"] == QUESTION  # the trace keeps the user's own question

    # What the front sends on for the version: the chunk in the last user turn; its base model is asked as it
    # is.
    body = json.dumps({"model": name, "messages": QUESTION}).encode()
    (sent,) = json.loads(rewrite_for(name)(body))["messages"]
    assert sent["content"].startswith(CONTEXT_HEADER) and CHUNKS[0]["text"] in sent["content"]
    assert sent["content"].endswith("Question: When are refunds paid?")
    assert rewrite_for(f"{name}-base") is None


class _Recording(Engine):
    """Answers "ok", keeping the messages each model choice was asked."""

    name = "recording"

    def __init__(self, retrieves_itself: bool = False):
        self.asked: dict[str, list[dict]] = {}
        self.retrieves_itself = retrieves_itself

    def stream(self, choice, messages, settings):
        self.asked[choice.key] = messages
        yield "ok"


def test_the_playground_asks_a_retrieving_side_with_its_chunks_and_traces_them(store):
    from mlflow_finetune_plugin.serving.playground import Playground
    from mlflow_finetune_plugin.serving.tracing import Tracer

    _, version = store
    engine = _Recording()
    version_key, base_key = f"bot/{version}", f"bot/{version}:base"
    pg = Playground(engine, ModelChoice("bot", version), ModelChoice("bot", version, base=True),
                    tracer=Tracer(EXPERIMENT, "playground"))
    result = pg.compare(QUESTION[0]["content"], max_new_tokens=4)
    (asked,) = engine.asked[version_key]
    assert asked["content"].startswith(CONTEXT_HEADER) and CHUNKS[0]["text"] in asked["content"]
    assert engine.asked[base_key] == QUESTION  # the base model is asked the question alone
    (span,) = _retriever_spans(result["a"]["trace_id"])
    assert [d["id"] for d in span.outputs] == ["refunds.md#0"]
    assert not _retriever_spans(result["b"]["trace_id"])

    # An engine whose server is `serve` (openai) leaves the retrieval to it.
    remote = _Recording(retrieves_itself=True)
    Playground(remote, ModelChoice("bot", version), ModelChoice("bot", version, base=True)).compare(
        QUESTION[0]["content"], max_new_tokens=4)
    assert remote.asked[version_key] == QUESTION


def test_parity_sends_the_held_out_prompts_as_serve_does(store):
    from mlflow_finetune_plugin.serving.parity import served_prompts

    _, version = store
    (sent,) = served_prompts(ModelChoice("bot", version), [QUESTION])
    assert CHUNKS[0]["text"] in sent[-1]["content"]
    assert served_prompts(ModelChoice("bot", version), [sent]) == [sent]  # recorded with its chunks: as it is
    assert served_prompts(ModelChoice("bot", version, base=True), [QUESTION]) == [QUESTION]
