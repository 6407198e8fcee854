"""The rows made of traced model calls (`traces.py` reads the calls): one chat row per conversation,
preference pairs and labelled rows from feedback and expectations, prompts for grpo."""

from __future__ import annotations

import json
from dataclasses import dataclass

from mlflow_finetune_plugin.messages import text_of

# Why a trace was left out, as the report says it.
FAILED, NO_CALL, UNKNOWN, EMPTY, CUT, NEGATIVE, UNRATED, UNPAIRED = (
    "failed (trace state ERROR)", "no CHAT_MODEL span", "model calls in a message format not read here",
    "empty answer", "answer cut off at the length limit (finish_reason length)", "negative feedback",
    "no feedback", "no answer of the opposite feedback to the same prompt")
REPEATED = "prompt sent before"
IMAGE = "an image the trace does not hold (its attachment missing, or a file path)"


@dataclass
class Call:
    """One model call: the messages it was given, its answer, and what the trace's assessments say about
    it."""

    trace_id: str
    span_id: str
    start_ns: int
    prompt: list[dict]
    answer: dict | None
    tools: list | None = None
    finish_reason: str | None = None
    problem: str | None = None       # why it makes no row (failed, empty, cut, unknown format)
    verdict: bool | None = None      # feedback: True up, False down, None none
    correction: dict | None = None   # an expectation: the answer to learn instead
    group: str = ""                  # the conversation it belongs to
    cost: dict | None = None         # model, prompt_tokens, completion_tokens, latency_s (`call_cost`)

    @property
    def conversation(self) -> list[dict]:
        return self.prompt + [self.answer]

    @property
    def target(self) -> dict:
        return self.correction or self.answer


def call_cost(span, inputs: dict, outputs) -> dict:
    """What a CHAT_MODEL span says the call cost: the model's name (MLflow's `mlflow.llm.model` attribute,
    else the call's `model` argument or the response's), its token usage (`mlflow.chat.tokenUsage`, else the
    response's `usage`; None where neither says) and the span's duration in seconds."""
    usage = span.get_attribute("mlflow.chat.tokenUsage") or {}
    given = (outputs.get("usage") if isinstance(outputs, dict) else None) or {}
    prompt = usage.get("input_tokens", given.get("prompt_tokens", given.get("input_tokens")))
    completion = usage.get("output_tokens", given.get("completion_tokens", given.get("output_tokens")))
    model = span.get_attribute("mlflow.llm.model") or inputs.get("model") or (
        outputs.get("model") if isinstance(outputs, dict) else None)
    start, end = span.start_time_ns, span.end_time_ns
    return {"model": model if isinstance(model, str) else None,
            "prompt_tokens": prompt if isinstance(prompt, int) else None,
            "completion_tokens": completion if isinstance(completion, int) else None,
            "latency_s": (end - start) / 1e9 if start and end and end >= start else None}


def _teacher(c: Call) -> dict:
    """The row's `teacher` (data/teacher.py): the logged answer, whatever the row's target (a correction
    replaces it there), with what the call cost."""
    return {"answer": text_of(c.answer.get("content")), **(c.cost or {"model": None, "prompt_tokens": None,
                                                                      "completion_tokens": None,
                                                                      "latency_s": None})}


def _key(messages: list[dict]) -> str:
    return json.dumps([{k: m.get(k) for k in ("role", "content", "tool_calls", "tool_call_id")}
                       for m in messages], sort_keys=True, ensure_ascii=False)


def conversations(calls: list[Call]) -> dict[str, Call]:
    """Link each call to the earlier call its messages extend (that call's messages and answer, exactly),
    giving every call the conversation of its first call; returns {conversation key of each call: call}."""
    by_key = {}
    for c in sorted(calls, key=lambda c: (len(c.prompt), c.start_ns)):
        c.group = c.group or f"{c.trace_id}/{c.span_id}"
        for n in range(len(c.prompt) - 1, 0, -1):
            earlier = by_key.get(_key(c.prompt[:n]))
            if earlier is not None:
                c.group = earlier.group
                break
        by_key.setdefault(_key(c.conversation), c)
    return by_key


def _trainable(c: Call, query) -> bool:
    return c.problem is None and (c.correction is not None or c.verdict is True
                                  or c.verdict is None and query.unrated)


def _with_tools(record: dict, c: Call) -> dict:
    return {**record, "tools": c.tools} if c.tools else record


