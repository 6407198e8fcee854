"""What a vision-language model is, asked of transformers and of the model itself: the one module that knows.

- `takes_images(config)`: whether a model generates text from images, by whether transformers maps its config
to an
  image-text-to-text model and the config has a vision tower's. No family is named here.
- `processor_of(tokenizer)`: the processor goes with the tokenizer: every stage already passes the tokenizer,
and the
  few that must turn images into inputs (training's collator, evaluation, the logged model, serving) ask for
  it; training asks `processor_for_images`, which refuses a text model given rows with images.
- `load_processor` / `save_processor`: the processor (tokenizer, image processor, chat template). Many
processors
  (Qwen2/2.5/3-VL, Qwen3.5, Gemma 4, SmolVLM2, InternVL, GLM-4V) build a video processor that needs
  torchvision, and torchvision cannot be installed beside torch+cpu here (PyPI's is a CUDA build that fails to
  import). Where `AutoProcessor` fails for that reason, the processor is built without its video processor
  (`without_video`): its PIL image processor and tokenizer work, and it refuses videos. A processor without
  video saves with `save_pretrained` under its real class name, with its image processor's settings for the
  video processor, so that a machine with torchvision can load the folder as the real processor (not tried:
  torchvision is not installable here).
- `load_vision_model`: `AutoModelForImageTextToText`.
- `vision_modules` / `language_model_modules` / `lora_target_modules`: where the vision tower and the
projector end
  and the language model begins, found from the model's structure (transformers' own
  `get_encoder(modality="image")` and `get_decoder()`, the projector being what the decoder's parent holds
  beside them), so LoRA adapts the language model only unless asked (LLaMA-Factory freezes tower and projector
  by default; PEFT's `all-linear` takes them all).
"""

from __future__ import annotations

import inspect
import os
import weakref
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError

