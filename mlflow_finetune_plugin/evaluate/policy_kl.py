"""How far a tuned policy moved from its base on held-out prompts: the reward-hacking check beside GRPO's
rewards.

A reward model can be fooled; a policy that fools it drifts from the base model's language while its reward
climbs. Each held-out prompt's tuned greedy answer (the one the evaluation scored) is scored token by token by
the tuned policy and by the base (the adapter switched off, or the base loaded apart for a full fine-tune),
and the KL per answer token is TRL's GRPO `kl` metric: exp(ref - logp) - (ref - logp) - 1 (Schulman's k3
estimator, never negative), averaged over all answer tokens as TRL averages a batch. Logged as
`eval/tuned/kl_to_base` beside the rewards, rougeL and `answer_tokens`. Greedy answers are not samples of the
policy, so the figure is a distance to compare runs and checkpoints by, not an unbiased KL; it costs two
forward passes over the held-out answers.
"""

from __future__ import annotations

import contextlib


def answer_kl(model, tokenizer, prompts: list, answers: list[str], base_model=None,
              batch_size: int = 8) -> tuple[float | None, list[float | None]]:
    """(mean KL per answer token over all answers, each answer's own mean; None for an empty answer)."""
    import torch

    from mlflow_finetune_plugin.evaluate.preferences import token_logps
    from mlflow_finetune_plugin.models.chat_format import reply_ids

    rows = [reply_ids(tokenizer, p if isinstance(p, list) else [{"role": "user", "content": p}], a)
            for p, a in zip(prompts, answers)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, tokens, per_answer = 0.0, 0, []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                ids, mask, completion = _right_padded(rows[start:start + batch_size], pad)
                logp, scored = token_logps(model, ids, mask, completion)
                with _reference(model, base_model) as reference:
                    ref, _ = token_logps(reference, ids, mask, completion)
                delta = (ref - logp).clamp(max=20.0)  # exp() of a gap the reference finds near-impossible
                kl = (torch.exp(delta) - delta - 1.0) * scored
                total, tokens = total + kl.sum().item(), tokens + int(scored.sum())
                per_answer += [(k.sum() / n).item() if n else None for k, n in zip(kl, scored.sum(dim=1))]
    finally:
        model.train(was_training)
    return (total / tokens if tokens else None), per_answer


@contextlib.contextmanager
def _reference(model, base_model):
    """The base model: loaded apart (a full fine-tune), or the same weights with the adapter off."""
    if base_model is not None:
        yield base_model
        return
    with model.disable_adapter():
        yield model


def _right_padded(rows: list[tuple[list[int], list[int]]], pad: int):
    """input_ids, attention_mask and completion_mask of (prompt ids, answer ids) rows, right-padded."""
    import torch

    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask[i, :len(p) + len(c)] = 1
        completion[i, len(p):len(p) + len(c)] = 1
    return ids, mask, completion
