"""What a model family's chat template means, found once by rendering it: the one place that knows.

Every stage that turns messages into tokens asks here (the data check, training's loss masks, evaluation, the
logged model's `predict`, both serving engines, the playground), so a family's quirks are handled once:

- **System messages.** Some templates drop a system message from a training row (Mistral v0.3 renders it only
  before the *last* user turn, so a row ending with the answer loses it) or refuse the role (Gemma 2, Mistral v0.1).
  Found by rendering a probe row; such templates get the system text folded into the first user turn, in training
  and at inference alike (LLaMA-Factory does the same for Mistral). Templates that keep it, or fold it themselves
  (Gemma 3), are left alone.
- **Assistant-only loss for any template.** The tokens of each assistant reply and its end-of-turn token are found by
  rendering the conversation up to each assistant turn with the generation prompt and diffing against the whole
  row (the turn starts where the generation prompt ends and runs to its end-of-turn token), as axolotl and
  LLaMA-Factory find turn boundaries. No `{% generation %}` markers needed, no list of known templates.
- **End-of-turn ids.** The token a template closes an assistant turn with (`<|eot_id|>`, `<end_of_turn>`, `<|end|>`,
  `<|im_end|>`, `</s>`), with every eos id the tokenizer and generation config name: all of them stop generation.
- **Reasoning blocks.** Qwen3-style templates put an empty `<think></think>` ahead of an answer; it is trained (the
  model must learn to close it) and stripped from answers before they are scored or shown.

Imports nothing heavy: tokenizers are duck-typed (`apply_chat_template`, `convert_tokens_to_ids`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from mlflow_finetune_plugin.errors import FinetuneError

_PROBE_SYSTEM, _PROBE_USER, _PROBE_ANSWER = "SYSPROBE7 follow these rules", "USERPROBE7 a question", "ANSPROBE7"
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


@dataclass(frozen=True)
class ChatFormat:
    """How one chat template renders: see the module docstring."""

    system: str  # "kept" (rendered in every row, by the template itself) or "folded" (into the first user turn)
    why: str = ""  # one line on why the system message is folded ("" when kept)
    end_of_turn: tuple[str, ...] = field(default_factory=tuple)  # token strings closing an assistant turn
    generation_prompt: bool = True  # whether add_generation_prompt writes anything (an assistant header)

    @property
    def folds_system(self) -> bool:
        return self.system == "folded"


_cache: dict[str, ChatFormat] = {}


def chat_format(tokenizer) -> ChatFormat:
    """The `ChatFormat` of this tokenizer's chat template (probed once per template text)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        raise FinetuneError(no_template_message(getattr(tokenizer, "name_or_path", None)))
    key = f"{type(tokenizer).__name__}:{template}"
    if key not in _cache:
        _cache[key] = _probe(tokenizer)
    return _cache[key]


def no_template_message(name) -> str:
    return (f"model {name!r} has no chat template (a base model?). Give it one with the recipe key "
            "`model.chat_template`: a bundled name (chatml, llama3, qwen, qwen3, gemma, mistral, phi3, gemma4, qwen3_5, qwen3_5_think, gptoss) or a .jinja "
            "file, e.g. `-P model.chat_template=chatml`; or pick an instruct/chat model.")


def _render(tokenizer, messages, add_generation_prompt=False, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **kwargs)


def _probe(tokenizer) -> ChatFormat:
    system = {"role": "system", "content": _PROBE_SYSTEM}
    user = {"role": "user", "content": _PROBE_USER}
    answer = {"role": "assistant", "content": _PROBE_ANSWER}
    end_of_turn = _end_of_turn(tokenizer, [user, answer])
    try:
        header = _render(tokenizer, [user], True) != _render(tokenizer, [user])
    except Exception:  # noqa: BLE001
        header = True
    try:
        row = _render(tokenizer, [system, user, answer])
    except Exception as e:  # noqa: BLE001 - a template that refuses the role raises (jinja's raise_exception)
        return ChatFormat("folded", f"the chat template refuses a system message ({_first_line(e)}): it is folded "
                                    "into the first user turn", end_of_turn, header)
    if _PROBE_SYSTEM not in row:
        return ChatFormat("folded", "the chat template leaves the system message out of a row that ends with the "
                                    "answer (it renders it only before the last user turn): it is folded into the "
                                    "first user turn, in training and at inference alike", end_of_turn, header)
    return ChatFormat("kept", "", end_of_turn, header)


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


