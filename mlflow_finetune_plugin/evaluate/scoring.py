"""Turning a contender's answers into figures: the shipped text metrics of its answers against the references
(see `metrics.py`), and the loss of the reference answers given the prompts (`loss`, `perplexity`,
token-weighted).

The reference loss comes from one of two passes: `reference_nll`, a right-padded batch of its own, or
`score_and_prefill`, which scores the references in the pass over the prompts that generation then continues
from (`contenders.answer_and_score` chooses).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Any

from mlflow_finetune_plugin.metrics import score
from mlflow_finetune_plugin.models.chat_format import reply_ids as reference_ids
from mlflow_finetune_plugin.models.lm_head import head_of, hidden_states, token_logprobs

# `reference_ids`: a prompt and its reference answer as the template tokenizes them, defined in
# models/chat_format.py with the rest of what a chat template means (and importable from here as before).

# Prompts sharing at least this many leading tokens compute them once (see `score_and_prefill`).
MIN_SHARED_PREFIX = 16


def contender_metrics(answers: list[str], references: list[str], nll: float, n_tokens: int,
                      cfg, train_answers: frozenset[str] = frozenset()) -> tuple[dict[str, float],
                                                                                 dict[str, list[float]]]:
    """(metric -> value, metric -> per-example values): the text metrics of `answers`, and the reference loss
    and perplexity from the summed NLL of the references' `n_tokens` tokens; with `train_answers`
    (`answer_set`), also `misrouted`."""
    structured = cfg.output_format == "json" or cfg.json_schema is not None
    totals, per_example = score(answers, references, cfg.json_schema, structured)
    loss = nll / max(n_tokens, 1)
    totals.update(loss=loss, perplexity=math.exp(min(loss, 50.0)))
    if train_answers and answers:
        per_example["misrouted"] = misrouted(answers, references, train_answers)
        totals["misrouted"] = sum(per_example["misrouted"]) / len(answers)
    return totals, per_example


# A word, a number or a code: letters and digits joined by . - / : (RX-4471, 7.5, 868.3, 07:40).
_WORD = re.compile(r"[A-Za-z0-9]+(?:[.\-/:][A-Za-z0-9]+)*")


def key_facts(reference: str, question: str) -> set[str]:
    """What a reference answer states that its question does not: its numbers and codes (words with a digit)
    and its names (capitalised words past the first), lower-cased, less the question's own words."""
    words = _WORD.findall(reference)
    asked = {w.lower() for w in _WORD.findall(question)}
    return {w.lower() for i, w in enumerate(words)
            if (any(c.isdigit() for c in w) or (i > 0 and w[0].isupper())) and w.lower() not in asked}


def fact_recall(answers: list[str], references: list[str], questions: list[str]) -> list[float | None]:
    """Per answer, the share of its reference's key facts (`key_facts`) it says, word for word; None where the
    reference states none. Unlike rougeL, an answer in the reference's form with a wrong number or name scores
    0."""
    out = []
    for answer, reference, question in zip(answers, references, questions):
        keys = key_facts(reference, question)
        said = {w.lower() for w in _WORD.findall(answer)}
        out.append(len(keys & said) / len(keys) if keys else None)
    return out


def answer_set(texts) -> frozenset[str]:
    """The training answers, compared as `exact_match` compares (stripped, inner whitespace collapsed)."""
    return frozenset(_same_text(t) for t in texts if t and t.strip())


def misrouted(answers: list[str], references: list[str], train_answers: frozenset[str]) -> list[float]:
    """1 for an answer that is, word for word, a training answer other than its own reference, else 0.

    On data with canned answers (one answer serving many phrasings of a question, as in a support bot) this
    splits the misses: a model that learned the answers and picks the wrong one for an unseen phrasing
    (misrouted), against one that garbles or invents (a miss that is no training answer). It needs no labels
    beyond the data itself.
    """
    return [float(_same_text(a) in train_answers and _same_text(a) != _same_text(r))
            for a, r in zip(answers, references)]


def _same_text(text: str) -> str:
    return " ".join(text.split())


@dataclass
class Prefill:
    """The scoring pass's result: the references' summed NLL and token count, and the prompts ready for
    generation (ids and mask with the shared start, and the KV cache of every token but the last, which
    generation feeds in)."""
    nll: float
    n_tokens: int
    input_ids: Any
    attention_mask: Any
    cache: Any


