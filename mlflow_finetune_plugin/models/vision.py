"""Vision-language models: whether a model takes images (asked of transformers, no family named), its processor,
and which of its modules are the language model.

The processor goes with the tokenizer: every stage already passes the tokenizer, and the few that must turn images
into inputs (training's collator, evaluation, the logged model, serving) ask `processor_of(tokenizer)`.
"""

from __future__ import annotations

import weakref
from pathlib import Path

_PROCESSORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def takes_images(config) -> bool:
    """Whether a model of this config takes images: transformers maps its config to an image-text-to-text model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES \
        and getattr(config, "vision_config", None) is not None


def has_processor_files(folder) -> bool:
    """Whether a saved model folder holds a processor (an image processor's or a processor's config)."""
    return any((Path(folder) / name).is_file() for name in _PROCESSOR_FILES)


def attach_processor(tokenizer, processor) -> None:
    _PROCESSORS[tokenizer] = processor


def processor_of(tokenizer):
    """The processor a vision-language model's tokenizer came with; None for a text model's tokenizer."""
    try:
        return _PROCESSORS.get(tokenizer)
    except TypeError:  # not weak-referenceable: no processor was attached to it
        return None


def load_processor(path, revision=None, trust_remote_code: bool = False):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)


def save_processor(processor, out_dir) -> None:
    processor.save_pretrained(str(out_dir))


def lora_target_modules(model, vision: bool = False):
    """PEFT target modules for `all-linear` on a vision-language model: the language model's linear layers (and,
    with `vision`, the tower's and projector's), never the output head. TEMPORARY: replaced by the tower lookup."""
    import torch

    tower = ("vision_tower", "vision_model", "visual", "multi_modal_projector", "connector")
    out = getattr(model, "get_output_embeddings", lambda: None)()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is out:
            continue
        if not vision and any(part in tower for part in name.split(".")):
            continue
        names.append(name)
    return names