_WITHOUT_VIDEO = "WithoutVideo"
_without_video_classes: dict[type, type] = {}
_PROCESSORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def takes_images(config) -> bool:
    """Whether the model of `config` (a config, or a model carrying one) takes images: transformers maps its
    config to an image-text-to-text model, and it has a vision tower's config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = getattr(config, "config", config)
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


def processor_for_images(tokenizer, model_name: str | None):
    """The processor that turns training rows' images into the model's inputs (`processor_of(tokenizer)`); a
    FinetuneError naming model.name where the model reads text only."""
    processor = processor_of(tokenizer)
    if processor is None:
        raise FinetuneError(
            f"the training data has images, but {model_name} reads text only: name a vision-language "
            "model with model.name (one whose processor takes images: SmolVLM, Qwen2-VL, LLaVA, "
            "Gemma 3 4B and up, ...), or leave the images out")
    return processor


def load_vision_model(path: str | os.PathLike, dtype=None, **kwargs):
    """The image-text-to-text model at `path` (a folder or a hub id; a built-in model's folder is
    `models.base.resolve_model_path(name)`); extra kwargs go to `from_pretrained`."""
    from transformers import AutoModelForImageTextToText

    from mlflow_finetune_plugin.models.attention import native_gqa_on_cpu

    native_gqa_on_cpu()
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        return AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)
    except OSError as e:
        raise FinetuneError(_not_found(path, e)) from None


def load_processor(path_or_id: str | os.PathLike, revision: str | None = None,
                   trust_remote_code: bool = False):
    """The processor of a vision model (a folder or a hub id). Where `AutoProcessor` fails because the
    processor's video processor needs torchvision, the same processor class is built without a video processor
    (one line says so); a processor that cannot do without one raises a FinetuneError that says what to do."""
    from transformers import AutoProcessor

    path = str(path_or_id)
    try:
        return AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    # transformers says "requires the Torchvision library" or "Missing ..."
    except (ImportError, ValueError) as e:
        if "torchvision" not in str(e).lower():
            raise
        needs = first_line(e)
    except OSError as e:
        # a folder saved without a video processor's settings, by a processor built without one
        if not str(e).startswith("Can't load video processor"):
            raise FinetuneError(_not_found(path_or_id, e)) from None
        needs = first_line(e)
    cls = _processor_class(path, revision, trust_remote_code)
    fix = (
        "install the torchvision built for this torch (for a CPU torch, the CPU wheel of the matching "
        "release: `pip install torchvision --index-url https://download.pytorch.org/whl/cpu`), or fine-tune "
        "a model whose processor works with PIL images alone")
    if cls is None or "video_processor" not in inspect.signature(cls.__init__).parameters:
        raise FinetuneError(f"cannot load the processor of {str(path_or_id)!r}: {needs}\nTo fix: {fix}.")
    try:
        processor = without_video(cls).from_pretrained(path, revision=revision,
                                                       trust_remote_code=trust_remote_code)
    except (ImportError, ValueError) as e:  # its image processor needs torchvision too (it has no PIL one)
        if "torchvision" not in str(e).lower():
            raise
        raise FinetuneError(
            f"cannot load the processor of {str(path_or_id)!r}, with or without its video processor: "
            f"{first_line(e)}\nTo fix: {fix}.") from None
    print(
        f"{path_or_id}: {cls.__name__}'s video processor needs torchvision, which is not installed: loaded "
        "its tokenizer and PIL image processor without it (images work, videos are refused)")
    return processor


def save_processor(processor, out_dir: str | os.PathLike) -> None:
    """Save a processor (tokenizer, image processor, chat template) so that `load_processor` reloads it. A
    processor built without its video processor (`without_video`) is saved under its real class name, with
    settings for the video processor, so that where torchvision is installed `AutoProcessor` can build the
    real processor from the folder."""
    import json

    processor.save_pretrained(str(out_dir))
    if not _lacks_video(processor):
        return
    # transformers reads a video processor's settings from processor_config.json, else from the image
    # processor's (what a hub folder of Qwen2-VL's time holds, `preprocessor_config.json`, and how
    # transformers reads it): the image processor's settings, under which a machine with torchvision builds
    # the family's video processor.
    path = Path(out_dir) / "processor_config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved["video_processor"] = dict(saved["image_processor"])
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def without_video(processor_class: type) -> type:
    """`processor_class` without its `video_processor`: a subclass that does not list one among its parts, so
    that transformers' processor machinery (which builds, checks, saves and loads the parts a processor lists)
    leaves it out; the constructor's `video_processor` stays None. It keeps the class's name (a saved folder
    names the real class); pickle finds it in this module as `<Name>WithoutVideo`."""
    if processor_class in _without_video_classes:
        return _without_video_classes[processor_class]

    def get_attributes(cls):
        return [name for name in processor_class.get_attributes() if name != "video_processor"]

    def from_args_and_dict(cls, args, processor_dict, **kwargs):
        # a folder saved for torchvision machines holds a video processor's settings: not a constructor
        # argument
        processor_dict = {k: v for k, v in processor_dict.items() if k != "video_processor"}
        return processor_class.from_args_and_dict.__func__(cls, args, processor_dict, **kwargs)

    cls = type(processor_class.__name__, (processor_class,), {
        "get_attributes": classmethod(get_attributes), "from_args_and_dict": classmethod(from_args_and_dict),
        "__module__": __name__, "__qualname__": processor_class.__name__ + _WITHOUT_VIDEO,
        "__doc__": f"{processor_class.__name__} without a video processor (models/vision.py: "
                   "without_video)."})
    _without_video_classes[processor_class] = cls
    return cls


def __getattr__(name: str):
    # pickle looks a processor built by `without_video` up by its qualified name, in a process that may not
    # have built it yet
    if name.endswith(_WITHOUT_VIDEO):
        import transformers

        return without_video(getattr(transformers, name[:-len(_WITHOUT_VIDEO)]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _not_found(name, err) -> str:
    return (
        f"could not load {str(name)!r}: {err}\nGive a hub id you can reach (check HF_TOKEN for gated models, "
        "HF_HUB_OFFLINE for offline machines) or a local folder made with save_pretrained; a built-in model "
        "by its folder (`models.base.resolve_model_path`: tiny-llava, tiny-smolvlm, tiny-gemma3-vision, "
        "tiny-qwen2-vl).")


def first_line(err: BaseException, limit: int | None = None) -> str:
    """An exception's first line (its type's name where it says nothing), cut to `limit` characters."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]


