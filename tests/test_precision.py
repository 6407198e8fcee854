"""`train.precision: auto` on a CPU: bf16 autocast only where this CPU's bf16 matmuls were measured fast
enough.

The measurement itself runs for real on whatever CPU runs the tests; the decision around it is checked against
each kind of CPU seen so far by standing in for its flags or its measured ratio.
"""

from __future__ import annotations

import pytest
import torch

from mlflow_finetune_plugin.models import precision


@pytest.fixture(autouse=True)
def fresh_measurement():
    precision.cpu_bf16_speedup.cache_clear()
    yield
    precision.cpu_bf16_speedup.cache_clear()


def test_the_measurement_runs_on_this_cpu():
    speedup = precision.cpu_bf16_speedup()
    if precision.cpu_flags() & precision.BF16_FLAGS:
        assert isinstance(speedup, float) and speedup > 0
        assert precision.cpu_has_fast_bf16() == (speedup >= precision.MIN_MATMUL_SPEEDUP)
    else:
        assert speedup is None and not precision.cpu_has_fast_bf16()
    # Measured once per process: the run's tag and its Trainer cannot disagree.
    assert precision.cpu_bf16_speedup() is speedup


def test_a_job_s_ranks_use_the_figure_measured_once_for_them(monkeypatch):
    # Measured by each rank beside the others' work, ranks chose apart (DDP then hung): the launcher's figure
    # wins.
    monkeypatch.setattr(torch, "randn", lambda *a,
                        **k: pytest.fail("measured although the launcher gave a figure"))
    monkeypatch.setenv(precision.SPEEDUP_ENV, "2.4")
    assert precision.cpu_bf16_speedup() == 2.4 and precision.cpu_has_fast_bf16()
    assert precision.for_every_rank() == {precision.SPEEDUP_ENV: "2.400"}
    precision.cpu_bf16_speedup.cache_clear()
    monkeypatch.setenv(precision.SPEEDUP_ENV, "none")
    assert precision.cpu_bf16_speedup() is None and not precision.cpu_autocast_bf16("auto", "auto")
    precision.cpu_bf16_speedup.cache_clear()
    monkeypatch.setenv(precision.SPEEDUP_ENV, "fast")
    with pytest.raises(ValueError, match="MLFLOW_FINETUNE_CPU_BF16_SPEEDUP='fast' is not a number: unset it"):
        precision.cpu_bf16_speedup()


def test_for_every_rank_hands_down_this_process_s_measurement(monkeypatch):
    monkeypatch.delenv(precision.SPEEDUP_ENV, raising=False)
    figure = precision.for_every_rank()[precision.SPEEDUP_ENV]
    speedup = precision.cpu_bf16_speedup()
    assert figure == ("none" if speedup is None else f"{speedup:.3f}")


def test_cpu_flags_are_read():
    flags = precision.cpu_flags()
    assert isinstance(flags, frozenset)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert "avx2" in flags


def test_no_native_bf16_means_fp32_without_measuring(monkeypatch):
    # an AVX2-only EPYC
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"sse4_2", "avx2", "fma"}))
    monkeypatch.setattr(torch, "randn", lambda *a, **k: pytest.fail("measured a CPU without bf16 arithmetic"))
    assert precision.cpu_bf16_speedup() is None
    assert not precision.cpu_autocast_bf16("auto", "auto")
    assert precision.compute_precision("auto", "auto") == "float32"
    assert "no native bf16" in precision.precision_reason("auto", "auto")


@pytest.mark.parametrize("speedup, autocast", [
    (0.65, False),  # Xeon with AVX-512 BF16, no AMX: bf16 slower than fp32
    (1.2, False),   # faster, but not by enough to pay for autocast's casts in a whole step
    (2.4, True),    # AMD EPYC with AVX-512 BF16
    (7.5, True),    # Xeon with AMX
])
def test_auto_follows_the_measured_speedup(monkeypatch, speedup, autocast):
    if torch.cuda.is_available():
        pytest.skip("on a GPU, auto is the GPU's bf16, not CPU autocast")
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
    assert precision.cpu_autocast_bf16("auto", "auto") is autocast
    assert precision.compute_precision("auto", "auto") == ("bf16 autocast, fp32 weights" if autocast
                                                           else "float32")
    reason = precision.precision_reason("auto", "auto")
    assert f"{speedup:.1f}x" in reason and ("does not pay" in reason) != autocast


def test_an_explicit_choice_is_never_overruled(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU autocast only")
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 7.5)
    assert not precision.cpu_autocast_bf16("fp32", "auto")
    assert not precision.cpu_autocast_bf16("auto", "bfloat16")  # the recipe set the weights' dtype itself
    assert precision.precision_reason("fp32", "auto") == ""
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 0.65)
    assert precision.cpu_autocast_bf16("bf16", "auto")  # asked for: autocast even where it is slow


