"""What LoRA reaches on a mixture of experts (issue 58): every expert, every dense and shared-expert MLP and
attention, the router left out unless `lora.target_modules` names it; and the run says what it reached and
left out.

Tiny random models straight from transformers' config classes (tests/arch_models.py), each with another layout
of experts: Llama 4 (a dense first layer, a shared expert, a router that subclasses nn.Linear and returns a
tuple), Qwen2-MoE (a shared expert with its one-output gate), DeepSeek V3 (a dense first layer, shared
experts, a router module), Qwen3-MoE (a dense first layer), Mixtral and gpt-oss (experts only). DeepSeek V3,
Qwen3-MoE and Mixtral are families PEFT 0.21 converts transformers-4 targets on (models/peft_targets.py).
"""

from __future__ import annotations

import types
from collections import Counter

import pytest
import torch

from mlflow_finetune_plugin import tags
from tests.arch_models import build, model_of
from tests.helpers import train_in_process
from tests.matrix_helpers import write_chat_project

# kind of module -> how many a tiny model holds (2 layers); fused experts count their parameters (gate_up,
# down)
PARTS = {
    "llama4": {"attention": 8, "dense MLP": 3, "shared-expert MLP": 3, "experts": 2, "router": 1},
    "qwen2_moe": {"attention": 8, "dense MLP": 3, "shared-expert MLP": 3, "experts": 2, "router": 2},
    "deepseek_v3": {"attention": 10, "dense MLP": 3, "shared-expert MLP": 3, "experts": 2, "router": 1},
    "qwen3_moe": {"attention": 8, "dense MLP": 3, "experts": 2, "router": 1},
    "mixtral": {"attention": 8, "experts": 4, "router": 2},
    "gpt_oss": {"attention": 8, "experts": 4, "router": 2},
}
# the router's own name in each family (what a recipe lists to adapt it)
ROUTER = {"llama4": "router", "qwen2_moe": "gate", "deepseek_v3": "gate", "qwen3_moe": "gate",
          "mixtral": "gate", "gpt_oss": "router"}


def _lora(model, **options):
    from peft import get_peft_model

    from mlflow_finetune_plugin.config.schema import LoraAdapter
    from mlflow_finetune_plugin.train.adapters.lora import peft_config

    cfg = LoraAdapter(r=4, dropout=0.0, **options)
    return get_peft_model(model, peft_config(cfg, model)), cfg


def _reached(peft) -> tuple[Counter, Counter]:
    from mlflow_finetune_plugin.models.moe_parts import adapted, parts

    base = peft.get_base_model()
    done = adapted(base)
    got, missed = Counter(), Counter()
    for part in parts(base):
        (got if part.name in done else missed)[part.kind] += 1
    return got, missed


