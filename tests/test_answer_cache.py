"""The base model's answers kept between runs (`eval.reuse_answers`): what decides the key, and a second
evaluation of the tiny model that takes the prompt-only contenders' answers from the cache and the tuned
model's from the model.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlflow_finetune_plugin.config.schema import EvalConfig
from mlflow_finetune_plugin.evaluate import answer_cache, answering
from mlflow_finetune_plugin.evaluate.answer_cache import weights_digest
from mlflow_finetune_plugin.evaluate.contenders import run_evaluation
from tests.helpers import chat_rows, random_lora


def test_the_digest_is_the_base_weights_not_the_adapter_nor_the_instance(tiny_model_dir):
    model = random_lora(tiny_model_dir)
    first = weights_digest(model)
    assert first == weights_digest(random_lora(tiny_model_dir))  # another load of the same weights
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(1.0)  # training moves the adapter only
    assert weights_digest(model) == first
    base = next(p for n, p in model.named_parameters() if "base_layer" in n)
    with torch.no_grad():
        base.view(-1)[0] += 1e-3  # one base weight changed
    assert weights_digest(model) != first
    # a full fine-tune's base model is given apart: its own weights, all of them
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert weights_digest(plain) == weights_digest(model, base_model=plain) != first


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """The contenders that really generated (by name), with the cache in tmp_path/answers."""
    monkeypatch.setattr(answer_cache, "cache_folder", lambda: tmp_path / "answers")
    answered, real = [], answering._answer_all_ended

    def spy(model, tokenizer, prompts, references, cfg, name, progress=None):
        answered.append(name)
        return real(model, tokenizer, prompts, references, cfg, name, progress)

    monkeypatch.setattr(answering, "_answer_all_ended", spy)
    return answered


def test_a_second_evaluation_reuses_the_base_answers_and_asks_the_tuned_model_again(tiny_model_dir, calls,
                                                                                    capsys, tmp_path):
    model, tok = random_lora(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    evals, train = [r["messages"] for r in chat_rows(4)], [r["messages"] for r in chat_rows(6, offset=10)]
    cfg = EvalConfig(max_examples=4, max_new_tokens=6, fewshot_k=2, traces=False,
                     contenders=["base", "fewshot", "retrieval"])
    prompt_only = ["base", "fewshot", "retrieval"]

    first = run_evaluation(model, tok, evals, train, cfg)
    assert calls == prompt_only + ["tuned"] and "Reused" not in capsys.readouterr().out
    assert len(list((tmp_path / "answers").glob("*.json"))) == 3  # one file per prompt-only contender

    calls.clear()
    again = run_evaluation(model, tok, evals, train, cfg)
    assert calls == ["tuned"]
    assert ("Reused from an earlier run on this machine: the base model's answers of base, fewshot, "
            "retrieval (the same") in capsys.readouterr().out
    for name in prompt_only + ["tuned"]:
        assert [row[f"{name}_answer"] for row in again.rows] == [row[f"{name}_answer"] for row in first.rows]
        for metric in ("rougeL", "loss", "latency_s"):
            assert (
                again.metrics[f"eval/{name}/{metric}"]
                == pytest.approx(first.metrics[f"eval/{name}/{metric}"])
                or name == "tuned"
                and metric == "latency_s"
            )

    # what decides an answer is in the key: another length answers again; so does a file cut short, and reuse
    # off
    calls.clear()
    run_evaluation(model, tok, evals, train, cfg.model_copy(update={"max_new_tokens": 5}))
    assert calls == prompt_only + ["tuned"]
    for kept in (tmp_path / "answers").glob("*.json"):
        kept.write_text(kept.read_text()[:20])
    calls.clear()
    run_evaluation(model, tok, evals, train, cfg)
    assert calls == prompt_only + ["tuned"]
    calls.clear()
    run_evaluation(model, tok, evals, train, cfg.model_copy(update={"reuse_answers": False}))
    assert calls == prompt_only + ["tuned"]

    # another base model (one weight moved) answers again
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "base_layer" in n).view(-1)[0] += 1e-2
    calls.clear()
    run_evaluation(model, tok, evals, train, cfg)
    assert calls == prompt_only + ["tuned"]
