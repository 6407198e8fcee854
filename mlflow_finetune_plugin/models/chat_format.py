"""What a model family's chat template means, found once by rendering it: the one place that knows.

Every stage that turns messages into tokens asks here (the data check, training's loss masks, evaluation, the
logged model's `predict`, both serving engines, the playground), so a family's quirks are handled once:

- **System messages.** Some templates drop a system message from a training row (Mistral v0.3 renders it only
  before the *last* user turn, so a row ending with the answer loses it) or refuse the role (Gemma 2, Mistral
  v0.1). Found by rendering a probe row; such templates get the system text folded into the first user turn,
  in training and at inference alike (LLaMA-Factory does the same for Mistral). Templates that keep it, or
  fold it themselves (Gemma 3), are left alone.
- **Assistant-only loss for any template.** The tokens of each assistant reply and its end-of-turn token are
found by
  rendering the conversation up to each assistant turn with the generation prompt and diffing against the
  whole row (the turn starts where the generation prompt ends and runs to its end-of-turn token), as axolotl
  and LLaMA-Factory find turn boundaries. No `{% generation %}` markers needed, no list of known templates.
- **End-of-turn ids.** The token a template closes an assistant turn with (`<|eot_id|>`, `<end_of_turn>`,
`<|end|>`,
  `<|im_end|>`, `</s>`), with every eos id the tokenizer and generation config name: all of them stop
  generation.
- **Reasoning.** What a template writes around a reply's reasoning (Qwen's `<think>`, gpt-oss's analysis
channel,
  Gemma 4's thought channel), ahead of a reply without any (Qwen3's empty `<think></think>`, gpt-oss's
  `<|channel|>final<|message|>`), and what its generation prompt writes that a row does not
  (DeepSeek-R1-distill's `<think>\n`) are found by rendering probes, and the last reply of a row is trained
  after exactly the prompt the model is given at inference (`last_turn`). A row's reasoning
  (`reasoning_content`, `thinking` or `reasoning` on the message, or a leading `<think>` block in its content)
  goes where the template renders it, and is trained there. Answers are read back through the same markers
  (`answer_text`, `AnswerStream`): the final answer, never channel markup.
- **Today's date.** Templates that write it (gpt-oss's system block, Llama 3.x's) get a pinned one in every
rendering,
  so a row's tokens and an evaluation do not depend on the day they run (`template_clock.py`).

Imports nothing heavy: tokenizers are duck-typed (`apply_chat_template`, `convert_tokens_to_ids`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.messages import text_of
from mlflow_finetune_plugin.models.template_clock import pinned_clock
from mlflow_finetune_plugin.models.vision import first_line

_PROBE_SYSTEM, _PROBE_USER, _PROBE_ANSWER = "SYSPROBE7 follow these rules", ("USERPROBE7 a "
                                                                             "question"), "ANSPROBE7"
_PROBE_REASONING, _PROBE_FIRST = "WHYPROBE7", "ANSPROBE3"
# The message fields templates read a reply's reasoning from: Qwen's and Gemma 4's, gpt-oss's and LFM2.5's,
# Gemma 4's.
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


@dataclass(frozen=True)
class ChatFormat:
    """How one chat template renders: see the module docstring."""

    # "kept" (rendered in every row, by the template itself) or "folded" (into the first user turn)
    system: str
    why: str = ""  # one line on why the system message is folded ("" when kept)
    end_of_turn: tuple[str, ...] = field(default_factory=tuple)  # token strings closing an assistant turn
    generation_prompt: bool = True  # whether add_generation_prompt writes anything (an assistant header)
    # tokens closing any assistant turn of a row (gpt-oss: <|end|> before the last)
    turn_ends: tuple[str, ...] = ()
    prefill: str = ""  # what the generation prompt writes after the assistant header that no row has there
    lead: str = ""  # what a row has between the assistant header and a reply without reasoning
    # the message field the template renders reasoning from (None: it renders none)
    reasoning_key: str | None = None
    reasoning_open: str = ""  # what it writes before the reasoning ("" where the header opens the block)
    reasoning_close: str = ""  # ... and between the reasoning and the reply
    refused: str = ""  # why the project cannot train or serve text chats with this template ("" when it can)

    @property
    def folds_system(self) -> bool:
        return self.system == "folded"


_cache: dict[str, ChatFormat] = {}


def chat_format(tokenizer) -> ChatFormat:
    """The `ChatFormat` of this tokenizer's chat template (probed once per template text)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        raise FinetuneError(no_template_message(getattr(tokenizer, "name_or_path", None)))
    # The probe's answers depend on the vocabulary too (which strings are single special tokens): a template
    # probed with a tokenizer that lacked its tokens (a base model before `model.chat_template` adds them)
    # must not answer for one that has them, in the same process.
    # (the size and the special tokens: cheap to read on every call, unlike the whole added vocabulary, which
    # a converted 262k-token vocabulary may hold entirely)
    specials = getattr(tokenizer, "all_special_tokens", None) or ()
    size = len(tokenizer) if hasattr(type(tokenizer), "__len__") else getattr(tokenizer, "vocab_size", None)
    key = f"{type(tokenizer).__qualname__}:{size}:{sorted(specials)}:{template}"
    if key not in _cache:
        _cache[key] = _probe(tokenizer)
    fmt = _cache[key]
    if fmt.refused:
        raise FinetuneError(f"model {getattr(tokenizer, 'name_or_path', None)!r}: {fmt.refused}")
    return fmt