def _chat_rows(calls: list[Call], query) -> list:
    """One row per conversation: a trainable call is left out when a later trainable call extends its messages
    and answer; a corrected or rejected earlier turn stays in the later row's history with weight 0 (its
    corrected answer is a row of its own)."""
    by_conv: dict[str, list[Call]] = {}
    for c in calls:
        by_conv.setdefault(_key(c.conversation), []).append(c)
    keep = [c for c in calls if _trainable(c, query)]
    extended = {_key(c.prompt[:n]) for c in keep for n in range(1, len(c.prompt))}  # conversations continued
    rows, seen = [], set()
    for c in sorted(keep, key=lambda c: c.start_ns):
        plain = c.correction is None and c.verdict is not False
        if plain and (_key(c.conversation) in extended or _key(c.conversation) in seen):
            continue  # inside a later row, or the same conversation again (one row each)
        seen.add(_key(c.conversation))
        messages = [dict(m) for m in c.prompt]
        ids = {c.trace_id} | ({d.trace_id for d in by_conv[_key(c.conversation)] if _trainable(d, query)}
                              if plain else set())
        for n in range(1, len(c.prompt)):
            for earlier in by_conv.get(_key(c.prompt[:n]), []):
                ids.add(earlier.trace_id)
                if earlier.correction is not None or earlier.verdict is False or earlier.problem:
                    messages[n - 1]["weight"] = 0
        rows.append((_with_tools({"messages": messages + [c.target], "teacher": _teacher(c)}, c), c.group,
                     sorted(ids)))
    return rows


def _unpaired_rows(calls: list[Call], query) -> list:
    """A labelled row per answer with feedback; a corrected answer gives the correction (true) and, where it
    differs, the logged answer (false)."""
    rows = []
    for c in sorted(calls, key=lambda c: c.start_ns):
        if c.problem and c.problem != CUT or c.problem == CUT and c.verdict is not False and not c.correction:
            continue
        labelled = []
        if c.correction is not None:
            labelled.append((c.correction, True))
            if _key([c.correction]) != _key([c.answer]):
                labelled.append((c.answer, False))
        elif c.verdict is not None:
            labelled.append((c.answer, c.verdict))
        rows += [(_with_tools({"prompt": c.prompt, "completion": [a], "label": up}, c), c.group, [c.trace_id])
                 for a, up in labelled]
    return rows


def _preference_rows(calls: list[Call], query) -> list:
    """Pairs: per prompt, an answer with positive feedback (or a correction) against one with negative
    feedback (or the answer the correction replaced)."""
    by_prompt: dict[str, tuple[list, list]] = {}
    for c in sorted(calls, key=lambda c: c.start_ns):
        if c.problem and c.problem != CUT:
            continue
        up, down = by_prompt.setdefault(_key(c.prompt), ([], []))
        if c.correction is not None:
            up.append((c.correction, c))
            if _key([c.correction]) != _key([c.answer]):
                down.append((c.answer, c))
        elif c.verdict is True and c.problem is None:
            up.append((c.answer, c))
        elif c.verdict is False:
            down.append((c.answer, c))
    rows = []
    for up, down in by_prompt.values():
        down = [(answer, c) for answer, c in down if all(_key([answer]) != _key([u]) for u, _ in up)]
        for (chosen, a), (rejected, b) in zip(up, down):  # an answer with both verdicts pairs with nothing
            rows.append((_with_tools({"prompt": a.prompt, "chosen": [chosen], "rejected": [rejected]}, a),
                         a.group, sorted({a.trace_id, b.trace_id})))
    return rows


def _prompt_rows(calls: list[Call], query) -> list:
    """The prompts the application sent (for grpo), each once, where they end with the user's turn."""
    seen, rows = set(), []
    for c in sorted(calls, key=lambda c: c.start_ns):
        key = _key(c.prompt)
        if c.problem in (FAILED, UNKNOWN,
                         IMAGE) or key in seen or not c.prompt or c.prompt[-1]["role"] != "user":
            continue
        seen.add(key)
        rows.append((_with_tools({"prompt": c.prompt}, c), c.group, [c.trace_id]))
    return rows


def make_rows(calls: list[Call], query) -> list:
    """(record, conversation, trace ids) of each row `query.rows` asks for, in the order of the calls."""
    make = {"chat": _chat_rows, "preference": _preference_rows, "unpaired_preference": _unpaired_rows,
            "prompt_only": _prompt_rows}[query.rows]
    return make(calls, query)
