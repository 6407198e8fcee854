"""Replay: general text mixed into supervised training, so that the model keeps what it knew (`data.replay`).

A fine-tune on a few hundred conversations at a high learning rate makes ordinary text much less likely to the
model: the forgetting check (`eval/forgetting/ppl_ratio`) measures it. The fix peers use first is to mix
general data back in: LLaMA-Factory mixes datasets (`mix_strategy`, `interleave_probs`), and
continual-learning work calls it rehearsal or replay. Here a share of the training rows (`data.replay_share`,
of all rows) is plain text from a corpus kept apart from the forgetting check's set: the prose bundled in
`assets/replay/` (written for this project) or a file of the recipe's own. Replay rows carry the
language-model loss on every token, with no chat template; the task's rows keep their assistant-only loss.
Both are tokenized here and mixed (seeded) before TRL packs them, so a packed row may hold conversations and
replayed paragraphs side by side, attention kept within each.

`data.replay_loss: kl` uses the same rows another way: the training rows stay as they are, and each step also
scores one replay row and pulls the tuned model's next-token distribution on it towards the base model's (a
distillation term, as in "learning without forgetting"; the trainer computes it). One-hot targets on a small
corpus repeated at a high learning rate are memorised rather than generalised; the base model's whole
distribution at every position is a denser target (docs/methods.md has the measurements).
"""

from __future__ import annotations

import random
from pathlib import Path

from mlflow_finetune_plugin.data.text import read_texts

BUNDLED = Path(__file__).parents[1] / "assets" / "replay" / "general_prose.txt"
KEY = "data.replay"


def replay_path(recipe) -> Path | None:
    """The replay corpus the recipe names: the bundled prose for `true`, None when off."""
    value = recipe.data.replay
    if value is False:
        return None
    return BUNDLED if value is True else Path(value)


def read_replay(recipe) -> list[str]:
    """The replay texts ([] when off); a bad file raises FinetuneError naming it (and the line, for
    .jsonl)."""
    path = replay_path(recipe)
    return read_texts(path, KEY) if path else []


def replay_count(n_train: int, share: float) -> int:
    """Replay rows so that they are `share` of all training rows (at least one)."""
    return max(1, round(n_train * share / (1.0 - share)))


def replay_rows(tokenizer, texts: list[str], n: int, max_length: int, seed: int):
    """`n` rows of `input_ids` + `assistant_masks` (every token trained), cycling through `texts` in a seeded
    order.

    A text longer than `max_length` tokens is cut into pieces of `max_length`, each a row of its own, as
    pretraining chunks its documents; each text ends with the end-of-text token, so the model also learns
    where prose stops.
    """
    from datasets import Dataset

    pieces = replay_pieces(tokenizer, texts, max_length, seed)
    chosen = [pieces[i % len(pieces)] for i in range(n)]
    return Dataset.from_dict({"input_ids": chosen, "assistant_masks": [[1] * len(ids) for ids in chosen]})


def replay_pieces(tokenizer, texts: list[str], max_length: int, seed: int) -> list[list[int]]:
    """The token ids of every text (and its end-of-text token) in pieces of at most `max_length`, in a seeded
    order: the rows replay cycles through."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids = ids + eos
        pieces += [ids[i: i + max_length] for i in range(0, len(ids), max_length)
                   if len(ids[i: i + max_length]) > 1]
    return [pieces[i] for i in random.Random(seed).sample(range(len(pieces)), len(pieces))]


def with_replay(tokenized_train, replay, seed: int):
    """The task's tokenized rows and the replay rows as one training set, shuffled (seeded)."""
    from datasets import concatenate_datasets

    return concatenate_datasets([tokenized_train, replay]).shuffle(seed=seed)


def describe(n_train: int, replay, tokenized_train, path: Path) -> str:
    """One line for the run's output: how much of the training is replay, in rows and in trained tokens."""
    replay_tokens = sum(len(ids) for ids in replay["input_ids"])
    task_tokens = sum(sum(mask) for mask in tokenized_train["assistant_masks"])
    share = replay_tokens / max(1, replay_tokens + task_tokens)
    return (
        f"Replay ({KEY}): {len(replay)} rows of general text from {path.name} mixed into {n_train} training "
        f"rows ({len(replay) / (len(replay) + n_train):.0%} of rows, {share:.0%} of the tokens that carry "
        "loss)")
