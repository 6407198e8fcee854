"""Serving: model choices from the registry, the transformers engine (one base copy for every side, adapters
on/off, token streaming, concurrent requests), the openai engine against a real `transformers serve`, the
`serve` command, and vLLM (real tests skipped without it and a GPU)."""

from __future__ import annotations

import os
import socket
import sys

import mlflow
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.logged_model import generate, load_logged_model
from mlflow_finetune_plugin.models.tiny import tiny_model_path
from mlflow_finetune_plugin.serving import ModelChoice, Settings, stream_pair
from mlflow_finetune_plugin.serving.batching import TokenStreamer
from mlflow_finetune_plugin.serving.choices import (
    local_model,
    parse_ref,
    picker_choices,
    require_vllm_support,
    vllm_support,
)
from mlflow_finetune_plugin.serving.openai_engine import OpenAIEngine
from mlflow_finetune_plugin.serving.transformers_engine import TransformersEngine
from tests.helpers import (
    cli_process,
    drain,
    free_port,
    register_eval_version,
    register_version,
    stop,
    wait_for,
    wait_for_http,
)

MESSAGES = [{"role": "user", "content": "How do I reset my password?"}]
GREEDY = Settings(temperature=0.0, top_p=1.0, max_new_tokens=16)


# --- model choices
# ---------------------------------------------------------------------------------------------


def test_references_resolve_to_registry_versions_and_nothing_else(tracking_uri):
    v1 = register_version(seed=0, alias="challenger")
    v2 = register_version(seed=1, alias="champion")
    assert parse_ref("bot@challenger").key == f"bot/{v1}"
    assert parse_ref("models:/bot@champion").key == f"bot/{v2}"
    assert parse_ref("bot/v2").key == "bot/2" and parse_ref("bot/1:base").key == "bot/1:base"
    assert parse_ref("base", base_of=ModelChoice("bot", v1)).key == f"bot/{v1}:base"
    assert parse_ref("champion", default_name="bot").key == f"bot/{v2}"
    with pytest.raises(FinetuneError, match="no version '9'"):
        parse_ref("bot/9")
    with pytest.raises(FinetuneError, match="no registered model named 'nope'"):
        picker_choices("nope")
    for bad in ("/etc/passwd", "bot", "bot/x", "bot/1:adapter"):
        with pytest.raises(FinetuneError, match="not a model choice"):
            ModelChoice.from_key(bad)
    choices = dict((key, label) for label, key in picker_choices("bot"))
    assert list(choices) == ["bot/2", "bot/1", "bot/2:base"]  # newest first, then one entry per base model
    assert "@challenger" in choices["bot/1"] and "@champion" in choices["bot/2"]
    # short; the playground shows the full reference on a click
    assert choices["bot/2:base"] == "base: tiny-llama"


def test_an_alias_is_followed_and_a_move_that_cannot_be_served_keeps_the_old_version(tracking_uri):
    from mlflow_finetune_plugin.serving.follow import AliasWatch, Followed, followed

    assert followed("bot@champion") == followed("models:/bot@champion") == Followed("bot", "champion")
    assert followed("champion", default_name="bot") == Followed("bot", "champion")
    assert followed("base", base_of=Followed("bot", "champion")) == Followed("bot", "champion", base=True)
    assert followed("bot@champion:base").key == "bot@champion:base"
    for pinned in ("bot/3", "models:/bot/3", "3", "v3", "base"):
        assert followed(pinned, default_name="bot") is None
    v1, v2, v3 = (register_eval_version({"rougeL": 0.5}) for _ in range(3))
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("bot", "champion", v1)
    said, refuse = [], {v3}

    def on_move(ref, old, new):
        if new.version in refuse:
            raise FinetuneError("no room for it")
        return f"now on {new.key}"

    watch = AliasWatch(on_move, echo=said.append)
    ref = Followed("bot", "champion")
    assert watch.follow(ref) == ModelChoice("bot", v1) and watch.check() == []
    client.set_registered_model_alias("bot", "champion", v2)
    assert watch.check() == [(ref, ModelChoice("bot", v1), ModelChoice("bot", v2))]
    assert watch.current(ref) == ModelChoice("bot", v2) and said[-1].endswith(
        f"moved from v{v1} to v{v2}: now on bot/{v2}")
    client.set_registered_model_alias("bot", "champion", v3)  # cannot be served here: v2 goes on answering
    assert watch.check() == [] and watch.current(ref) == ModelChoice("bot", v2)
    assert "cannot be served here: no room for it" in said[-1] and f"Still serving v{v2}" in said[-1]
    assert watch.check() == [] and len(said) == 2  # refused once, not again at every look
    client.delete_registered_model_alias("bot", "champion")  # gone: keep serving, say so once
    watch.check()
    watch.check()
    assert watch.current(ref) == ModelChoice("bot",
                                             v2) and len(said) == 3 and "cannot read the registry" in said[-1]