def no_template_message(name) -> str:
    return (f"model {name!r} has no chat template (a base model?). Give it one with the recipe key "
            "`model.chat_template`: a bundled name (chatml, llama3, qwen, qwen3, gemma, mistral, phi3, "
            "gemma4, qwen3_5, qwen3_5_think, gptoss) or a .jinja "
            "file, e.g. `-P model.chat_template=chatml`; or pick an instruct/chat model.")


# Templates that read content parts only (the vision-language models' own: LLaVA-1.5's, SmolVLM's): every
# string content is given to them as one text part, as TRL's `prepare_multimodal_messages` does.
_PARTS_ONLY: set[str] = set()


def apply_template(tokenizer, messages, add_generation_prompt=False, **kwargs) -> str:
    """The template's text for `messages` as given (no folding: `render` prepares them first), on the pinned
    date."""
    if getattr(tokenizer, "chat_template", None) in _PARTS_ONLY:
        messages = [{**m, "content": [{"type": "text", "text": m["content"]}]}
                    if isinstance(m.get("content"), str) else m for m in messages]
    with pinned_clock():
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **kwargs)


def _probe(tokenizer) -> ChatFormat:
    system = {"role": "system", "content": _PROBE_SYSTEM}
    user = {"role": "user", "content": _PROBE_USER}
    answer = {"role": "assistant", "content": _PROBE_ANSWER}
    try:
        plain = apply_template(tokenizer, [user, answer])
    except Exception:  # noqa: BLE001 - judged below by what the rows themselves do
        plain = None
    if plain is not None and (_PROBE_USER not in plain or _PROBE_ANSWER not in plain):
        plain = _parts_only(tokenizer, [user, answer])
    if plain is not None and (_PROBE_USER not in plain or _PROBE_ANSWER not in plain):
        return ChatFormat("kept",
                          refused="its chat template renders no text of a message whose content is a string "
                                  "(a multimodal template that reads content parts only): training would see "
                                  "empty turns. Give a text chat template with `model.chat_template`.")
    earlier = _end_of_turn(tokenizer, [user, {"role": "assistant", "content": _PROBE_FIRST}, user, answer],
                           _PROBE_FIRST)
    # A template that writes nothing after the last reply (GLM-4.5: a turn ends where the next <|user|>
    # starts) ends it as it ends the earlier ones: the model must learn to write that token, and it stops
    # generation.
    last = _end_of_turn(tokenizer, [user, answer]) or earlier
    turns = {"end_of_turn": tuple(dict.fromkeys(last + _tool_call_end(tokenizer, user))),
             "turn_ends": tuple(dict.fromkeys(last + earlier)), **_reasoning_markers(tokenizer, user)}
    try:
        header = apply_template(tokenizer, [user], True) != apply_template(tokenizer, [user])
    except Exception:  # noqa: BLE001
        header = True
    try:
        row = apply_template(tokenizer, [system, user, answer])
    except Exception as e:  # noqa: BLE001 - a template that refuses the role raises (jinja's raise_exception)
        return ChatFormat("folded",
                          f"the chat template refuses a system message ({first_line(e, 160)}): it is folded "
                          "into the first user turn", generation_prompt=header, **turns)
    if _PROBE_SYSTEM not in row:
        return ChatFormat("folded",
                          "the chat template leaves the system message out of a row that ends with the "
                          "answer (it renders it only before the last user turn): it is folded into the "
                          "first user turn, in training and at inference alike", generation_prompt=header,
                          **turns)
    return ChatFormat("kept", "", generation_prompt=header, **turns)