def _lacks_video(processor) -> bool:
    """Whether `processor` is of a class built by `without_video`."""
    return type(processor) in _without_video_classes.values()


def _processor_class(path: str, revision: str | None, trust_remote_code: bool) -> type | None:
    """The processor class a folder names (as AutoProcessor reads it: processor_config.json, then the older
    files), else the one transformers maps the model's config to; None where neither says."""
    import json

    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name
    from transformers.utils import cached_file

    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        found = cached_file(path, file, revision=revision, _raise_exceptions_for_missing_entries=False)
        if found and (name := json.loads(open(found, encoding="utf-8").read()).get("processor_class")):
            return processor_class_from_name(name)
    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
    return processor_class_from_name(name) if name else None


# --- where the vision tower and projector end and the language model begins
# ----------------------------------------

def vision_modules(model) -> list[str]:
    """The module names (prefixes) of the vision tower and of the projector(s) that map its features into the
    language model (`model.vision_tower` and `model.multi_modal_projector`, `model.vision_model` and
    `model.connector`, `model.visual` with its merger, ... as the model has them)."""
    tower, projectors, _ = _parts(model)
    return [tower, *projectors]


def language_model_modules(model) -> list[str]:
    """The module names (prefixes) of the language model: its decoder and its output layer."""
    return _parts(model)[2]


def lora_target_modules(model, vision: bool = False) -> list[str]:
    """PEFT `target_modules` for every linear layer of the language model (its output layer left out, as
    PEFT's `all-linear` does) and, with `vision`, also of the vision tower and the projector: full module
    names, so that nothing outside them matches by suffix."""
    import torch

    tower, projectors, language = _parts(model)
    output = _name_of(model, model.get_output_embeddings())
    prefixes = [p for p in language if p != output] + ([tower, *projectors] if vision else [])
    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and name != output and _under(name, prefixes))


def _parts(model) -> tuple[str, list[str], list[str]]:
    """(vision tower, projectors, language model) module names of a vision-language model (or of a PeftModel
    of one: the names are those of the model given)."""
    tower = _name_of(model, model.get_encoder(modality="image"))
    decoder = _name_of(model, model.get_decoder())
    # transformers answers the model itself, or the module holding both, where it finds no tower
    if not tower or not decoder or _under(decoder, [tower]) or _under(tower, [decoder]):
        raise FinetuneError(
            f"{type(model).__name__} has no vision tower and language model that transformers can find "
            "(`get_encoder(modality='image')`, `get_decoder()`): it is not a vision-language model, or one "
            "this version of transformers does not lay out so; load it with load_vision_model, or train its "
            "language model as a text model.")
    # The projector: what the module holding the decoder holds beside it and the tower, where it has weights.
    parent = decoder.rpartition(".")[0]
    projectors = [f"{parent}.{name}" if parent else name
                  for name, child in model.get_submodule(parent).named_children()
                  if any(True for _ in child.parameters())]
    projectors = [p for p in projectors if p != decoder and not _under(tower, [p]) and not _under(p, [tower])]
    language = [decoder]
    if (head := model.get_output_embeddings()) is not None:
        language.append(_name_of(model, head))
    return tower, projectors, language


def _name_of(model, module) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None)


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def unquantized_modules(config) -> list[str]:
    """What stays in full precision when a vision-language model's base loads in 4 or 8 bits: the vision
    tower, the projector and the output layer (LLaMA-Factory and Unsloth quantize the language model only;
    bitsandbytes' CPU kernels also fail on a tiny tower's narrow layers). Found on a model built on the meta
    device."""
    model = _meta_model(config)
    return [*vision_modules(model), _name_of(model, model.get_output_embeddings())]


def config_vision_modules(config) -> list[str]:
    """`vision_modules` of the model `config` describes (no weights: built on the meta device)."""
    return vision_modules(_meta_model(config))


def _meta_model(config):
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)
