"""The bundled chat templates and the tiny random models of the chat families (issues 44 and 52).

The expected values below are the real models' own, from their hub files (tokenizer_config.json, config.json,
generation_config.json of Llama-3.2-1B-Instruct, Qwen2.5-0.5B-Instruct, Qwen3-0.6B, gemma-3-1b-it,
Mistral-7B-Instruct-v0.3, Phi-3.5-mini-instruct, gemma-4-*-it, Qwen3.5-0.8B/2B and -4B, gpt-oss-20b; the 2026
ones as published copies of those files show them, the hub being out of reach here): written out here, not
read from the module under test, so that a change to the module that drifts from the real models fails.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.models import chat_templates, tiny_families
from mlflow_finetune_plugin.models.chat_templates import (
    BUNDLED,
    TEMPLATE_TOKENS,
    bundled_template,
    read_template,
)
from tests.helpers import SUPPORT_BOT

# family: (config class, model class, bundled template, TRL's copy of it or None)
CLASSES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", "llama3", "llama3_2.jinja"),
    "qwen2.5": ("Qwen2Config", "Qwen2ForCausalLM", "qwen", "qwen2_5.jinja"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen3", "qwen3.jinja"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "gemma", "gemma3.jinja"),
    "mistral": ("MistralConfig", "MistralForCausalLM", "mistral", None),
    "phi3.5": ("Phi3Config", "Phi3ForCausalLM", "phi3", "phi3_5.jinja"),
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", "gemma4", "gemma4_v5.jinja"),
    "qwen3.5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", "qwen3_5", "qwen3_5_nothink.jinja"),
    "qwen3.5-think": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", "qwen3_5_think", "qwen3_5_think.jinja"),
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM", "gptoss", "gptoss.jinja"),
}
# family: (bos, eos, pad, unk, tokenizer adds bos)
TOKENS = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", None, None, True),
    "qwen2.5": (None, "<|im_end|>", "<|endoftext|>", None, False),
    "qwen3": (None, "<|im_end|>", "<|endoftext|>", None, False),
    "gemma3": ("<bos>", "<eos>", "<pad>", "<unk>", True),
    "mistral": ("<s>", "</s>", None, "<unk>", True),
    "phi3.5": ("<s>", "<|endoftext|>", "<|endoftext|>", "<unk>", False),
    "gemma4": ("<bos>", "<turn|>", "<pad>", "<unk>", True),
    "qwen3.5": (None, "<|im_end|>", "<|endoftext|>", None, False),
    "qwen3.5-think": (None, "<|im_end|>", "<|endoftext|>", None, False),
    "gpt-oss": ("<|startoftext|>", "<|return|>", "<|endoftext|>", None, False),
}
# family: generation_config.json eos_token_id, as tokens, in the real file's order
GENERATION_EOS = {
    "llama3": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    "qwen2.5": ["<|im_end|>", "<|endoftext|>"],
    "qwen3": ["<|im_end|>", "<|endoftext|>"],
    "gemma3": ["<eos>", "<end_of_turn>"],
    "mistral": ["</s>"],
    "phi3.5": ["<|end|>", "<|assistant|>", "<|endoftext|>"],
    "gemma4": ["<eos>", "<turn|>", "<|tool_response>"],
    "qwen3.5": ["<|im_end|>", "<|endoftext|>"],
    "qwen3.5-think": ["<|im_end|>", "<|endoftext|>"],
    "gpt-oss": ["<|return|>", "<|endoftext|>", "<|call|>"],
}
# family: the token that ends an assistant turn in its template
END_OF_TURN = {"llama3": "<|eot_id|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>",
               "gemma3": "<end_of_turn>", "mistral": "</s>", "phi3.5": "<|end|>", "gemma4": "<turn|>",
               "qwen3.5": "<|im_end|>", "qwen3.5-think": "<|im_end|>", "gpt-oss": "<|return|>"}
# What makes the 2026 families what they are, asked of the built model (tests below).
LAYER_TYPES = {"qwen3.5": ["linear_attention", "full_attention"],
               "qwen3.5-think": ["linear_attention", "full_attention"],
               "gemma4": ["sliding_attention", "full_attention"], "gpt-oss": ["sliding_attention",
                                                                              "full_attention"]}

CHAT = [{"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Where is the station?"},
        {"role": "assistant", "content": "La gare est ici."}]

FAMILIES = list(tiny_families.FAMILIES)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: tiny_families.build_family_model(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="module")
def tokenizers(built):
    from transformers import AutoTokenizer

    return {f: AutoTokenizer.from_pretrained(path) for f, path in built.items()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the bundled templates
# ----------------------------------------------------------------------------------------

def test_every_bundled_template_has_its_tokens_and_an_origin():
    assert set(BUNDLED) == set(TEMPLATE_TOKENS) == set(chat_templates.ORIGINS)
    for name in BUNDLED:
        text = bundled_template(name)
        eot, control = TEMPLATE_TOKENS[name]
        for token in control:
            assert token in text, (name, token)
        # None: the template ends a reply with the tokenizer's own eos_token.
        assert (eot or "eos_token") in text, name


# TRL ships no Mistral template: its text is checked by the next test.
@pytest.mark.parametrize("family", [f for f in FAMILIES if CLASSES[f][3]])
def test_bundled_template_is_trls_file_byte_for_byte(family):
    import trl

    template, trl_file = CLASSES[family][2:]
    shipped = Path(trl.__file__).parent / "chat_templates" / trl_file
    assert bundled_template(template).encode("utf-8") == shipped.read_bytes()


def test_mistral_template_is_mistrals_v3_template():
    text = bundled_template("mistral")
    # Digest of the text taken from llama.cpp's tests/test-chat-template.cpp ("mistralai 'v3' template"), see
    # ORIGINS.
    assert hashlib.sha256(text.encode()).hexdigest() == (
        "e16746b40344d6c5b5265988e0328a0bf7277be86f1c335156eae07e29c82826")
    assert '{{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}' in text


def test_chatml_is_the_tiny_models_template():
    from mlflow_finetune_plugin.models.tiny import CHAT_TEMPLATE

    assert bundled_template("chatml") == CHAT_TEMPLATE


def test_read_template_takes_a_bundled_name_or_a_file(tmp_path):
    assert read_template("gemma", tmp_path) == bundled_template("gemma")
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "mine.jinja").write_text("{{ messages[0]['content'] }}")
    assert read_template("templates/mine.jinja", tmp_path) == "{{ messages[0]['content'] }}"
    assert read_template(str(tmp_path / "templates" / "mine.jinja"), None) == "{{ messages[0]['content'] }}"


def test_read_template_names_the_key_the_choices_and_the_nearest(tmp_path):
    with pytest.raises(FinetuneError) as err:
        read_template("gemma3", tmp_path)
    message = str(err.value)
    assert "model.chat_template" in message and "'gemma3' is not a bundled template" in message
    assert "Did you mean 'gemma'?" in message and ", ".join(BUNDLED) in message

    with pytest.raises(FinetuneError) as err:
        read_template("templates/missing.jinja", tmp_path)
    message = str(err.value)
    assert "model.chat_template: file not found: templates/missing.jinja" in message
    assert str(tmp_path) in message and "chatml" in message


# --- the tiny family models
# -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_family_model_has_its_config_and_model_class(built, family):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_class, model_class = CLASSES[family][:2]
    assert type(AutoConfig.from_pretrained(built[family])).__name__ == config_class
    model = AutoModelForCausalLM.from_pretrained(built[family])
    assert type(model).__name__ == model_class
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("family", sorted(LAYER_TYPES))
def test_the_2026_families_have_their_architectures(built, family):
    """Qwen3.5: a Gated DeltaNet layer (its cache keeps a convolution and a recurrent state, run here by
    transformers' torch fallback, without the fla/causal-conv1d kernels) beside full attention; gpt-oss:
    experts with a router;
    Gemma 4: a per-layer head_dim that `config.head_dim` refuses."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(built[family])
    assert config.layer_types == LAYER_TYPES[family]
    model = AutoModelForCausalLM.from_pretrained(built[family]).eval()
    names = {type(m).__name__ for m in model.modules()}
    if family.startswith("qwen3.5"):
        assert {"Qwen3_5GatedDeltaNet", "Qwen3_5Attention"} <= names, names
    if family == "gpt-oss":
        assert (config.num_local_experts, config.num_experts_per_tok) == (4, 2)
        assert {"GptOssExperts", "GptOssTopKRouter"} <= names, names
    if family == "gemma4":  # not an AttributeError: getattr(config, "head_dim", None) raises it too
        with pytest.raises(Exception) as raised:  # noqa: PT011, B017
            config.head_dim  # noqa: B018 - the access is the test
        assert type(raised.value).__name__ == "AmbiguousGlobalPerLayerAttributeError"
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():  # cached decoding runs on CPU and gives the logits of the full pass
        full = model(ids).logits[0, -1]
        out = model.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert torch.allclose(out.logits[0][0], full, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_tokenizer_has_the_real_special_tokens(tokenizers, family):
    tok = tokenizers[family]
    bos, eos, pad, unk, adds_bos = TOKENS[family]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (bos, eos, pad, unk)
    ids = tok("Hello")["input_ids"]
    assert (ids[0] == tok.bos_token_id) is adds_bos
    for token in (*TEMPLATE_TOKENS[CLASSES[family][2]].control, END_OF_TURN[family]):
        # one token, not split by BPE
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token


@pytest.mark.parametrize("family", FAMILIES)
def test_every_loader_tokenizes_alike(built, tokenizers, family):
    # AutoTokenizer rebuilds some families' tokenizers by class (Qwen as Qwen2Tokenizer); the project loads
    # its built-in folders as PreTrainedTokenizerFast. Both must give the same ids and offsets.
    from transformers import PreTrainedTokenizerFast

    text = "It's 12345 o'clock,  café\n\nthen <|im_end|> <think> [INST] <end_of_turn> bye"
    auto, fast = tokenizers[family], PreTrainedTokenizerFast.from_pretrained(built[family])
    assert auto(text, return_offsets_mapping=True) == fast(text, return_offsets_mapping=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_config_stops_on_the_real_eos_list(built, tokenizers, family):
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(built[family]).eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    assert tokenizers[family].convert_ids_to_tokens(eos) == GENERATION_EOS[family]
    assert END_OF_TURN[family] in GENERATION_EOS[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_template_is_the_bundled_file(tokenizers, family):
    assert tokenizers[family].chat_template == bundled_template(CLASSES[family][2])


@pytest.mark.parametrize("family", FAMILIES)
def test_family_renders_a_conversation_and_the_model_runs_on_it(built, tokenizers, family):
    import torch
    from transformers import AutoModelForCausalLM

    tok = tokenizers[family]
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert "Where is the station?" in text
    assert "La gare est ici." + END_OF_TURN[family] in text
    # Mistral's template writes the system message before the LAST user turn only: a conversation that ends
    # with the answer loses it (the integrator's chat_format handles that); every other family keeps it.
    assert ("Answer in French." in text) is (family != "mistral")
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert "Answer in French." in prompt and "Where is the station?" in prompt

    model = AutoModelForCausalLM.from_pretrained(built[family]).eval()
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_build_is_reproducible(built, tmp_path, family):
    again = tiny_families.build_family_model(family, tmp_path / family)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert _sha256(again / name) == _sha256(built[family] / name), name


def test_family_names_are_built_in_models():
    from mlflow_finetune_plugin.models.base import is_builtin, model_reference, resolve_model_path

    assert tiny_families.BUILTIN_NAMES == ("tiny-llama3", "tiny-qwen2.5", "tiny-qwen3", "tiny-gemma3",
                                           "tiny-mistral", "tiny-phi3.5", "tiny-gemma4", "tiny-qwen3.5",
                                           "tiny-qwen3.5-think", "tiny-gpt-oss")
    for name in tiny_families.BUILTIN_NAMES:
        assert is_builtin(name) and is_builtin("builtin:" + name)
        assert model_reference(name) == model_reference("builtin:" + name) == "builtin:" + name
    assert not is_builtin("tiny-qwen4") and tiny_families.family_of("tiny-qwen4") is None
    path = Path(resolve_model_path("tiny-gemma3"))
    assert path.name == "tiny-gemma3-v1" and (path / "model.safetensors").is_file()
    assert resolve_model_path("builtin:tiny-gemma3") == str(path)
    assert tiny_families.family_of("tiny-qwen3.5-think") == "qwen3.5-think"
    assert tiny_families.family_of("builtin:tiny-gpt-oss") == "gpt-oss"


def test_a_misspelled_family_name_gets_the_nearest_one():
    from mlflow_finetune_plugin.models.base import _not_found

    message = _not_found("tiny-qwen", OSError("not a hub id"))
    assert "Did you mean 'tiny-qwen3'?" in message and "tiny-phi3.5" in message


# --- one family through `mlflow run`
# ----------------------------------------------------------------------------------

@pytest.mark.integration
# tests/test_family_matrix.py runs tiny-qwen3 through `mlflow run` with evaluation and registration
@pytest.mark.stress
def test_mlflow_run_trains_a_family_model(tmp_path, tracking_uri):
    from mlflow import MlflowClient

    cmd = [sys.executable, "-m", "mlflow", "run", str(SUPPORT_BOT), "-e", "lora", "--backend", "finetune",
           "-P", "model=tiny-qwen3", "-P", "max_steps=2", "-P", "eval.enabled=false", "-P",
           "registry.enabled=false", "--experiment-name", "families"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("families").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags[tags.BASE_MODEL] == "builtin:tiny-qwen3"
    assert run.data.metrics["train/loss"] > 0


def test_a_template_probed_with_a_tokenizer_lacking_its_tokens_does_not_answer_for_one_that_has_them():
    """The probe is cached per template: a tokenizer of the same class without the template's special tokens
    (a base model before `model.chat_template` adds them) probed first left gpt-oss's real tokenizer, later in
    the same process, with no end-of-turn token, and its answers came out empty (CI, issue 58)."""
    from mlflow_finetune_plugin.models.base import load_tokenizer
    from mlflow_finetune_plugin.models.chat_format import chat_format, stop_ids
    from mlflow_finetune_plugin.models.tiny import _build_tokenizer
    from mlflow_finetune_plugin.models.tiny_families import family_model_path

    real = load_tokenizer(str(family_model_path("gpt-oss")))
    lacking = _build_tokenizer()
    lacking.chat_template = real.chat_template
    assert type(lacking) is type(real)
    assert chat_format(lacking).end_of_turn == ()  # its <|return|> is no token of this vocabulary
    assert chat_format(real).end_of_turn == ("<|return|>", "<|call|>")
    assert real.convert_tokens_to_ids("<|return|>") in stop_ids(real)
