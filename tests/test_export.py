"""`mlflow-finetune export`: a registered version from a real fine-tune becomes a plain transformers folder
(adapter merged, no PEFT needed) with the same logits as adapter + base; the export is logged to the source
run and tagged on the version. Prompt tuning (nothing to merge) and `--gguf` without llama.cpp's converter are
refused with the reason, before any weights load, and leave no files behind. The GGUF files themselves:
tests/test_gguf.py."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.logged_model import load_logged_model, log_finetuned_model
from mlflow_finetune_plugin.models.tiny import TINY_MODEL_REF
from mlflow_finetune_plugin.registry.export import export_model
from mlflow_finetune_plugin.registry.versions import register
from mlflow_finetune_plugin.train.job import run
from tests.helpers import FAST_OVERRIDES, chat_rows, jsonl

MESSAGES = [{"role": "user", "content": "How do I reset my password? It has 12 digits, é and ü."}]


def _logits(model, tokenizer):
    enc = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with torch.no_grad():
        return model(**enc).logits


def _fine_tune(root: Path) -> None:
    """A real two-step LoRA fine-tune of the tiny model, registered as `<root name>` with alias challenger."""
    jsonl(root / "data" / "train.jsonl", chat_rows(8))
    jsonl(root / "data" / "eval.jsonl", chat_rows(2, 50))
    (root
     / "finetune.yaml").write_text("data: {train: data/train.jsonl, eval: data/eval.jsonl, max_length: 64}\n")
    assert run(load_recipe(root, overrides={**FAST_OVERRIDES, "train.learning_rate": 1e-2})) == 0


def test_a_lora_version_exports_merged_with_the_same_logits(tmp_path, tracking_uri):
    _fine_tune(tmp_path / "bot")
    out = tmp_path / "export"
    result = CliRunner().invoke(main, ["export", "models:/bot@challenger", "--to", str(out)])
    assert result.exit_code == 0, result.output
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "export.json"} <= files
    assert not any("adapter" in f for f in files)

    # adapter + base, as the registry serves the version
    logged = load_logged_model(mlflow.artifacts.download_artifacts("models:/bot/1"), device="cpu")
    expected = _logits(logged.model, logged.tokenizer)
    with logged.model.disable_adapter():
        # the tune matters
        assert not torch.allclose(_logits(logged.model, logged.tokenizer), expected, atol=1e-3)

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(merged).__name__ == "LlamaForCausalLM"  # plain transformers, no PEFT wrapper
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == logged.tokenizer.chat_template
    merged_logits = _logits(merged, tokenizer)
    # W + BA folded once vs Wx + B(Ax) per call: the same sum in another float32 order
    torch.testing.assert_close(merged_logits, expected, rtol=1e-4, atol=1e-4)

    # logged back to the source run, lineage on the version
    version = mlflow.MlflowClient().get_model_version("bot", "1")
    run_id = version.run_id
    assert version.tags[tags.EXPORT_URI] == f"runs:/{run_id}/exports/bot-v1"
    assert (version.tags[tags.EXPORT_MERGED], version.tags[tags.EXPORT_GGUF_TYPE]) == ("true", "none")
    assert (
        version.tags[tags.EXPORT_BASE] == TINY_MODEL_REF
        and version.tags[tags.EXPORT_SOURCE] == "models:/bot/1"
    )
    logged_files = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "exports/bot-v1")}
    assert {"exports/bot-v1/model.safetensors", "exports/bot-v1/export.json"} <= logged_files
    info = json.loads((out / "export.json").read_text())
    assert (info["source"], info["gguf_file"]) == ("models:/bot/1", None)


def test_prompt_tuning_and_gguf_without_a_converter_are_refused_and_full_weights_export_as_is(
        tmp_path, tracking_uri, tiny_model_dir, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    from mlflow_finetune_plugin.config.schema import PromptAdapter
    from mlflow_finetune_plugin.train.adapters import prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tuned = prompt.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         PromptAdapter(num_virtual_tokens=4))
    with mlflow.start_run():
        info = log_finetuned_model(tuned, tokenizer, {"base_model": TINY_MODEL_REF, "artifact": "adapter",
                                                      "method": "prompt"})
    register(info.model_uri, "pt", {}, "challenger")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", "models:/pt@challenger", "--to", str(out)])
    assert result.exit_code == 1 and "PROMPT_TUNING adapter" in result.output
    assert "nothing to merge" in result.output and "Traceback" not in result.output
    assert out.is_dir() and not any(out.iterdir())  # nothing half-written

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=1,
                                      n_head=2)).eval()
    with mlflow.start_run() as full_run:
        log_finetuned_model(gpt2, tokenizer, {"base_model": TINY_MODEL_REF, "artifact": "full",
                                              "method": "full"})
    uri = f"runs:/{full_run.info.run_id}/model"
    # No converter anywhere (no option, no $LLAMA_CPP_DIR, nothing on PATH, an empty cache): the error names
    # every way to give one, and the one pip command that gets it.
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setenv("MLFLOW_FINETUNE_CACHE", str(tmp_path / "empty-cache"))
    result = CliRunner().invoke(main, ["export", uri, "--to", str(out), "--gguf"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    for named in ("--llama-cpp", "LLAMA_CPP_DIR",
                  "pip download --no-deps --no-binary :all: llama-cpp-python=="):
        assert named in result.output
    with pytest.raises(FinetuneError,
                       match=r"--llama-cpp .*nowhere does not exist: give a llama.cpp checkout"):
        export_model(uri, out, gguf_type="f16", llama_cpp=str(tmp_path / "nowhere"), echo=lambda *_: None)
    # a folder, but neither a checkout nor holding the sdist
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(FinetuneError, match=r"\$LLAMA_CPP_DIR .* is not usable: give a llama.cpp checkout"):
        export_model(uri, out, gguf_type="q8_0", echo=lambda *_: None)
    result = CliRunner().invoke(main, ["export", uri, "--to", str(out), "--llama-cpp", str(tmp_path)])
    assert result.exit_code == 2 and "give it with --gguf or --gguf-type" in result.output
    with pytest.raises(FinetuneError, match="--gguf-type 'q4_k': use one of f32, f16, q8_0"):
        export_model(uri, out, gguf_type="q4_k", echo=lambda *_: None)
    assert not any(out.iterdir())

    (out / "stray.txt").write_text("x")
    with pytest.raises(FinetuneError, match="is not empty"):
        export_model(uri, out, echo=lambda *_: None)

    full = export_model(uri, tmp_path / "full", echo=lambda *_: None)
    assert not full.merged and full.gguf_file is None
    reloaded = AutoModelForCausalLM.from_pretrained(full.folder).eval()
    torch.testing.assert_close(_logits(reloaded, tokenizer), _logits(gpt2, tokenizer), rtol=0, atol=0)
    # no registered version: the run carries the export's tags
    run_tags = mlflow.get_run(full_run.info.run_id).data.tags
    assert run_tags[tags.EXPORT_URI] == f"runs:/{full_run.info.run_id}/exports/model"
    assert run_tags[tags.EXPORT_MERGED] == "false" and run_tags[tags.EXPORT_GGUF_TYPE] == "none"


def test_an_ia3_adapter_exports_to_its_own_logits(tmp_path, tracking_uri, tiny_model_dir):
    """IA3 scales activations instead of adding a low-rank update; merged, it is a plain model too. (The
    bottleneck and DoRA adapters merge through the same PEFT call.)"""
    from mlflow_finetune_plugin.config.schema import IA3Adapter
    from mlflow_finetune_plugin.train.adapters import ia3

    torch.manual_seed(0)
    model = ia3.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), IA3Adapter())
    with torch.no_grad():  # move every scale off its identity start, so the merge has work to do
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = _logits(model.eval(), tokenizer)
    with mlflow.start_run():
        info = log_finetuned_model(model, tokenizer, {"base_model": TINY_MODEL_REF, "artifact": "adapter",
                                                      "method": "ia3"})
    result = export_model(info.model_uri, tmp_path / "ia3", log=False, echo=lambda *_: None)
    merged = _logits(AutoModelForCausalLM.from_pretrained(result.folder).eval(), tokenizer)
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)
