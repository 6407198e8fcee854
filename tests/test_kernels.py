"""`train.kernels` (models/kernels.py): which kernels a run takes, what it refuses and what its tag says, on
CPU. Liger's kernels themselves run on CUDA only (bench/gpu/train_throughput.py measures them)."""

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
        "train.kernels auto: liger-kernel is not installed (pip install liger-kernel (from the project's "
        "clone: pip install -e '.[gpu]'))",
        "train.kernels auto: Liger Kernel does not cover model type 'gpt2'",
        "train.kernels: none"]


@pytest.mark.parametrize("on_cuda, types, model_type, says", [
    (False, LIGER, "llama", "needs a CUDA GPU"),
    (True, None, "llama", "Liger Kernel is not installed: pip install liger-kernel (from the project's "
                          "clone: pip install -e '.[gpu]')"),
    (True, LIGER, "gpt2", "has no kernels for model type 'gpt2' (it covers llama, qwen2)"),
])
def test_an_explicit_liger_that_cannot_be_honoured_is_refused_with_the_key_and_the_fix(on_cuda, types,
                                                                                       model_type, says):
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


def _lora_tiny(dropout: float):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mlflow_finetune_plugin.models.tiny import tiny_model_path

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                            target_modules="all-linear"))
    for name, p in model.named_parameters():  # B starts at zero: give it values so its path changes the loss
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _step(model, autocast: bool):
    """The loss, every LoRA gradient and the number of dtype copies (`aten._to_copy`) of one
    forward+backward."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                Copies.count += 1
            return func(*args, **(kwargs or {}))

    ids = torch.arange(3, 35).reshape(2, 16)
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout masks on both sides
    with Copies(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, Copies.count


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_layers_skip_peft_s_input_casts_under_autocast_with_the_same_numbers(dropout):
    """Without dropout the numbers are the same bit for bit; with it, CPU's bf16 dropout rounds the scaled
    input once more than fp32's (the masks are the same), so they agree to bf16 rounding."""
    import torch
    from peft.tuners.lora import LoraLayer

    from mlflow_finetune_plugin.train.adapters.lora import no_casts_under_autocast

    def same(a, b):
        return torch.equal(a, b) if dropout == 0 else torch.allclose(a, b, rtol=2e-2, atol=2e-3)

    def same_grads(a, b):
        if dropout == 0:
            return all(torch.equal(a[n], b[n]) for n in a)
        flat_a, flat_b = torch.cat([g.flatten() for g in a.values()]), torch.cat([g.flatten()
                                                                                  for g in b.values()])
        return torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0) > 0.99

    plain, hooked = _lora_tiny(dropout), _lora_tiny(dropout)
    assert no_casts_under_autocast(hooked) == sum(isinstance(m, LoraLayer) for m in hooked.modules()) > 0
    loss, grads, copies = _step(plain, autocast=True)
    loss_h, grads_h, copies_h = _step(hooked, autocast=True)
    assert same(loss, loss_h) and grads.keys() == grads_h.keys() and same_grads(grads, grads_h)
    assert copies_h < copies  # the bf16 -> fp32 -> bf16 round trips are gone
    # without autocast PEFT's cast is needed (fp32 adapter on a bf16 base) and stays on: the same numbers
    # exactly
    loss, grads, _ = _step(plain, autocast=False)
    loss_h, grads_h, _ = _step(hooked, autocast=False)
    assert torch.equal(loss, loss_h) and all(torch.equal(grads[n], grads_h[n]) for n in grads)


def test_torch_compile_compiles_each_decoder_layer_with_the_same_numbers_and_undoes_it():
    """`train.torch_compile`: the layers the model names in
    `_no_split_modules` run through torch.compile (a counting backend here; inductor on a run), with the loss
    and gradients of the eager model, and run eagerly again once uncompiled (evaluation's changing shapes)."""
    import torch

    from mlflow_finetune_plugin.models.kernels import compile_layers, decoder_layers, uncompile_layers

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(model):  # not _step: dynamo does not trace under its dispatch mode
        ids = torch.arange(3, 35).reshape(2, 16)
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    eager, compiled = _lora_tiny(0.0).float(), _lora_tiny(0.0).float()
    layers = decoder_layers(compiled)
    assert [type(layer).__name__
            for layer in layers] == ["LlamaDecoderLayer"] * compiled.config.num_hidden_layers
    assert compile_layers(compiled, backend=counting) == len(layers)
    loss, grads = step(eager)
    loss_c, grads_c = step(compiled)
    assert graphs, "the decoder layers did not go through torch.compile"
    assert torch.allclose(loss, loss_c) and grads.keys() == grads_c.keys()
    assert all(torch.allclose(grads[n], grads_c[n], atol=1e-6) for n in grads)
    uncompile_layers(compiled)
    seen = len(graphs)
    step(compiled)
    assert len(graphs) == seen and all(layer._compiled_call_impl is None for layer in layers)


def test_torch_compile_refuses_a_model_that_names_no_decoder_layer():
    import torch

    from mlflow_finetune_plugin.models.kernels import compile_layers

    with pytest.raises(FinetuneError, match="train.torch_compile: Sequential names no decoder layer.*false"):
        compile_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
