"""A teacher for prompts without answers (`-e distill`, docs/distill.md): `mlflow-finetune serve` on a tiny
registered model is the teacher, `mlflow run -e distill --backend finetune` asks it for the answers to a file
of prompts and trains the tiny student on them. A small proxy in front of the server counts (and, where a test
says so, refuses) the requests, so the tests see what the teacher was asked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import mlflow
import pytest

from mlflow_finetune_plugin import paths
from mlflow_finetune_plugin.data.teacher import TEACHER_KEY as TEACHER
from mlflow_finetune_plugin.data.teacher import teacher_of
from tests.helpers import (
    FAST_OVERRIDES,
    cli_process,
    drain,
    forget_active_experiment,
    free_port,
    register_version,
    stop,
    subprocess_env,
    use_store,
    wait_for_http,
    write_project,
)

PROMPTS = ([{"prompt": f"Question {i}: where is order {i}?"} for i in range(4)]
           + [{"messages": [{"role": "user", "content": f"Can I return item {i}?"}]} for i in range(3)]
           + [{"messages": [{"role": "user", "content": "How do I reset my password?"},
                            {"role": "assistant", "content": "Click 'Forgot password'."}]}])
EVAL = [{"messages": [{"role": "user", "content": f"When do you open on day {i}?"},
                      {"role": "assistant", "content": "At nine."}]} for i in range(2)]
RECIPE = ("data:\n  train: data/prompts.jsonl\n  eval: data/eval.jsonl\n  max_length: 64\n  packing: false\n"
          "distill:\n  max_tokens: 3\n  concurrency: 2\n  stop: [' ']\n")
CLI = "import sys; from mlflow_finetune_plugin.cli import main; sys.exit(main())"
# stop: the tiny teacher writes random tokens; ending at the first space, some of its answers end
# (finish_reason stop)


class Proxy:
    """An HTTP proxy in front of the teacher's server: it records the last user message of every chat
    completion and refuses (400) the prompts in `refuse`."""

    def __init__(self, target: str):
        self.target, self.asked, self.refuse, self.delay = target, [], set(), 0.0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802 - http.server's name
                got = httpx.get(proxy.target + self.path, timeout=60, trust_env=False)
                self._send(got.status_code, got.content)

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                asked = body["messages"][-1]["content"]
                proxy.asked.append(asked)
                if asked in proxy.refuse:
                    return self._send(400, b'{"detail": "refused by the test"}')
                time.sleep(proxy.delay)  # a slow teacher
                got = httpx.post(proxy.target + self.path, json=body, timeout=120,
                                 trust_env=False)
                self._send(got.status_code, got.content)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny registered model `teacher` served by `mlflow-finetune serve` behind a counting proxy, on a
    sqlite store: (store URI, its folder, the proxy)."""
    root = tmp_path_factory.mktemp("distill")
    with pytest.MonkeyPatch.context() as mp:
        uri = use_store(mp, root)
        register_version(name="teacher", seed=0, alias="champion")
        port = free_port()
        server = cli_process("serve", "teacher/1", "--engine", "transformers", "--port", str(port))
        drain(server)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health", server)
            yield uri, root, Proxy(f"http://127.0.0.1:{port}")
        finally:
            stop(server)
            forget_active_experiment()
            mlflow.set_tracking_uri(None)


def _distill(uri, root, project, experiment, backend_config=None, **overrides):
    params = {**FAST_OVERRIDES, **overrides}
    cmd = [sys.executable, "-m", "mlflow", "run", str(project), "-e", "distill", "--backend", "finetune",
           "--experiment-name", experiment] + [a for k, v in params.items() for a in ("-P", f"{k}={v}")]
    if backend_config:
        cmd += ["--backend-config", json.dumps(backend_config)]
    # the registry too: set_registry_uri in the fixtures exports MLFLOW_REGISTRY_URI into this process
    env = {**subprocess_env(uri), "MLFLOW_REGISTRY_URI": uri}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              order_by=["attributes.start_time DESC"])
    return proc, runs[0]


