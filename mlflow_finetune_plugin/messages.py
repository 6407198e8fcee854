"""Chat message helpers shared by evaluation, serving and the playground. Bottom layer: imports nothing from the
package (and nothing heavy, so a command that only serves or lists does not pay for torch or mlflow here)."""

from __future__ import annotations


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