def test_the_gradio_apps_settings_come_from_arguments_then_environment_variables():
    from mlflow_finetune_plugin.serving.playground.launch import PlaygroundConfig

    env = {"MLFLOW_FINETUNE_MODEL": "bot@challenger", "MLFLOW_FINETUNE_BLIND": "yes",
           "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861",
           "MLFLOW_FINETUNE_OPENAI_URL": "http://a/v1 bot/1:base=http://b/v1",
           "MLFLOW_FINETUNE_FOLLOW_INTERVAL": "2.5", "MLFLOW_FINETUNE_ENGINE": "openai"}
    config = PlaygroundConfig.from_env(env, engine="vllm", max_lora_rank=8, against=None)
    assert (config.model, config.against, config.engine, config.blind) == ("bot@challenger", "base", "vllm",
                                                                           True)
    assert (config.host, config.port, config.follow_interval, config.max_lora_rank) == ("0.0.0.0", 7861, 2.5,
                                                                                        8)
    assert config.openai_urls == ("http://a/v1", "bot/1:base=http://b/v1")
    with pytest.raises(FinetuneError, match="MLFLOW_FINETUNE_BLIND='maybe': use 1/true/yes"):
        PlaygroundConfig.from_env({**env, "MLFLOW_FINETUNE_BLIND": "maybe"})
    with pytest.raises(FinetuneError, match="which model.*MLFLOW_FINETUNE_MODEL"):
        PlaygroundConfig.from_env({})


def test_settings_are_checked_all_at_once():
    with pytest.raises(FinetuneError) as err:
        Settings(temperature=3.0, top_p=0.0, max_new_tokens=0).checked()
    assert all(k in str(err.value) for k in ("temperature=3.0", "top_p=0.0", "max_new_tokens=0"))
    assert Settings(0.7, 0.9, 32).checked() == Settings(0.7, 0.9, 32)
    assert Settings(0.0, 1.0, 4096).checked(max_new_tokens_cap=None).max_new_tokens == 4096  # engines: no cap
    with pytest.raises(FinetuneError, match="use 1 to 64"):
        Settings(0.0, 1.0, 65).checked(max_new_tokens_cap=64)
    with pytest.raises(FinetuneError, match="num_beams=9: use 1"):
        Settings(0.0, 1.0, 8, num_beams=9).checked()
    with pytest.raises(FinetuneError, match="beam search is deterministic; set temperature 0"):
        Settings(0.5, 1.0, 8, num_beams=2).checked()
    assert Settings(0.0, 1.0, 8, num_beams=4).checked().num_beams == 4


# --- the transformers engine
# -----------------------------------------------------------------------------------