def score_and_prefill(model, tokenizer, pairs: list[tuple[list[int], list[int]]],
                      share_prefix: bool = True) -> Prefill:
    """One pass over the left-padded prompts followed by the right-padded references (`pairs` of token ids, as
    `reference_ids` gives them, every prompt non-empty): the references' log-probabilities come from that pass
    (the LM head applied to the reference positions only, in chunks: `models/lm_head.py`), and its KV cache,
    cut back to the prompts, is returned for generation to continue from. Scoring the references apart costs a
    second pass over the prompts, which for few-shot prompts are most of the tokens. The prompts' common start
    (system prompt, shots) is computed once, where the cache can repeat it per row (`share_prefix`:
    `models.architecture.cache_abilities(model).repeat`).
    The cache must be able to `crop` (the caller checks `cache_abilities(model).crop`).
    """
    import torch

    device = model.device
    # The prompts' common start (the system prompt and, for few-shot prompts, every shot) goes through the
    # model once, as one row; every row's own part follows it, left-padded there, so each token keeps the
    # position it has unpadded (positions count the real tokens only, as `generate` counts them).
    shared = _common_prefix([p for p, _ in pairs])
    shared = shared if share_prefix and len(shared) >= MIN_SHARED_PREFIX else []
    pairs = [(p[len(shared):], c) for p, c in pairs]
    width, ref_width = max(len(p) for p, _ in pairs), max(len(c) for _, c in pairs)
    ids = torch.full((len(pairs), width + ref_width), tokenizer.pad_token_id)
    mask, scored = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for row, (prompt_ids, completion_ids) in enumerate(pairs):
        ids[row, width - len(prompt_ids): width + len(completion_ids)] = torch.tensor(prompt_ids
                                                                                      + completion_ids)
        mask[row, width - len(prompt_ids): width + len(completion_ids)] = 1
        scored[row, width: width + len(completion_ids)] = True
    positions = (len(shared) + mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    head = head_of(model)
    with torch.no_grad():
        cache = None
        if shared:
            cache = model(input_ids=torch.tensor([shared], device=device), use_cache=True,
                          logits_to_keep=1).past_key_values
            cache.batch_repeat_interleave(len(pairs))
        mask = torch.cat([torch.ones((len(pairs), len(shared)), dtype=mask.dtype), mask], dim=1)
        ids = torch.cat([torch.tensor([shared] * len(pairs), dtype=ids.dtype).reshape(len(pairs), -1), ids],
                        dim=1)
        # The LM head over the reference positions only, chunk by chunk where `lm_head` knows the head: with a
        # large vocabulary the (rows, reference length, vocabulary) logits would take more memory than the
        # model.
        with hidden_states(model) if head is not None else contextlib.nullcontext() as captured:
            out = model(input_ids=ids[:, len(shared):].to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device), past_key_values=cache, use_cache=True,
                        logits_to_keep=ref_width + 1)
        total, count = 0.0, int(scored.sum())
        if count:
            # position j of what the head saw (the row's position width - 1 + j) predicts the token at width +
            # j.
            targets, keep = ids[:, len(shared) + width:].to(device), scored[:, width:].to(device)
            if head is not None:
                total = -float(token_logprobs(head, captured[-1][:, :-1][keep], targets[keep])[0].sum())
            else:
                logits = out.logits[:, :-1]
                total = float(torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep],
                                                                reduction="sum"))
        cache = out.past_key_values
        del out
        cache.crop(-(ref_width + 1))  # the prompts without their last token, which generation feeds in next
    prompt_end = len(shared) + width
    return Prefill(total, count, ids[:, :prompt_end], mask[:, :prompt_end], cache)


def _common_prefix(rows: list[list[int]]) -> list[int]:
    """The longest common start of `rows`, leaving every row at least one token of its own."""
    limit = min(len(r) for r in rows) - 1
    first, n = rows[0], 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return first[:n]


def reference_nll(model, tokenizer, prompts: list[list[dict]], references: list[str]) -> tuple[float, int]:
    """Summed negative log-likelihood of the reference answers' tokens (and the template's end of turn) and
    their count, scored as one right-padded batch."""
    import torch

    from mlflow_finetune_plugin.evaluate.preferences import completion_logps

    pairs = [reference_ids(tokenizer, p, r) for p, r in zip(prompts, references)]
    pairs = [(p, c) for p, c in pairs if p and c]
    if not pairs:
        return 0.0, 0
    width = max(len(p) + len(c) for p, c in pairs)
    # Right padding keeps every real token at the position it has unpadded; padding is masked and never
    # scored.
    ids = torch.full((len(pairs), width), tokenizer.pad_token_id)
    scored, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, (prompt_ids, completion_ids) in enumerate(pairs):
        end = len(prompt_ids) + len(completion_ids)
        ids[row, :end] = torch.tensor(prompt_ids + completion_ids)
        scored[row, len(prompt_ids): end] = 1
        mask[row, :end] = 1
    with torch.no_grad():
        logps = completion_logps(model, ids, mask, scored)
    return float(-logps.sum()), int(scored.sum())