@pytest.mark.parametrize("project, entry_point, measured", [
    ("support-bot", "lora", True),
    ("qlora", "qlora", False),  # a quantized base
    ("dpo", "dpo", False),      # a preference objective (its logged margins moved under autocast)
    ("ia3", "ia3", False),      # another adapter
])
def test_auto_picks_bf16_only_for_the_kind_of_run_it_was_measured_on(monkeypatch, project, entry_point,
                                                                     measured):
    if torch.cuda.is_available():
        pytest.skip("CPU autocast only")
    from mlflow_finetune_plugin.config.loading import load_recipe
    from tests.helpers import REPO

    recipe = load_recipe(REPO / "recipes" / project, method=entry_point)
    assert precision.measured_for(recipe) is measured
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 2.4)
    assert precision.cpu_autocast_bf16("auto", "auto", precision.measured_for(recipe)) is measured
    reason = precision.precision_reason("auto", "auto", precision.measured_for(recipe))
    assert ("train.precision: bf16` forces it" in reason) is not measured
    assert precision.cpu_autocast_bf16("bf16", "auto", precision.measured_for(recipe))  # asked for: always


def _tiny_lora_model(seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    # init_lora_weights=False: B is random too, so the adapter changes the outputs from the first step
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False))


def _guarded_step(model, ids):
    """(loss, LoRA gradients) of one training step under the guards and CPU bf16 autocast."""
    model.zero_grad()
    with precision.fp32_where_it_matters(model, True), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_guards_keep_logits_and_lora_updates_in_fp32_under_autocast():
    from peft.tuners.lora import LoraLayer

    model = _tiny_lora_model()
    ids = torch.randint(0, 128, (2, 12))
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    seen = {}
    layer.register_forward_hook(lambda mod, args, out: seen.__setitem__("lora_out", out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(input_ids=ids).logits.dtype == torch.bfloat16  # plain autocast: bf16 logits
        assert seen["lora_out"] == torch.bfloat16
        with precision.fp32_where_it_matters(model, enabled=True):
            out = model(input_ids=ids, labels=ids)
            assert out.logits.dtype == torch.float32
            assert seen["lora_out"] == torch.float32
            out.loss.backward()  # gradients flow through the guarded modules
    trained = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert trained and all(g is not None and g.abs().sum() > 0 for g in trained)


def test_guards_keep_a_small_lora_update_that_plain_autocast_rounds_away():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(256, 256))
    with torch.no_grad():
        base[0].bias.fill_(20.0)  # outputs near 20: bf16 steps of 0.125 there
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["0"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(1e-3)  # an update well below the rounding step of the base output
    x = torch.randn(8, 256)
    with model.disable_adapter():
        plain = model(x)
    update = model(x) - plain  # fp32: the adapter's real contribution
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with model.disable_adapter():
            base_bf16 = model(x).float()
        rounded = model(x).float() - base_bf16
        with precision.fp32_where_it_matters(model, enabled=True):
            with model.disable_adapter():
                base_guarded = model(x)
            kept = model(x) - base_guarded
    error = lambda got: ((got - update).norm() / update.norm()).item()  # noqa: E731
    assert error(rounded) > 0.5  # plain autocast: the update is mostly rounding noise
    assert error(kept) < 0.05  # guarded: the update as fp32 computes it


def test_guards_compute_the_lora_branch_in_bf16_and_sum_it_in_fp32(monkeypatch):
    """Under the guards a plain LoRA layer takes the project's forward (not PEFT's): base layer and branch in
    bf16, their sum in fp32, so that the update keeps bf16's precision of itself and is not rounded against
    its base output. Where the layer is not plain (DoRA) or autocast is off, PEFT's forward runs, with the
    fp32 guards."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 48))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    layer = model.base_model.model[0]
    calls = []
    peft_forward = LoraLinear.forward
    monkeypatch.setattr(LoraLinear, "forward", lambda self, *a, **k: calls.append(1) or peft_forward(self, *a,
                                                                                                     **k))
    x = torch.randn(5, 64)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    linear = torch.nn.functional.linear
    base_out = linear(bf(x), bf(layer.base_layer.weight), bf(layer.base_layer.bias)).float()
    update = linear(linear(bf(x), bf(a)) * 2.0, bf(b)).float()  # scaling alpha / r = 2
    with precision.fp32_where_it_matters(model, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert calls == []  # the project's forward, not PEFT's
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, base_out + update, rtol=0, atol=1e-6)  # the sum of the two, in fp32
        out.sum().backward()
        assert a.grad is not None and b.grad is not None and b.grad.abs().sum() > 0
        with torch.no_grad():
            fp32 = layer.base_layer(x) + 2.0 * (x @ a.t()) @ b.t()
            torch.testing.assert_close(model(x), fp32)  # autocast off: PEFT's forward, in fp32
        assert calls
    dora = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 48)),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True))
    calls.clear()
    with precision.fp32_where_it_matters(dora, True), torch.autocast("cpu", dtype=torch.bfloat16):
        assert dora(x).dtype == torch.float32
    assert calls  # a variant keeps PEFT's forward


def test_the_input_cast_once_for_several_layers_trains_the_same_gradients_as_a_cast_per_layer(monkeypatch):
    """q, k and v (gate and up) read one input: it is cast to bf16 once, and each layer still sends its
    gradient back through its own cast, so the gradients are summed in fp32 as with a cast per layer, bit for
    bit."""
    model = _tiny_lora_model()
    ids = torch.randint(0, 128, (2, 12))

    casts = []
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: casts.append(1) or to(self, *a, **k))
    shared_loss, shared = _guarded_step(model, ids)
    shared_casts = len(casts)
    monkeypatch.setattr(precision, "_cast_once", lambda x, dtype: x.to(dtype))
    casts.clear()
    loss, each = _guarded_step(model, ids)
    assert shared_casts < len(casts)
    assert torch.equal(shared_loss, loss)
    assert shared.keys() == each.keys() and all(torch.equal(shared[n], each[n]) for n in shared)


def test_guards_put_the_modules_back_and_do_nothing_when_off():
    model = _tiny_lora_model()
    ids = torch.randint(0, 128, (1, 8))
    before = model(input_ids=ids).logits
    patched_names = lambda: [n for n, m in model.named_modules() if "forward" in m.__dict__]  # noqa: E731
    with precision.fp32_where_it_matters(model, enabled=False):
        assert patched_names() == []
    with precision.fp32_where_it_matters(model, enabled=True):
        assert "base_model.model.lm_head" in patched_names()
        assert any(n.endswith("q_proj.lora_A.default") for n in patched_names())
        assert torch.equal(model(input_ids=ids).logits, before)  # outside autocast: fp32 as before
    assert patched_names() == []
    assert torch.equal(model(input_ids=ids).logits, before)


def test_frozen_weights_in_bf16_train_the_same_numbers_and_come_back_bit_for_bit(tmp_path):
    """The frozen base weights held in bf16 under autocast: the loss and the LoRA gradients are autocast's
    over fp32 weights (autocast rounds the same way), the fp32 weights come back exactly, the head and the
    trainable weights never change dtype, and the spill file is gone."""
    model = _tiny_lora_model()
    ids = torch.randint(0, 128, (2, 8))
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}

    loss, grads = _guarded_step(model, ids)
    with precision.frozen_weights_in_bf16(model, True, tmp_path):
        held = {n: p.dtype for n, p in model.named_parameters()}
        assert held["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
        assert all(held[n] == torch.float32 for n in held if "lora_" in n or "embed" in n or "lm_head" in n)
        assert list(tmp_path.iterdir())
        loss_bf16, grads_bf16 = _guarded_step(model, ids)
    assert torch.equal(loss, loss_bf16)
    assert all(torch.equal(grads[n], grads_bf16[n]) for n in grads)
    assert all(p.dtype == torch.float32 and torch.equal(p, originals[n]) for n, p in model.named_parameters())
    assert not list(tmp_path.iterdir())
    with precision.frozen_weights_in_bf16(model, False, tmp_path):
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_frozen_weights_in_bf16_let_go_of_the_checkpoint_mapping_and_take_it_back_after(tmp_path):
    """A model loaded from safetensors holds its fp32 weights in a private mapping of the file (paged into the
    process's memory by the first step). Under the lever nothing refers to it any more, so it is unmapped:
    that is
    where the memory comes from. Afterwards the fp32 weights are back, the model answers as before."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _tiny_lora_model().get_base_model().save_pretrained(tmp_path / "base", safe_serialization=True)
    checkpoint = str(tmp_path / "base" / "model.safetensors")

    def mapped() -> bool:
        with open("/proc/self/maps", encoding="utf-8") as f:
            return checkpoint in f.read()

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                      init_lora_weights=False))
    ids = torch.randint(0, 128, (2, 8))
    before = model(input_ids=ids).logits.detach()
    if not mapped():
        pytest.skip("this safetensors/transformers loads into memory rather than mapping the file")
    with precision.frozen_weights_in_bf16(model, True, tmp_path / "spill"):
        import gc

        gc.collect()
        assert not mapped()
    assert torch.equal(model(input_ids=ids).logits.detach(), before)


def test_forced_bf16_on_a_quantized_base_fails_the_run_naming_the_fix(tmp_path, tracking_uri, monkeypatch):
    """`train.precision: bf16` on a CPU with a 4-bit base: bitsandbytes' CPU layers cannot train under
    autocast (torch raised "expected m1 and m2 to have the same dtype" mid-run). Refused before the model
    loads, the run FAILED with the fix in its error."""
    if torch.cuda.is_available():
        pytest.skip("CPU autocast only")
    import mlflow

    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.train import pipeline
    from mlflow_finetune_plugin.train.job import run
    from tests.helpers import FAST_OVERRIDES, SUPPORT_BOT

    monkeypatch.setattr(pipeline, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    recipe = load_recipe(SUPPORT_BOT, method="qlora", overrides={**FAST_OVERRIDES, "model": "tiny",
                                                                 "train.precision": "bf16"})
    assert run(recipe) == 1
    [failed] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert failed.info.status == "FAILED"
    error = failed.data.tags["finetune.error"]
    assert "train.precision: bf16" in error and "4bit" in error and "train.precision: auto" in error