def test_one_base_copy_serves_base_and_two_adapters_streaming_at_once(tracking_uri):
    v1, v2 = register_version(seed=0), register_version(seed=1, alias=None)
    base, c1, c2 = ModelChoice("bot", v1, base=True), ModelChoice("bot", v1), ModelChoice("bot", v2)
    engine = TransformersEngine(device="cpu")
    # The base first: the adapters are then put onto that same model, not onto a second copy.
    jobs = [(base, MESSAGES), (c1, MESSAGES), (c2, MESSAGES)]
    texts, pieces, errors = ["", "", ""], [0, 0, 0], []
    for i, piece, error in stream_pair(engine, jobs, GREEDY):
        texts[i] += piece
        pieces[i] += bool(piece)
        errors += [error] if error else []
    assert not errors
    assert len(engine._slots) == 1  # one copy of the base weights in memory
    # ... and one tokenizer: the sides' tokenizer files are the same bytes (same base, same chat template)
    assert len({id(tokenizer) for _, _, tokenizer in engine._routes.values()}) == 1
    assert min(pieces) > 1  # streamed token by token, not in one piece

    # Interleaved on one model, each answer is still exactly what its model alone answers (greedy).
    loaded = load_logged_model(local_model(c1).path, device="cpu")
    expected_v1 = generate(loaded, MESSAGES, max_new_tokens=16)
    with loaded.model.disable_adapter():
        expected_base = generate(loaded, MESSAGES, max_new_tokens=16)
    expected_v2 = generate(load_logged_model(local_model(c2).path, device="cpu"), MESSAGES, max_new_tokens=16)
    assert [t.strip() for t in texts] == [expected_base, expected_v1, expected_v2]
    assert len({expected_base, expected_v1, expected_v2}) == 3  # the adapters change the answers

    # Alone, and with another length limit, it still answers the same.
    assert engine.generate(c1, MESSAGES, GREEDY) == expected_v1
    assert engine.generate(c1, MESSAGES, Settings(0.0, 1.0, 4)) == generate(loaded, MESSAGES,
                                                                            max_new_tokens=4)


def test_beam_search_answers_are_the_logged_models_beam_answers_batched_with_both_sides(tracking_uri):
    """num_beams > 1: the engine answers what the logged model's own generate (the evaluation's decoding)
    answers, for the base side and two adapters in one mixed batch; greedy requests still answer greedily."""
    v1, v2 = register_version(seed=0), register_version(seed=1, alias=None)
    base, c1, c2 = ModelChoice("bot", v1, base=True), ModelChoice("bot", v1), ModelChoice("bot", v2)
    beams = Settings(0.0, 1.0, 16, num_beams=3)
    engine = TransformersEngine(device="cpu")
    for choice in (base, c1, c2):
        # loaded first, so the three requests usually share one batch (mixed adapter names,
        engine.prepare(choice)
    engine._slots[0].batcher.gap_s = 1.0  # which PEFT repeats per beam); the answers are the same either way
    jobs = [(base, MESSAGES), (c1, MESSAGES), (c2, MESSAGES)]
    texts = ["", "", ""]
    for i, piece, error in stream_pair(engine, jobs, beams):
        assert error is None
        texts[i] += piece

    loaded = load_logged_model(local_model(c1).path, device="cpu")
    expected_v1 = generate(loaded, MESSAGES, max_new_tokens=16, num_beams=3)
    with loaded.model.disable_adapter():
        expected_base = generate(loaded, MESSAGES, max_new_tokens=16, num_beams=3)
    expected_v2 = generate(load_logged_model(local_model(c2).path, device="cpu"), MESSAGES, max_new_tokens=16,
                           num_beams=3)
    assert [t.strip() for t in texts] == [expected_base, expected_v1, expected_v2]
    # Beam search is not greedy decoding here (else this test would show nothing), and greedy still streams.
    greedy = generate(loaded, MESSAGES, max_new_tokens=16)
    assert expected_v1 != greedy
    assert engine.generate(c1, MESSAGES, GREEDY) == greedy


