"""The `retrieval` contender's shots: for each held-out question, the k train conversations most similar to
it.

Similarity is BM25 (the package's one retriever, `retriever.py`: `bm25s`, sparse, numpy only, nothing
downloaded) between the question's user turns and each train conversation's user turns. It is the strongest
cheap alternative to fine-tuning a user has: prompting with
the nearest examples, as a retrieval-augmented prompt would. A train conversation whose user turns equal the
question (a duplicate across the splits) is never a shot of that question: it would hand the base model the
answer.
"""

from __future__ import annotations

from mlflow_finetune_plugin.messages import text_of
from mlflow_finetune_plugin.retriever import Retriever


def user_text(messages: list[dict]) -> str:
    """The user turns of a conversation, one text (what BM25 compares)."""
    return "\n".join(text_of(m.get("content")) for m in messages if m.get("role") == "user")


def same_question(a: str, b: str) -> bool:
    """Equal up to case and whitespace: a row copied between splits often differs in nothing else."""
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def nearest_shots(train_conversations: list[list[dict]], questions: list[list[dict]],
                  k: int) -> list[list[list[dict]]]:
    """For each prompt in `questions`, up to `k` train conversations, most similar first (ties: the earlier
    row).

    Only train conversations with a user turn and an assistant answer are candidates; those whose user turns
    equal the question's are left out. Below k candidates with any word in common, the rest of the k are the
    next in order (score 0), so every question gets as many shots as the few-shot contender.
    """
    import numpy as np

    pool = [conv for conv in train_conversations
            if user_text(conv).strip() and any(m.get("role") == "assistant" for m in conv)]
    if k <= 0 or not pool:
        return [[] for _ in questions]
    docs = [user_text(conv) for conv in pool]
    asked = [user_text(prompt) for prompt in questions]
    shots = []
    for question, scores in zip(asked, Retriever([{"text": doc} for doc in docs]).scores(asked)):
        # Stable sort on the negated scores: equal scores keep the file's order, so a run is repeatable.
        order = np.argsort(-np.asarray(scores), kind="stable")
        picked = [int(i) for i in order if not same_question(docs[i], question)][:k]
        shots.append([pool[i] for i in picked])
    return shots

