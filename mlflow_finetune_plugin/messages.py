"""Chat message helpers shared by evaluation, serving and the playground. Bottom layer: imports nothing from the
package (and nothing heavy, so a command that only serves or lists does not pay for torch or mlflow here)."""

from __future__ import annotations


def split_conversation(messages: list[dict]) -> tuple[list[dict], str] | None:
    """(prompt, reference): every message before the last assistant message, and that message's text."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return [dict(m) for m in messages[:i]], text_of(messages[i].get("content"))
    return None


def text_of(content) -> str:
    """Message content as plain text: a string, or a list of parts ({"type": "text", "text": ...}) as chat UIs
    and OpenAI clients send it; parts without text (images, files) are dropped, None is ""."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    return "".join(text_of(part) for part in content)
