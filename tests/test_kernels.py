"""`train.kernels` (models/kernels.py): which kernels a run takes, what it refuses and what its tag says, on CPU.
Liger's kernels themselves run on CUDA only (bench/gpu/train_throughput.py measures them)."""

from __future__ import annotations

import pytest

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.errors import FinetuneError, RecipeError
from mlflow_finetune_plugin.models.kernels import (
    KernelChoice,
    choose,
    describe,
    liger_model_types,
    resolve,
    takes_lm_head,
)
from tests.helpers import QUICK_RECIPE, chat_rows, train_in_process, write_project

LIGER = frozenset({"llama", "qwen2"})


def test_auto_takes_liger_only_with_cuda_the_package_and_the_architecture():
    assert choose("auto", True, LIGER, "llama") == KernelChoice("liger", "train.kernels: auto")
    assert choose("auto", True, LIGER, None).liger  # before the model loads: nothing against it yet
    off = [choose("auto", False, LIGER, "llama"), choose("auto", True, None, "llama"),
           choose("auto", True, LIGER, "gpt2"), choose("none", True, LIGER, "llama")]
    assert [c.name for c in off] == ["none"] * 4
    assert [c.reason for c in off] == [
        "train.kernels auto: no CUDA GPU",
        "train.kernels auto: liger-kernel is not installed (pip install 'mlflow-finetune-plugin[gpu]' (or pip "
        "install liger-kernel))",
        "train.kernels auto: Liger Kernel does not cover model type 'gpt2'",
        "train.kernels: none"]


@pytest.mark.parametrize("on_cuda, types, model_type, says", [
    (False, LIGER, "llama", "needs a CUDA GPU"),
    (True, None, "llama", "Liger Kernel is not installed: pip install 'mlflow-finetune-plugin[gpu]'"),
    (True, LIGER, "gpt2", "has no kernels for model type 'gpt2' (it covers llama, qwen2)"),
])
def test_an_explicit_liger_that_cannot_be_honoured_is_refused_with_the_key_and_the_fix(on_cuda, types, model_type,
                                                                                       says):
    with pytest.raises(FinetuneError) as e:
        choose("liger", on_cuda, types, model_type)
    assert "train.kernels: liger" in str(e.value) and says in str(e.value)
    assert "train.kernels: auto" in str(e.value)


def test_the_recipe_key_is_typed_and_resolves_on_this_machine(tmp_path):
    import torch

    write_project(tmp_path, QUICK_RECIPE, chat_rows(8))
    assert load_recipe(tmp_path).train.kernels == "auto"
    with pytest.raises(RecipeError, match="train.kernels"):
        load_recipe(tmp_path, overrides={"train.kernels": "unsloth"})
    if torch.cuda.is_available():
        pytest.skip("the CPU answers below")
    auto = resolve(load_recipe(tmp_path))
    assert auto == KernelChoice("none", "train.kernels auto: no CUDA GPU")
    assert describe(auto, False) == "none (train.kernels auto: no CUDA GPU)"
    assert not takes_lm_head(load_recipe(tmp_path), auto)
    with pytest.raises(FinetuneError, match="needs a CUDA GPU"):
        resolve(load_recipe(tmp_path, overrides={"train.kernels": "liger"}))


def test_liger_head_only_with_fused_lm_head_auto(tmp_path):
    write_project(tmp_path, QUICK_RECIPE, chat_rows(8))
    on = KernelChoice("liger", "train.kernels: auto")
    assert takes_lm_head(load_recipe(tmp_path), on)
    for value in ("true", "false", "chunked"):  # the user chose the plugin's head: Liger keeps to the layers
        assert not takes_lm_head(load_recipe(tmp_path, overrides={"train.fused_lm_head": value}), on)


def test_liger_s_own_table_covers_the_tiny_llama():
    types = liger_model_types()
    if types is None:
        pytest.skip("liger-kernel is not installed")
    assert "llama" in types


def _run(project, tmp_path, overrides):
    return train_in_process(project, tmp_path, overrides, "kernels")


def test_a_cpu_run_says_no_kernels_in_its_tag_and_output(tmp_path, tracking_uri, capfd):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CPU run")
    project = write_project(tmp_path / "project", QUICK_RECIPE, chat_rows(8))
    code, finished = _run(project, tmp_path, {"train.max_steps": 2, "registry.enabled": False})
    assert code == 0 and finished.info.status == "FINISHED"
    assert finished.data.tags[tags.KERNELS] == "none (train.kernels auto: no CUDA GPU)"
    assert "Kernels: none (train.kernels auto: no CUDA GPU)" in capfd.readouterr().out


def test_an_explicit_liger_on_a_cpu_fails_the_run_before_the_model_loads(tmp_path, tracking_uri, monkeypatch):
    import torch

    from mlflow_finetune_plugin.train import pipeline

    if torch.cuda.is_available():
        pytest.skip("a CPU run")

    def not_here(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_base_model", not_here)
    project = write_project(tmp_path / "project", QUICK_RECIPE, chat_rows(8))
    code, finished = _run(project, tmp_path, {"train.kernels": "liger"})
    assert code != 0 and finished.info.status == "FAILED"
    error = finished.data.tags[tags.ERROR]
    assert "train.kernels: liger needs a CUDA GPU" in error and "train.kernels: auto" in error
    assert tags.KERNELS not in finished.data.tags
