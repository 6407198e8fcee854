"""Serving: model choices from the registry, the transformers engine (one base copy for every side, adapters on/off,
token streaming, concurrent requests), the openai engine against a real `transformers serve`, the `serve` command,
and vLLM (real tests skipped without it and a GPU)."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.logged_model import generate, load_logged_model
from mlflow_finetune_plugin.models.tiny import tiny_model_path
from mlflow_finetune_plugin.serving import ModelChoice, Settings, stream_pair
from mlflow_finetune_plugin.serving.choices import (
    local_model,
    parse_ref,
    picker_choices,
    require_vllm_support,
    vllm_support,
)
from mlflow_finetune_plugin.serving.openai_engine import OpenAIEngine
from mlflow_finetune_plugin.serving.transformers_engine import TokenStreamer, TransformersEngine
from mlflow_finetune_plugin.serving.vllm_engine import VLLMEngine, vllm_available
from tests.helpers import cli_process, free_port, register_version, stop, wait_for_http

MESSAGES = [{"role": "user", "content": "How do I reset my password?"}]
GREEDY = Settings(temperature=0.0, top_p=1.0, max_new_tokens=16)


# --- model choices ---------------------------------------------------------------------------------------------


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
    assert choices["bot/2:base"] == "base: tiny-llama"  # short; the playground shows the full reference on a click


def test_settings_are_checked_all_at_once():
    with pytest.raises(FinetuneError) as err:
        Settings(temperature=3.0, top_p=0.0, max_new_tokens=0).checked()
    assert all(k in str(err.value) for k in ("temperature=3.0", "top_p=0.0", "max_new_tokens=0"))
    assert Settings(0.7, 0.9, 32).checked() == Settings(0.7, 0.9, 32)
    assert Settings(0.0, 1.0, 4096).checked(max_new_tokens_cap=None).max_new_tokens == 4096  # engines: no cap
    with pytest.raises(FinetuneError, match="use 1 to 64"):
        Settings(0.0, 1.0, 65).checked(max_new_tokens_cap=64)


# --- the transformers engine -----------------------------------------------------------------------------------


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
    assert engine.generate(c1, MESSAGES, Settings(0.0, 1.0, 4)) == generate(loaded, MESSAGES, max_new_tokens=4)


def test_an_adapter_loaded_first_shares_its_base_with_the_base_side(tracking_uri):
    v1 = register_version(seed=0)
    engine = TransformersEngine(device="cpu")
    tuned = engine.generate(ModelChoice("bot", v1), MESSAGES, GREEDY)
    base = engine.generate(ModelChoice("bot", v1, base=True), MESSAGES, GREEDY)
    assert len(engine._slots) == 1 and tuned != base
    with pytest.raises(FinetuneError, match="would exceed the model's context"):
        list(engine.stream(ModelChoice("bot", v1), [{"role": "user", "content": "word " * 1100}], GREEDY))


def test_the_streamer_hands_out_each_token_as_soon_as_it_is_whole_characters():
    """Not a word late (transformers' TextIteratorStreamer waits for a space): the first piece comes with the first
    token; a token holding half a UTF-8 character waits for the next one; the pieces join to the decoded answer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    answer = tokenizer.encode("Hello, wörld: naïve café 😀 okay.", add_special_tokens=False)
    streamer = TokenStreamer(tokenizer, timeout=5)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt: never streamed
    pieces = []
    for i, token in enumerate(answer):
        streamer.put(torch.tensor([token]))
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


# --- vLLM: what it can serve, the command, the engine ----------------------------------------------------------


def test_vllm_refuses_adapters_it_cannot_serve_and_names_the_alternatives(tracking_uri):
    ok = register_version(seed=0, r=8)
    dora = register_version(seed=1, r=8, use_dora=True, alias=None)
    odd_rank = register_version(seed=2, r=12, alias=None)
    assert vllm_support(local_model(ModelChoice("bot", ok))) == (True, "LoRA without DoRA or biases, rank supported "
                                                                       "by vLLM")
    assert "DoRA" in vllm_support(local_model(ModelChoice("bot", dora)))[1]
    assert "r=12" in vllm_support(local_model(ModelChoice("bot", odd_rank)))[1]
    with pytest.raises(FinetuneError) as err:
        require_vllm_support(local_model(ModelChoice("bot", dora)))
    assert "--engine transformers" in str(err.value) and "merge" in str(err.value)

    runner = CliRunner()
    result = runner.invoke(main, ["serve", f"bot/{ok}", "bot/1:base", "--engine", "vllm", "--dry-run",
                                  "--port", "8123"])
    assert result.exit_code == 0, result.output
    command = result.output.splitlines()[-1]
    assert command.startswith("$ vllm serve ") and "--enable-lora" in command and "--host 127.0.0.1" in command
    assert f"--lora-modules bot-v{ok}=" in command and "--served-model-name bot-v1-base" in command
    assert "--max-lora-rank 8" in command and "--port 8123" in command
    refused = runner.invoke(main, ["serve", f"bot/{dora}", "--engine", "vllm", "--dry-run"])
    assert refused.exit_code == 1 and "does not serve DoRA" in refused.output


def _fake_vllm(monkeypatch) -> list:
    """Stand-ins for the few vLLM names the engine uses (vLLM needs CUDA): an AsyncLLM whose generate() streams
    DELTA pieces naming the LoRA it was given. Returns the list of requests it receives."""
    import types

    requests = []

    class AsyncLLM:
        @classmethod
        def from_engine_args(cls, args):
            engine = cls()
            engine.args = args
            return engine

        async def generate(self, prompt, params, request_id, *, lora_request=None):
            requests.append((prompt, params, lora_request))
            name = lora_request.lora_name if lora_request else "base"
            for piece in (f"answer from {name}", " in", " pieces"):
                yield types.SimpleNamespace(outputs=[types.SimpleNamespace(text=piece)], finished=False)

        def shutdown(self):
            requests.append("shutdown")

    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)

    module("vllm", SamplingParams=lambda **kw: kw)
    module("vllm.inputs", TokensPrompt=lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids})
    module("vllm.sampling_params", RequestOutputKind=types.SimpleNamespace(DELTA="delta"))
    module("vllm.lora.request", LoRARequest=lambda name, int_id, path: types.SimpleNamespace(
        lora_name=name, lora_int_id=int_id, lora_path=path))
    module("vllm.engine.arg_utils", AsyncEngineArgs=lambda **kw: kw)
    module("vllm.v1.engine.async_llm", AsyncLLM=AsyncLLM)
    return requests


