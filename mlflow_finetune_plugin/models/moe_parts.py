"""The parts of a mixture of experts, found from the model's structure, never from its family's name: its
experts (fused 3-D parameters, or a list of per-expert modules), the routers beside them, the shared-expert
MLPs beside those, the dense MLPs of the layers without experts, and attention; and what `all-linear` means on
such a model.

PEFT's `all-linear` (every nn.Linear but the output head) misses the point of a mixture of experts three ways:
- fused experts are parameters, not linear layers: only `target_parameters` reaches them
(train/adapters/lora.py);
- a router may subclass nn.Linear with a forward of its own (Llama 4's returns scores and logits as a tuple):
  all-linear wraps it, and LoRA's `base(x) + update` fails on the tuple at the first step;
- PEFT 0.21 converts transformers-4 MoE targets on the families transformers 5 re-fused (Qwen2/3-MoE,
DeepSeek,
  Mixtral, ...): every target named `gate_proj`, `up_proj`, `down_proj` becomes the fused experts' parameters
  and `gate` the router's weight, so the dense and shared-expert MLPs lose their LoRA and the router gains one
  (huggingface/peft#3711). `models/peft_targets.py` keeps the explicit module names resolved here.

So on a mixture of experts `all-linear` is resolved here into module names: every linear of attention, of the
dense and shared-expert MLPs (and per-expert linears), never the output head nor a router; the fused experts
come through `target_parameters`. A router is what sits beside the experts in their block and scores them: a
direct child of the block holding the experts whose weight has one row per expert (or a single row: a shared
expert's gate).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("attention", "dense MLP", "shared-expert MLP", "experts", "router", "other")
# Module names PEFT inserts when it wraps a layer; the model's own layer keeps the wrapper's name.
_WRAPPER_PARTS = ("base_layer", "original_module", "modules_to_save", "token_adapter")
# The decoder layer's index in a module name (PEFT's own `layers_to_transform` pattern: the first number).
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


@dataclass(frozen=True)
class Part:
    """One adaptable piece: `name` is a module's name, or for fused experts `module.parameter`. `linear`: an
    nn.Linear that LoRA can wrap as a layer (its forward is nn.Linear's, or a library's quantized linear)."""
    name: str
    kind: str
    linear: bool


def parts(model) -> list[Part]:
    """Every linear layer and fused expert parameter of a mixture of experts by kind (`KINDS`), PEFT's
    wrappers seen through; [] for a model with no experts. The output head is no part: no adapter's
    `all-linear` takes it."""
    import torch

    from mlflow_finetune_plugin.models.architecture import moe_of

    experts = moe_of(model)
    if experts is None:
        return []
    tree = dict(_tree(model))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    own_code = type(model).__module__.rsplit(".", 1)[0]
    containers = _expert_containers(tree, experts.total)
    blocks = {_parent(name): (name, count) for name, count in containers.items()}
    routers = {name for block, (held, count) in blocks.items() for name in _children(tree, block)
               if name != held and _scores_experts(tree[name], count)}
    slots = {_leaf(block) for block in blocks}
    # the shared experts' MLP classes: where a model has them, a dense layer's MLP is of one of them
    # (NemotronH's `mixer` slot holds the experts in some layers, and attention, Mamba or an MLP in the
    # others)
    shared = {type(tree[name]) for block, (held, _) in blocks.items() for name in _children(tree, block)
              if name != held and name not in routers and isinstance(tree[name], torch.nn.Module)
              and any(isinstance(m, torch.nn.Linear) for m in tree[name].modules())}
    layers = {_parent(block) for block in blocks}
    layer_lists = {_parent(layer) for layer in layers if _leaf(layer).isdigit()}

    found = []
    for name, module in tree.items():
        if name in routers:
            found.append(Part(name, "router", False))
            continue
        if name in containers:
            found.extend(Part(f"{name}.{p}", "experts", False) for p, value in
                         module.named_parameters(recurse=False) if value.dim() == 3)
        if not isinstance(module, torch.nn.Linear) or module is head or _under(name, routers):
            continue
        linear = type(module).forward is torch.nn.Linear.forward or not type(module).__module__.startswith(
            own_code)
        found.append(Part(name, _kind(name, tree, containers, blocks, slots, layer_lists, shared), linear))
    return found


def all_linear(model) -> list[str]:
    """`all-linear` on a mixture of experts: the names of its linear layers LoRA wraps, routers and head left
    out."""
    return [part.name for part in parts(model) if part.linear and part.kind != "router"]


def adapted(model) -> set[str]:
    """The names of `parts(model)` an adapter reaches: layers PEFT wrapped, and parameters it adapts
    (`target_parameters`: fused experts, or a router's weight, which names the router itself)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = set()
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or any(s in _WRAPPER_PARTS or s.startswith("lora_")
                                                         for s in name.split(".")):
            continue
        names.add(name)
        while isinstance(module, BaseTunerLayer):  # nested wrappers: one per adapted parameter
            if getattr(module, "parameter_name", None):
                names.add(f"{name}.{module.parameter_name}")
            module = module.base_layer
    return names


def in_layers(name: str, layers: set[int]) -> bool:
    """Whether module `name` sits in one of the decoder `layers` (by index)."""
    match = _LAYER_INDEX.match(name + ".")
    return match is not None and int(match["idx"]) in layers


def _kind(name, tree, containers, blocks, slots, layer_lists, shared) -> str:
    if _under(name, containers):
        return "experts"
    block = next((b for b in blocks if name.startswith(b + ".")), None)
    if block is not None:
        return "shared-expert MLP"
    layer_list = next((lst for lst in layer_lists if name.startswith(lst + ".")), None)
    if layer_list is None:
        return "other"
    layer = layer_list + "." + name[len(layer_list) + 1:].split(".", 1)[0]
    # the dense layers hold their MLP where the others hold the experts' block (`mlp`, `feed_forward`, ...)
    slot = next((f"{layer}.{slot}" for slot in slots if name.startswith(f"{layer}.{slot}.")), None)
    return "dense MLP" if slot is not None and (not shared or type(tree.get(slot)) in shared) else "attention"


def _tree(model):
    """(name, module) of the model's own modules, each PEFT-wrapped layer under its own name as the layer
    itself."""
    for name, module in model.named_modules():
        segments = name.split(".")
        if any(s in _WRAPPER_PARTS or s.startswith("lora_") for s in segments):
            continue
        while hasattr(module, "base_layer") and hasattr(module, "get_base_layer"):
            module = module.base_layer
        yield name, module


def _expert_containers(tree: dict, total: int) -> dict[str, int]:
    """Modules holding experts, with their count: fused 3-D parameters of the model's own modules (the first
    dimension counts the experts), or a list of `total` modules of one class that hold linear layers."""
    import torch

    found = {}
    for name, module in tree.items():
        if type(module).__module__.startswith("torch.") and not isinstance(module, torch.nn.ModuleList):
            continue
        fused = [p for p in module.named_parameters(recurse=False) if p[1].dim() == 3]
        if fused and not _leaf(name).isdigit():
            found[name] = fused[0][1].shape[0]
        # a list of experts sits inside a decoder layer (a numbered module above it): the decoder layers' own
        # list is no experts' list, even where the model has as many layers as experts
        elif isinstance(module, torch.nn.ModuleList) and total > 1 and len(module) == total \
                and any(part.isdigit() for part in name.split(".")) \
                and len({type(m) for m in module}) == 1 \
                and any(isinstance(m, torch.nn.Linear) for m in module[0].modules()):
            found[name] = total
    return found


def _scores_experts(module, count: int) -> bool:
    """A router: a module holding a 2-D weight with one row per expert (or one row: a shared expert's
    gate)."""
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    return weight is not None and weight.dim() == 2 and weight.shape[0] in (count, 1)


def _children(tree: dict, parent: str) -> list[str]:
    return [name for name in tree if _parent(name) == parent and name != parent]


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]
