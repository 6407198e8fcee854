"""LLM judges over served traffic, on demand and online (`monitor NAME --judge MODEL`, `--start`, `--stop`;
docs/monitoring.md, "LLM judges, on demand and online").

The judge's model is `KeywordJudge`: a small deterministic OpenAI-compatible chat server on loopback that
passes an answer when it contains a keyword. It stands in for an external LLM (a small real model does not
reliably write the JSON verdict MLflow's judges ask for); everything under test is real: MLflow's judges
(`make_judge`), the AI Gateway endpoint made for the judge's URL on a real `mlflow server`, that server's job
runner scoring traces as they arrive, and `monitor` reading the verdicts back. The traffic is recorded by
`serve`'s own Tracer (serving/tracing.py), the traces `serve --trace` writes."""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import pytest
from click.testing import CliRunner

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.monitor import gateway, online
from mlflow_finetune_plugin.monitor.judge import judge_name, judged, spec_of
from mlflow_finetune_plugin.monitor.traffic import read_requests
from mlflow_finetune_plugin.monitor.watch import watch
from mlflow_finetune_plugin.serving.base import ModelChoice
from mlflow_finetune_plugin.serving.tracing import Tracer, completion
from tests.helpers import (
    forget_active_experiment,
    mlflow_server,
    register_version,
    send_json,
    use_server_store,
    use_store,
)

KEYWORD = "refund"
NO_JSON = "#garbled"  # an answer holding this gets a reply that is not the judge's JSON verdict
WINDOW = "10s"
ONLINE_TIMEOUT_S = 240  # the job runner's scheduler ticks once a minute; a loaded machine may miss a tick


class KeywordJudge:
    """An OpenAI-compatible judge model on 127.0.0.1: `POST /v1/chat/completions` answers MLflow's judge
    prompt with {"result": true} when the text after "outputs:" (the answer judged) holds KEYWORD, false
    otherwise; `GET /v1/models` lists it. A stand-in for an external LLM, not for the code under test."""

    MODEL = "keyword-judge"

    def __init__(self):
        self.calls = 0
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, body: dict):
                send_json(self, body)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": KeywordJudge.MODEL, "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.calls += 1
                asked = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
                judged_text = asked.split("outputs:", 1)[-1].lower()
                passed = KEYWORD in judged_text
                said = ("It reads fine to me." if NO_JSON in judged_text else
                        json.dumps({"result": passed,
                                    "rationale": f"{KEYWORD!r} {'in' if passed else 'not in'} it"}))
                self._send({"id": f"judge-{judge.calls}", "object": "chat.completion",
                            "created": int(time.time()), "model": KeywordJudge.MODEL,
                            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                                                                                          "content": said}}],
                            "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/v1"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def keyword_judge():
    judge = KeywordJudge()
    yield judge
    judge.close()


def record(tracer: Tracer, answers: list[str], choice: ModelChoice | None, failed: int = 0) -> list[str]:
    """One traced request per answer, as `serve --trace` records it; the last `failed` end in an error."""
    ids = []
    for i, answer in enumerate(answers):
        extra = None if choice else {tags.SERVED_MODEL: "bot/1"}
        span = tracer.start(choice, "bot@champion", {"model": "bot@champion", "max_tokens": 32, "messages": [
            {"role": "user", "content": f"Question {i}: can I get my money back?"}]}, extra)
        if i >= len(answers) - failed:
            tracer.end(span, None, error="the model failed")
        else:
            tracer.end(span, completion(answer, "bot@champion", "stop"))
        ids.append(span.trace_id)
    tracer.flush()
    return ids


def wait_for_window(seconds: int) -> None:
    """Sleep into the next window (a second past its start), so that a batch of traffic has a window of its
    own."""
    time.sleep(seconds - time.time() % seconds + 1)


# ----------------------------------------------------------------------------------------- on demand, no
# server


