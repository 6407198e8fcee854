"""The chat templates the package ships, verbatim, for `model.chat_template` (a base model has none of its
own).

Each file in `assets/chat_templates/` is the model vendor's own template, byte for byte; nothing in a file
says where it came from (the text must stay verbatim), so `ORIGINS` below does. Where TRL ships the same
template, the file is a copy of TRL's (tests/test_families.py checks that they are equal), which TRL in turn
keeps equal to the model's tokenizer_config.json on the hub (its weekly `scripts/check_chat_templates.py`).

Licences: TRL is Apache-2.0. The templates come from the model vendors' repositories, under the models' own
terms: Qwen2.5, Qwen3 and Qwen3.5 Apache-2.0, Mistral-7B-Instruct-v0.3 Apache-2.0, Phi-3.5-mini-instruct MIT,
gpt-oss Apache-2.0, Gemma 3 the Gemma Terms of Use, Llama 3.2 the Llama 3.2 Community License (both allow
redistribution with their notices), Gemma 4 the terms on google/gemma-4-*'s model card (not checked from here:
no hub access).
`assets/chat_templates/README.md` lists them for anyone who ships this package.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from mlflow_finetune_plugin.errors import FinetuneError

KEY = "model.chat_template"

BUNDLED: tuple[str, ...] = ("chatml", "llama3", "qwen", "qwen3", "gemma", "mistral", "phi3", "gemma4",
                            "qwen3_5", "qwen3_5_think", "gptoss")

# Where each file's text was taken from (and what it is the template of).
ORIGINS: dict[str, str] = {
    "chatml": "this package: models/tiny.py CHAT_TEMPLATE (plain ChatML, the built-in tiny model's and "
              "smollm2's rendering, with {% generation %} markers around each reply and its <|im_end|>)",
    "llama3": "meta-llama/Llama-3.2-1B-Instruct tokenizer_config.json, as TRL 1.16 ships it: "
              "trl/chat_templates/llama3_2.jinja",
    "qwen": "Qwen/Qwen2.5-*-Instruct tokenizer_config.json, as TRL 1.16 ships it: "
            "trl/chat_templates/qwen2_5.jinja",
    "qwen3": "Qwen/Qwen3-* tokenizer_config.json, as TRL 1.16 ships it: trl/chat_templates/qwen3.jinja",
    "gemma": "google/gemma-3-*-it tokenizer_config.json, as TRL 1.16 ships it: "
             "trl/chat_templates/gemma3.jinja",
    "phi3": "microsoft/Phi-3.5-mini-instruct tokenizer_config.json, as TRL 1.16 ships it: "
            "trl/chat_templates/phi3_5.jinja",
    # TRL has no Mistral template. This is Mistral's "v3" template (Mistral-7B-Instruct-v0.3, also
    # Mixtral-8x22B and Mistral-Large-2407), taken from llama.cpp's tests/test-chat-template.cpp (the entry
    # llama.cpp calls "mistralai 'v3' template"; read from the copy vendored in llama-cpp-python 0.3.36's
    # sdist, vendor/llama.cpp), where it is a C string literal, decoded. The same text is what
    # lmstudio-community/Mistral-7B-Instruct-v0.3-GGUF embeds from the hub repo.
    "mistral": "mistralai/Mistral-7B-Instruct-v0.3 tokenizer_config.json (Mistral's v3 template), via "
               "llama.cpp tests/test-chat-template.cpp",
    # TRL keeps five revisions of Gemma 4's template; gemma4_v5 is what google/gemma-4-E2B-it ships now
    # (8995379), the only one that renders the reasoning of a final assistant turn (so a row's reasoning can
    # be trained).
    "gemma4": "google/gemma-4-E2B-it chat_template.jinja at 8995379 (the current revision), as TRL 1.16 "
              "ships it: trl/chat_templates/gemma4_v5.jinja",
    "qwen3_5": "Qwen/Qwen3.5-0.8B and -2B chat template (thinking off by default), as TRL 1.16 ships it: "
               "trl/chat_templates/qwen3_5_nothink.jinja",
    "qwen3_5_think": "Qwen/Qwen3.5-4B and larger chat template (thinking on by default), as TRL 1.16 ships "
                     "it: trl/chat_templates/qwen3_5_think.jinja",
    "gptoss": "openai/gpt-oss-20b and -120b chat template (harmony), as TRL 1.16 ships it: "
              "trl/chat_templates/gptoss.jinja",
}


# The templates of the vision families' processors (`tiny_vision.py`): they render image parts as the family's
# placeholder, and take content as a list of parts only, so they are not choices for `model.chat_template`
# (Gemma 3's is the bundled `gemma`, which renders images too).
VISION: tuple[str, ...] = ("llava", "smolvlm", "qwen2_vl")

VISION_ORIGINS: dict[str, str] = {
    "llava": "llava-hf/llava-1.5-7b-hf chat_template.json, as transformers' "
             "tests/models/llava/test_processing_llava.py quotes it (prepare_processor_dict) and, "
             "identically, openvino.genai src/cpp/src/tokenizer.cpp (\"llava-1.5, llava-v1.6-vicuna "
             "(chat_template.json)\")",
    "smolvlm": "HuggingFaceTB/SmolVLM-Instruct (SmolVLM v1; SmolVLM2 ships the same text), as TRL 1.16 ships "
               "it: trl/chat_templates/smolvlm.jinja",
    "qwen2_vl": "Qwen/Qwen2-VL-2B-Instruct (byte-identical to Qwen2.5-VL's), as TRL 1.16 ships it: "
                "trl/chat_templates/qwen2_5_vl.jinja",
}


class TemplateTokens(NamedTuple):
    """What a template writes around turns. `end_of_turn` closes an assistant reply; None means the template
    writes the tokenizer's own `eos_token` there (Mistral's does), so it is whatever that tokenizer's eos is.
    `control` lists the tokens the template writes as literal text in a conversation without tools: a
    tokenizer must have each as one token, and a base model must learn it."""

    end_of_turn: str | None
    control: tuple[str, ...]


_CHATML = TemplateTokens("<|im_end|>", ("<|im_start|>", "<|im_end|>"))

TEMPLATE_TOKENS: dict[str, TemplateTokens] = {
    "chatml": _CHATML,
    "qwen": _CHATML,
    # Qwen3 writes an empty <think></think> block before the last reply of a conversation.
    "qwen3": TemplateTokens("<|im_end|>", ("<|im_start|>", "<|im_end|>", "<think>", "</think>")),
    # The template writes bos_token itself: whichever the tokenizer has, so it is not listed.
    "llama3": TemplateTokens("<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "gemma": TemplateTokens("<end_of_turn>", ("<start_of_turn>", "<end_of_turn>")),
    "mistral": TemplateTokens(None, ("[INST]", "[/INST]")),
    "phi3": TemplateTokens("<|end|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    "gemma4": TemplateTokens("<turn|>", ("<|turn>", "<turn|>")),
    # Both write a think block (empty or not) ahead of the last reply; the generation prompt of `qwen3_5`
    # closes it.
    "qwen3_5": TemplateTokens("<|im_end|>", ("<|im_start|>", "<|im_end|>", "<think>", "</think>")),
    "qwen3_5_think": TemplateTokens("<|im_end|>", ("<|im_start|>", "<|im_end|>", "<think>", "</think>")),
    # Harmony: the final answer ends with <|return|>, earlier messages with <|end|>.
    "gptoss": TemplateTokens("<|return|>", ("<|start|>", "<|channel|>", "<|message|>", "<|end|>",
                                            "<|return|>")),
}


def bundled_template(name: str) -> str:
    """The text of a bundled template, exactly as shipped."""
    if name not in BUNDLED:
        raise FinetuneError(_unknown(name))
    path = resources.files("mlflow_finetune_plugin") / "assets" / "chat_templates" / f"{name}.jinja"
    # newline="" keeps the bytes as they are (no newline translation): the text must equal the vendor's.
    with path.open("r", encoding="utf-8", newline="") as f:
        return f.read()


def vision_template(name: str) -> str:
    """The text of a vision family's processor template (`VISION`) or of a bundled one, exactly as shipped."""
    if name in BUNDLED:
        return bundled_template(name)
    if name not in VISION:
        raise FinetuneError(f"{name!r} is not a vision template; the vision templates: {', '.join(VISION)}")
    path = resources.files("mlflow_finetune_plugin") / "assets" / "chat_templates" / f"{name}.jinja"
    with path.open("r", encoding="utf-8", newline="") as f:
        return f.read()


def read_template(value: str, base_dir: Path | None = None) -> str:
    """The template `model.chat_template` names: a bundled one by name, or a `.jinja` file (a relative path is
    relative to `base_dir`, the project folder)."""
    value = value.strip()
    if value in BUNDLED:
        return bundled_template(value)
    path = Path(value).expanduser()
    relative = not path.is_absolute() and base_dir is not None
    if relative:
        path = Path(base_dir) / path
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if _looks_like_path(value):
        where = f" (looked in {base_dir})" if relative else ""
        raise FinetuneError(
            f"{KEY}: file not found: {value}{where}. Give a .jinja file, or a bundled template: "
            f"{', '.join(BUNDLED)}")
    raise FinetuneError(_unknown(value))


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.startswith(("~", ".")) or Path(value).suffix != ""


def _unknown(name: str) -> str:
    near = difflib.get_close_matches(name.lower(), BUNDLED, n=1, cutoff=0.5)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    return (
        f"{KEY}: {name!r} is not a bundled template.{hint} Bundled: {', '.join(BUNDLED)}; or give the path "
        "of a .jinja file (relative to the project folder).")
