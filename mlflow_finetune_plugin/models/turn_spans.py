"""Which tokens of a chat row train: each assistant turn found in the row as its chat template renders it
(where the generation prompt ends, to its end-of-turn token: the turn boundaries axolotl and LLaMA-Factory
find by rendering and diffing), and the loss mask over the row's tokens. What the template means (system
folding, end-of-turn strings, reasoning, the last reply after exactly the generation prompt) is
`chat_format.py`'s; this module only asks it."""

from __future__ import annotations

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.messages import text_of
from mlflow_finetune_plugin.models.chat_format import (
    apply_template,
    chat_format,
    end_tokens,
    last_turn,
    prepared,
    split_reasoning,
    turn_end,
)


def tokenize_row(tokenizer, messages: list[dict], tools=None, assistant_only: bool = True) -> dict:
    """One training row: `input_ids` and `assistant_masks` (1 = trained).

    With `assistant_only`, exactly each assistant reply and its end-of-turn token are trained, except turns
    with `"weight": 0`; without it every token is trained except those of weight-0 turns.
    """
    text, spans = trained_spans(tokenizer, messages, tools)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    return {"input_ids": ids, "assistant_masks": span_mask(enc["offset_mapping"], spans, assistant_only)}


def trained_spans(tokenizer, messages: list[dict], tools=None) -> tuple[str, list[tuple[int, int, object]]]:
    """(the row's text as training tokenizes it, [start, end, weight] of each assistant turn in it): the text
    and turns `tokenize_row` masks, for a caller that tokenizes the text itself (a processor that expands
    images)."""
    messages = prepared(tokenizer, messages)
    kwargs = {"tools": tools} if tools else {}
    text = apply_template(tokenizer, messages, **kwargs)
    last = None
    if messages and messages[-1].get("role") == "assistant":
        # The last reply after exactly the generation prompt (see last_turn); the row's text changes only
        # where the template renders a row the generation prompt does not start.
        prompt_text, completion = last_turn(tokenizer, messages[:-1], messages[-1], **kwargs)
        if not text.startswith(prompt_text + completion):
            text = prompt_text + completion
        last = (len(prompt_text), len(prompt_text) + len(completion))
    spans = assistant_spans(tokenizer, messages[:-1] if last else messages, text, **kwargs) + ([last] if last
                                                                                               else [])
    weights = [m.get("weight") for m in messages if m.get("role") == "assistant"]
    return text, [(start, end, weight) for (start, end), weight in zip(spans, weights)]


def span_mask(offsets, spans, assistant_only: bool = True) -> list[int]:
    """1 for each token (by its character `offsets`) inside a trained span (weight-0 turns: 0); the rest 0, or
    1 without `assistant_only`."""
    mask = [0 if assistant_only else 1] * len(offsets)
    for start, end, weight in spans:
        for t, (a, b) in enumerate(offsets):
            if b > start and a < end:  # the token overlaps the turn
                mask[t] = 0 if weight == 0 else 1
    return mask


def assistant_spans(tokenizer, messages: list[dict], text: str | None = None,
                    **kwargs) -> list[tuple[int, int]]:
    """[start, end) character spans of each assistant turn in the rendered row: from where the generation
    prompt ends to the end of the turn's end-of-turn token (or of the row). FinetuneError when a turn cannot
    be found."""
    text = apply_template(tokenizer, messages, **kwargs) if text is None else text
    ends = end_tokens(tokenizer)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = _turn_start(tokenizer, messages, i, text, cursor, kwargs)
        end = turn_end(text, start, ends, _next_turn_start(tokenizer, messages, i, text, start, kwargs),
                       split_reasoning(m)[1].strip())
        spans.append((start, end))
        cursor = end
    return spans


def _turn_start(tokenizer, messages, i, text, cursor, kwargs) -> int:
    """Where assistant turn `i` starts in `text`: the end of the row rendered up to it with the generation
    prompt. A template with no generation prompt: where two renderings of the row up to turn `i`, with
    different replies, part (axolotl's way of finding a turn). Templates that render history differently:
    where its content appears after `cursor`."""
    try:
        if chat_format(tokenizer).generation_prompt:
            prefix = apply_template(tokenizer, messages[:i], add_generation_prompt=True, **kwargs)
        else:
            one, other = (apply_template(tokenizer, [*messages[:i], {"role": "assistant", "content": c}],
                                         **kwargs) for c in ("A", "B"))
            prefix = one[:_common_prefix(one, other)]
    except Exception:  # noqa: BLE001 - e.g. a template that insists on ending with an assistant turn
        prefix = None
    if prefix is not None and text.startswith(prefix) and len(prefix) >= cursor:
        return len(prefix)
    content = text_of(messages[i].get("content")).strip()
    at = text.find(content, cursor) if content else -1
    if at < 0:
        raise FinetuneError(
            f"cannot find assistant turn {i + 1} in the row as the chat template renders it, so its loss "
            "mask cannot be built; set data.assistant_only_loss: false to train on whole conversations")
    return at


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _next_turn_start(tokenizer, messages, i, text, start, kwargs) -> int:
    """A bound for assistant turn `i`'s span: the end of the row rendered up to and including it, where the
    whole row starts with that rendering; else the row's end (the end-of-turn token then ends the span)."""
    try:
        upto = apply_template(tokenizer, messages[: i + 1], **kwargs)
    except Exception:  # noqa: BLE001
        return len(text)
    return len(upto) if text.startswith(upto) and len(upto) > start else len(text)
