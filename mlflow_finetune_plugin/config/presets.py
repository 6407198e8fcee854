"""Entry points as presets over the four axes of a fine-tune, and the recipe sections they used to own.

A fine-tune is adapter x quantization x objective x data. An entry point (`-e qlora`) is a preset: it fills
the axes a recipe leaves unset (`qlora` = a LoRA adapter on a 4-bit base, trained with SFT). Keys the recipe
sets win.

Recipes written before the axes existed keep working: the section named after the entry point (`qlora:`,
`dpo:`, `multitask:`, ...) is read into the axes it describes, and the `lora:` section configures any LoRA
adapter. This module only moves keys between places in the raw YAML mapping; `loading.py` validates the
result. It imports nothing from the package, so the loader can use it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    adapter: str                 # adapter.type
    objective: str = "sft"       # objective
    quantization: str = "none"   # model.quantization
    mixture: bool = False        # needs data.tasks (two or more)
    distill: bool = False        # needs distill.teacher: the data's prompts answered by a teacher
    trains: bool = True          # False: no weights change (-e optimize-prompt: the prompt search only)


PRESETS = {
    "lora": Preset("lora"),
    "qlora": Preset("lora", quantization="4bit"),
    "adapter": Preset("bottleneck"),
    "prefix": Preset("prefix"),
    "prompt": Preset("prompt"),
    "ia3": Preset("ia3"),
    "full": Preset("full"),
    "multitask": Preset("lora", mixture=True),
    "dpo": Preset("lora", objective="dpo"),
    "grpo": Preset("lora", objective="grpo"),
    "reward": Preset("lora", objective="reward"),
    "kto": Preset("lora", objective="kto"),
    "distill": Preset("lora", distill=True),
    "optimize-prompt": Preset("lora", trains=False),
}

LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "use_dora", "use_rslora", "bias", "layers")
# Keys of the old per-method sections that now live on another axis: section -> {key: dotted destination}.
_MOVED = {
    "qlora": {"bits": "model.quantization", "quant_type": "model.quant_type",
              "double_quant": "model.double_quant", "compute_dtype": "model.compute_dtype"},
    "dpo": {"init_adapter": "model.init_adapter"}, "multitask": {"tasks": "data.tasks",
                                                                 "stopping": "data.stopping",
                                                                 "adapters": "data.adapters"},
}
# Keys of an objective's own section that stay there (the rest of a legacy `dpo:` section is LoRA's).
_OBJECTIVE_KEYS = {"dpo": ("beta", "loss_type", "label_smoothing")}
# Sections a recipe may carry from before the axes; each is read only when its entry point runs (`lora:` also
# whenever the adapter is LoRA). `adapter:` is the adapter axis itself (a legacy bottleneck section has no
# `type`).
LEGACY_SECTIONS = ("lora", "qlora", "prefix", "prompt", "ia3", "full", "multitask")


def adapter_type(method: str, *raws: dict) -> str | None:
    """The adapter a recipe trains: `adapter.type` where set (the last of `raws` wins), else the preset's;
    None when the type written is not a name (e.g. `-P adapter.type=[0]`: the schema's validation then reports
    it)."""
    for raw in reversed(raws):
        adapter = raw.get("adapter")
        if isinstance(adapter, dict) and adapter.get("type"):
            return adapter["type"] if isinstance(adapter["type"], str) else None
    preset = PRESETS.get(method)
    return preset.adapter if preset else None


def to_axes(raw: dict, method: str, adapter: str | None) -> tuple[dict, dict]:
    """The raw recipe mapping (file or `-P` overrides) with its legacy sections moved onto the axes, and
    {new path: (section, key)} of every moved key, so errors name the key the user wrote. `adapter` is the
    adapter type the whole recipe resolves to. The preset's defaults are filled in later (`fill_preset`)."""
    raw = copy.deepcopy(raw)
    origin: dict[tuple, tuple] = {}
    moved: dict = {}

    def move(section: str, key: str, dest: str, value):
        if dest == "model.quantization" and value not in (4, 8):
            return  # reported once, as qlora.bits, by the recipe's legacy-section check
        node = moved
        parts = dest.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _quantization(value) if dest == "model.quantization" else value
        origin[tuple(parts)] = (section, *key.split("."))

    if adapter == "lora" and isinstance(raw.get("lora"), dict):
        for key, value in raw["lora"].items():
            move("lora", key, f"adapter.{key}", value)
    own = raw.get(method) if method in (*LEGACY_SECTIONS, "dpo") and method != "lora" else None
    if isinstance(own, dict):
        for key, value in own.items():
            if key in _MOVED.get(method, {}):
                move(method, key, _MOVED[method][key], value)
            elif key not in _OBJECTIVE_KEYS.get(method, ()):
                # prompt's own `kind` (prompt_tuning | p_tuning) is not the adapter's type
                move(method, key, f"adapter.{key}", value)
    if isinstance(raw.get("dpo"), dict):  # the objective's section keeps only its own keys
        raw["dpo"] = {k: v for k, v in raw["dpo"].items()
                      if k in _OBJECTIVE_KEYS["dpo"] or k not in (*LORA_KEYS, "init_adapter")}
    for section in LEGACY_SECTIONS:
        if section in raw and not isinstance(raw[section], dict) and raw[section] is not None:
            continue  # left in place: validation reports it as a section that must be a mapping
        raw.pop(section, None)
    return deep_merge(moved, raw), origin


def without_foreign_adapter(raw: dict, adapter: str | None) -> dict:
    """The recipe file's mapping without its `adapter:` section where that section names no `type` and so
    configures the file's own adapter (`recipes/adapter`'s bottleneck keys), while the entry point trains
    another one: like the per-method sections, it is read only when its adapter trains (`-e lora` on the
    bottleneck recipe trains LoRA with LoRA's defaults instead of refusing bottleneck_size as an unknown LoRA
    key)."""
    section = raw.get("adapter")
    if not isinstance(section, dict) or section.get("type"):
        return raw
    method = raw.get("method")
    # a wrong `method:` is refused later
    own = method if isinstance(method, str) and method in PRESETS else "lora"
    return raw if PRESETS[own].adapter == adapter else {k: v for k, v in raw.items() if k != "adapter"}


def fill_preset(raw: dict, method: str) -> None:
    """Fill the axes the recipe leaves unset from the entry point's preset."""
    preset = PRESETS[method]
    adapter = raw.setdefault("adapter", {})
    if isinstance(adapter, dict):
        adapter.setdefault("type", preset.adapter)
    raw.setdefault("objective", preset.objective)
    model = raw.setdefault("model", {})
    if isinstance(model, dict):
        if model.get("quantization") is None:
            model["quantization"] = preset.quantization


def _quantization(bits: int) -> str:
    """qlora.bits (4 or 8) as model.quantization."""
    return f"{bits}bit"


def deep_merge(base: dict, top: dict) -> dict:
    """A new mapping: `base` with `top` merged in, section by section; where both set a value, `top`'s
    wins."""
    out = dict(base)
    for key, value in top.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key),
                                                                                         dict) else value
    return out