def test_the_playground_decodes_as_the_version_was_evaluated_unless_told_otherwise(tracking_uri):
    """A version evaluated with eval.num_beams 3 logs it; the playground's comparisons default to it at
    temperature 0 (both sides), so its answers are those the run's figures scored; Beams 1 or sampling
    override it."""
    from mlflow_finetune_plugin.serving.choices import logged_num_beams
    from mlflow_finetune_plugin.serving.playground.core import Playground

    greedy_version = register_version(seed=0)
    v = register_version(seed=1, alias=None, config={"num_beams": 3})
    assert logged_num_beams(ModelChoice("bot", v)) == 3 and logged_num_beams(ModelChoice("bot", v, True)) == 3
    assert logged_num_beams(ModelChoice("bot", greedy_version)) == 1
    engine = TransformersEngine(device="cpu")
    pg = Playground(engine, ModelChoice("bot", v), ModelChoice("bot", v, base=True))
    tuned, base = ModelChoice("bot", v), ModelChoice("bot", v, True)
    beams, greedy = Settings(0.0, 1.0, 12, num_beams=3), Settings(0.0, 1.0, 12)
    r = pg.compare("How do I reset my password?", max_new_tokens=12)
    assert r["settings"]["num_beams"] == 3
    assert [r["a"]["answer"], r["b"]["answer"]] == [engine.generate(tuned, MESSAGES, beams),
                                                    engine.generate(base, MESSAGES, beams)]
    assert r["a"]["answer"] != engine.generate(tuned, MESSAGES, greedy)
    assert pg.compare("How do I reset my password?", max_new_tokens=12, num_beams=1)["a"]["answer"] == \
        engine.generate(tuned, MESSAGES, greedy)
    assert pg.compare("How do I reset my password?", temperature=0.7,
                      max_new_tokens=12)["settings"]["num_beams"] == 1
    assert pg.default_num_beams(f"bot/{greedy_version}") == 1
    engine.close()


def test_the_playground_follows_the_alias_and_a_conversation_under_way_keeps_its_version(tracking_uri):
    """`playground --model bot@champion` (the app of gradio_app/app.py): after the alias moves, new
    comparisons answer with the new version, while one that had started goes on with the version it started
    with."""
    from mlflow_finetune_plugin.serving.playground.launch import PlaygroundConfig, create_app

    v1, v2 = register_version(seed=0, alias="champion"), register_version(seed=1, alias=None)
    said = []
    # looked at below
    _, pg = create_app(PlaygroundConfig("bot@champion", follow_interval=3600), echo=said.append)
    try:
        assert (pg.default_a, pg.default_b) == ("bot@champion", "bot@champion:base")
        assert pg.choices()[:2] == [(f"bot @champion (follows the alias; now v{v1})", "bot@champion"),
                                    ("base of bot @champion (follows the alias; now tiny-llama)",
                                     "bot@champion:base")]
        first = pg.compare("How do I reset my password?", max_new_tokens=16)
        assert (first["a"]["model"], first["b"]["model"]) == (f"bot/{v1}", f"bot/{v1}:base")
        # A comparison under way: its sides were resolved when it started.
        sides = [pg.resolve(key, key).key for key in (pg.default_a, pg.default_b)]
        under_way = pg.stream(sides, [pg.context("", [], "How do I reset my password?")] * 2,
                              pg.settings(0, 1, 16))
        next(under_way)
        mlflow.MlflowClient().set_registered_model_alias("bot", "champion", v2)
        moves = pg.watch.check()
        assert [(ref.key, old.version, new.version) for ref, old, new in moves] == [
            ("bot@champion", v1, v2), ("bot@champion:base", v1, v2)]
        assert any(f"bot@champion moved from v{v1} to v{v2}: new conversations answer with bot/{v2}" in line
                   for line in said)
        *_, (texts, errors) = under_way
        assert not any(errors) and texts[0].strip() == first["a"]["answer"]
        after = pg.compare("How do I reset my password?", max_new_tokens=16)
        assert (after["a"]["model"], after["b"]["model"]) == (f"bot/{v2}", f"bot/{v2}:base")
        assert after["a"]["answer"] == pg.engine.generate(ModelChoice("bot", v2), MESSAGES,
                                                          GREEDY) != first["a"]["answer"]
        assert pg.choices()[0][0] == f"bot @champion (follows the alias; now v{v2})"
        assert pg.label(pg.default_a) == f"bot v{v2} @champion"
    finally:
        pg.close()


