"""The model names in the bodies the front (`front.py`) passes on: the one a request asks for, a request
renamed for the server, and an answer renamed back to the name the client asked for (streamed or whole)."""

from __future__ import annotations

import json


def requested_model(body: bytes):
    """The `model` a request names, None where it names none (or is not JSON)."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return None  # the server itself answers malformed requests
    return data.get("model") if isinstance(data, dict) else None


def with_model(body: bytes, model: str) -> bytes:
    """The request asking for `model` instead (the server knows an alias's version by its own name)."""
    return json.dumps({**json.loads(body), "model": model}).encode()


async def renamed(chunks, name: str, stream: bool):
    """The answer's bytes with the `model` it names said as `name`: each `data:` line of a stream as it
    passes, a whole answer once read (an error, which names no model, as it is)."""
    if not stream:
        yield named(b"".join([chunk async for chunk in chunks]), name)
        return
    pending = b""
    async for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        if lines:
            yield b"".join(named_line(line, name) + b"\n" for line in lines)
    if pending:
        yield named_line(pending, name)


def named_line(line: bytes, name: str) -> bytes:
    data = line[5:].strip() if line.startswith(b"data:") else b"[DONE]"
    return line if data == b"[DONE]" else b"data: " + named(data, name)


def named(body: bytes, name: str) -> bytes:
    try:
        answer = json.loads(body)
    except ValueError:
        return body
    if not isinstance(answer, dict) or "model" not in answer:
        return body
    return json.dumps({**answer, "model": name}).encode()