def _project(tmp_path, prompts=PROMPTS, held_out=True, eval_rows=EVAL):
    """The recipe's project with `prompts` as data/prompts.jsonl, and `eval_rows` as its held-out rows (or no
    data.eval)."""
    recipe = RECIPE if held_out else RECIPE.replace("  eval: data/eval.jsonl\n", "")
    project = write_project(tmp_path / "project", recipe, eval_rows=eval_rows if held_out else None)
    (project / "data" / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    return project


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.integration
def test_the_student_trains_on_the_teachers_answers_and_a_rerun_asks_nothing_again(teacher, tmp_path):
    uri, root, proxy = teacher
    project = _project(tmp_path)
    proxy.asked.clear()

    proc, run = _distill(uri, root, project, "distill", **{"distill.teacher": proxy.url})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert run.info.status == "FINISHED"
    assert "prompts.jsonl): 8, answered by" in proc.stderr  # checked before the run
    assert "the student learns only the teacher's text" in proc.stderr
    # Every prompt asked once: 8 of data.train, 2 of data.eval (their references stay)
    assert sorted(proxy.asked) == sorted([r["prompt"] for r in PROMPTS[:4]]
                                         + [r["messages"][0]["content"] for r in PROMPTS[4:]]
                                         + [r["messages"][0]["content"] for r in EVAL])

    # The cache artifact: every answer with the teacher's model name, tokens and latency
    logged = _rows(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="distill/answers.jsonl", dst_path=str(tmp_path / "a"))))
    assert len(logged) == 10 and {r["model"] for r in logged} == {"teacher-v1"}
    assert all(isinstance(r["latency_s"], float) and r["prompt_tokens"] for r in logged)
    summary = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/distill/summary.json")
    train_log = [r for r in logged if r["split"] == "data.train"]
    usable = [r for r in train_log if r["answer"].strip() and r["finish_reason"] != "length"]
    assert summary["data.train"]["rows"] == len(usable) and summary["asked"] == 10 and summary["cached"] == 0
    assert summary["data.train"]["left_out"] == len(train_log) - len(usable)
    assert f"{summary['data.train']['left_out']} left out" in proc.stderr

    # The rows trained on are the teacher's answers; held-out rows keep their references beside the teacher's
    rows = _rows(paths.job_dir(run.info.run_id) / "distill" / "train.jsonl")
    assert [r["messages"][-1]["content"] for r in rows] == [r["answer"] for r in usable]
    assert all(r[TEACHER]["model"] == "teacher-v1" for r in rows)
    held = _rows(paths.job_dir(run.info.run_id) / "distill" / "eval.jsonl")
    assert [r["messages"][-1]["content"] for r in held] == ["At nine.", "At nine."]
    assert all(set(r[TEACHER]) >= {"answer", "model", "prompt_tokens", "completion_tokens", "latency_s"}
               for r in held)
    assert run.data.tags["finetune.distill.teacher"] == f"{proxy.url} (teacher-v1)"
    assert "eval/teacher/rougeL" in run.data.metrics  # the evaluation scored the teacher as a contender
    # A rerun that asks nothing again (every answer from the cache): the limited run's test, below, ends with
    # one.


# -m stress: the answers cached across runs are covered by the limited run's test (a larger run asks only for
# the rest), and a teacher failing the run by the unanswering-URL test; this adds a failure halfway through
# the asking.
@pytest.mark.stress
@pytest.mark.integration
def test_a_teacher_that_fails_halfway_is_asked_only_for_the_rest_next_time(teacher, tmp_path):
    uri, root, proxy = teacher
    prompts = [{"prompt": f"Crash test {i}?"} for i in range(6)]
    project = _project(tmp_path, prompts, held_out=False)
    proxy.asked.clear()
    proxy.refuse = {"Crash test 3?"}
    try:
        proc, run = _distill(uri, root, project, "distill-crash",
                             **{"distill.teacher": proxy.url, "distill.concurrency": 1,
                                "data.eval_split": 0.3})
    finally:
        proxy.refuse = set()
    assert proc.returncode != 0 and run.info.status == "FAILED"
    assert f"distill.teacher {proxy.url} answered 400" in run.data.tags["finetune.error"]
    assert proxy.asked == [f"Crash test {i}?" for i in range(4)]  # one at a time, in order, until the refusal

    proxy.asked.clear()
    proc, run = _distill(uri, root, project, "distill-crash",
                         **{"distill.teacher": proxy.url, "distill.concurrency": 1, "data.eval_split": 0.3})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proxy.asked == [f"Crash test {i}?" for i in range(3, 6)]  # the answered three came from the cache
    assert run.data.tags["finetune.distill.answers"] == "6 prompts: 3 asked, 3 from the cache"