def test_vllm_engine_routes_base_and_lora_requests_through_its_event_loop(tracking_uri, monkeypatch):
    """The engine's own logic on CPU (vLLM itself is exercised by the GPU test below): one engine on the base,
    base = no LoRA, each version = its LoRARequest, pieces streamed from the asyncio loop, DoRA refused."""
    v1, dora = register_version(seed=0), register_version(seed=1, use_dora=True, alias=None)
    requests = _fake_vllm(monkeypatch)
    engine = VLLMEngine(max_lora_rank=8)
    try:
        jobs = [(ModelChoice("bot", v1, base=True), MESSAGES), (ModelChoice("bot", v1), MESSAGES)]
        texts = ["", ""]
        for i, piece, error in stream_pair(engine, jobs, GREEDY):
            assert error is None
            texts[i] += piece
        assert texts == ["answer from base in pieces", f"answer from bot-v{v1} in pieces"]
        args = engine._llm.args
        assert args["enable_lora"] and args["max_lora_rank"] == 8 and args["trust_remote_code"] is False
        assert args["model"] == str(tiny_model_path()) and args["tokenizer"].endswith("tokenizer")
        loras = [r[2] for r in requests]
        assert None in loras and {lr.lora_path for lr in loras if lr} == {str(local_model(jobs[1][0]).adapter_dir)}
        prompt, params, _ = requests[0]
        expected_ids = AutoTokenizer.from_pretrained(tiny_model_path()).apply_chat_template(
            MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert prompt == {"prompt_token_ids": list(expected_ids)}
        assert params["temperature"] == 0.0 and params["max_tokens"] == 16 and params["output_kind"] == "delta"
        with pytest.raises(FinetuneError, match="(?s)does not serve DoRA.*--engine transformers"):
            engine.prepare(ModelChoice("bot", dora))
    finally:
        engine.close()
    assert requests[-1] == "shutdown"


@pytest.mark.skipif(vllm_available(), reason="checks the message shown when vllm is not installed")
def test_the_vllm_engine_without_vllm_says_what_to_do():
    with pytest.raises(FinetuneError, match="--engine transformers"):
        VLLMEngine()


@pytest.mark.requires_vllm
@pytest.mark.gpu
@pytest.mark.skipif(not (vllm_available() and torch.cuda.is_available()), reason="needs vllm and a CUDA GPU")
def test_vllm_engine_streams_base_and_lora_side_by_side(tracking_uri):
    v1 = register_version(seed=0, r=8)
    dora = register_version(seed=1, use_dora=True, alias=None)
    engine = VLLMEngine(max_lora_rank=8, gpu_memory_utilization=0.3, max_model_len=1024)
    try:
        jobs = [(ModelChoice("bot", v1, base=True), MESSAGES), (ModelChoice("bot", v1), MESSAGES)]
        texts, pieces = ["", ""], [0, 0]
        for i, piece, error in stream_pair(engine, jobs, GREEDY):
            assert error is None
            texts[i] += piece
            pieces[i] += bool(piece)
        assert all(texts) and texts[0] != texts[1] and min(pieces) > 1
        with pytest.raises(FinetuneError, match="DoRA"):
            engine.prepare(ModelChoice("bot", dora))
    finally:
        engine.close()


# --- the openai engine against a real server, started by `mlflow-finetune serve` -------------------------------


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
        configured = make_engine("openai", ModelChoice("bot", v1), [url, f"bot/{v1}:base=http://127.0.0.1:9/v1"],
                                 ["bot@challenger=merged"])
        assert configured.endpoint(ModelChoice("bot", v1)) == (url, "merged")
        assert configured.endpoint(ModelChoice("bot", v1, True)) == ("http://127.0.0.1:9/v1", f"bot-v{v1}-base")
    finally:
        stop(proc)
    with pytest.raises(FinetuneError, match="cannot reach the server"):
        OpenAIEngine(base_url=f"http://127.0.0.1:{free_port()}/v1").generate(ModelChoice("bot", v1), MESSAGES, GREEDY)


@pytest.mark.integration
@pytest.mark.parametrize("stop_signal", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_serve_answers_the_openai_client_and_a_stop_signal_leaves_nothing_behind(tracking_uri, tmp_path, monkeypatch,
                                                                                  stop_signal):
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
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
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
    with socket.socket() as s:  # and a new server can take it (SO_REUSEADDR, as servers do: connections in TIME_WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


@pytest.mark.integration
@pytest.mark.parametrize("stop_signal", ["SIGTERM", "SIGINT", "SIGHUP"])
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


def test_the_forward_lock_is_released_exactly_once_when_a_switch_fails():
    """A failing adapter switch must leave the lock free, and must not release it a second time (a second release
    would free a hold another request's forward has taken in between)."""
    import threading
    import warnings

    import torch

    from mlflow_finetune_plugin.serving.transformers_engine import ForwardLock

    lock, module = ForwardLock(), torch.nn.Linear(2, 2)

    def switch(name):
        if name == "broken":
            raise RuntimeError("adapter 'broken' is not loaded")

    lock.install(module, switch)
    lock.want("broken")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch turns an error in an always_call hook (a double release) into a warning
        with pytest.raises(RuntimeError, match="not loaded"):
            module(torch.ones(1, 2))
    assert lock._lock.acquire(blocking=False)  # free again
    lock._lock.release()
    lock.want("good")
    assert module(torch.ones(1, 2)).shape == (1, 2)
    held_elsewhere = threading.Event()
    with lock:  # another holder: a forward now must wait, not run
        t = threading.Thread(target=lambda: (module(torch.ones(1, 2)), held_elsewhere.set()))
        t.start()
        assert not held_elsewhere.wait(0.3)
    t.join(5)
    assert held_elsewhere.is_set()
