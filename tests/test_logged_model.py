"""The adapter as an MLflow model: small (base referenced, not copied), reloads to the same logits, and
refuses a different base instead of answering wrongly."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlflow_finetune_plugin.config.schema import LoraAdapter
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.logged_model import LoadedModel, load_logged_model, log_finetuned_model
from mlflow_finetune_plugin.models.tiny import TINY_MODEL_REF
from mlflow_finetune_plugin.train.adapters import lora


@pytest.fixture
def trained_adapter(tiny_model_dir):
    """A LoRA adapter on the tiny model with non-zero (random) updates, so it changes the logits."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = lora.apply(base, LoraAdapter(r=8, alpha=16, dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def _logits(model, tok):
    enc = tok.apply_chat_template([{"role": "user", "content": "How do I reset my password?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**enc).logits


def test_reload_gives_the_same_logits_and_the_base_is_not_copied(tracking_uri, trained_adapter,
                                                                 tiny_model_dir):
    model, tok = trained_adapter
    with mlflow.start_run():
        info = log_finetuned_model(model, tok, {"base_model": TINY_MODEL_REF, "artifact": "adapter",
                                                "method": "lora"})
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    files = {p.name: p.stat().st_size for p in local.rglob("*") if p.is_file()}
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    base_size = sum(p.stat().st_size for p in Path(tiny_model_dir).glob("*.safetensors"))
    assert sum(files.values()) < base_size  # the base weights are referenced, not copied
    assert not any(name == "model.safetensors" for name in files)

    loaded = load_logged_model(local)
    expected = _logits(model, tok)
    assert torch.allclose(_logits(loaded.model, loaded.tokenizer), expected, atol=1e-5)
    with loaded.model.disable_adapter():
        assert not torch.allclose(_logits(loaded.model, loaded.tokenizer), expected, atol=1e-3)

    # The adapter folder is a plain PEFT folder too.
    from peft import PeftModel

    adapter_dir = next(p.parent for p in local.rglob("adapter_config.json"))
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      adapter_dir).eval()
    assert torch.allclose(_logits(plain, tok), expected, atol=1e-5)

    # And the pyfunc answers a chat prompt.
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    answers = pyfunc.predict([{"messages": [{"role": "user", "content": "Hello"}]}],
                             params={"max_new_tokens": 8})
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_the_decoding_a_model_was_evaluated_with_is_its_pyfunc_default(tracking_uri, trained_adapter):
    """A run with eval.num_beams logs that many beams as the model's default `num_beams` param: pyfunc
    predictions decode as the evaluation did, unless the caller says otherwise."""
    from mlflow_finetune_plugin.logged_model import generate

    model, tok = trained_adapter
    with mlflow.start_run():
        info = log_finetuned_model(model, tok, {"base_model": TINY_MODEL_REF, "artifact": "adapter",
                                                "method": "lora", "num_beams": 3})
    assert {p.name: p.default for p in info.signature.params}["num_beams"] == 3
    messages = [{"role": "user", "content": "Hello there, how are you today?"}]
    loaded = LoadedModel(model, tok, {})
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    assert pyfunc.predict([{"messages": messages}], params={"max_new_tokens": 10}) == [
        generate(loaded, messages, max_new_tokens=10, num_beams=3)]
    assert pyfunc.predict([{"messages": messages}], params={"max_new_tokens": 10, "num_beams": 1}) == [
        generate(loaded, messages, max_new_tokens=10)]


def test_a_different_base_is_refused(tracking_uri, trained_adapter, tmp_path, monkeypatch):
    model, tok = trained_adapter
    with mlflow.start_run():
        info = log_finetuned_model(model, tok, {"base_model": TINY_MODEL_REF, "artifact": "adapter",
                                                "method": "lora"})
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    # Point the tiny-model cache somewhere else and build it with another seed: same name, other weights.
    from mlflow_finetune_plugin.models import tiny as tiny_model

    monkeypatch.setenv("MLFLOW_FINETUNE_CACHE", str(tmp_path / "other-cache"))
    other = tiny_model.tiny_model_path()
    tiny_model.build_tiny_model(tmp_path / "seed1", seed=1)
    for f in (tmp_path / "seed1").glob("*.safetensors"):
        (other / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FinetuneError, match="not the one this adapter was trained on"):
        load_logged_model(local)


def test_mlmodel_records_base_reference_and_requirements(tracking_uri, trained_adapter):
    model, tok = trained_adapter
    with mlflow.start_run():
        info = log_finetuned_model(model, tok, {"base_model": TINY_MODEL_REF, "artifact": "adapter",
                                                "method": "lora"})
    conf = info.flavors["python_function"]["config"]
    assert conf["base_model"] == TINY_MODEL_REF and len(conf["base_digest"]) == 64
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    reqs = (local / "requirements.txt").read_text()
    assert "peft==" in reqs and "transformers==" in reqs and "mlflow-finetune-plugin" not in reqs
    adapter_config = json.loads(next(local.rglob("adapter_config.json")).read_text())
    assert adapter_config["peft_type"] == "LORA"


NIMBUS = "You are the support assistant for Nimbus Notes. Answer briefly and accurately."


def test_the_trained_system_prompt_is_the_recipes_else_the_datas_most_common():
    from mlflow_finetune_plugin.evaluate.contenders import trained_system_prompt

    def row(system=None):
        return {"messages": [*([{"role": "system", "content": system}] if system else []),
                             {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}

    rows = [row(NIMBUS), row(NIMBUS), row("Be terse."), row()]
    assert trained_system_prompt(rows) == NIMBUS
    assert trained_system_prompt(rows, "From the recipe.") == "From the recipe."
    assert trained_system_prompt([row(), row(), row(NIMBUS)]) is None  # mostly none: none
    assert trained_system_prompt([{"instruction": "Say hi", "output": "Hi"}]) is None
    assert trained_system_prompt([]) is None


def test_a_trained_version_carries_its_training_datas_system_prompt(tmp_path, tracking_uri):
    """The support-bot case: the rows hold the system message, the recipe none; the playground reads it
    back."""
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.serving import ModelChoice
    from mlflow_finetune_plugin.serving.choices import trained_system_prompt
    from mlflow_finetune_plugin.train.job import run
    from tests.helpers import chat_rows, write_project

    rows = [{"messages": [{"role": "system", "content": NIMBUS}, *r["messages"]]} for r in chat_rows(6)]
    proj = write_project(tmp_path / "bot", "data: {max_length: 64}\neval: {enabled: false}\n",
                         rows=rows + chat_rows(2))
    recipe = load_recipe(proj, overrides={"train.max_steps": 1, "train.batch_size": 2, "train.save_steps": 1})
    assert run(recipe) == 0
    version = mlflow.MlflowClient().get_model_version_by_alias("bot", "challenger")
    info = mlflow.models.get_model_info(f"models:/bot/{version.version}")
    assert info.flavors["python_function"]["config"]["system_prompt"] == NIMBUS
    assert trained_system_prompt(ModelChoice("bot", version.version)) == (NIMBUS, "from the training data")


def test_the_model_is_logged_from_code_with_a_signature_and_an_input_example(tracking_uri, trained_adapter):
    import logging
    import warnings

    model, tok = trained_adapter
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    mlflow_logger = logging.getLogger("mlflow")  # MLflow's logger does not propagate to the root (caplog)
    mlflow_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with mlflow.start_run():
                info = log_finetuned_model(model, tok, {"base_model": TINY_MODEL_REF, "artifact": "adapter",
                                                        "method": "lora"})
    finally:
        mlflow_logger.removeHandler(handler)
    # Neither the pickling warning, nor "no input example", nor a failed run of the example at logging time.
    said = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert not [m for m in said if "CloudPickle" in m or "input example" in m.lower()], said
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    conf = info.flavors["python_function"]
    assert "python_model" not in conf and conf["model_code_path"].endswith("chat_model.py")
    assert info.signature.inputs.input_names() == ["messages"]
    assert info.saved_input_example_info is not None
    assert mlflow.models.Model.load(str(local)).load_input_example(str(local)) is not None

    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    answers = pyfunc.predict([{"messages": [{"role": "user", "content": "Hello"}]}],
                             params={"max_new_tokens": 8})
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_a_version_logged_as_a_pickle_before_still_loads(tracking_uri, trained_adapter):
    """Versions logged before models-from-code hold `logged_model.FinetunedChatModel` pickled."""
    from mlflow_finetune_plugin import logged_model

    model, tok = trained_adapter
    with mlflow.start_run():
        info = log_finetuned_model(model, tok, {"base_model": TINY_MODEL_REF, "artifact": "adapter",
                                                "method": "lora"})
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    conf = info.flavors["python_function"]
    # The same model, logged the old way: the class pickled, the same artifacts and config.
    with mlflow.start_run():
        old = mlflow.pyfunc.log_model(
            name="model", python_model=logged_model.FinetunedChatModel(),
            artifacts={k: str(local / spec["path"]) for k, spec in conf["artifacts"].items()},
            model_config=conf["config"], signature=info.signature, pip_requirements=["mlflow"])
    old_local = Path(mlflow.artifacts.download_artifacts(old.model_uri))
    assert (old_local / "python_model.pkl").exists()
    pyfunc = mlflow.pyfunc.load_model(old.model_uri)
    new = mlflow.pyfunc.load_model(info.model_uri)
    prompt = [{"messages": [{"role": "user", "content": "Hello"}]}]
    assert pyfunc.predict(prompt, params={"max_new_tokens": 8}) == new.predict(prompt,
                                                                               params={"max_new_tokens": 8})
    assert torch.allclose(_logits(load_logged_model(old_local).model, tok), _logits(model, tok), atol=1e-5)



def test_wrapping_and_reloading_an_adapter_prints_no_upstream_deprecation(tracking_uri, tiny_model_dir,
                                                                          tmp_path):
    """transformers >= 5.23 deprecates `is_gradient_checkpointing`, which PEFT reads each time it wraps a
    model: a FutureWarning in every run that the user cannot act on. The plugin hides that one message (its
    __init__.py); under older transformers there is no such warning at all. In a process of its own: pytest
    puts its own warning filters in front of a module's for each test."""
    import subprocess
    import sys

    script = f"""
import warnings
import mlflow
from transformers import AutoModelForCausalLM, AutoTokenizer
from mlflow_finetune_plugin.config.schema import LoraAdapter
from mlflow_finetune_plugin.logged_model import load_logged_model, log_finetuned_model
from mlflow_finetune_plugin.train.adapters import lora
with warnings.catch_warnings(record=True) as seen:
    base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})
    model = lora.apply(base, LoraAdapter(r=4, alpha=8))
    with mlflow.start_run():
        info = log_finetuned_model(model, AutoTokenizer.from_pretrained({str(tiny_model_dir)!r}),
                                   {{"base_model": {TINY_MODEL_REF!r}, "artifact": "adapter",
                                     "method": "lora"}})
    load_logged_model(mlflow.artifacts.download_artifacts(info.model_uri))
print("WARNINGS", [str(w.message)[:80] for w in seen if "is_gradient_checkpointing" in str(w.message)])
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNINGS []" in proc.stdout, proc.stdout[-2000:]
