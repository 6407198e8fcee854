"""What training computes in on this machine: bf16 where it pays, found by measuring, not by the CPU's name.

On a GPU, `train.precision: auto` is bf16 where the GPU supports it. On a CPU it is fp32 weights, with bf16
autocast (bf16 matmuls) only where this CPU runs bf16 matmuls much faster than fp32. That differs by CPU in
ways no flag tells: a Xeon with AVX-512 BF16 but no AMX ran them at 0.65x fp32, an AMD EPYC with the same flag
at 2.4x, a Xeon with AMX at 3-8x (docs/benchmarks.md, "CPUs seen so far"). So the answer is a measurement,
taken once per process on a matmul the size of a training step's, in about a tenth of a second. A job of
several processes (torchrun, Ray) measures once, before its ranks start, and hands the figure to them
(`SPEEDUP_ENV`): measured by each rank beside the others' work, ranks chose apart, and DDP's first sync then
waited forever on tensors of two dtypes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

# bf16 matmuls must run this much faster than fp32 for autocast to pay in a whole step: matmuls are two thirds
# of a LoRA step on smollm2, and autocast adds casts; a bare 2.4x made a step 1.43x (docs/benchmarks.md, "CPUs
# seen so far").
MIN_MATMUL_SPEEDUP = 1.6
# CPU flags (x86 /proc/cpuinfo "flags", Arm "Features") of native bf16 arithmetic; without one, bf16 is
# emulated.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# The measurement handed to each process of a job ("none": no native bf16), so that every rank decides alike.
SPEEDUP_ENV = "MLFLOW_FINETUNE_CPU_BF16_SPEEDUP"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float | None:
    """bf16 over fp32 throughput of a training-sized matmul on this CPU, measured now; None on a CPU without
    native bf16 arithmetic (bf16 is then emulated and slower, so there is nothing to measure). Under a job's
    launcher, the figure it measured once for all its ranks (`SPEEDUP_ENV`)."""
    given = os.environ.get(SPEEDUP_ENV, "").strip()
    if given:
        if given == "none":
            return None
        try:
            return float(given)
        except ValueError:
            raise ValueError(
                f"{SPEEDUP_ENV}={given!r} is not a number: unset it (the launcher sets it) or give the "
                "bf16 over fp32 matmul speedup, e.g. 2.4, or 'none'") from None
    if not cpu_flags() & BF16_FLAGS:
        return None
    import torch

    def seconds(dtype) -> float:
        # 512 tokens through a 576 -> 1536 projection: smollm2's MLP at 2 rows of 256 tokens. Best of 5 after
        # a warm-up, so a moment of other work on the machine does not decide the run's precision.
        a, b = torch.randn(512, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        for _ in range(2):
            a @ b
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        return best

    return seconds(torch.float32) / seconds(torch.bfloat16)


def for_every_rank() -> dict[str, str]:
    """The environment that makes every process of a job use this process's measurement: {SPEEDUP_ENV:
    figure},
    measured now unless already given; nothing on a GPU machine, where nothing is measured."""
    import torch

    if torch.cuda.is_available():
        return {}
    speedup = cpu_bf16_speedup()
    return {SPEEDUP_ENV: "none" if speedup is None else f"{speedup:.3f}"}


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 autocast pays on this CPU (see the module docstring)."""
    speedup = cpu_bf16_speedup()
    return speedup is not None and speedup >= MIN_MATMUL_SPEEDUP


def measured_for(recipe) -> bool:
    """Whether `auto` may pick CPU bf16 autocast for this recipe: the kind of run it was measured on, keeping
    fp32's quality (docs/methods.md): a LoRA adapter, the sft objective, an unquantized base. Preference and
    RL objectives (DPO's logged preference margins moved by 0.3% under it), the other adapters and a quantized
    base were not measured, and stay fp32 unless `train.precision: bf16` asks."""
    return recipe.adapter.type == "lora" and recipe.objective == "sft" and recipe.model.quantization == "none"


def cpu_autocast_bf16(precision: str, model_dtype: str, measured: bool = True) -> bool:
    """Train with fp32 weights under CPU autocast to bf16: asked for (`train.precision: bf16` on a CPU), or
    `auto` on a CPU where bf16 is fast for a run of the kind measured (`measured_for`), unless the recipe sets
    the weights' dtype itself."""
    import torch

    if torch.cuda.is_available():
        return False
    if precision == "bf16":
        return model_dtype in ("auto", "float32")
    return precision == "auto" and model_dtype == "auto" and measured and cpu_has_fast_bf16()


def recipe_autocast_bf16(recipe) -> bool:
    """`cpu_autocast_bf16` for a recipe: its `train.precision`, `model.dtype` and kind of run."""
    return cpu_autocast_bf16(recipe.train.precision, recipe.model.dtype, measured_for(recipe))