def test_an_adapter_loaded_first_shares_its_base_with_the_base_side(tracking_uri):
    v1 = register_version(seed=0)
    engine = TransformersEngine(device="cpu")
    tuned = engine.generate(ModelChoice("bot", v1), MESSAGES, GREEDY)
    base = engine.generate(ModelChoice("bot", v1, base=True), MESSAGES, GREEDY)
    assert len(engine._slots) == 1 and tuned != base
    with pytest.raises(FinetuneError, match="would exceed the model's context"):
        list(engine.stream(ModelChoice("bot", v1), [{"role": "user", "content": "word " * 1100}], GREEDY))


def test_the_streamer_hands_out_each_token_as_soon_as_it_is_whole_characters():
    """Not a word late (transformers' TextIteratorStreamer waits for a space): the first piece comes with the
    first token; a token holding half a UTF-8 character waits for the next one; the pieces join to the decoded
    answer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    answer = tokenizer.encode("Hello, wörld: naïve café 😀 okay.", add_special_tokens=False)
    streamer = TokenStreamer(tokenizer, timeout=5)
    pieces = []
    for i, token in enumerate(answer):
        streamer.add(token)
        got = []
        while not streamer.pieces.empty():
            got.append(streamer.pieces.get())
        whole = not tokenizer.decode(answer[:i + 1]).endswith("\ufffd")
        assert len(got) == whole, (i, got)
        pieces += got
    streamer.end()
    pieces += list(streamer)
    assert pieces[0] == tokenizer.decode(answer[:1])
    assert "".join(pieces) == tokenizer.decode(answer) and not any("\ufffd" in p for p in pieces)
    assert len(pieces) > len(answer) // 2  # token by token, not word by word


# --- vLLM: what it can serve, the command, the engine
# ----------------------------------------------------------


def test_vllm_refuses_adapters_it_cannot_serve_and_names_the_alternatives(tracking_uri):
    ok = register_version(seed=0, r=8)
    dora = register_version(seed=1, r=8, use_dora=True, alias=None)
    odd_rank = register_version(seed=2, r=12, alias=None)
    assert vllm_support(local_model(ModelChoice("bot", ok))) == (True,
                                                                 "LoRA without DoRA or biases, rank within "
                                                                 "vLLM's largest max_lora_rank")
    assert "DoRA" in vllm_support(local_model(ModelChoice("bot", dora)))[1]
    assert vllm_support(local_model(ModelChoice("bot", odd_rank)))[0]  # served under max_lora_rank 16
    with pytest.raises(FinetuneError) as err:
        require_vllm_support(local_model(ModelChoice("bot", dora)))
    assert "--engine transformers" in str(err.value) and "merge" in str(err.value)

    runner = CliRunner()
    result = runner.invoke(main, ["serve", f"bot/{ok}", "bot/1:base", "--engine", "vllm", "--dry-run",
                                  "--port", "8123"])
    assert result.exit_code == 0, result.output
    command = result.output.splitlines()[-1]
    # vLLM runs as a child on a loopback port, behind the front that listens on --port.
    assert command.startswith(f"$ {sys.executable} -m mlflow_finetune_plugin.serving.vllm_cli "
                              "serve ") and "--enable-lora" in command
    assert f"--lora-modules bot-v{ok}=" in command and "--served-model-name bot-v1-base" in command
    assert "--max-lora-rank 16" in command and "--host 127.0.0.1" in command and "--port 8123" not in command
    if not torch.cuda.is_available():
        assert "--dtype float32" in command and "--kv-cache-memory-bytes" in command
    refused = runner.invoke(main, ["serve", f"bot/{dora}", "--engine", "vllm", "--dry-run"])
    assert refused.exit_code == 1 and "does not serve DoRA" in refused.output


# --- the openai engine against a real server, started by `mlflow-finetune serve`
# -------------------------------


@pytest.mark.integration
def test_serve_transformers_and_the_openai_engine_stream_the_merged_model(tracking_uri):
    v1 = register_version(seed=0)
    port = free_port()
    proc = cli_process("serve", f"bot/{v1}", "--engine", "transformers", "--port", str(port))
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc)
        engine = OpenAIEngine(base_url=f"http://127.0.0.1:{port}/v1")
        pieces = list(engine.stream(ModelChoice("bot", v1), MESSAGES, GREEDY))
        assert len(pieces) > 1
        # The merged model on the server answers what the adapter answers in process.
        local = TransformersEngine(device="cpu")
        assert "".join(pieces).strip() == local.generate(ModelChoice("bot", v1), MESSAGES, GREEDY)
        # This server holds one model: asking it for another names the server's answer and the fix.
        with pytest.raises(FinetuneError, match=f"model 'bot-v{v1}-base'.*--served-model"):
            engine.generate(ModelChoice("bot", v1, base=True), MESSAGES, GREEDY)
        # The playground's options: a default server, one model sent elsewhere, a server-side name.
        from mlflow_finetune_plugin.serving.playground.launch import make_engine

        url = f"http://127.0.0.1:{port}/v1"
        configured = make_engine("openai", ModelChoice("bot", v1), [url, f"bot/{v1}"
                                                                         ":base=http://127.0.0.1:9/v1"],
                                 ["bot@challenger=merged"])
        assert configured.endpoint(ModelChoice("bot", v1)) == (url, "merged")
        assert configured.endpoint(ModelChoice("bot", v1, True)) == ("http://127.0.0.1:9/v1",
                                                                     f"bot-v{v1}-base")
    finally:
        stop(proc)
    with pytest.raises(FinetuneError, match="cannot reach the server"):
        OpenAIEngine(base_url=f"http://127.0.0.1:{free_port()}/v1").generate(ModelChoice("bot", v1), MESSAGES,
                                                                             GREEDY)


@pytest.mark.integration
# SIGHUP and SIGINT go through the same handler as SIGTERM (front.STOP_SIGNALS; SIGINT left to `-m stress` for
# CI time); the playground's test sends all three.
@pytest.mark.parametrize("stop_signal", ["SIGTERM", pytest.param("SIGINT", marks=pytest.mark.stress)])
def test_serve_answers_the_openai_client_and_a_stop_signal_leaves_nothing_behind(tracking_uri, tmp_path,
                                                                                 monkeypatch, stop_signal):
    import signal

    import openai
    import psutil

    # A fresh machine: no Hugging Face hub cache at all.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    v1 = register_version(seed=0)
    name = f"bot-v{v1}"
    port = free_port()
    proc = cli_process("serve", f"bot/{v1}", "--engine", "transformers", "--port", str(port))
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        assert [m.id for m in client.models.list()] == [name]
        assert client.models.retrieve(name).id == name
        answer = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=8, temperature=0.0)
        assert isinstance(answer.choices[0].message.content, str) and answer.choices[0].message.content
        stream = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=8, temperature=0.0,
                                                stream=True)
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len(pieces) > 1 and "".join(pieces).strip()
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("no-such-model")

        children = psutil.Process(proc.pid).children(recursive=True)
        assert children  # the server runs as a child of `serve`, behind the front
        groups = {os.getpgid(c.pid) for c in children}
        proc.send_signal(getattr(signal, stop_signal))
        assert proc.wait(timeout=60) == 0
    finally:
        stop(proc)
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    for group in groups:
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)
    with pytest.raises(ConnectionRefusedError):  # nothing listens on the port any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    # and a new server can take it (SO_REUSEADDR, as servers do: connections in TIME_WAIT)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


@pytest.mark.integration
def test_serve_follows_the_alias_while_a_client_streams_from_the_old_version(tracking_uri):
    """`serve NAME@champion` serves the new champion once `promote` moves the alias, without a restart: it
    logs the switch, /v1/models lists the version that answers, and a stream under way finishes on the version
    it started on (its server is held still mid-answer, SIGSTOP, while the alias moves, so the answer is
    surely in flight); the old server stops once that request is answered."""
    import signal
    import threading

    import openai
    import psutil

    v1, v2 = register_version(seed=0, alias="champion"), register_version(seed=1, alias=None)
    local = TransformersEngine(device="cpu")
    expected = {v: local.generate(ModelChoice("bot", v), MESSAGES, GREEDY) for v in (v1, v2)}
    local.close()
    port = free_port()
    proc = cli_process("serve", "bot@champion", "--engine", "transformers", "--port", str(port),
                       "--follow-interval", "0.5")
    log = drain(proc)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=300)
        assert [m.id for m in client.models.list()] == [f"bot-v{v1}"]
        old_server = next(c for c in psutil.Process(proc.pid).children(recursive=True)
                          if f"bot-v{v1}" in c.cmdline())
        chunks = []

        def stream():  # 400 tokens: seconds of streaming on the tiny model
            for chunk in client.chat.completions.create(model="bot@champion", messages=MESSAGES,
                                                        max_tokens=400, temperature=0.0, stream=True):
                chunks.append(chunk)

        streaming = threading.Thread(target=stream)
        streaming.start()
        wait_for(lambda: chunks, timeout=120, what="the first streamed piece")
        os.killpg(old_server.pid, signal.SIGSTOP)  # its server held mid-answer
        try:
            mlflow.MlflowClient().set_registered_model_alias("bot", "champion", v2)  # what `promote` does
            wait_for(lambda: [m.id for m in client.models.list()] == [f"bot-v{v2}"], timeout=300,
                     what="the switch to v2")
            # the routes switch first, then the move is logged (and read from the pipe): wait for the line too
            try:
                wait_for(lambda: any(f"bot@champion moved from v{v1} to v{v2}" in line
                                     and "1 request(s) in flight" in line for line in log),
                         timeout=30, what="the move logged with 1 request in flight")
            except AssertionError as e:
                raise AssertionError(f"{e}; the log:\n{''.join(log[-30:])}") from None
            answer = client.chat.completions.create(model="bot@champion", messages=MESSAGES, max_tokens=16,
                                                    temperature=0.0)
            assert (
                answer.model.startswith(f"bot-v{v2}")
                and answer.choices[0].message.content.strip() == expected[v2]
            )
            assert (
                client.chat.completions.create(
                    model=f"bot-v{v2}", messages=MESSAGES, max_tokens=16, temperature=0.0
                )
                .choices[0]
                .message.content.strip()
                == expected[v2]
            )
            with pytest.raises(openai.NotFoundError, match=f"Served here: bot-v{v2}"):
                client.chat.completions.create(model=f"bot-v{v1}", messages=MESSAGES, max_tokens=4)
            assert old_server.is_running()  # kept while its request is in flight
        finally:
            os.killpg(old_server.pid, signal.SIGCONT)
        streaming.join(timeout=120)
        assert not streaming.is_alive()
        # The stream under way finished on v1: every piece from it, the whole answer (400 tokens, greedy).
        assert {c.model.split("@")[0] for c in chunks} == {f"bot-v{v1}"}
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
        assert text.startswith(expected[v1].rstrip("\ufffd")) and not text.startswith(expected[v2])
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        psutil.wait_procs([old_server], timeout=60)
        assert not old_server.is_running()
        # the front stops the old server, then says so (read from its pipe by the drain thread): wait for the
        # line
        wait_for(lambda: any(f"bot-v{v1}: its last request in flight is answered; its server stops" in line
                             for line in log), timeout=30, what="the old server's stop logged")
        assert proc.poll() is None  # the front went on serving
    finally:
        stop(proc)


@pytest.mark.integration
# SIGINT and SIGHUP take the same shutdown path as SIGTERM: left to -m stress for CI's 45 minutes.
@pytest.mark.parametrize("stop_signal", ["SIGTERM", pytest.param("SIGINT", marks=pytest.mark.stress),
                                         pytest.param("SIGHUP", marks=pytest.mark.stress)])
def test_a_stop_signal_to_the_playground_leaves_nothing_behind(tracking_uri, stop_signal):
    import signal

    import psutil

    v1 = register_version(seed=0)
    port = free_port()
    proc = cli_process("playground", "--model", f"bot/{v1}", "--port", str(port), "--device", "cpu")
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", proc)
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(getattr(signal, stop_signal))
        proc.wait(timeout=60)
    finally:
        stop(proc)
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