def test_the_judge_scores_stored_traces_on_demand_without_a_server_and_counts_what_it_cannot_judge(
        tmp_path, monkeypatch, keyword_judge):
    use_store(monkeypatch, tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a judge server that takes no key needs none
    try:
        tracer = Tracer("traffic", by="serve")
        ids = record(tracer, ["A refund takes 5 days.", "It ships tomorrow.", f"A refund {NO_JSON}", "x"],
                     None, failed=1)
        requests = read_requests("bot", [tracer.experiment_id])
        notes: list[str] = []
        got = judged(requests, spec_of(keyword_judge.url), name="bot", notes=notes)
        assert got == {ids[0]: True, ids[1]: False}
        assert "OPENAI_API_KEY" not in os.environ
        (note,) = notes
        assert "2 answers judged" in note and "the judge's reply was not its JSON verdict (1)" in note
        assert "the request failed (1)" in note
        # Stored on the traces, as MLflow's own scoring of traces does, and read back as each request's
        # verdict.
        verdicts = {r.trace_id: r.judge for r in read_requests("bot", [tracer.experiment_id])}
        assert verdicts == {ids[0]: True, ids[1]: False, ids[2]: None, ids[3]: None}
        (stored,) = [a for a in mlflow.get_trace(ids[0]).info.assessments if a.name == judge_name("bot")]
        assert stored.source.source_id == f"openai:/{KeywordJudge.MODEL}" and stored.rationale

        # Online needs `mlflow server`; a registered model is served first: both refused with the fix.
        with pytest.raises(FinetuneError, match="needs an `mlflow server`"):
            online.start("bot", [tracer.experiment_id], spec_of(keyword_judge.url))
        with pytest.raises(FinetuneError,
                           match=r"No suitable adapter found.*mlflow-finetune serve bot@champion"):
            spec_of("models:/bot@champion")
        dead = spec_of("http://127.0.0.1:9/v1", "m")
        with pytest.raises(FinetuneError, match="does not answer"):
            judged(requests, dead, name="bot", store=False)
    finally:
        forget_active_experiment()
        mlflow.set_tracking_uri(None)


# ------------------------------------------------------------------------------------ online, on `mlflow
# server`


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` with its job runner (online scoring), whose gateway may reach the loopback judge
    and which scores traces as soon as they end (no completion buffer); bot v1 registered. Yields its URI."""
    root = tmp_path_factory.mktemp("judges")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_GATEWAY_API_BASE_ALLOWED_SCHEMES", "http,https")
        mp.setenv("MLFLOW_GATEWAY_API_BASE_ALLOW_PRIVATE_IPS", "true")
        mp.setenv("MLFLOW_ONLINE_SCORING_DEFAULT_TRACE_COMPLETION_BUFFER_SECONDS", "0")
        # so that the code scorer's refusal is MLflow's last
        mp.setenv("MLFLOW_SERVER_ENABLE_CUSTOM_SCORERS", "true")
        with mlflow_server(root / "server", jobs=True) as uri:
            use_server_store(mp, uri, root)
            register_version(alias="champion")
            try:
                yield uri
            finally:
                forget_active_experiment()
                mlflow.set_tracking_uri(None)


def _monitor(*args: str):
    return CliRunner().invoke(main, ["monitor", *args], catch_exceptions=False)


def _judge_pass(report) -> dict[int, float]:
    return {w.start_s: w.metrics["judge_pass"] for w in report.windows if "judge_pass" in w.metrics}


def _online_verdicts(experiment_id: str, ids: list[str], timeout: float) -> dict[str, object]:
    """trace id -> the online judge's verdict, once every trace in `ids` has one (waits for the job
    runner)."""
    deadline = time.monotonic() + timeout
    while True:
        found = {}
        for t in mlflow.search_traces(locations=[experiment_id], return_type="list"):
            for a in t.info.assessments:
                if a.name == judge_name("bot") and a.source.source_id.startswith("gateway:/"):
                    found[t.info.trace_id] = a.feedback.error or a.value
        if set(ids) <= set(found) or time.monotonic() > deadline:
            return found
        time.sleep(2)  # polling interval: the loop checks the real condition


# -m stress since the studio's tests joined CI (93 s of its 45 minutes):
# test_mlflow_runs_only_gateway_judges_online judges on the same server, and the on-demand tests score the
# same judge.
@pytest.mark.integration
@pytest.mark.stress
def test_online_judge_on_the_server_agrees_with_the_judge_on_demand_and_stops(server, keyword_judge):
    tracer = Tracer("traffic", by="serve")  # `serve --trace traffic` makes the experiment at start-up
    started = _monitor("bot", "-x", "traffic", "--start", "--judge", keyword_judge.url)
    assert started.exit_code == 0, started.output
    assert (f"{judge_name('bot')} judges 100% of bot's new traces with "
            "gateway:/finetune-judge-") in started.output
    (registered,) = mlflow.genai.scorers.list_scorers(experiment_id=tracer.experiment_id)
    assert registered.sample_rate == 1.0 and registered.filter_string == ("tag.`finetune.served.model` LIKE "
                                                                          "'bot/%'")

    # Traffic arrives in two windows: 3 of 4 answers pass, then 1 of 4.
    choice = ModelChoice("bot", "1")
    wait_for_window(10)
    first = record(tracer, ["A refund takes 5 days.", "Your refund is on its way.", "Refunds: see Billing.",
                            "It ships tomorrow."], choice)
    wait_for_window(10)
    second = record(tracer, ["Open Settings.", "Call us.", "A refund needs the receipt.", "Sorry, no."],
                    choice)

    # On demand: every answer judged now, through the judge's URL.
    before = keyword_judge.calls
    spec = spec_of(keyword_judge.url)
    on_demand = watch("bot", ("traffic",), WINDOW, judge=spec, store_judgments=False)
    assert sorted(_judge_pass(on_demand).values()) == [0.25, 0.75]
    assert keyword_judge.calls - before == 8 and any("8 answers judged" in n for n in on_demand.notes)

    # Online: the server's job runner judges the same traces through the gateway endpoint made for the URL.
    verdicts = _online_verdicts(tracer.experiment_id, first + second, ONLINE_TIMEOUT_S)
    assert verdicts == {t: t in first[:3] + second[2:3] for t in first + second}, verdicts
    from_server = watch("bot", ("traffic",), WINDOW)
    assert _judge_pass(from_server) == _judge_pass(on_demand)
    # On demand through that gateway endpoint too (MLflow's client calls the server's gateway: no litellm
    # here).
    endpoint = "gateway:/" + gateway.endpoint_name(keyword_judge.url, KeywordJudge.MODEL)
    through_gateway = watch("bot", ("traffic",), WINDOW, judge=spec_of(endpoint), store_judgments=False)
    assert _judge_pass(through_gateway) == _judge_pass(on_demand)
    assert any(f"the verdicts {judge_name('bot')} stored on 8 of 8 traces" in n for n in from_server.notes)

    # The command on demand shows the judge column and stores its verdicts beside the online ones.
    shown = _monitor("bot", "-x", "traffic", "--window", WINDOW, "--judge", keyword_judge.url,
                     "--judge-model", KeywordJudge.MODEL)
    assert shown.exit_code == 0, shown.output
    assert "judge" in shown.output and "0.750" in shown.output and "0.250" in shown.output
    sources = {a.source.source_id for a in mlflow.get_trace(first[0]).info.assessments
               if a.name == judge_name("bot")}
    assert f"openai:/{KeywordJudge.MODEL}" in sources and any(s.startswith("gateway:/") for s in sources)

    stopped = _monitor("bot", "-x", "traffic", "--stop")
    assert stopped.exit_code == 0 and f"{judge_name('bot')} stopped and removed" in stopped.output
    assert mlflow.genai.scorers.list_scorers(experiment_id=tracer.experiment_id) == []
    again = _monitor("bot", "-x", "traffic", "--stop")
    assert "no judge of bot was registered" in again.output


@pytest.mark.integration
def test_mlflow_runs_only_gateway_judges_online(server, keyword_judge):
    from mlflow.exceptions import MlflowException
    from mlflow.genai.judges import make_judge
    from mlflow.genai.scorers import ScorerSamplingConfig

    experiment_id = Tracer("traffic", by="serve").experiment_id
    sampling = ScorerSamplingConfig(sample_rate=1.0)
    refusal = "Automatic evaluation is only supported for scorers that use gateway models"
    direct = make_judge(name="direct", instructions="Is {{ outputs }} fine?", model="openai:/gpt-4o-mini",
                        feedback_value_type=bool)
    with pytest.raises(MlflowException, match=refusal):
        direct.register(experiment_id=experiment_id).start(experiment_id=experiment_id,
                                                           sampling_config=sampling)
    with pytest.raises(MlflowException, match=refusal):
        answer_is_short.register(experiment_id=experiment_id).start(experiment_id=experiment_id,
                                                                    sampling_config=sampling)
    endpoint = "gateway:/" + gateway.endpoint_for(keyword_judge.url, KeywordJudge.MODEL)
    graded = spec_of(endpoint, instructions="Does {{ outputs }} match {{ expectations }}?")
    with pytest.raises(FinetuneError,
                       match="requires expectations, but scorers with expectations are not currently "
                             "supported for automatic evaluation"):
        online.start("graded", [experiment_id], graded)
    refused = CliRunner().invoke(main, ["monitor", "bot", "-x", "traffic", "--start", "--judge",
                                        "openai:/gpt-4o-mini"])
    assert refused.exit_code == 1 and refusal in refused.output
    no_endpoint = CliRunner().invoke(main, ["monitor", "bot", "-x", "traffic", "--judge", "gateway:/nowhere"])
    assert no_endpoint.exit_code == 1 and ("has no gateway endpoint "
                                           "'nowhere'") in no_endpoint.output, no_endpoint.output


@mlflow.genai.scorers.scorer
def answer_is_short(outputs) -> bool:
    """A code scorer (MLflow reads its source from this file to register it)."""
    return len(str(outputs)) < 500
