"""The plan where a run starts: `train.batch_size: auto` and `train.gradient_checkpointing: auto` take the
plan's choice for this machine's device, and on CUDA a recipe that cannot fit the device is refused before any
weight loads, naming the setting that fits. The backend (before it creates the run) and `mlflow-finetune
train` call `settle`; the studio's Check shows the same plan.
"""

from __future__ import annotations

import sys

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.memory.plan import AUTO_BATCH, Plan, check_fits, data_longest, plan
from mlflow_finetune_plugin.memory.sizes import gib


def is_auto(recipe) -> bool:
    return "auto" in (recipe.train.batch_size, recipe.train.gradient_checkpointing)


def this_device() -> tuple[str, int | None]:
    """(`cuda` or `cpu`, the memory a training process may take there): the first GPU's total memory (asked of
    nvidia-smi, so that this process holds no CUDA context while the training process runs; else torch),
    or the memory the machine has available. Without a GPU driver on the machine, torch is not imported: every
    `mlflow run` asks this, and importing torch costs seconds of CPU beside the starting job."""
    import os
    import shutil

    driver = (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/kfd")
              or shutil.which("nvidia-smi") is not None)
    if driver and _cuda_available():
        import subprocess

        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True, timeout=30, check=True)
            return "cuda", int(out.stdout.split()[0]) * 2**20
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            import torch

            return "cuda", torch.cuda.get_device_properties(0).total_memory
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return "cpu", int(line.split()[1]) * 1024
    except OSError:
        pass
    return "cpu", None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def settle(recipe, device: str | None = None, memory: int | None = None):
    """(the recipe with its `auto` settings chosen, the plan or None). Plans only where it matters: a recipe
    with `auto`, or any recipe on CUDA (refused when it cannot fit). `device`/`memory` default to this
    machine's (`this_device`)."""
    if device is None:
        device, found = this_device()
        memory = memory if memory is not None else found
    if not is_auto(recipe) and device != "cuda":
        return recipe, None
    if recipe.objective == "grpo" and recipe.train.batch_size == "auto":
        raise FinetuneError("train.batch_size: auto is not taken with objective: grpo (its batch counts "
                            "completions, which grpo.num_generations must divide): give a number")
    longest, _ = data_longest(recipe)
    result = plan(recipe, device_memory=memory, device=device, longest=longest)
    if not is_auto(recipe):
        check_fits(result)
        return recipe, result
    choice = result.choice
    if choice is None or choice.max_length < recipe.data.max_length:
        if device == "cuda" or choice is None and memory is not None:
            check_fits(result)  # names the shorter rows that fit, or the least memory it needs
        choice = None
    train = recipe.train
    batch = train.batch_size if train.batch_size != "auto" else (choice.batch_size if choice else 1)
    accum = train.grad_accum
    if train.batch_size == "auto":
        accum = choice.grad_accum if choice else max(1, AUTO_BATCH * train.grad_accum)
    ckpt = train.gradient_checkpointing
    if ckpt == "auto":
        ckpt = choice.gradient_checkpointing if choice else True
    settled = recipe.model_copy(update={"train": train.model_copy(update={
        "batch_size": batch, "grad_accum": accum, "gradient_checkpointing": ckpt})})
    chosen = plan(settled, device_memory=memory, device=device, longest=longest)
    print(f"Memory plan: {chosen.setting.line()} on {device}"
          + (f" ({gib(memory)})" if memory else "") + " (train.batch_size / gradient_checkpointing: auto)",
          file=sys.stderr)
    return settled, chosen


def run_tags(result: Plan | None) -> dict[str, str]:
    """The tag a planned run carries (the setting planned and its peak), {} where nothing was planned."""
    from mlflow_finetune_plugin import tags

    return {tags.MEMORY_PLAN: f"{result.setting.line()} on {result.device}"} if result is not None else {}