def compute_precision(precision: str, model_dtype: str, measured: bool = True) -> str:
    """What training computes in, in words (logged as the `finetune.precision` tag)."""
    import torch

    from mlflow_finetune_plugin.models.base import torch_dtype

    if cpu_autocast_bf16(precision, model_dtype, measured):
        return "bf16 autocast, fp32 weights"
    weights = str(torch_dtype(model_dtype)).removeprefix("torch.")
    if torch.cuda.is_available() and precision != "auto":
        return f"{str(torch_dtype(precision)).removeprefix('torch.')} mixed precision, {weights} weights"
    return weights


def precision_reason(precision: str, model_dtype: str, measured: bool = True) -> str:
    """Why `auto` chose what it chose on this CPU, for the printed line ('' where nothing was measured)."""
    import torch

    if precision != "auto" or model_dtype != "auto" or torch.cuda.is_available():
        return ""
    speedup = cpu_bf16_speedup()
    if speedup is None:
        return "this CPU has no native bf16 arithmetic"
    if speedup < MIN_MATMUL_SPEEDUP:
        return (f"bf16 matmuls measured {speedup:.1f}x fp32 on this CPU: autocast does not pay "
                f"(below {MIN_MATMUL_SPEEDUP}x)")
    if not measured:
        return (
            f"bf16 matmuls measured {speedup:.1f}x fp32 on this CPU, but `auto` uses bf16 autocast only for "
            "LoRA with the sft objective on an unquantized base; `train.precision: bf16` forces it")
    return f"bf16 matmuls measured {speedup:.1f}x fp32 on this CPU: autocast pays"


@contextlib.contextmanager
def fp32_where_it_matters(model, enabled: bool):
    """While training under CPU bf16 autocast, keep in fp32 what the adapter's learning depends on: the LM
    head (the logits, and through them the loss and the replay KL term) and each LoRA layer's update, computed
    in fp32 and added to its base layer's output in fp32. The base layers' own matmuls, nearly all the work,
    stay in bf16.

    Plain autocast rounded both to bf16 (8 bits of mantissa: a logit near 20 moves in steps of 0.125, and a
    LoRA update well below its base output is rounded with it) and cost support-bot 0.11-0.14 rougeL against
    fp32 (docs/benchmarks-history.md, section 6). Put back as they were on exit; with `enabled` false nothing
    changes.
    """
    if not enabled:
        yield
        return
    import torch
    from peft.tuners.lora import LoraLayer

    patched = []

    def patch(module, make):
        patched.append((module, module.__dict__.get("forward")))
        module.forward = make(module.forward)

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        patch(head, _computed_in_fp32)
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and isinstance(layer.get_base_layer(), torch.nn.Linear):
            patch(layer.get_base_layer(), _output_in_fp32)
            for branch in (*layer.lora_A.values(), *layer.lora_B.values()):
                patch(branch, _computed_in_fp32)
            patch(layer, lambda forward, layer=layer: _lora_summed_in_fp32(layer, forward))
    try:
        yield
    finally:
        for module, forward in reversed(patched):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _computed_in_fp32(forward):
    import torch

    def fp32_forward(x, *args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return forward(x.float(), *args, **kwargs)
    return fp32_forward


def _lora_summed_in_fp32(layer, forward):
    """A plain LoRA layer's forward under CPU bf16 autocast: the base layer and the rank-r branch both compute
    in bf16, and the branch's update is added to the base output in fp32. What plain autocast loses is the
    sum: an update well below its base output, rounded with it to bf16, is mostly rounding noise
    (tests/test_precision.py); here the update keeps bf16's relative precision of itself, as every base output
    does, and the sum is fp32. The branch's two skinny matmuls in fp32 were 14% of a smollm2 step (MKL's SGEMM
    on [tokens, 16] shapes), and PEFT's way adds three fp32 passes over `[tokens, out_features]` (the upcast,
    the scaling, the sum): here the scaling multiplies the rank-r activation and the upcast is folded into the
    sum (type promotion). A smollm2 step in bf16 on Zen 4: PEFT's forward with the fp32 guards took
    1.065-1.075x its time (docs/benchmarks-history.md). Anything else (a variant such as DoRA, merged or
    disabled adapters, per-row adapter names, a base layer or branch with its own forward, autocast off) takes
    PEFT's forward with the fp32 guards."""
    import torch
    import torch.nn.functional as F

    base = layer.get_base_layer()
    linear = torch.nn.Linear.forward

    def summed_forward(x, *args, **kwargs):
        active = [name for name in layer.active_adapters if name in layer.lora_A]
        if (args or kwargs or not active or layer.disable_adapters or layer.merged
            or not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type)
            or type(base).forward is not linear or any(name in layer.lora_variant
                                                       or type(layer.lora_A[name]).forward is not linear
                                                       or type(layer.lora_B[name]).forward is not linear
                                                       for name in active)):
            return forward(x, *args, **kwargs)
        dtype = torch.get_autocast_dtype(x.device.type)
        result = F.linear(_cast_once(x, dtype), base.weight, base.bias)  # bf16
        for name in active:
            a, b = layer.lora_A[name], layer.lora_B[name]
            rank = F.linear(layer.lora_dropout[name](_cast_once(x, dtype)), a.weight,
                            a.bias) * layer.scaling[name]
            result = torch.add(F.linear(rank, b.weight, b.bias).float(), result)  # fp32 from here
        return result
    return summed_forward