def _special_strings(tokenizer) -> list[str]:
    """The tokenizer's special and added tokens, longest first (so `<|im_end|>` wins over a shorter prefix)."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        found.add(getattr(token, "content", str(token)))
    return sorted((t for t in found if t), key=len, reverse=True)


def _end_of_turn(tokenizer, conversation) -> tuple[str, ...]:
    """The special token the template writes right after an assistant reply (the first one after it)."""
    try:
        text = _render(tokenizer, conversation)
    except Exception:  # noqa: BLE001 - a template that cannot render a plain exchange: nothing to learn here
        return ()
    at = text.rfind(_PROBE_ANSWER)
    if at < 0:
        return ()
    rest = text[at + len(_PROBE_ANSWER):]
    best = None
    for token in _special_strings(tokenizer):
        i = rest.find(token)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, token)
    return (best[1],) if best else ()


# ---------------------------------------------------------------- messages and rendering


def prepared(tokenizer, messages: list[dict]) -> list[dict]:
    """`messages` as this template must see them: a leading system message folded into the first user turn where
    the template would drop or refuse it (the same in training and at inference)."""
    if not messages or messages[0].get("role") != "system" or not chat_format(tokenizer).folds_system:
        return messages
    system, rest = messages[0], list(messages[1:])
    for i, m in enumerate(rest):
        if m.get("role") == "user":
            rest[i] = {**m, "content": f"{_text(system.get('content'))}\n\n{_text(m.get('content'))}"}
            return rest
    return [{"role": "user", "content": _text(system.get("content"))}, *rest]


def _text(content) -> str:
    from mlflow_finetune_plugin.messages import text_of

    return text_of(content)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
    """The chat template's text for `messages` (prepared: see `prepared`)."""
    return _render(tokenizer, prepared(tokenizer, messages), add_generation_prompt, **kwargs)


def prompt_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    """Token ids of `messages` with the generation prompt, as training tokenizes a row (the template writes any BOS
    itself: nothing is added again)."""
    return tokenizer(render(tokenizer, messages, True, **kwargs), add_special_tokens=False)["input_ids"]


def reply_ids(tokenizer, prompt: list[dict], reply: str) -> tuple[list[int], list[int]]:
    """Token ids of `prompt` (with the generation prompt) and of what the model must write to give `reply`: as
    training trains it, the reply and its end-of-turn token, with whatever the template puts ahead of the reply in
    the answer (Qwen3's empty `<think></think>` block, which takes room in `max_new_tokens` too)."""
    prompt_text = render(tokenizer, prompt, add_generation_prompt=True)
    full_text = render(tokenizer, prompt + [{"role": "assistant", "content": reply}])
    # Not what the template writes after the end of turn. Templates that render the last turn differently fall back
    # to the reply + end of turn.
    end = chat_format(tokenizer).end_of_turn or ((tokenizer.eos_token,) if tokenizer.eos_token else ())
    completion = (full_text[len(prompt_text):] if full_text.startswith(prompt_text)
                  else reply + (end[0] if end else ""))
    cuts = [at + len(t) for t in end if (at := completion.find(t)) >= 0]
    completion = completion[:min(cuts)] if cuts else completion
    return (tokenizer(prompt_text, add_special_tokens=False)["input_ids"],
            tokenizer(completion, add_special_tokens=False)["input_ids"])


def clean_answer(text: str) -> str:
    """A generated answer as a user reads it: a leading (empty or not) `<think>` block removed, whitespace trimmed."""
    return _THINK.sub("", text, count=1).strip()


def clean_stream(pieces: Iterable[str]) -> Iterator[str]:
    """`clean_answer` for an answer that arrives in pieces (the serving engines): the start is held back while it
    may open a `<think>` block, a block is dropped once it closes (with the whitespace after it), and everything else
    passes as it comes."""
    held, state = "", "start"  # start: a block may open; lead: drop the whitespace after one; through: pass on
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
    if state == "start" and held:  # ended inside an unclosed block (or on a prefix of one): as clean_answer keeps it
        yield held


# ---------------------------------------------------------------- stopping


