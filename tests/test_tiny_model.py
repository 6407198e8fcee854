"""The built-in tiny model (build, cache, chat template) and the bundled support-bot dataset."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlflow_finetune_plugin import paths
from mlflow_finetune_plugin.models import tiny as tiny_model
from mlflow_finetune_plugin.models.tiny import (
    _CACHE_NAME,
    TINY_MODEL_REF,
    build_tiny_model,
    tiny_model_path,
    weights_digest,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "support-bot" / "data"

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How do I reset my password?"},
    {"role": "assistant", "content": "Open Settings > Security and click Reset."},
    {"role": "user", "content": "thanks"},
    {"role": "assistant", "content": " You're welcome!"},  # a leading space must still be inside the mask
]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "seed0", seed=0)


@pytest.fixture(scope="module")
def tok(built):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built)


@pytest.fixture(scope="module")
def model(built):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(built).eval()


# --- build
# -----------------------------------------------------------------------------------------------------

def test_build_writes_a_complete_model_folder(built):
    assert built.is_absolute()
    for name in ("config.json", "model.safetensors", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (built / name).is_file(), name
    assert TINY_MODEL_REF == "builtin:tiny-llama"


def test_build_is_deterministic_and_seeded(built, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert (again / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_text() == (built / "tokenizer.json").read_text()
    assert weights_digest(again) == weights_digest(built)

    other = build_tiny_model(tmp_path / "other", seed=1)
    assert weights_digest(other) != weights_digest(built)
    assert (other / "tokenizer.json").read_text() == (built / "tokenizer.json").read_text()


def test_build_leaves_the_callers_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_weights_digest_is_sha256_of_the_safetensors_files_in_name_order(built, tmp_path):
    single = hashlib.sha256((built / "model.safetensors").read_bytes()).hexdigest()
    assert weights_digest(built) == single

    (tmp_path / "b.safetensors").write_bytes(b"second")
    (tmp_path / "a.safetensors").write_bytes(b"first")
    (tmp_path / "config.json").write_text("{}")  # not a weights file: ignored
    assert weights_digest(tmp_path) == hashlib.sha256(b"firstsecond").hexdigest()

    with pytest.raises(FileNotFoundError, match="safetensors"):
        weights_digest(tmp_path / "config.json")


# --- load back
# -------------------------------------------------------------------------------------------------

def test_tokenizer_loads_with_autotokenizer(tok):
    assert len(tok) == 2048
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>" and tok.bos_token is None
    assert tok.model_max_length == 1024
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]) == [0, 1, 2,
                                                                                                     3]
    assert set(tok.all_special_ids) == {0, 1, 2, 3}


@pytest.mark.parametrize("text", ["Hello, world!", "héllo 🙂 世界\n\ttabs",
                                  "Settings > Billing > Invoices: $49.99"])
def test_any_text_round_trips_through_the_tokenizer(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < len(tok) for i in ids)
    assert tok.decode(ids) == text


def test_model_loads_with_automodel(model, tok):
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (128, 256, 4)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (4, 2, 1024)
    assert cfg.vocab_size == len(tok)
    assert (
        cfg.eos_token_id == tok.eos_token_id
        and cfg.pad_token_id == tok.pad_token_id
        and cfg.bos_token_id is None
    )
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert sum(p.numel() for p in model.parameters()) == 853_120
    gen = model.generation_config
    assert (gen.eos_token_id, gen.pad_token_id, gen.do_sample, gen.max_new_tokens) == (2, 3, False, 64)


# --- chat template
# ---------------------------------------------------------------------------------------------

def test_chat_template_renders_chatml(tok):
    text = tok.apply_chat_template(CHAT[:3], tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nHow do I reset my password?<|im_end|>\n"
                    "<|im_start|>assistant\nOpen Settings > Security and click Reset.<|im_end|>\n")
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("password?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_accepts_content_parts(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "},
                                          {"type": "text", "text": "there"}]}]
    assert tok.apply_chat_template(parts, tokenize=False) == "<|im_start|>user\nHi there<|im_end|>\n"


def test_assistant_mask_covers_exactly_the_replies_and_their_end_token(tok):
    out = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(mask) == len(ids)
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        if not m and start is not None:
            spans.append(ids[start:i])
            start = None
    assert [tok.decode(s) for s in spans] == [
        "Open Settings > Security and click Reset.<|im_end|>", " You're welcome!<|im_end|>"]
    # Everything outside the mask is the system/user turns and the role headers.
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "Reset." not in unmasked and "welcome" not in unmasked
    assert unmasked.count("<|im_start|>assistant\n") == 2


def test_trl_accepts_the_chat_template_for_assistant_only_loss(tok):
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    assert has_generation_markers(tok.chat_template)
    assert is_chat_template_stop_token_trained(tok)


# --- generation
# ------------------------------------------------------------------------------------------------

def test_generate_runs_and_is_capped_by_the_generation_config(model, tok):
    inputs = tok.apply_chat_template(CHAT[:2], add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs)
    new = out[0, prompt_len:].tolist()
    assert 0 < len(new) <= 64
    assert len(new) == 64 or new[-1] == tok.eos_token_id
    assert isinstance(tok.decode(new, skip_special_tokens=True), str)


def test_generate_stops_at_im_end(model, tok):
    from transformers import LogitsProcessor, LogitsProcessorList

    class _EosOnThirdToken(LogitsProcessor):
        def __init__(self, prompt_len):
            self.prompt_len = prompt_len

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - self.prompt_len == 2:
                scores[:] = -float("inf")
                scores[:, tok.eos_token_id] = 0.0
            return scores

    inputs = tok.apply_chat_template(CHAT[:2], add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, logits_processor=LogitsProcessorList([_EosOnThirdToken(prompt_len)]))
    new = out[0, prompt_len:].tolist()
    assert len(new) == 3 and new[-1] == tok.convert_tokens_to_ids("<|im_end|>")


# --- cache
# -----------------------------------------------------------------------------------------------------

def test_tiny_model_path_builds_once_then_reuses(tmp_path, monkeypatch, built):
    monkeypatch.setenv("MLFLOW_FINETUNE_CACHE", str(tmp_path))
    first = tiny_model_path()
    assert first == tmp_path / _CACHE_NAME
    assert weights_digest(first) == weights_digest(built)  # the cache is the seed-0 build
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [_CACHE_NAME]  # no temp folder left
    mtime = (first / "model.safetensors").stat().st_mtime_ns

    def _no_rebuild(*args, **kwargs):
        raise AssertionError("the cached build should have been reused")

    monkeypatch.setattr(tiny_model, "build_tiny_model", _no_rebuild)
    assert tiny_model_path() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime


def test_tiny_model_path_is_safe_for_concurrent_processes(tmp_path):
    # Two processes race on an empty cache: one builds under the lock, the other waits and reuses it.
    # Without the lock, the second rename onto a non-empty folder would fail or files would be rewritten.
    code = ("from mlflow_finetune_plugin.models.tiny import tiny_model_path\n"
            "p = tiny_model_path(); print(p, (p / 'model.safetensors').stat().st_mtime_ns)")
    env = {**os.environ, "MLFLOW_FINETUNE_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1]
    assert outputs[0].split()[0] == str(tmp_path / _CACHE_NAME)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [_CACHE_NAME]


def test_tiny_model_path_replaces_an_incomplete_folder_and_stale_temp_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_FINETUNE_CACHE", str(tmp_path))
    (tmp_path / _CACHE_NAME).mkdir()
    (tmp_path / _CACHE_NAME / "config.json").write_text("{}")
    (tmp_path / f".{_CACHE_NAME}.tmp-crashed").mkdir()
    path = tiny_model_path()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert not (tmp_path / f".{_CACHE_NAME}.tmp-crashed").exists()


def test_cache_root_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_FINETUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert paths.cache_root() == tmp_path / "mlflow-finetune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.cache_root() == tmp_path / "home" / ".cache" / "mlflow-finetune"


# --- support-bot dataset
# ---------------------------------------------------------------------------------------

def _rows(name):
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _turns(rows, role):
    return [m["content"] for r in rows for m in r["messages"] if m["role"] == role]


@pytest.mark.parametrize("name, low, high", [("train.jsonl", 350, 450), ("eval.jsonl", 50, 70)])
def test_dataset_rows_are_chats_with_system_user_assistant(name, low, high):
    rows = _rows(name)
    assert low <= len(rows) <= high
    system_prompts = set()
    for row in rows:
        assert set(row) == {"messages"}
        roles = [m["role"] for m in row["messages"]]
        assert roles in (["system", "user", "assistant"], ["system", "user", "assistant", "user",
                                                           "assistant"])
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in row["messages"])
        system_prompts.add(row["messages"][0]["content"])
    assert len(system_prompts) == 1
    assert all(len(a.split()) < 60 for a in _turns(rows, "assistant"))


def test_dataset_splits_share_answers_but_not_questions():
    train, evaluation = _rows("train.jsonl"), _rows("eval.jsonl")
    train_q, eval_q = _turns(train, "user"), _turns(evaluation, "user")
    assert len(set(train_q)) == len(train_q) and len(set(eval_q)) == len(eval_q)
    assert not set(train_q) & set(eval_q)
    assert set(_turns(evaluation, "assistant")) <= set(_turns(train, "assistant"))
    assert len(set(_turns(train, "assistant"))) >= 35  # ~40 intents

    two_turn = sum(len(r["messages"]) == 5 for r in train)
    assert 0.05 <= two_turn / len(train) <= 0.15
    answer_of = {}
    for row in train + evaluation:  # no question is answered two different ways
        msgs = row["messages"]
        for q, a in zip(msgs[1::2], msgs[2::2]):
            assert answer_of.setdefault(q["content"], a["content"]) == a["content"]


def test_dataset_files_match_the_generator():
    spec = importlib.util.spec_from_file_location("make_data",
                                                  REPO / "recipes" / "support-bot" / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    train, evaluation = make_data.make_rows()
    assert train == _rows("train.jsonl") and evaluation == _rows("eval.jsonl")
