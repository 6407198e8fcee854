"""A base model (no chat template of its own) fine-tuned with `model.chat_template` (issue 44, point 4).

The base is the tiny Gemma 3 with its template removed and `<eos>` as its only stop token, as google/gemma-3-270m
comes (tests/test_gemma3.py). Without `model.chat_template` nothing starts; with `gemma`, whose control tokens the
tokenizer has but a base never learned, those rows train under LoRA (PEFT's trainable_token_indices) and no other
row moves; with `chatml`, whose tokens it lacks, they are added, the embeddings grow, and the logged model grows the
same rows again when it reloads. Either way the logged model carries the template, reloads with it, and its end of
turn ends an answer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from mlflow_finetune_plugin import tags
from tests.helpers import subprocess_env
from tests.matrix_helpers import Script, own_warnings, write_chat_project

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is 3 plus 3?"}]
OVERRIDES = {"train.max_steps": 4, "train.batch_size": 2, "train.learning_rate": 1.0e-2, "train.logging_steps": 1,
             "train.save_steps": 4, "eval.enabled": False}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """The tiny Gemma 3 as a base model: no chat template, generation stops on <eos> only."""
    from mlflow_finetune_plugin.models.tiny_families import family_model_path

    folder = tmp_path_factory.mktemp("base") / "gemma3-base"
    shutil.copytree(family_model_path("gemma3"), folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    for name in ("config.json", "generation_config.json"):
        config = json.loads((folder / name).read_text())
        config["eos_token_id"] = 1  # <eos>
        (folder / name).write_text(json.dumps(config, indent=2))
    return folder


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
                                                                 "model.chat_template": template, **OVERRIDES})
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
    # The base's generation config stops on <eos> only; the template's <end_of_turn> ends the answer all the same.
    with own_warnings() as found:
        (answer,) = model.predict([{"messages": QUESTION}], params={"max_new_tokens": 8})
    assert isinstance(answer, str) and not found, found
    script = Script(tokenizer, "<end_of_turn>")
    with script.forced():
        assert model.predict([{"messages": QUESTION}], params={"max_new_tokens": 12}) == [script.text]
    # ... and in the exported folder, whose generation config is what `vllm serve`, `transformers serve` and a plain
    # `generate` stop on.
    from mlflow_finetune_plugin.models.chat_format import prompt_ids
    from mlflow_finetune_plugin.registry.export import export_model

    out = export_model("models:/base-gemma/1", tmp_path / "export", log=False, echo=lambda *_: None).folder
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([prompt_ids(tokenizer, QUESTION)])
    with script.forced(), torch.no_grad():
        assert merged.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist() == script.ids


def test_a_template_whose_tokens_the_base_lacks_adds_them_and_the_model_reloads_grown(base_model, tmp_path,
                                                                                       tracking_uri):
    from transformers import AutoTokenizer

    from mlflow_finetune_plugin.models.chat_templates import bundled_template

    run, model = _fine_tune(base_model, tmp_path, "chatml")
    assert run.info.status == "FINISHED"
    assert run.data.tags[tags.TRAINABLE_TOKENS] == "<|im_start|>, <|im_end|>"
    loaded = model.unwrap_python_model()._loaded
    tokenizer = loaded.tokenizer
    assert tokenizer.chat_template == bundled_template("chatml")
    added = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    vocab = len(AutoTokenizer.from_pretrained(base_model))
    assert len(tokenizer) == loaded.config["vocab_size"] == vocab + 2 and sorted(added) == [vocab, vocab + 1]
    assert loaded.model.get_base_model().get_input_embeddings().weight.shape[0] == len(tokenizer)
    # The added rows come from the adapter (trained), not from the resize at load: a second load, under another
    # seed, has the same rows.
    torch.manual_seed(1234)
    again = mlflow.pyfunc.load_model("models:/base-chatml/1").unwrap_python_model()._loaded
    assert torch.equal(_embeddings(again.model, vocab + 2)[added], _embeddings(loaded.model, vocab + 2)[added])
    script = Script(tokenizer, "<|im_end|>")
    with script.forced():
        assert model.predict([{"messages": QUESTION}], params={"max_new_tokens": 12}) == [script.text]