def stop_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends an answer: the tokenizer's eos, the generation config's eos (an int or a list) and the
    template's end-of-turn token, in that order, without repeats."""
    ids: list[int] = []
    values = [getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)]
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        values += [tokenizer.convert_tokens_to_ids(t) for t in chat_format(tokenizer).end_of_turn]
    for value in values:
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(t, int) and t >= 0 and t not in ids and t != getattr(tokenizer, "unk_token_id", None):
                ids.append(t)
    return ids


# ---------------------------------------------------------------- loss masks


def tokenize_row(tokenizer, messages: list[dict], tools=None, assistant_only: bool = True) -> dict:
    """One training row: `input_ids` and `assistant_masks` (1 = trained).

    With `assistant_only`, exactly each assistant reply and its end-of-turn token are trained, except turns with
    `"weight": 0`; without it every token is trained except those of weight-0 turns.
    """
    messages = prepared(tokenizer, messages)
    kwargs = {"tools": tools} if tools else {}
    text = _render(tokenizer, messages, **kwargs)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    spans = assistant_spans(tokenizer, messages, text, **kwargs)
    weights = [m.get("weight") for m in messages if m.get("role") == "assistant"]
    mask = [0 if assistant_only else 1] * len(ids)
    for (start, end), weight in zip(spans, weights):
        for t, (a, b) in enumerate(offsets):
            if b > start and a < end:  # the token overlaps the turn
                mask[t] = 0 if weight == 0 else 1
    return {"input_ids": ids, "assistant_masks": mask}


def assistant_spans(tokenizer, messages: list[dict], text: str | None = None, **kwargs) -> list[tuple[int, int]]:
    """[start, end) character spans of each assistant turn in the rendered row: from where the generation prompt
    ends to the end of the turn's end-of-turn token (or of the row). FinetuneError when a turn cannot be found."""
    text = _render(tokenizer, messages, **kwargs) if text is None else text
    end_tokens = chat_format(tokenizer).end_of_turn or tuple(t for t in [getattr(tokenizer, "eos_token", None)] if t)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = _turn_start(tokenizer, messages, i, text, cursor, kwargs)
        end = _turn_end(text, start, end_tokens, _next_turn_start(tokenizer, messages, i, text, start, kwargs))
        spans.append((start, end))
        cursor = end
    return spans


def _turn_start(tokenizer, messages, i, text, cursor, kwargs) -> int:
    """Where assistant turn `i` starts in `text`: the end of the row rendered up to it with the generation prompt.
    A template with no generation prompt: where two renderings of the row up to turn `i`, with different replies,
    part (axolotl's way of finding a turn). Templates that render history differently: where its content appears after `cursor`."""
    try:
        if chat_format(tokenizer).generation_prompt:
            prefix = _render(tokenizer, messages[:i], add_generation_prompt=True, **kwargs)
        else:
            one, other = (_render(tokenizer, [*messages[:i], {"role": "assistant", "content": c}], **kwargs)
                          for c in ("A", "B"))
            prefix = one[:_common_prefix(one, other)]
    except Exception:  # noqa: BLE001 - e.g. a template that insists on ending with an assistant turn
        prefix = None
    if prefix is not None and text.startswith(prefix) and len(prefix) >= cursor:
        return len(prefix)
    content = _text(messages[i].get("content")).strip()
    at = text.find(content, cursor) if content else -1
    if at < 0:
        raise FinetuneError(
            f"cannot find assistant turn {i + 1} in the row as the chat template renders it, so its loss mask "
            "cannot be built; set data.assistant_only_loss: false to train on whole conversations")
    return at


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _next_turn_start(tokenizer, messages, i, text, start, kwargs) -> int:
    """A bound for assistant turn `i`'s span: the end of the row rendered up to and including it, where the whole row
    starts with that rendering; else the row's end (the end-of-turn token then ends the span)."""
    try:
        upto = _render(tokenizer, messages[: i + 1], **kwargs)
    except Exception:  # noqa: BLE001
        return len(text)
    return len(upto) if text.startswith(upto) and len(upto) > start else len(text)


def _turn_end(text: str, start: int, end_tokens, limit: int) -> int:
    ends = [at + len(token) for token in end_tokens if 0 <= (at := text.find(token, start)) < limit]
    return min(ends) if ends else limit