def _parts_only(tokenizer, messages) -> str | None:
    """The row rendered with its contents as text parts, where the template renders those (and is then
    rendered that way from here on); None where it does not."""
    _PARTS_ONLY.add(tokenizer.chat_template)
    try:
        text = apply_template(tokenizer, messages)
    except Exception:  # noqa: BLE001 - a template that refuses parts too: refused below
        text = None
    if text is None or any(m["content"] not in text for m in messages):
        _PARTS_ONLY.discard(tokenizer.chat_template)
    return text


def _reasoning_markers(tokenizer, user) -> dict:
    """What the template writes after the assistant header (the part every rendering of the turn shares): the
    generation prompt's prefill, the lead before a plain reply, and the markers around reasoning, with the
    field it reads reasoning from."""
    try:
        prompt = apply_template(tokenizer, [user], True)
        plain = apply_template(tokenizer, [user, {"role": "assistant", "content": _PROBE_ANSWER}])
    except Exception:  # noqa: BLE001 - nothing to learn from a template that cannot render a plain exchange
        return {}
    found, key = plain, None
    for name in REASONING_KEYS:
        try:
            text = apply_template(tokenizer, [user, {"role": "assistant", "content": _PROBE_ANSWER,
                                              name: _PROBE_REASONING}])
        except Exception:  # noqa: BLE001
            continue
        if _PROBE_REASONING in text and _PROBE_ANSWER in text.split(_PROBE_REASONING, 1)[1]:
            found, key = text, name
            break
    header = _common_prefix_len(prompt, plain, found)
    if _PROBE_ANSWER not in plain[header:]:
        return {}
    markers = {"prefill": prompt[header:], "lead": plain[header:plain.index(_PROBE_ANSWER, header)]}
    if key:
        why = found.index(_PROBE_REASONING, header)
        markers.update(reasoning_key=key, reasoning_open=found[header:why],
                       reasoning_close=found[why + len(_PROBE_REASONING):found.index(_PROBE_ANSWER, why)])
    return markers


def _common_prefix_len(*texts: str) -> int:
    n = 0
    for chars in zip(*texts):
        if any(c != chars[0] for c in chars):
            break
        n += 1
    return n


def _tool_call_end(tokenizer, user) -> tuple[str, ...]:
    """The special token a template ends an assistant tool call with (gpt-oss's <|call|>, Gemma 4's
    <|tool_response>): the last one of a row that ends with the call."""
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call00001", "type": "function", "function": {"name": "probe_tool", "arguments": {"x": 1}}}]}
    try:
        before, text = apply_template(tokenizer, [user]), apply_template(tokenizer, [user, call])
    except Exception:  # noqa: BLE001 - a template without tool calls
        return ()
    if not text.startswith(before) or "probe_tool" not in text:
        return ()
    rest = text[text.index("probe_tool"):]
    ends = [(rest.rfind(t), t) for t in _special_strings(tokenizer) if t in rest]
    return (max(ends)[1],) if ends else ()