@pytest.mark.stress
@pytest.mark.integration
def test_a_run_cancelled_while_asking_ends_killed_at_once_and_its_answers_are_kept(teacher, tmp_path):
    uri, root, proxy = teacher
    prompts = [{"prompt": f"Cancel test {i}?"} for i in range(8)]
    project = _project(tmp_path, prompts, held_out=False)
    # 2 of the 8 held out, both scored (eval.max_examples 2): every prompt is used, and asked
    overrides = {**FAST_OVERRIDES, "distill.teacher": proxy.url, "distill.concurrency": 1,
                 "data.eval_split": 0.25}
    cmd = [sys.executable, "-m", "mlflow", "run", str(project), "-e", "distill", "--backend", "finetune",
           "--experiment-name", "distill-cancel", "--backend-config", '{"detach": true}'] + [
        a for k, v in overrides.items() for a in ("-P", f"{k}={v}")]
    proxy.asked.clear()
    proxy.delay = 3.0
    try:
        started = subprocess.run(cmd, cwd=root, env={**subprocess_env(uri), "MLFLOW_REGISTRY_URI": uri},
                                 capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stderr[-3000:]
        client = mlflow.MlflowClient()
        (run,) = client.search_runs([client.get_experiment_by_name("distill-cancel").experiment_id])
        deadline = time.monotonic() + 120
        while len(proxy.asked) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(proxy.asked) == 2  # the first answered (and cached), the second in flight
        cancelled = time.monotonic()
        stopped = subprocess.run([sys.executable, "-c", CLI, "cancel", run.info.run_id],
                                 env=subprocess_env(uri), capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stderr[-2000:]
        while client.get_run(run.info.run_id).info.status == "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get_run(run.info.run_id).info.status == "KILLED"
        assert time.monotonic() - cancelled < 20
    finally:
        proxy.delay = 0.0
    before = list(proxy.asked)
    proxy.asked.clear()
    proc, rerun = _distill(uri, root, project, "distill-cancel", **{k: v for k, v in overrides.items()
                                                                    if k not in FAST_OVERRIDES})
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the answers cached before the cancel are not asked again (the one in flight then may have been dropped)
    done = 8 - len(proxy.asked)
    assert 1 <= done <= len(before) and proxy.asked == [f"Cancel test {i}?" for i in range(done, 8)]


@pytest.mark.integration
def test_a_teacher_url_that_does_not_answer_fails_the_run_before_training(teacher, tmp_path):
    uri, root, _ = teacher
    project = _project(tmp_path)
    url = f"http://127.0.0.1:{free_port()}/v1"
    proc, run = _distill(uri, root, project, "distill-down", **{"distill.teacher": url})
    assert proc.returncode != 0
    assert run.info.status == "FAILED"
    assert f"distill.teacher {url} does not answer" in run.data.tags["finetune.error"]
    assert url in proc.stderr
    assert not any(k.startswith("train/") for k in run.data.metrics)  # nothing trained
    assert "Tokenizing" not in proc.stderr


# -m stress: a registered model loaded in the run as the teacher is covered by the token-level test (its
# teacher is registered too, and loaded in process); this adds the sequence-level answers of an in-process
# teacher.
@pytest.mark.stress
@pytest.mark.integration
def test_a_registered_model_teaches_in_this_process(teacher, tmp_path):
    uri, root, proxy = teacher
    project = _project(tmp_path)
    proxy.asked.clear()
    proc, run = _distill(uri, root, project, "distill-local",
                         **{"distill.teacher": "models:/teacher@champion"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proxy.asked == []
    summary = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/distill/summary.json")
    assert summary["teacher"] == "models:/teacher@champion" and summary["asked"] == 10
    rows = _rows(paths.job_dir(run.info.run_id) / "distill" / "train.jsonl")
    assert rows and all(r[TEACHER]["model"] == "models:/teacher@champion" for r in rows)
    assert all(r[TEACHER]["finish_reason"] == "stop" and r[TEACHER]["completion_tokens"] <= 3 for r in rows)
    assert summary["data.train"]["rows"] + summary["data.train"]["left_out"] == 8
    # A teacher that ran here knows its size: the verdict compares parameters without eval.teacher_params.
    from mlflow_finetune_plugin.evaluate.cost import parameter_counts
    from mlflow_finetune_plugin.logged_model import load_logged_model

    size = parameter_counts(
        load_logged_model(mlflow.artifacts.download_artifacts("models:/teacher/1")).model
    )["tuned"]
    assert all(r[TEACHER]["params"] == size for r in rows)
    assert run.data.metrics["eval/teacher/params"] == size


@pytest.mark.integration
def test_under_torchrun_rank_0_asks_the_teacher_once_and_both_ranks_train_on_its_rows(teacher, tmp_path):
    uri, root, proxy = teacher
    prompts = [{"prompt": f"Under torchrun, question {i}?"} for i in range(8)]
    project = _project(tmp_path, prompts=prompts, held_out=False)
    proxy.asked.clear()
    proc, run = _distill(uri, root, project, "distill-torchrun",
                         {"launcher": "torchrun", "nproc_per_node": 2}, **{"distill.teacher": proxy.url,
                                                                           "train.max_steps": 4})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert run.info.status == "FINISHED" and run.data.tags["finetune.job.launcher"] == "torchrun"
    assert sorted(proxy.asked) == sorted(p["prompt"] for p in prompts)  # once each: rank 1 read rank 0's rows
    rows = _rows(paths.job_dir(run.info.run_id) / "distill" / "train.jsonl")
    assert rows and all(r[TEACHER]["model"] == "teacher-v1" for r in rows)
    # Both ranks trained on those rows: 2 ranks x 2 rows a step, so an epoch is half the steps one rank would
    # take.
    steps_per_epoch = -(-len(rows) // 4)
    assert run.data.metrics["train/epoch"] == pytest.approx(4 / steps_per_epoch), len(rows)


# ---------------------------------------------------------------- before any run (no teacher, no model)


def test_chat_rows_keep_the_teacher_key_through_the_data_check_and_reading(tmp_path):
    from mlflow_finetune_plugin.data.check import check_data
    from mlflow_finetune_plugin.data.read import load_training_dataset

    answer = {"answer": "At nine.", "model": "big", "prompt_tokens": 7, "completion_tokens": None,
              "latency_s": 0.5, "finish_reason": "stop"}
    rows = [{"messages": [{"role": "user", "content": f"When do you open on day {i}?"},
                          {"role": "assistant", "content": "At nine."}], TEACHER: answer} for i in range(3)]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert check_data(path).errors == []
    ds, fmt = load_training_dataset(str(path))
    assert fmt == "chat" and teacher_of(ds[0]) == answer and ds[2]["messages"][-1]["content"] == "At nine."


@pytest.mark.parametrize("overrides, method, says", [
    ({}, "distill", "distill.teacher: -e distill needs a teacher"),
    ({"distill.teacher": "ftp://x"}, "distill", "expected an OpenAI-compatible base URL"),
    ({"distill.teacher": "models:/teacher"}, "distill", "models:/NAME@ALIAS or models:/NAME/VERSION"),
    ({"distill.teacher": "http://x/v1", "distill.loss": "logits"}, "distill",
     "distill.loss: logits needs the teacher's token distributions, which a server's API does not give"),
    ({"distill.teacher": "http://x/v1"}, "dpo", "the teacher's answers train with the sft objective"),
])
def test_what_a_distill_recipe_refuses(overrides, method, says):
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.errors import RecipeError
    from tests.helpers import SUPPORT_BOT

    with pytest.raises(RecipeError, match=says):
        load_recipe(SUPPORT_BOT, method=method, overrides=overrides)


def test_the_prompts_are_checked_before_a_run_exists(tmp_path, capsys):
    from mlflow_finetune_plugin.backend import resolve_entry_point
    from mlflow_finetune_plugin.errors import FinetuneError

    project = write_project(tmp_path / "project", RECIPE, eval_rows=EVAL)
    rows = PROMPTS + [{"prompt": ""}, {"messages": [{"role": "assistant", "content": "Hi"}]},
                      {"question": "?"}]
    (project / "data" / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FinetuneError) as info:
        resolve_entry_point(str(project), "distill",
                            {"model": "tiny", "distill.teacher": "http://127.0.0.1:9/v1"})
    said = str(info.value)
    assert "prompts for the teacher; nothing was started" in said
    assert "prompts.jsonl:9" in said and "prompts.jsonl:10" in said and ("prompts.jsonl:11: not a "
                                                                         "prompt") in said

    (project / "data" / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    recipe, _ = resolve_entry_point(str(project), "distill",
                                    {"model": "tiny", "distill.teacher": "http://x:9/v1"})
    assert (
        recipe.distill.teacher == "http://x:9/v1"
        and recipe.adapter.type == "lora"
        and recipe.objective == "sft"
    )
    assert "prompts.jsonl): 8, answered by http://x:9/v1 when the run starts" in capsys.readouterr().err


def test_the_prompt_of_each_kind_of_row():
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.data.prompts import answered_row, read_prompts
    from tests.helpers import REPO

    recipe = load_recipe(REPO / "recipes" / "distill")
    got = read_prompts(recipe, "data.train")
    assert len(got.prompts) == 80 and not got.issues
    first = got.prompts[0]
    assert first.messages == [{"role": "system", "content": recipe.data.system_prompt},
                              {"role": "user",
                               "content": "Are backups encrypted?"}] and first.reference is None
    held = read_prompts(recipe, "data.eval").prompts[0]
    assert held.messages[-1]["role"] == "user" and held.reference["role"] == "assistant"
    answer = {"answer": "Yes.", "model": "m", "prompt_tokens": None, "completion_tokens": None,
              "latency_s": 0.1, "finish_reason": "stop"}
    assert answered_row(held, answer, held_out=True)["messages"][-1] == held.reference  # the reference stays
    assert answered_row(held, answer, held_out=True)[TEACHER] == answer
    # no reference of its own
    assert answered_row(first, answer, held_out=True)["messages"][-1]["content"] == "Yes."
    assert answered_row(held, answer, held_out=False)["messages"][-1] == {"role": "assistant",
                                                                          "content": "Yes."}
    assert answered_row(first, {**answer, "finish_reason": "length"}, held_out=False) is None
    assert answered_row(first, {**answer, "answer": " "}, held_out=False) is None


def test_the_prompts_of_traces_each_once(tracking_uri, tmp_path):
    from mlflow.entities import SpanType

    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.data.prompts import read_prompts

    def call(messages, answer):
        with mlflow.start_span("Completions", span_type=SpanType.CHAT_MODEL) as span:
            span.set_inputs({"messages": messages, "model": "m"})
            span.set_outputs({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                           "finish_reason": "stop"}]})

    mlflow.set_experiment("app")
    for text in ("Where is my order?", "Can I pay by card?", "Where is my order?"):  # one asked twice
        call([{"role": "user", "content": text}], "A poor answer.")
    # ends with the bot
    call([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "?")
    mlflow.flush_trace_async_logging()
    forget_active_experiment()
    project = write_project(tmp_path / "project", RECIPE.replace("  eval: data/eval.jsonl\n", ""))
    recipe = load_recipe(project, method="distill", overrides={"data": "traces:app",
                                                               "distill.teacher": "http://x/v1"})
    got = read_prompts(recipe, "data.train")
    assert not got.issues
    assert [p.messages for p in got.prompts] == [[{"role": "user", "content": "Where is my order?"}],
                                                 [{"role": "user", "content": "Can I pay by card?"}]]
    assert all(p.reference is None for p in got.prompts)  # the logged answers are not learned
    assert got.traces.startswith("4 traces read, 2 used (2 prompt_only rows), 2 left out")


@pytest.mark.integration
def test_a_token_level_loss_against_a_registered_teacher_sharing_the_tokenizer(teacher, tmp_path):
    uri, root, _ = teacher
    project = _project(tmp_path)
    logits = {"distill.teacher": "models:/teacher@champion", "distill.loss": "logits",
              "distill.kl_weight": 0.5}
    proc, run = _distill(uri, root, project, "distill-logits", **logits)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "KL(teacher || student), weight 0.5" in proc.stderr
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/teacher_kl")
    assert len(history) == 2 and all(m.value > 0 for m in history)  # 2 steps, the student is not the teacher
    task = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/task_loss")
    loss = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert [t.value + 0.5 * k.value for t, k in zip(task, history)] == pytest.approx([v.value for v in loss],
                                                                                     abs=2e-3)

    # another family's tokenizer: refused before the student loads
    proc, run = _distill(uri, root, project, "distill-logits", model="tiny-qwen2.5", **logits)
    assert proc.returncode != 0 and run.info.status == "FAILED"
    assert "the tokenizer of models:/teacher@champion is not the student's (tiny-qwen2.5)" in run.data.tags[
        "finetune.error"]
    assert not any(k.startswith("train/") for k in run.data.metrics)


# ---------------------------------------------------------------- only the prompts the run uses are asked


def _support_bot(**overrides):
    from mlflow_finetune_plugin.config.loading import load_recipe
    from tests.helpers import SUPPORT_BOT

    return load_recipe(SUPPORT_BOT, method="distill",
                       overrides={"model": "tiny", "distill.teacher": "http://x/v1", **overrides})


def test_the_teacher_is_asked_only_for_the_prompts_the_run_uses():
    from mlflow_finetune_plugin.data.prompts import prompt_sets, used_prompts

    # The new user's command on the support-bot data: 419 + 60 prompts read, 16 + 4 used
    recipe = _support_bot(**{"data.max_rows": 16, "eval.max_examples": 4})
    read = prompt_sets(recipe)
    assert [len(s.prompts) for s in read] == [419, 60]
    (train, held), notes = used_prompts(recipe, read)
    assert train.prompts == read[0].prompts[:16] and held.prompts == read[1].prompts[:4]
    assert held.unasked == read[1].prompts[4:]  # kept with their references (the eval loss), not asked
    assert notes == ["data.max_rows 16: 403 training prompts not asked",
                     "eval.max_examples 4: 56 held-out prompts "
                     "not asked, 56 of them kept with their reference answers for the eval loss"]

    # distill.max_prompts: the held-out prompts first, the training prompts up to the cap
    (train, held), notes = used_prompts(_support_bot(**{"eval.max_examples": 4, "distill.max_prompts": 30}),
                                        read)
    assert (len(train.prompts), len(held.prompts)) == (26,
                                                       4) and notes[-1].startswith("distill.max_prompts 30")

    # data.eval_split: the seeded share of the (capped) training prompts; its first eval.max_examples asked,
    # with the teacher's answers as their targets
    recipe = _support_bot(**{"data.eval": None, "data.eval_split": 0.2, "eval.max_examples": 4,
                             "distill.max_prompts": 50})
    (train, held), notes = used_prompts(recipe, prompt_sets(recipe))
    assert (len(train.prompts), len(held.prompts)) == (40, 4) and not held.keeps_references
    assert not {p.key for p in train.prompts} & {p.key for p in held.prompts}
    assert "eval.max_examples 4: 6 prompts of the data.eval_split share not asked" in notes

    # eval off: data.eval is not asked at all
    (train,), notes = used_prompts(_support_bot(**{"eval.enabled": False}), read)
    assert len(train.prompts) == 419 and notes == ["eval.enabled false: the 60 prompts of data.eval not "
                                                   "asked"]


@pytest.mark.parametrize("value, says", [
    (0, "distill.max_prompts: Input should be greater than 0"),
    ("lots", "distill.max_prompts: Input should be a valid integer"),
    (4, "distill.max_prompts 4 leaves no training prompt: the held-out set takes 4 (eval.max_examples 4)"),
])
def test_a_bad_prompt_cap_is_refused_before_a_run_exists(value, says):
    from mlflow_finetune_plugin.backend import resolve_entry_point
    from tests.helpers import SUPPORT_BOT

    with pytest.raises(Exception, match=re.escape(says)):
        resolve_entry_point(str(SUPPORT_BOT), "distill", {"model": "tiny", "distill.teacher": "http://x/v1",
                                                          "eval.max_examples": 4,
                                                          "distill.max_prompts": value})


def test_the_count_and_the_tokens_are_said_before_the_first_request(capsys):
    from mlflow_finetune_plugin.data.prompts import prompt_sets, used_prompts
    from mlflow_finetune_plugin.distill.estimate import planned, prompt_tokens
    from mlflow_finetune_plugin.models.base import load_tokenizer
    from mlflow_finetune_plugin.models.chat_format import prompt_ids

    recipe = _support_bot(**{"data.max_rows": 16, "eval.max_examples": 4, "distill.max_tokens": 100})
    sets, notes = used_prompts(recipe, prompt_sets(recipe))
    todo = [p for s in sets for p in s.prompts][2:]  # two of them cached
    plan = planned(recipe, 479, 20, todo, notes)
    tok = load_tokenizer("tiny")
    assert plan["prompt_tokens"] == sum(len(prompt_ids(tok, p.messages)) for p in todo) > 0
    assert plan["answer_tokens_at_most"] == 1800 and (plan["to_ask"], plan["cached"]) == (18, 2)
    said = capsys.readouterr().err
    assert "Teacher http://x/v1: the run uses 20 of the 479 prompts (data.max_rows 16: " in said
    assert (
        f"18 to ask, 2 cached: about {plan['prompt_tokens']:,} prompt tokens (the student's tokenizer, tiny; "
        "the teacher's may count differently) and at most 1,800 answer tokens (18 x distill.max_tokens "
        "100)") in said

    # a tokenizer that cannot be loaded: about 4 characters a token, said so
    broken = recipe.model_copy(update={"model": recipe.model.model_copy(update={"name": "/nowhere/model"})})
    tokens, how = prompt_tokens(broken, todo)
    assert tokens == -(-sum(len(m["content"]) for p in todo for m in p.messages) // 4)
    assert how.startswith("approximated as 4 characters a token")


@pytest.mark.integration
def test_a_limited_run_asks_the_teacher_for_the_rows_it_uses_and_a_larger_one_only_for_the_rest(teacher,
                                                                                                tmp_path):
    uri, root, proxy = teacher
    prompts = [{"prompt": f"Budget question {i}?"} for i in range(8)]
    held_out = [{"messages": [{"role": "user", "content": f"Budget: when do you open on day {i}?"},
                              {"role": "assistant", "content": "At nine."}]} for i in range(2)]
    project = _project(tmp_path, prompts, eval_rows=held_out)
    limited = {"distill.teacher": proxy.url, "data.max_rows": 3, "eval.max_examples": 1}
    proxy.asked.clear()
    proc, run = _distill(uri, root, project, "distill-budget", **limited)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # 3 training prompts and 1 held-out one: as many requests as rows used
    assert sorted(proxy.asked) == sorted([f"Budget question {i}?" for i in range(3)]
                                         + ["Budget: when do you open on day 0?"])
    said = proc.stderr
    assert said.index("the run uses 4 of the 10 prompts") < said.index("Teacher answers")
    assert "4 to ask, 0 cached: about " in said and ("at most 12 answer tokens (4 x distill.max_tokens "
                                                     "3)") in said
    summary = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/distill/summary.json")
    assert (
        summary["asked"] == 4
        and summary["plan"]["prompts_read"] == 10
        and summary["plan"]["prompt_tokens"] > 0
    )
    assert summary["data.eval"]["unasked"] == 1
    assert "1 prompt, 2 chat rows, 0 left out; 1 more held out with their references, not asked" in said
    held = _rows(paths.job_dir(run.info.run_id) / "distill" / "eval.jsonl")
    # the unasked one stays held out
    assert [r["messages"][-1]["content"] for r in held] == ["At nine.", "At nine."]
    assert TEACHER in held[0] and TEACHER not in held[1]
    assert "eval/teacher/rougeL" in run.data.metrics

    # More rows: only the prompts not answered yet are asked; a cap of 4 asks nothing new
    proxy.asked.clear()
    proc, run = _distill(uri, root, project, "distill-budget", **{**limited, "data.max_rows": 5})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(proxy.asked) == ["Budget question 3?", "Budget question 4?"]
    assert run.data.tags["finetune.distill.answers"] == "6 prompts: 2 asked, 4 from the cache"
    proxy.asked.clear()
    proc, run = _distill(uri, root, project, "distill-budget", **{**limited, "data.max_rows": 8,
                                                                   "distill.max_prompts": 4})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proxy.asked == [] and "every answer is cached: the teacher is not asked" in proc.stderr
    assert run.data.tags["finetune.distill.answers"] == "4 prompts: 0 asked, 4 from the cache"