_last_cast: list = [None, None, -1]  # a weak reference to the last input cast, its cast, its version then


def _cast_once(x, dtype):
    """`x` in `dtype`, cast once for the layers that read the same input in a row (q, k and v; gate and up):
    each
    would otherwise cast it again, and each LoRA branch would keep its own copy for the backward pass. Each
    layer still gets its own node in the graph (`_SharedCast`), so that their gradients reach `x` in its own
    dtype and are summed there, as with a cast per layer: the same gradients, bit for bit."""
    import weakref

    import torch

    if x.dtype == dtype:
        return x
    ref, cast, version = _last_cast
    if ref is None or ref() is not x or x._version != version or cast._version != 0:
        with torch.no_grad():
            cast = x.to(dtype)
        _last_cast[:] = [weakref.ref(x), cast, x._version]
    return _shared_cast().apply(x, cast) if x.requires_grad and torch.is_grad_enabled() else cast


def _shared_cast():
    """torch.autograd.Function (made on first use): forward hands out the cast made once, backward casts the
    gradient back to the input's dtype, as the cast's own backward does."""
    global _SharedCast
    if _SharedCast is None:
        import torch

        class SharedCast(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, cast):
                ctx.dtype = x.dtype
                return cast.view_as(cast)

            @staticmethod
            def backward(ctx, grad):
                return grad.to(ctx.dtype), None

        _SharedCast = SharedCast
    return _SharedCast


_SharedCast = None


def _output_in_fp32(forward):
    import torch

    def upcast_forward(x, *args, **kwargs):
        output = forward(x, *args, **kwargs)
        # a layer of the model's own code may subclass nn.Linear and answer otherwise (Llama 4's router: a
        # tuple of scores and logits, when a recipe adapts its weight): its output is left as it is
        return output.float() if isinstance(output, torch.Tensor) else output
    return upcast_forward


@contextlib.contextmanager
def frozen_weights_in_bf16(model, enabled: bool, spill_dir):
    """While training under CPU bf16 autocast, hold the frozen weights of the LoRA layers' base `nn.Linear`s
    in bf16 instead of fp32, and put the fp32 weights back afterwards, bit for bit.

    Autocast casts an fp32 weight to bf16 in every forward pass and keeps the copy for the backward pass (a
    frozen weight is not in its cast cache). Held in bf16, the weight is the copy autocast would have made
    (round to nearest even either way): the step computes the same numbers, without the copies. Memory,
    smollm2: the fp32 weights (0.51 GB, a private mapping of the checkpoint file, paged in by the first step)
    give way to 0.20 GB of bf16 ones and a 0.11 GB copy of the embeddings; the mapping goes once nothing
    refers to it, so the other fp32 tensors (embeddings, norms) are copied out of it here. And a step no
    longer keeps 0.20 GB of casts for its backward. The fp32 weights wait in a raw file in `spill_dir`
    (written weight by weight, read back once), so that what is evaluated, logged and served after training is
    the fp32 base with the adapter, as before. The LM head and the embeddings stay fp32
    (`fp32_where_it_matters` computes the head in fp32); so does every trainable weight. With `enabled` false
    nothing changes."""
    if not enabled:
        yield
        return
    import os
    from pathlib import Path

    import numpy as np
    import torch
    from peft.tuners.lora import LoraLayer

    shared = {id(p) for get in ("get_input_embeddings", "get_output_embeddings")
              for m in [getattr(model, get, lambda: None)()] if m is not None for p in m.parameters()}
    layers = [layer.get_base_layer() for layer in model.modules() if isinstance(layer, LoraLayer)]
    layers = [base for base in layers if isinstance(base, torch.nn.Linear) and base.weight.dtype
              == torch.float32 and not base.weight.requires_grad and id(base.weight) not in shared]
    # a weight two layers share: spilled once
    layers = list({id(base.weight): base for base in layers}.values())
    if not layers:
        yield
        return
    path = Path(spill_dir) / f"frozen-fp32-rank{os.environ.get('RANK', '0')}.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # raw fp32 in this machine's byte order, one weight after another
        for base in layers:
            f.write(base.weight.data.contiguous().numpy().tobytes())
            base.weight.data = base.weight.data.to(torch.bfloat16)
    held = {id(base.weight) for base in layers}
    for tensor in (*model.parameters(), *model.buffers()):  # out of the checkpoint's mapping, so that it goes
        if id(tensor) not in held and not tensor.requires_grad and tensor.device.type == "cpu":
            tensor.data = tensor.data.clone()
    try:
        yield
    finally:
        with open(path, "rb") as f:
            for base in layers:
                shape = base.weight.shape
                data = np.fromfile(f, dtype=np.float32, count=base.weight.numel())
                base.weight.data = torch.from_numpy(data).reshape(shape)
        path.unlink(missing_ok=True)