def _special_strings(tokenizer) -> list[str]:
    """The tokenizer's special and added tokens, longest first (so `<|im_end|>` wins over a shorter
    prefix)."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        found.add(getattr(token, "content", str(token)))
    return sorted((t for t in found if t), key=len, reverse=True)


def _end_of_turn(tokenizer, conversation, answer: str = _PROBE_ANSWER) -> tuple[str, ...]:
    """The special token the template writes right after the assistant reply `answer` (the first one after
    it)."""
    try:
        text = apply_template(tokenizer, conversation)
    except Exception:  # noqa: BLE001 - a template that cannot render a plain exchange: nothing to learn here
        return ()
    at = text.rfind(answer)
    if at < 0:
        return ()
    rest = text[at + len(answer):]
    best = None
    for token in _special_strings(tokenizer):
        i = rest.find(token)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, token)
    return (best[1],) if best else ()


# ---------------------------------------------------------------- messages and rendering


def prepared(tokenizer, messages: list[dict]) -> list[dict]:
    """`messages` as this template must see them: a leading system message folded into the first user turn
    where the template would drop or refuse it, and each reply's reasoning on the field the template reads
    (the same in training and at inference)."""
    fmt = chat_format(tokenizer)
    if fmt.reasoning_key:
        messages = [_reasoning_on(m, fmt.reasoning_key) if m.get("role") == "assistant" else m
                    for m in messages]
    if not messages or messages[0].get("role") != "system" or not fmt.folds_system:
        return messages
    system, rest = messages[0], list(messages[1:])
    for i, m in enumerate(rest):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):  # parts (images among them): the system text goes first, as a part
                content = [{"type": "text", "text": f"{text_of(system.get('content'))}\n\n"}, *content]
            else:
                content = f"{text_of(system.get('content'))}\n\n{text_of(content)}"
            rest[i] = {**m, "content": content}
            return rest
    return [{"role": "user", "content": text_of(system.get("content"))}, *rest]


def split_reasoning(message: dict) -> tuple[str, str]:
    """(reasoning, reply) of an assistant message: reasoning from `reasoning_content`, `thinking` or
    `reasoning`, or a leading `<think>...</think>` block of its content ("" when it has none)."""
    content = text_of(message.get("content"))
    for key in REASONING_KEYS:
        if isinstance(message.get(key), str) and message[key].strip():
            return message[key].strip(), content
    found = _THINK.match(content)
    if found:
        inner = found.group(0).strip()[len(_THINK_OPEN):-len(_THINK_CLOSE)]
        return inner.strip(), content[found.end():]
    return "", content


def _reasoning_on(message: dict, key: str) -> dict:
    reasoning, reply = split_reasoning(message)
    out = {k: v for k, v in message.items() if k not in REASONING_KEYS}
    if not reasoning:
        return out if len(out) < len(message) else message
    return {**out, "content": reply, key: reasoning}


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
    """The chat template's text for `messages` (prepared: see `prepared`)."""
    return apply_template(tokenizer, prepared(tokenizer, messages), add_generation_prompt, **kwargs)


def prompt_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    """Token ids of `messages` with the generation prompt, as training tokenizes a row (the template writes
    any BOS itself: nothing is added again)."""
    return tokenizer(render(tokenizer, messages, True, **kwargs), add_special_tokens=False)["input_ids"]


