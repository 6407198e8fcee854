"""Every original chat template TRL ships (`trl/chat_templates/*.jinja`, not TRL's `*_training` patches)
through what the project does with a template (issue 52): the loss mask, system messages, stop ids, the prompt
the model answers after, and reading the answer back. A template TRL adds later is a new row of this test by
itself.

Each template runs on the built-in tiny tokenizer, given the template's own special tokens (found by rendering
a conversation and collecting its markers) and a bos/eos of its own, as a base model given
`model.chat_template` would be. Fast: no model, tokenizers only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CONVERSATION = [{"role": "system", "content": "SYSTEXT answer in French."},
                {"role": "user", "content": "USERONE where is the station?"},
                {"role": "assistant", "content": "La gare est ici."},
                {"role": "user", "content": "USERTWO and the bank?"},
                {"role": "assistant", "content": "La banque est là."}]
REPLIES = ["La gare est ici.", "La banque est là."]
# Markers a template writes: <|...|>, <｜...｜>, Gemma 4's <|turn> / <turn|>, <start_of_turn>, [INST]-style.
_MARKER = re.compile(r"<[|｜][^<>\s]{0,40}?[|｜]?>|<[^<>\s|｜]{1,40}[|｜]>|<[a-z_/]{1,30}>|\[/?[A-Z_]{"
                     r"3,20}\]")
BOS, EOS = "<|tplbos|>", "<|tpleos|>"

# Templates the project cannot train on, each with the reason; their check must fail loudly (a FinetuneError
# with what to do, or the template's own error), never pass with a wrong mask.
REFUSED: dict[str, str] = {
    # Vision-language templates that read a message's content as a list of parts ({"type": "text", "text":
    # ...}) are given string contents as one text part (Idefics3, SmolVLM: they train); Llava-Next's raises on
    # parts too.
    "llava_next": "has no attribute 'text'",
}


def _template_dir() -> Path:
    import trl

    return Path(trl.__file__).parent / "chat_templates"


def _originals() -> list[str]:
    return sorted(p.stem for p in _template_dir().glob("*.jinja") if not p.stem.endswith("_training"))


def _tokenizer(name: str):
    """The tiny tokenizer with this template, its markers as special tokens, and a bos/eos of its own."""
    from transformers import PreTrainedTokenizerFast

    from mlflow_finetune_plugin.models.base import load_tokenizer, resolve_model_path

    load_tokenizer("tiny")  # builds the cached model folder
    tok = PreTrainedTokenizerFast.from_pretrained(resolve_model_path("tiny"))
    tok.chat_template = (_template_dir() / f"{name}.jinja").read_text(encoding="utf-8")
    tok.add_special_tokens({"bos_token": BOS, "eos_token": EOS})
    found = set()
    for messages, prompt in ((CONVERSATION, False), (CONVERSATION[:2], True), (CONVERSATION[1:], False)):
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        # a template that refuses this shape: the markers of the others suffice
        except Exception:  # noqa: BLE001
            continue
        for m in messages:
            text = text.replace(m["content"], " ")
        found |= set(_MARKER.findall(text))
    tok.add_special_tokens({"additional_special_tokens": sorted(found - {BOS, EOS})},
                           replace_extra_special_tokens=False)
    return tok


@pytest.mark.parametrize("name", _originals())
def test_every_trl_template_trains_replies_stops_and_answers(name):
    from mlflow_finetune_plugin.errors import FinetuneError
    from mlflow_finetune_plugin.models.answers import answer_text
    from mlflow_finetune_plugin.models.chat_format import (
        chat_format,
        last_turn,
        stop_ids,
    )
    from mlflow_finetune_plugin.models.turn_spans import tokenize_row
    from tests.matrix_helpers import trained_pieces

    tok = _tokenizer(name)
    if name in REFUSED:
        with pytest.raises(Exception) as refused:  # noqa: PT011 - the template's own error or ours
            tokenize_row(tok, CONVERSATION)
        assert REFUSED[name] in str(refused.value), str(refused.value)
        if isinstance(refused.value, FinetuneError):
            assert "model.chat_template" in str(refused.value)
        return
    fmt = chat_format(tok)
    encoded = tokenize_row(tok, CONVERSATION)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    row = tok.decode(ids)
    pieces = trained_pieces(tok, ids, mask)

    # System messages: kept by the template (or folded by it), else folded by us, never lost.
    assert fmt.system in ("kept", "folded")
    assert "SYSTEXT" in row, (fmt.system, row)

    # The loss mask: each reply, and nothing of the system message or the questions.
    trained = "".join(pieces)
    for reply in REPLIES:
        assert reply in trained, (pieces, fmt)
    assert "SYSTEXT" not in trained and "USERONE" not in trained and "USERTWO" not in trained, pieces
    # ... ending with the token that ends the turn, which stops generation.
    stops = set(stop_ids(tok))
    ends = set(fmt.turn_ends) | {tok.eos_token}
    assert any(pieces[-1].endswith(t) for t in ends), (pieces[-1], ends)
    last_end = next(t for t in ends if pieces[-1].endswith(t))
    assert tok.convert_tokens_to_ids(last_end) in stops, (last_end, stops)

    # Training and inference give the model the same prefix before its answer: the row's last reply is trained
    # right after the generation prompt, as the model is asked to answer.
    prompt_text, completion = last_turn(tok, CONVERSATION[:-1], CONVERSATION[-1])
    prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)][-1:]), (prompt_text[-80:], row[-120:])
    written = tok(completion, add_special_tokens=False)["input_ids"]
    assert ids[len(prompt):len(prompt) + len(written)] == written
    assert all(mask[len(prompt):len(prompt) + len(written)])
    # What the model writes there reads back as the reply alone.
    assert answer_text(tok, written) == REPLIES[-1], (completion, fmt)

    # No rendering depends on the day.
    import datetime

    today = datetime.date.today()
    for shown in (today.strftime("%Y-%m-%d"), today.strftime("%d %b %Y")):
        assert shown not in row

    # Stop ids: the eos and the template's end of turn.
    assert tok.eos_token_id in stops and fmt.end_of_turn, fmt


def test_renders_made_outside_chat_format_read_the_pinned_date_during_a_fine_tune():
    """TRL's DPO, KTO and GRPO trainers render rows and prompts with the tokenizer themselves: `fine_tune`
    runs under `pinned_clock`, so those renders get the pinned date too (Llama 3.2's header here), and the
    clock is put back."""
    import datetime

    from transformers import AutoTokenizer

    from mlflow_finetune_plugin.models.template_clock import PINNED_DATE, pinned_clock
    from mlflow_finetune_plugin.models.tiny_families import family_model_path

    tokenizer = AutoTokenizer.from_pretrained(family_model_path("llama3"))
    messages = [{"role": "user", "content": "hi"}]
    pinned, today = PINNED_DATE.strftime("%d %b %Y"), datetime.date.today().strftime("%d %b %Y")
    with pinned_clock(), pinned_clock():  # nested, as a render inside a fine-tune is
        assert pinned in tokenizer.apply_chat_template(messages, tokenize=False)
    assert today in tokenizer.apply_chat_template(messages, tokenize=False)
