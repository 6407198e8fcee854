"""One model call read from its trace: a CHAT_MODEL span's request and answer in each shape MLflow's
autologging records (OpenAI chat completions, the Responses API, text in and out), its messages in the
canonical form, its images read back from the trace's attachments, and why a span makes no row (`traces.py`
reads the experiment)."""

from __future__ import annotations

from mlflow_finetune_plugin.data.trace_images import NoImage, content_parts, has_image, with_images
from mlflow_finetune_plugin.data.trace_rows import CUT, EMPTY, FAILED, IMAGE, UNKNOWN, Call, call_cost


def _text(content) -> str | None:
    """Message content as text: a string, or a list of text parts; None for other parts (images, audio)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict)]
        if all(isinstance(t, str) for t in texts) and len(texts) == len(content):
            return "".join(texts)
    return None


def _content(content, role: str):
    """A message's content as the formats carry it: text, or (a user's message with images) OpenAI chat parts
    whose images are as traced (`trace_images.with_images` reads them back); None for what neither holds
    (audio)."""
    text = _text(content)
    if text is not None or content is None or role != "user" or not isinstance(content, list):
        return text
    return content_parts(content)


def message_of(m) -> dict | None:
    """An OpenAI chat message in the project's chat format; None where it holds what the formats do not
    carry."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        return None
    role = "system" if m["role"] == "developer" else m["role"]
    content = _content(m.get("content"), role)
    if role not in ("system", "user", "assistant",
                    "tool") or content is None and m.get("content") is not None:
        return None
    out = {"role": role, "content": content}
    calls = m.get("tool_calls")
    if role == "assistant" and calls:
        out["tool_calls"] = [{k: c[k] for k in ("id", "type", "function") if k in c} for c in calls
                             if isinstance(c, dict)]
    if role == "tool" and m.get("tool_call_id"):
        out["tool_call_id"] = m["tool_call_id"]
    if m.get("name") and role in ("tool", "user"):
        out["name"] = m["name"]
    return out


def _openai_chat(inputs: dict, outputs) -> tuple | None:
    if not (isinstance(inputs.get("messages"), list) and isinstance(outputs, dict)
            and isinstance(outputs.get("choices"), list)):
        return None
    choice = outputs["choices"][0] if outputs["choices"] else {}
    return inputs["messages"], choice.get("message") or {}, inputs.get("tools"), choice.get("finish_reason")


def _openai_responses(inputs: dict, outputs) -> tuple | None:
    if not (isinstance(outputs, dict) and isinstance(outputs.get("output"), list) and "input" in inputs):
        return None
    items = inputs["input"] if isinstance(inputs["input"],
                                          list) else [{"role": "user", "content": inputs["input"]}]
    messages = [{"role": "system", "content": inputs["instructions"]}] if inputs.get("instructions") else []
    for item in items:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "function_call":
            messages.append({"role": "assistant", "content": None, "tool_calls": [_response_call(item)]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "content": item.get("output"),
                             "tool_call_id": item.get("call_id")})
        else:
            messages.append(item)
    answer, calls = {"role": "assistant", "content": ""}, []
    for item in outputs["output"]:
        if item.get("type") == "message":
            answer["content"] += _text([{"text": p.get("text")} for p in item.get("content") or []]) or ""
        elif item.get("type") == "function_call":
            calls.append(_response_call(item))
    if calls:
        answer["tool_calls"] = calls
    cut = (outputs.get("incomplete_details") or {}).get("reason") == "max_output_tokens"
    tools = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                               if k in t}} for t in inputs.get("tools") or []
             if isinstance(t, dict) and t.get("type") == "function"]
    return messages, answer, tools or None, "length" if cut else "stop"


def _response_call(item: dict) -> dict:
    return {"id": item.get("call_id"), "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}


def _text_out(inputs: dict, outputs) -> tuple | None:
    if isinstance(inputs.get("messages"), list) and isinstance(outputs, str):
        return inputs["messages"], {"role": "assistant", "content": outputs}, inputs.get("tools"), None
    return None


_READERS = (_openai_chat, _openai_responses, _text_out)


def read_call(trace_id: str, span) -> Call:
    """A CHAT_MODEL span as a Call (its `problem` says why it makes no row)."""
    call = Call(trace_id, span.span_id, span.start_time_ns or 0, [], None)
    inputs, outputs = span.inputs if isinstance(span.inputs, dict) else {}, span.outputs
    if str(getattr(span.status, "status_code", "")).endswith("ERROR"):
        call.problem = FAILED
        return call
    parsed = next((got for reader in _READERS if (got := reader(inputs, outputs)) is not None), None)
    if parsed is None:
        call.problem = UNKNOWN
        return call
    messages, answer, tools, call.finish_reason = parsed
    prompt = [message_of(m) for m in messages]
    call.answer = message_of({"role": "assistant", **answer}) if isinstance(answer, dict) else None
    if any(m is None for m in prompt) or call.answer is None:
        call.problem = UNKNOWN
        return call
    call.prompt, call.tools, call.cost = prompt, tools or None, call_cost(span, inputs, outputs)
    if call.finish_reason == "length":
        call.problem = CUT
    elif not (call.answer.get("content") or "").strip() and not call.answer.get("tool_calls"):
        call.problem = EMPTY
    return call


def read_images(call: Call, trace_info) -> None:
    """The call's images as data URLs (its attachments read back); a call with an image the trace does not
    hold makes no row (its reason counted)."""
    if call.problem in (FAILED, UNKNOWN) or not has_image(call.prompt):
        return
    try:
        call.prompt = with_images(call.prompt, trace_info)
    except NoImage:
        call.problem = IMAGE


def unknown_shape(span) -> str:
    """What an unreadable span holds, for the error message."""
    inputs = sorted(span.inputs) if isinstance(span.inputs, dict) else type(span.inputs).__name__
    outputs = sorted(span.outputs) if isinstance(span.outputs, dict) else type(span.outputs).__name__
    return f"span {span.name!r}: inputs {inputs}, outputs {outputs}"