def last_turn(tokenizer, prompt: list[dict], reply: dict, **kwargs) -> tuple[str, str]:
    """(prompt text, completion text) of a row's last reply, as training trains it and as the model must write
    it after the generation prompt: the prompt text IS the generation prompt, and the completion runs to the
    end of the turn. Where the row does not start with the generation prompt: a template whose generation
    prompt closes an empty think block (Qwen3.5's non-thinking one) gets the reply without its reasoning, as
    the model answers there; one whose generation prompt opens a think block the row lacks
    (DeepSeek-R1-distill's `<think>\n`) gets the reasoning (or none) and the block's close ahead of the reply,
    so that the model answers as it was trained."""
    prompt, reply = prepared(tokenizer, prompt), prepared(tokenizer, [reply])[0]
    prompt_text = apply_template(tokenizer, prompt, True, **kwargs)
    full = apply_template(tokenizer, [*prompt, reply], **kwargs)
    reasoning, content = split_reasoning(reply)
    if not full.startswith(prompt_text):
        bare = {k: v for k, v in reply.items() if k not in REASONING_KEYS}
        full = apply_template(tokenizer, [*prompt, {**bare, "content": content}], **kwargs)
    if full.startswith(prompt_text):
        completion = full[len(prompt_text):]
    else:
        shared = _common_prefix_len(prompt_text, full)
        prefill, completion = prompt_text[shared:], full[shared:]
        if _THINK_OPEN in prefill and _THINK_CLOSE not in prefill.split(_THINK_OPEN)[-1]:
            completion = f"{reasoning}\n{_THINK_CLOSE}\n\n{completion.lstrip()}"
    ends = end_tokens(tokenizer)
    completion = completion[:turn_end(completion, 0, ends, len(completion), content.strip())]
    # the row ends without closing the turn: the model must close it
    if ends and not completion.endswith(ends):
        completion = completion.rstrip() + (chat_format(tokenizer).end_of_turn or ends)[0]
    return prompt_text, completion


def reply_ids(tokenizer, prompt: list[dict], reply: str) -> tuple[list[int], list[int]]:
    """Token ids of `prompt` (with the generation prompt) and of what the model must write to give `reply`: as
    training trains it, the reply and its end-of-turn token, with whatever the template puts ahead of the
    reply in the answer (Qwen3's empty `<think></think>` block, which takes room in `max_new_tokens` too)."""
    prompt_text, completion = last_turn(tokenizer, prompt, {"role": "assistant", "content": reply})
    return (tokenizer(prompt_text, add_special_tokens=False)["input_ids"],
            tokenizer(completion, add_special_tokens=False)["input_ids"])


def end_tokens(tokenizer) -> tuple[str, ...]:
    """The strings that end an assistant turn in this template's text (its eos where it names none)."""
    fmt = chat_format(tokenizer)
    return (tuple(dict.fromkeys(fmt.turn_ends + fmt.end_of_turn))
            or tuple(t for t in [getattr(tokenizer, "eos_token", None)] if t))


# ---------------------------------------------------------------- stopping


def stop_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends an answer: the tokenizer's eos, the generation config's eos (an int or a list) and
    the template's end-of-turn token, in that order, without repeats."""
    ids: list[int] = []
    values = [getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)]
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        values += [tokenizer.convert_tokens_to_ids(t) for t in chat_format(tokenizer).end_of_turn]
    for value in values:
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(t, int) and t >= 0 and t not in ids and t != getattr(tokenizer, "unk_token_id",
                                                                               None):
                ids.append(t)
    return ids


def turn_end(text: str, start: int, ends, limit: int, content: str = "") -> int:
    """The end of the first end-of-turn token after the turn's reply (after its reasoning: gpt-oss closes an
    analysis message with <|end|> and the final answer with <|return|>), before `limit`."""
    after = text.find(content, start) if content else -1
    start = after + len(content) if 0 <= after < limit else start
    ends = [at + len(token) for token in ends if 0 <= (at := text.find(token, start)) < limit]
    return min(ends) if ends else limit
