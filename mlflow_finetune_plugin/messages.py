"""Chat message helpers shared by evaluation, serving and the playground. Bottom layer: imports nothing from
the package (and nothing heavy, so a command that only serves or lists does not pay for torch or mlflow
here)."""

from __future__ import annotations


def split_conversation(messages: list[dict]) -> tuple[list[dict], str] | None:
    """(prompt, reference): every message before the last assistant message, and that message's text."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return [dict(m) for m in messages[:i]], text_of(messages[i].get("content"))
    return None


def text_of(content, sep: str = "") -> str:
    """Message content as plain text: a string, or a list of parts ({"type": "text", "text": ...}) as chat UIs
    and OpenAI clients send it, their texts joined by `sep`; parts without text (images, files) are dropped,
    None is "". The retriever joins parts with a newline (`sep="\\n"`): words of two parts stay two words."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    return sep.join(text for text in (text_of(part) for part in content) if text)


def last_user_index(messages: list[dict]) -> int | None:
    """The index of the last user turn (the question a conversation asks), None when there is none."""
    return max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)


def last_user_text(messages: list[dict], sep: str = "") -> str:
    """The last user turn's text (`text_of`), "" when there is none."""
    last = last_user_index(messages)
    return "" if last is None else text_of(messages[last].get("content"), sep)


# The part types that hold an image: the canonical placeholder and transformers' parts ("image"), OpenAI's
# chat parts ("image_url") and its Responses API parts ("input_image").
IMAGE_PART_TYPES = ("image", "image_url", "input_image")


def image_count(content) -> int:
    """How many image parts a message's content holds (0 for a string or None)."""
    if isinstance(content, dict):
        return int(content.get("type") in IMAGE_PART_TYPES)
    if isinstance(content, list):
        return sum(image_count(part) for part in content if isinstance(part, dict))
    return 0


def text_messages(messages: list[dict]) -> list[dict]:
    """The messages with each list-of-parts content as its text (image parts dropped): what a text-only
    tokenizer's chat template renders, for counting text tokens."""
    return [{**m, "content": text_of(m["content"])} if isinstance(m, dict) and isinstance(m.get("content"),
                                                                                          list) else m
            for m in messages]


def fewshot_prompt(prompt: list[dict], shots: list[list[dict]]) -> list[dict]:
    """The prompt with `shots` (whole conversations) as earlier turns, after the prompt's system
    message(s)."""
    system = [m for m in prompt if m.get("role") == "system"]
    turns = [m for shot in shots for m in shot if m.get("role") != "system"]
    return system + turns + [m for m in prompt if m.get("role") != "system"]


def with_instruction(prompt: list[dict], instruction: str | None) -> list[dict]:
    """`prompt` with `instruction` after its system message's text (a system message of its own where it has
    none)."""
    if not instruction:
        return prompt
    for i, message in enumerate(prompt):
        if message.get("role") == "system":
            content = message.get("content")
            joined = (f"{content}\n\n{instruction}" if isinstance(content, str)
                      else [*(content or []), {"type": "text", "text": f"\n\n{instruction}"}])
            return [*prompt[:i], {**message, "content": joined}, *prompt[i + 1:]]
    return [{"role": "system", "content": instruction}, *prompt]
