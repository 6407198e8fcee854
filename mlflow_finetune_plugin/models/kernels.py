"""Fused GPU kernels for training (`train.kernels`): which one a run takes, and putting it on the model.

The option is Liger Kernel (PyPI `liger-kernel`, Triton, CUDA only; from the project's clone: `pip install -e
'.[gpu]'`): it swaps a model's RMSNorm, rotary embedding and SwiGLU MLP for fused Triton kernels, and can
replace the LM head and cross-entropy with its fused linear cross-entropy, which takes each
chunk's gradient in the forward pass (no logits held, none recomputed in the backward pass). It is installed
from PyPI like any package, so it works on an offline machine; TRL's Hub kernels (`use_kernels=True`) are
fetched from the hub at run time and are not offered.

Which architectures Liger covers is Liger's own table (`MODEL_TYPE_TO_APPLY_LIGER_FN`, by
`config.model_type`), asked here rather than copied. `auto` takes Liger on CUDA where it is installed and
covers the model, and nothing otherwise (every CPU run); an explicit `liger` that cannot be honoured is
refused with the fix, before the model loads where that can be known (no CUDA, not installed), and once its
config is read otherwise.

The LM head: `train.fused_lm_head` says how the SFT loss meets it. Liger's fused linear cross-entropy is used
when that key is `auto` and Liger is on (`lm_head()`); any explicit value keeps the plugin's head and Liger's
stays off, so the two never both patch the model's forward. The run's tag `finetune.kernels` says which.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow_finetune_plugin.errors import FinetuneError

LAYER_KERNELS = ("rope", "rms_norm", "swiglu")
INSTALL = "pip install liger-kernel (from the project's clone: pip install -e '.[gpu]')"


@dataclass(frozen=True)
class KernelChoice:
    name: str  # "liger" or "none"
    reason: str  # why, in words, for the tag and the printed line

    @property
    def liger(self) -> bool:
        return self.name == "liger"


def liger_model_types() -> frozenset[str] | None:
    """The `config.model_type`s Liger Kernel patches, from its own table; None where it is not installed."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:  # installed without its dependencies (triton), or a layout this version does not have
        return None
    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def choose(value: str, on_cuda: bool, liger_types: frozenset[str] | None,
           model_type: str | None) -> KernelChoice:
    """`train.kernels` resolved for one run. `liger_types` is `liger_model_types()`; `model_type` None means
    the model is not loaded yet (then only what can be known without it is judged). Raises on an explicit
    choice that cannot be honoured."""
    if value == "none":
        return KernelChoice("none", "train.kernels: none")
    explicit = value == "liger"
    if not on_cuda:
        if explicit:
            raise FinetuneError(
                "train.kernels: liger needs a CUDA GPU (Liger Kernel runs as Triton kernels on "
                "CUDA); none is visible here. Set train.kernels: auto (nothing on a CPU) or none, "
                "or train on a GPU.")
        return KernelChoice("none", "train.kernels auto: no CUDA GPU")
    if liger_types is None:
        if explicit:
            raise FinetuneError(f"train.kernels: liger, but Liger Kernel is not installed: {INSTALL}, or set "
                                "train.kernels: auto or none.")
        return KernelChoice("none", f"train.kernels auto: liger-kernel is not installed ({INSTALL})")
    if model_type is not None and model_type not in liger_types:
        if explicit:
            raise FinetuneError(f"train.kernels: liger, but Liger Kernel has no kernels for model type "
                                f"{model_type!r} (it covers {', '.join(sorted(liger_types))}). Set "
                                "train.kernels: auto or none.")
        return KernelChoice("none",
                            f"train.kernels auto: Liger Kernel does not cover model type {model_type!r}")
    return KernelChoice("liger", f"train.kernels: {value}")


def resolve(recipe, model_config=None) -> KernelChoice:
    """`choose()` for this recipe on this machine; without `model_config`, the check made before the model
    loads. Liger is not imported on a CPU (auto decides there without it)."""
    import torch

    on_cuda = torch.cuda.is_available()
    value = recipe.train.kernels
    types = liger_model_types() if on_cuda and value != "none" else None
    model_type = getattr(model_config, "model_type", None) if model_config is not None else None
    return choose(value, on_cuda, types, model_type)


def apply_layers(model, choice: KernelChoice) -> None:
    """Liger's layer kernels (RMSNorm, rotary embedding, SwiGLU) on a loaded base model, before any adapter
    wraps its layers; the LM head is left to `lm_head()`."""
    if not choice.liger:
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, **{k: True for k in LAYER_KERNELS}, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def takes_lm_head(recipe, choice: KernelChoice) -> bool:
    """Whether Liger's fused linear cross-entropy computes the SFT loss: Liger on, `train.fused_lm_head:
    auto`, and
    one rank (its gradient is taken inside the forward pass, which DDP refuses, as for the chunked head)."""
    import os

    return choice.liger and recipe.train.fused_lm_head == "auto" and int(os.environ.get("WORLD_SIZE",
                                                                                        "1")) == 1


def lm_head(model) -> None:
    """Liger's fused linear cross-entropy as the forward of the base model under `model` (a PeftModel or the
    model): with labels, while training, it returns the loss (and the token accuracy) and no logits."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(model=base, **{k: False for k in LAYER_KERNELS}, cross_entropy=False,
                                    fused_linear_cross_entropy=True)


def describe(choice: KernelChoice, liger_head: bool) -> str:
    """The `finetune.kernels` tag and printed line: what was used, and what computes the loss."""
    if not choice.liger:
        return f"none ({choice.reason})"
    import importlib.metadata as md

    head = "fused_linear_cross_entropy" if liger_head else "LM head per train.fused_lm_head"
    return f"liger {md.version('liger-kernel')}: {', '.join(LAYER_KERNELS)}, {head} ({choice.reason})"


def decoder_layers(model) -> list:
    """The model's repeated blocks: modules whose class the model names in `_no_split_modules` (what it keeps
    whole across devices, i.e. its decoder layer), outermost ones only."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers, inside = [], set()
    for module in base.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            layers.append(module)
            inside.update(id(m) for m in module.modules())
    return layers


def compile_layers(model, backend="inductor") -> int:
    """`train.torch_compile`: each decoder layer compiled in place (`nn.Module.compile`, its state dict
    unchanged); returns how many. `uncompile_layers` undoes it. `backend` is torch.compile's."""
    layers = decoder_layers(model)
    if not layers:
        raise FinetuneError(f"train.torch_compile: {type(model).__name__} names no decoder layer class "
                            "(`_no_split_modules`), so there is nothing to compile per layer. Set "
                            "train.torch_compile: false.")
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


def uncompile_layers(model) -> None:
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None