def _step(peft, bf16: bool) -> dict[str, torch.Tensor]:
    """One forward and backward pass, under the CPU bf16 path when `bf16`: the LoRA parameters' gradients."""
    from mlflow_finetune_plugin.models.precision import fp32_where_it_matters

    peft.zero_grad()
    ids = torch.arange(3, 27).view(2, 12)
    with fp32_where_it_matters(peft, bf16), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = peft(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    return {name: p.grad for name, p in peft.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("kind", list(PARTS))
def test_all_linear_reaches_every_part_but_the_router_and_trains_the_experts(kind):
    peft, _ = _lora(model_of(kind)[0])
    got, missed = _reached(peft)
    assert dict(got) == {k: n for k, n in PARTS[kind].items() if k != "router"}, kind
    assert dict(missed) == {"router": PARTS[kind]["router"]}, kind
    assert not peft.peft_config["default"].rank_pattern  # PEFT's conversion doubled the experts' rank before
    for bf16 in (False, True):
        grads = _step(peft, bf16)
        # LoRA's B starts at zero, so at the first step only B has a gradient, and the experts' Bs have one
        experts = [g for name, g in grads.items() if ".experts." in name and "lora_B" in name]
        assert experts and all(g.abs().sum() > 0 for g in experts), (kind, bf16)


@pytest.mark.parametrize("kind", ["llama4", "deepseek_v3", "gpt_oss"])
def test_a_router_named_in_target_modules_is_adapted_and_a_step_finishes(kind):
    """Llama 4's router subclasses nn.Linear and returns a tuple: it is adapted through its weight, never
    wrapped, and the step finishes under fp32 and under the CPU bf16 path."""
    peft, _ = _lora(model_of(kind)[0], target_modules=["all-linear", ROUTER[kind]])
    got, missed = _reached(peft)
    assert got["router"] == PARTS[kind]["router"] and not missed
    for bf16 in (False, True):
        grads = _step(peft, bf16)
        assert any(ROUTER[kind] + ".lora_B" in name and g.abs().sum() > 0 for name, g in grads.items()), bf16


def test_the_cpu_bf16_wrapper_leaves_a_layer_that_answers_with_a_tuple_alone():
    """A LoRA layer on an nn.Linear subclass whose forward returns a tuple (Llama 4's router, adapted by a
    recipe that names it): the wrapper that upcasts base outputs under CPU bf16 autocast passes the tuple
    through."""
    from mlflow_finetune_plugin.models.precision import fp32_where_it_matters

    peft, _ = _lora(model_of("llama4")[0], target_modules=["all-linear", "router"])
    router = peft.get_base_model().model.layers[1].feed_forward.router
    x = torch.randn(5, 64)
    with fp32_where_it_matters(peft, True), torch.autocast("cpu", dtype=torch.bfloat16):
        scores, logits = router(x)
    assert scores.shape == logits.shape == (5, 4)


def test_the_line_says_what_is_reached_and_what_is_left_out():
    from mlflow_finetune_plugin.models.architecture import moe_of
    from mlflow_finetune_plugin.train.reach import experts_line

    model = model_of("deepseek_v3")[0]
    peft, cfg = _lora(model)
    line = experts_line(types.SimpleNamespace(adapter=cfg), peft, moe_of(model))
    assert "reaches attention (10), dense MLP (3), shared-expert MLP (3), experts (2)" in line
    assert "experts.gate_up_proj, experts.down_proj" in line
    assert "leaves out router (1): lora.target_modules [all-linear, gate] adds it" in line

    model = model_of("qwen3_moe")[0]
    peft, cfg = _lora(model, target_modules=["q_proj", "v_proj"], target_parameters=[])
    line = experts_line(types.SimpleNamespace(adapter=cfg), peft, moe_of(model))
    assert "reaches attention (4 of 8)" in line
    assert "leaves out attention (4 of 8)" in line and "dense MLP (3)" in line and "router (1)" in line
    assert "experts (2): fused 3-D parameters" in line and "lora.target_parameters: auto adapts them" in line


def test_top_layers_keep_the_experts_and_modules_of_those_layers_only():
    model = model_of("qwen3_moe")[0]
    peft, _ = _lora(model, layers=1)
    config = peft.peft_config["default"]
    assert all(".layers.1." in name for name in [*config.target_modules, *config.target_parameters])
    got, missed = _reached(peft)
    assert got == Counter({"attention": 4, "experts": 2}) and missed["dense MLP"] == 3


def test_a_saved_adapter_loads_back_with_its_dense_and_shared_mlps(tmp_path):
    """DeepSeek V3 is a family PEFT 0.21 converts transformers-4 targets on: loaded by the plain PEFT path,
    its dense and shared-expert MLPs' targets would become the experts' parameters; `load_adapter` keeps
    them."""
    from transformers import AutoModelForCausalLM

    from mlflow_finetune_plugin.models.peft_targets import load_adapter

    model = model_of("deepseek_v3")[0]
    model.save_pretrained(tmp_path / "base")
    peft, _ = _lora(model)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # a trained adapter: its updates change the output
    peft.save_pretrained(tmp_path / "adapter")
    ids = torch.arange(3, 15).view(1, 12)
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        loaded = load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
        assert _reached(loaded) == _reached(peft)
        assert torch.allclose(loaded(input_ids=ids).logits, expected)


QUICK = {"train.max_steps": 2, "train.batch_size": 2, "train.logging_steps": 1, "train.save_steps": 2,
         "eval.max_examples": 2, "eval.max_new_tokens": 4, "eval.fewshot_k": 1, "eval.traces": False,
         "eval.forgetting": False}


def _run(project, root, overrides) -> tuple[int, object]:
    return train_in_process(project, root, overrides, project.name)


@pytest.mark.integration
def test_a_llama4_lora_run_finishes_and_says_what_it_reached(tmp_path, tracking_uri, capsys, monkeypatch):
    model = build("llama4", tmp_path / "llama4")
    project = write_chat_project(tmp_path / "moe-llama4", "moe-llama4")
    # CPU bf16 autocast wherever this CPU has it: the path that failed on the router's tuple
    code, run = _run(project, tmp_path, {"model.name": str(model), "train.precision": "bf16", **QUICK})
    assert code == 0 and run.info.status == "FINISHED"
    reached = run.data.tags[tags.LORA_EXPERTS]
    assert reached.startswith("LoRA reaches attention (8), dense MLP (3), shared-expert MLP (3), experts (2)")
    assert "leaves out router (1)" in reached
    assert "leaves out router (1)" in capsys.readouterr().out

    # the same run failing before training (here: its rehearsal's training step) carries no tag of what it
    # reached
    from mlflow_finetune_plugin.train import rehearsal

    def fails(trainer):
        raise RuntimeError("the first step failed")

    monkeypatch.setattr(rehearsal, "training_step", fails)
    project = write_chat_project(tmp_path / "moe-llama4-fails", "moe-llama4-fails")
    code, run = _run(project, tmp_path, {"model.name": str(model), **QUICK})
    assert code != 0 and run.info.status == "FAILED"
    assert tags.LORA_EXPERTS not in run.data.tags
    assert "LoRA reaches attention (8)" in capsys.readouterr().out  # printed as it was found, not tagged
