"""PEFT keeps the linear layers an adapter names, on every mixture of experts.

With transformers 5, PEFT 0.21 converts an adapter's targets on the families whose experts transformers
re-fused (the model types its conversion table maps to Mixtral or Qwen2-MoE: Qwen3-MoE, DeepSeek V2/V3,
GLM-4-MoE, OLMoE, ...), so that an adapter trained on transformers 4's per-expert linears loads. It does so by
name: any target that is or ends in `gate_proj`, `up_proj`, `down_proj` (`w1`, `w2`, `w3`) becomes the fused
experts' parameters, and `gate` the router's weight. A dense layer's MLP and a shared expert carry the same
names, so they lose their LoRA, in training and again whenever the saved adapter is loaded
(huggingface/peft#3711; the fix proposed there keeps dotted names of linear layers the model has, which is
what `keep_module_targets` does).

`keep_module_targets()` wraps that conversion once per process: a target with a dot that names nn.Linear
layers of the model as it is (exact or as a suffix, PEFT's own matching) is held out of the conversion and put
back after it; bare names and transformers-4 paths (`experts.0.w1`, no such layer now) are converted as
before. The adapters this project saves name every layer in full (`models/moe_parts.all_linear`), so training
and every later load agree.
"""

from __future__ import annotations

_installed = False


def keep_module_targets() -> None:
    """Install the wrapper (idempotent); a PEFT without the conversion is left alone."""
    global _installed
    if _installed:
        return
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:
        return
    convert = getattr(conversion, "convert_peft_config_for_transformers", None)
    if convert is None:
        return

    def keeping_module_targets(peft_config, model, *args, **kwargs):
        if made_for_fused_experts(peft_config, model):
            return None
        targets = getattr(peft_config, "target_modules", None)
        kept = linear_targets(targets, model) if targets and not isinstance(targets, str) else set()
        if kept:
            peft_config.target_modules = set(targets) - kept
        try:
            return convert(peft_config, model, *args, **kwargs)
        finally:
            if kept:
                peft_config.target_modules = set(peft_config.target_modules or ()) | kept

    convert_weights = conversion.convert_peft_adapter_state_dict_for_transformers

    def keeping_weights(model, peft_config, adapter_state_dict, **kwargs):
        # The saved weights' names are converted on load as the config is: a shared expert's `gate_proj` LoRA
        # was renamed as if it were a transformers-4 expert's, and the shared expert loaded with its initial
        # LoRA instead, silently (the reloaded model's logits differed from the trained model's).
        if made_for_fused_experts(peft_config, model):
            return adapter_state_dict
        return convert_weights(model=model, peft_config=peft_config, adapter_state_dict=adapter_state_dict,
                               **kwargs)

    # PEFT imports the function from this module at each call (tuners_utils.inject_adapter), so this reaches
    # it
    conversion.convert_peft_config_for_transformers = keeping_module_targets
    conversion.convert_peft_adapter_state_dict_for_transformers = keeping_weights
    _installed = True


def made_for_fused_experts(peft_config, model) -> bool:
    """Whether an adapter was made on transformers 5's layout, so nothing of it is converted: it names fused
    experts as parameters (transformers 4 had none), or every target is a full name of a linear layer the
    model has now. Converting such an adapter doubles the experts' rank (gate and up were two LoRAs in 4) and
    renames the dense and shared-expert MLPs' weights as experts'."""
    if getattr(peft_config, "target_parameters", None):
        return True
    targets = getattr(peft_config, "target_modules", None)
    if not targets or isinstance(targets, str):
        return False
    return linear_targets(targets, model) == set(targets)


def linear_targets(targets, model) -> set[str]:
    """The dotted entries of `targets` that name nn.Linear layers of `model`, exactly or as a name's
    suffix."""
    import torch

    dotted = {t for t in targets if "." in t}
    if not dotted:
        return set()
    # a layer an earlier adapter wrapped is the nn.Linear under its `base_layer`: named as the layer
    linears = [name.replace(".base_layer", "") for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)]
    return {t for t in dotted if any(name == t or name.endswith("." + t) for name in linears)}


def load_adapter(base, folder, **kwargs):
    """`PeftModel.from_pretrained(base, folder, **kwargs)` with the module targets kept
    (`keep_module_targets`)."""
    from peft import PeftModel

    keep_module_targets()
    return PeftModel.from_pretrained(base, str(folder), **kwargs)
