"""A generated answer as a user reads it, scores it and is served it: the final answer, without the reasoning
or the channel markup the template has the model write ahead of it.

What to remove comes from the template's `ChatFormat` (`chat_format.py` finds it by rendering): the text the
generation prompt prefills (DeepSeek-R1-distill's `<think>\\n`), the markers around reasoning (Qwen's
`<think>`, gpt-oss's analysis channel, Gemma 4's thought channel) and the lead before a reply (gpt-oss's
`<|channel|>final<|message|>`, Qwen3's empty think block). Generated ids are decoded with their special
tokens, read through those markers, cut at the first end-of-turn token and only then stripped of special
tokens: decoding with `skip_special_tokens=True` first would leave gpt-oss's channel names in the answer
("analysis...assistantfinal...").

`clean_answer` and `clean_stream` work on text alone (a leading `<think>` block), for engines that hand back
text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from mlflow_finetune_plugin.models.chat_format import ChatFormat, chat_format

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


def clean_answer(text: str) -> str:
    """A generated answer as a user reads it: a leading (empty or not) `<think>` block removed, whitespace
    trimmed."""
    return _THINK.sub("", text, count=1).strip()


def clean_stream(pieces: Iterable[str]) -> Iterator[str]:
    """`clean_answer` for an answer that arrives in pieces (the serving engines): the start is held back while
    it may open a `<think>` block, a block is dropped once it closes (with the whitespace after it), and
    everything else passes as it comes."""
    # start: a block may open; lead: drop the whitespace after one; through: pass on
    held, state = "", "start"
    for piece in pieces:
        if state == "through":
            yield piece
            continue
        held += piece
        if state == "start":
            text = held.lstrip()
            if _THINK_OPEN.startswith(text) or (text.startswith(_THINK_OPEN) and _THINK_CLOSE not in text):
                continue
            if not text.startswith(_THINK_OPEN):
                state, out, held = "through", held, ""
                yield out
                continue
            state, held = "lead", text.split(_THINK_CLOSE, 1)[1]
        held = held.lstrip()
        if held:
            state, out, held = "through", held, ""
            yield out
    # ended inside an unclosed block (or on a prefix of one): as clean_answer keeps it
    if state == "start" and held:
        yield held


# How a generated answer ended (the evaluation records it per row; `serving` parity compares it with the
# served one).
STOP, LENGTH = "stop", "length"   # on a stop id; cut at max_new_tokens without one


def ending(ids, stops) -> str:
    """STOP when the generated `ids` hold one of the `stops` ids (rows that end early are padded after it),
    else LENGTH: the answer ran to max_new_tokens and was cut there."""
    stops = set(stops)
    return STOP if any(int(t) in stops for t in ids) else LENGTH


def answer_text(tokenizer, ids) -> str:
    """The answer in generated `ids` (what follows the generation prompt), as a user reads it."""
    return _Reader(tokenizer).answer(list(ids), final=True)


class AnswerStream:
    """`answer_text` for ids that arrive one at a time: `add(id)` returns the new text of the answer (possibly
    ""), held back while the start may still be reasoning or markup; `end()` returns the rest."""

    def __init__(self, tokenizer):
        self._reader, self.ids, self.sent = _Reader(tokenizer), [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(self._reader.answer(self.ids, final=False))

    def end(self) -> str:
        return self._delta(self._reader.answer(self.ids, final=True))

    def _delta(self, text: str | None) -> str:
        if text is None or not text.startswith(self.sent) or text.endswith("\ufffd"):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new


class _Reader:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        template = getattr(tokenizer, "chat_template", None)
        self.fmt = chat_format(tokenizer) if isinstance(template, str) and template else ChatFormat("kept")
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        self.ends = tuple(t for t in (*self.fmt.turn_ends, *self.fmt.end_of_turn,
                                      getattr(tokenizer, "eos_token", None)) if t)
        self.specials = sorted((t for t in specials if t), key=len, reverse=True)

    def answer(self, ids: list[int], final: bool) -> str | None:
        """The answer so far; None while it cannot be told yet (not `final` and the start may be
        reasoning)."""
        text = self.fmt.prefill + self.tokenizer.decode(ids, skip_special_tokens=False)
        reply = _after_markup(text, self.fmt, final)
        if reply is None:
            return None
        cuts = [at for t in self.ends if (at := reply.find(t)) >= 0]
        reply = reply[:min(cuts)] if cuts else reply
        for token in self.specials:
            reply = reply.replace(token, "")
        return reply.strip() if final else reply.lstrip()


def _after_markup(text: str, fmt: ChatFormat, final: bool) -> str | None:
    """`text` (from the assistant header on) without its leading reasoning block, channel markup or lead; None
    while that cannot be told yet. A block that never closes is all there is: it is shown without its
    markers."""
    s = text.lstrip()
    open_, close = fmt.reasoning_open.strip(), fmt.reasoning_close.strip()
    lead = fmt.lead.strip()
    if close and (not open_ or s.startswith(open_)):
        if close in s:
            return s.split(close, 1)[1]
        return s[len(open_):] if final else None
    if open_ and open_.startswith(s) and not final:
        return None
    if lead:
        if s.startswith(lead):
            return s[len(lead):]
        if lead.startswith(s) and not final:
            return None
    if s.startswith(_THINK_OPEN):
        if _THINK_CLOSE in s:
            return _THINK.sub("", s, count=1)
        return s if final else None
    if _THINK_OPEN.startswith(s) and not final:
        return None
    return s


def response_template(tokenizer) -> dict | None:
    """transformers' declarative response template (`tokenizer.response_template`, which `transformers serve`
    and `tokenizer.parse_response` read) that reads a generation as `answer_text` does: the reasoning between
    the format's markers as `reasoning_content`, the reply after its lead (gpt-oss's
    `<|channel|>final<|message|>`) as `content`, ended by any end-of-turn token. None for a format that writes
    nothing ahead of a reply, where decoding without special tokens already reads it right."""
    fmt = chat_format(tokenizer)
    if not fmt.lead and not fmt.reasoning_open:
        return None
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                              add_generation_prompt=gen) for gen in (False, True)]
    header = rendered[1][len(rendered[0]):] if rendered[1].startswith(rendered[0]) else ""
    header = header[: len(header)
                    - len(fmt.prefill)] if fmt.prefill and header.endswith(fmt.prefill) else header
    if not header.strip():
        return None  # no anchor to find the answer's start by
    # The markers without their surrounding whitespace, as `_after_markup` reads them (a model need not write
    # a template's exact newlines around them).
    open_, close, lead = fmt.reasoning_open.strip(), fmt.reasoning_close.strip(), fmt.lead.strip()
    ends = list(dict.fromkeys((*fmt.end_of_turn, *fmt.turn_ends)))
    # nothing closes the reply (LLaVA-1.5's template): transformers refuses a field with no close
    if not ends:
        return None
    fields = {}
    if open_ and close:
        fields["reasoning_content"] = {"open": open_, "close": close, "content": "text"}
    if lead:
        # The lead is a region of its own that closes at once: what follows it is the reply (the implicit
        # region).
        fields["lead"] = {"open": lead, "close_pattern": "", "content": "text"}
    fields["content"] = {"close": ends, "content": "text"}
    return {"defaults": {"role": "assistant"}, "start_anchor": header, "fields": fields}


def add_response_template(tokenizer, model_type: str) -> bool:
    """Give `tokenizer` the `response_template` above where `transformers serve` would otherwise stream the
    raw decode (no template of its own, none built into transformers for `model_type`); True when one was
    added."""
    if getattr(tokenizer, "response_template", None) is not None:
        return False
    try:
        from transformers.cli.serving.utils import get_response_template
    except ImportError:  # a transformers whose server parses no responses: the template does no harm
        get_response_template = None
    if get_response_template is not None:
        from types import SimpleNamespace

        if get_response_template(tokenizer, SimpleNamespace(config=SimpleNamespace(model_type=model_type))):
            return False
    template = response_template(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    if template is None:
        return False
    tokenizer.response_template = template
    return True
