"""`mlflow-finetune export --gguf`: llama.cpp's own converter (convert_hf_to_gguf.py, run in a process of its
own) writes the merged fine-tune as one GGUF file. transformers' GGUF reader loads it back with the same
tokenizer, chat template and special tokens, and at f32 with the merged model's logits and greedy answers; f16
and q8_0 stay within their precision in a half and about a quarter of the size. What the converter cannot
convert is refused with its reason: an architecture it has no conversion for before any weights load, and its
own errors summarised.

The converter comes from $LLAMA_CPP_DIR: a llama.cpp checkout, or the folder holding llama-cpp-python's source
distribution (`python .ci/fetch_sdist.py llama-cpp-python 0.3.36 DIR`, as .ci/run does, or `pip download
--no-deps --no-binary :all: llama-cpp-python==0.3.36 -d DIR`).
Without one these tests skip and say why, except where FINETUNE_REQUIRE_LLAMA_CPP is set (CI): there they
fail.

`FAMILIES` is the matrix: the built-in tiny model and the tiny chat families (models/tiny_families.py), each a
merged LoRA converted at f32. Where transformers' reader, not the file, falls short for a family (checked
against llama.cpp's own loader in the same sdist), `Readback` says so and gives the reader what it misses: it
ignores `rope_freqs` (Llama 3's rope scaling: logits drift, greedy answers part), `qwen3.attention.key_length`
(a Qwen3 head_dim other than hidden/heads does not load), Gemma 3's attention scale (llama.cpp takes
1/sqrt(key_length)) and its per-layer pattern. llama.cpp runs every 6th Gemma 3 layer as global unless the
file lists them, which the export does for tiny-gemma3's alternating layers. Mistral v0.3 is stored as a
Llama. tiny-phi3.5 is refused with the converter's reason: llama.cpp reads a Phi-3 vocabulary from a
SentencePiece tokenizer.model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import mlflow
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.logged_model import log_finetuned_model
from mlflow_finetune_plugin.models.tiny import TINY_MODEL_REF, tiny_model_path
from mlflow_finetune_plugin.models.tiny_families import family_model_path, reference
from mlflow_finetune_plugin.paths import cache_root
from mlflow_finetune_plugin.registry.export import export_model
from mlflow_finetune_plugin.registry.llama_cpp import extract_sdist, find_llama_cpp
from mlflow_finetune_plugin.registry.versions import register

PROMPTS = [
    [{"role": "user", "content": "How do I reset my password? It has 12 digits, é and ü."}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "What is 2 plus 2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about   spaces\tand\nnewlines."}],
]


@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    try:
        return find_llama_cpp()
    except FinetuneError as e:
        if os.environ.get("FINETUNE_REQUIRE_LLAMA_CPP"):
            pytest.fail(f"FINETUNE_REQUIRE_LLAMA_CPP is set and llama.cpp's converter is missing: {e}")
        pytest.skip(f"needs llama.cpp's converter (set LLAMA_CPP_DIR): {e}")


@dataclass(frozen=True)
class Readback:
    """How transformers' GGUF reader loads a family's file back, where the reader (not the file) falls
    short."""
    # config values the reader does not read from the file: given from the merged model
    config: tuple[str, ...] = ()
    logits_atol: float = 1e-5
    loads_as: str | None = None   # the class the reader builds, where llama.cpp stores the family as another
    metadata: tuple = ()          # (key, value) the file must hold for llama.cpp to run the family right


# The matrix: the built-in tiny model and the tiny chat families (models/tiny_families.py); tiny-phi3.5 is
# refused (test_what_the_converter_cannot_convert_is_refused_with_its_reason).
FAMILIES = {
    TINY_MODEL_REF: Readback(),
    # The reader ignores rope_freqs (Llama 3's rope scaling, which llama.cpp applies): without it logits drift
    # by up to 0.07 and greedy answers part after a few tokens.
    reference("llama3"): Readback(config=("rope_parameters",)),
    reference("qwen2.5"): Readback(),
    # The reader ignores qwen3.attention.key_length: a head_dim other than hidden/heads does not load without
    # it.
    reference("qwen3"): Readback(config=("head_dim",)),
    # The reader ignores the attention scale (llama.cpp takes 1/sqrt(key_length)) and the per-layer pattern.
    reference("gemma3"): Readback(config=("query_pre_attn_scalar", "layer_types"),
                                  metadata=(("gemma3.attention.sliding_window_pattern", [True, False]),)),
    # llama.cpp stores Mistral v0.3 (no sliding window) as a Llama: the same computation, read back as Llama.
    reference("mistral"): Readback(loads_as="LlamaForCausalLM"),
}


def _logged_lora(base_ref: str):
    """A LoRA on the base `base_ref` whose update is not zero (B starts at zero), logged in a run of its
    own."""
    from mlflow_finetune_plugin.config.schema import LoraAdapter
    from mlflow_finetune_plugin.models.base import resolve_model_path
    from mlflow_finetune_plugin.train.adapters import lora

    base = resolve_model_path(base_ref)
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(1)
    model = lora.apply(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                       LoraAdapter(r=4, dropout=0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    with mlflow.start_run():
        return log_finetuned_model(model.eval(), tokenizer, {"base_model": base_ref, "artifact": "adapter",
                                                             "method": "lora"})


def _load_gguf(path: Path, **config):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 **config).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _encoded(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                         return_tensors="pt")


# In the default run (CI's 45 minutes): the plain Llama, Qwen2.5 and Gemma 3 (the one whose file needs a key
# written for llama.cpp); Llama 3.2, Qwen3 and Mistral (about 40 s each) run with `-m stress`.
# Gemma 3 (the reader needs two config overrides) in the default run; the CLI test converts the plain Llama
# there too.
IN_THE_DEFAULT_RUN = {reference("gemma3")}


@pytest.mark.parametrize("family", [f if f in IN_THE_DEFAULT_RUN
                                    else pytest.param(f, marks=pytest.mark.stress) for f in sorted(FAMILIES)])
def test_a_merged_lora_of_each_family_converts_to_gguf_that_answers_like_it(family, tmp_path, tracking_uri,
                                                                           llama_cpp):
    readback = FAMILIES[family]
    info = _logged_lora(family)
    result = export_model(info.model_uri, tmp_path / "out", gguf_type="f32", log=False,
                          llama_cpp=str(llama_cpp), echo=lambda *_: None)
    merged = AutoModelForCausalLM.from_pretrained(result.folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.folder)
    from_gguf, gguf_tokenizer = _load_gguf(result.gguf_file,
                                           **{key: getattr(merged.config, key) for key in readback.config})

    assert type(from_gguf).__name__ == (readback.loads_as or type(merged).__name__)
    fields = gguf.GGUFReader(result.gguf_file).fields
    assert [(key, fields[key].contents()) for key, _ in readback.metadata] == list(readback.metadata)
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    specials = ("bos_token", "eos_token", "pad_token")
    assert [getattr(gguf_tokenizer, s) for s in specials] == [getattr(tokenizer, s) for s in specials]
    for messages in PROMPTS:
        enc = _encoded(tokenizer, messages)
        assert torch.equal(_encoded(gguf_tokenizer, messages)["input_ids"], enc["input_ids"])
        with torch.no_grad():
            torch.testing.assert_close(from_gguf(**enc).logits, merged(**enc).logits, rtol=0,
                                       atol=readback.logits_atol)
            answers = [m.generate(**enc, max_new_tokens=16, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id) for m in (merged, from_gguf)]
        assert torch.equal(*answers), family


def test_the_cli_writes_a_registered_version_as_gguf_logs_it_and_q8_0_quarters_it(tmp_path, tracking_uri,
                                                                                  llama_cpp, monkeypatch):
    info = _logged_lora(TINY_MODEL_REF)
    register(info.model_uri, "bot", {}, "challenger")
    out = tmp_path / "export"
    result = CliRunner().invoke(main, ["export", "models:/bot@challenger", "--to", str(out), "--gguf",
                                       "--llama-cpp", str(llama_cpp)])
    assert result.exit_code == 0, result.output
    f16 = out / "gguf" / "bot-v1.f16.gguf"  # --gguf alone: f16
    assert f"Writing GGUF (f16) to {f16}" in result.output and f"GGUF: {f16}" in result.output
    export_info = json.loads((out / "export.json").read_text())
    assert export_info["gguf_file"] == "gguf/bot-v1.f16.gguf"
    assert export_info["gguf_converter"] == str(llama_cpp / "convert_hf_to_gguf.py")
    fields = gguf.GGUFReader(f16).fields  # our name for the file, the base model as its lineage
    assert fields["general.name"].contents() == "bot-v1"
    assert fields["general.base_model.0.name"].contents() == TINY_MODEL_REF

    version = mlflow.MlflowClient().get_model_version("bot", "1")
    assert version.tags[tags.EXPORT_GGUF_TYPE] == "f16"
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(version.run_id, "exports/bot-v1/gguf")}
    assert logged == {"exports/bot-v1/gguf/bot-v1.f16.gguf"}

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    enc = _encoded(AutoTokenizer.from_pretrained(out), PROMPTS[0])
    with torch.no_grad():
        expected = merged(**enc).logits

    def error(path: Path) -> float:
        """The relative error of the file's logits against the merged model's."""
        with torch.no_grad():
            return ((_load_gguf(path)[0](**enc).logits - expected).norm() / expected.norm()).item()

    f16_error = error(f16)
    assert 0 < f16_error < 1e-2
    f32_bytes = (out / "model.safetensors").stat().st_size
    assert f16.stat().st_size < 0.6 * f32_bytes

    # q8_0, logged beside the first export. A converter extracted from the sdist is found in the cache
    # unaided.
    if llama_cpp.parent == cache_root().absolute():
        monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    q8 = export_model("models:/bot/1", tmp_path / "export8", gguf_type="q8_0", echo=lambda *_: None)
    assert q8.gguf_file.name == "bot-v1.q8_0.gguf" and q8.artifact_uri.endswith("exports/bot-v1-2")
    assert json.loads((q8.folder
                       / "export.json").read_text())["gguf_converter"] == export_info["gguf_converter"]
    assert q8.gguf_file.stat().st_size < 0.35 * f32_bytes
    assert f16_error < error(q8.gguf_file) < 0.1  # 8-bit blocks: coarser than f16, still the same model
    assert mlflow.MlflowClient().get_model_version("bot", "1").tags[tags.EXPORT_GGUF_TYPE] == "q8_0"


def test_what_the_converter_cannot_convert_is_refused_with_its_reason(tmp_path, tracking_uri, llama_cpp):
    from tokenizers import normalizers
    from transformers import OPTConfig, OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    out = tmp_path / "out"

    # An architecture llama.cpp has no conversion for: refused before any weights load, nothing left behind.
    opt = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=128,
                                   word_embed_proj_dim=32))
    with mlflow.start_run():
        opt_info = log_finetuned_model(opt, tokenizer, {"base_model": TINY_MODEL_REF, "artifact": "full",
                                                        "method": "full"})
    result = CliRunner().invoke(main, ["export", opt_info.model_uri, "--to", str(out), "--gguf-type", "f32",
                                       "--llama-cpp", str(llama_cpp)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "has no conversion for OPTForCausalLM (model_type 'opt')" in result.output
    assert "exports without --gguf" in result.output
    assert not any(out.iterdir())

    # A tokenizer llama.cpp cannot name (it lowercases first, which no llama.cpp pre-tokenizer does): the
    # converter runs and fails, and its own error comes back, summarised.
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    with mlflow.start_run():
        llama_info = log_finetuned_model(AutoModelForCausalLM.from_pretrained(tiny_model_path()), tokenizer,
                                         {"base_model": TINY_MODEL_REF, "artifact": "full", "method": "full"})
    with pytest.raises(FinetuneError) as refused:
        export_model(llama_info.model_uri, out, gguf_type="f32", log=False, llama_cpp=str(llama_cpp),
                     echo=lambda *_: None)
    message = str(refused.value)
    assert "NotImplementedError: BPE pre-tokenizer was not recognized" in message
    assert "a newer llama.cpp may know it" in message and "The converter's last lines:" in message
    assert not any(out.iterdir())

    # Phi-3.5: llama.cpp converts Phi3ForCausalLM's vocabulary from a SentencePiece tokenizer.model (or as
    # GPT-2's, for Phi-4's GPT2Tokenizer); tiny-phi3.5's byte-level BPE has neither, and the converter's
    # reason comes back.
    phi = family_model_path("phi3.5")
    with mlflow.start_run():
        phi_info = log_finetuned_model(AutoModelForCausalLM.from_pretrained(phi),
                                       AutoTokenizer.from_pretrained(phi), {"base_model": reference("phi3.5"),
                                                                            "artifact": "full",
                                                                            "method": "full"})
    with pytest.raises(FinetuneError) as refused:
        export_model(phi_info.model_uri, out, gguf_type="f32", log=False, llama_cpp=str(llama_cpp),
                     echo=lambda *_: None)
    message = str(refused.value)
    assert "ValueError: Error: Missing" in message and "tokenizer.model" in message
    assert ("reads a SentencePiece tokenizer.model, and the exported tokenizer has only "
            "tokenizer.json") in message
    assert not any(out.iterdir())


def test_the_converter_is_found_in_a_checkout_on_path_and_taken_safely_from_an_sdist(tmp_path, monkeypatch):
    """No converter needed: a fake llama.cpp checkout and a fake sdist, to check where export looks and what
    it extracts (only the converter's files, nothing outside the cache, no links)."""
    import io
    import tarfile

    checkout = tmp_path / "llama.cpp"
    (checkout / "build" / "bin").mkdir(parents=True)
    (checkout / "convert_hf_to_gguf.py").write_text("")
    (checkout / "build" / "bin" / "llama-quantize").write_text("")
    (checkout / "build" / "bin" / "llama-quantize").chmod(0o755)
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("MLFLOW_FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(checkout / "build" / "bin"))
    assert find_llama_cpp() == checkout
    assert find_llama_cpp(str(checkout / "convert_hf_to_gguf.py")) == checkout

    sdist = tmp_path / "dl" / "llama_cpp_python-9.9.9.tar.gz"
    sdist.parent.mkdir()
    with tarfile.open(sdist, "w:gz") as tar:
        def add(name: str, data: bytes = b"x", **kind) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data) if not kind else 0
            for key, value in kind.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data) if not kind else None)

        top = "llama_cpp_python-9.9.9/vendor/llama.cpp"
        add(f"{top}/convert_hf_to_gguf.py", b"# the converter")
        add(f"{top}/conversion/base.py")
        add(f"{top}/gguf-py/gguf/__init__.py")
        add(f"{top}/models/templates/x.jinja")
        add(f"{top}/models/ggml-vocab-big.gguf")  # test data the converter never reads
        add(f"{top}/src/llama.cpp")
        add(f"{top}/conversion/../../../../escape.py")
        add(f"{top}/conversion/link.py", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    extracted = find_llama_cpp(str(sdist.parent))
    assert extracted == extract_sdist(sdist) == tmp_path / "cache" / "llama.cpp-from-llama_cpp_python-9.9.9"
    files = {p.relative_to(extracted).as_posix() for p in extracted.rglob("*") if p.is_file()}
    assert files == {"convert_hf_to_gguf.py", "conversion/base.py", "gguf-py/gguf/__init__.py",
                     "models/templates/x.jinja"}
    assert not (tmp_path / "escape.py").exists() and not list(tmp_path.rglob("escape.py"))
    assert find_llama_cpp() == extracted  # later: from the cache, unaided


# The 2026 families (issue 52, point 7). transformers' GGUF reader cannot load them back (it maps none of
# Qwen3.5's Gated DeltaNet tensors and builds no gpt-oss), so the file is checked against the merged folder
# itself: every weight written at f32 (the parameter counts equal, the embedding exactly), the architecture
# llama.cpp runs, and the tokenizer read back by transformers (the same ids, chat template and special
# tokens). Qwen3.5's conversion expects a multi-token prediction head transformers does not keep: converted
# with --no-mtp. Gemma 4's reads its vocabulary as a byte-fallback BPE (the released tokenizer's kind), which
# tiny-gemma4's byte-level BPE is not: refused with the converter's reason. The hybrid cache and the experts
# by default, Gemma 4 and Qwen3.5 thinking with -m stress.
NEW_FAMILIES = {"qwen3.5": "qwen35", "gpt-oss": "gpt-oss", "qwen3.5-think": "qwen35", "gemma4": None}


@pytest.mark.parametrize("family", [f if f in ("qwen3.5", "gpt-oss")
                                    else pytest.param(f, marks=pytest.mark.stress) for f in NEW_FAMILIES])
def test_the_2026_families_convert_to_gguf_or_are_refused_with_the_converters_reason(family, tmp_path,
                                                                                     tracking_uri, llama_cpp):
    import numpy as np
    from safetensors.torch import load_file

    info = _logged_lora(reference(family))
    notes = []
    if NEW_FAMILIES[family] is None:
        with pytest.raises(FinetuneError) as refused:
            export_model(info.model_uri, tmp_path / "out", gguf_type="f32", log=False,
                         llama_cpp=str(llama_cpp), echo=notes.append)
        message = str(refused.value)
        assert "FileNotFoundError: Cannot find Llama BPE tokenizer" in message
        assert "byte fallback" in message and "exports without --gguf" in message
        assert not any((tmp_path / "out").iterdir())
        return
    result = export_model(info.model_uri, tmp_path / "out", gguf_type="f32", log=False,
                          llama_cpp=str(llama_cpp), echo=notes.append)
    assert any("--no-mtp" in n for n in notes) is family.startswith("qwen3.5")
    reader = gguf.GGUFReader(result.gguf_file)
    assert reader.fields["general.architecture"].contents() == NEW_FAMILIES[family]
    weights = load_file(result.folder / "model.safetensors")
    assert sum(int(np.prod(t.shape)) for t in reader.tensors) == sum(w.numel() for w in weights.values())
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = weights["model.embed_tokens.weight"].numpy()
    assert np.array_equal(np.asarray(embedding.data).reshape(expected.shape), expected)

    tokenizer = AutoTokenizer.from_pretrained(result.folder)
    try:
        read_back = AutoTokenizer.from_pretrained(result.gguf_file.parent, gguf_file=result.gguf_file.name)
    except TypeError as e:
        # transformers 5.2x's GGUF reader takes the first part of gpt-oss's rope-scaling fields (the key's
        # length array) for the value ("only 0-dimensional arrays can be converted"): the file is read with
        # gguf's own reader instead, its vocabulary and chat template against the exported tokenizer's.
        assert family == "gpt-oss" and "0-dimensional" in str(e), e
        assert reader.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        assert reader.fields["tokenizer.ggml.tokens"].contents() == vocab
        return
    assert read_back.chat_template == tokenizer.chat_template
    specials = ("bos_token", "eos_token", "pad_token")
    assert [getattr(read_back, s) for s in specials] == [getattr(tokenizer, s) for s in specials]
    for messages in PROMPTS:
        assert torch.equal(_encoded(read_back, messages)["input_ids"],
                           _encoded(tokenizer, messages)["input_ids"])
