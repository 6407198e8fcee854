"""Retrieval over document chunks, and the prompt that carries what it found: one module for every place that
retrieves, so that training rows (RAFT), the evaluation's `rag` and `tuned-rag` contenders, the logged model's
`predict`, `serve` and the playground put the same chunks into the same prompt.

A chunk is a dict: `id` (`SOURCE#N`), `source` (the document's path under `data.documents`), `text`, and where
known `line` (first line, 1-based), `page` (a PDF's page, 1-based) and `heading` (the section it sits under).

The retriever is BM25 over the chunks' words (`bm25s`: sparse, numpy only) by default, or a
sentence-transformers model by name. A logged model trained with retrieval carries its chunks and these
settings under `RETRIEVAL_DIR` (`save` / `load`); nothing but this module, `bm25s` (and sentence-transformers
where named) is needed to retrieve. Every logged model carries it: it imports nothing of the package but
`messages.py` (a leaf).
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow_finetune_plugin.messages import last_user_index, last_user_text, text_of

RETRIEVAL_DIR = "retrieval"       # the artifact of a logged model that retrieves
CHUNKS_FILE = "chunks.jsonl"
SETTINGS_FILE = "retriever.json"
BM25 = "bm25"
# What heads the chunks in a prompt; the question follows them.
CONTEXT_HEADER = "Answer the question from these documents where they hold the answer."


def query_of(messages: list[dict]) -> str:
    """What is retrieved for: the last user turn's text (its parts a line each)."""
    return last_user_text(messages, sep="\n")


def context_text(chunks: list[dict]) -> str:
    """The retrieved chunks as the prompt shows them, numbered, each under its source."""
    parts = [CONTEXT_HEADER]
    for i, chunk in enumerate(chunks, 1):
        where = chunk.get("source", "")
        if chunk.get("page"):
            where += f", page {chunk['page']}"
        parts.append(f"[{i}] {where}\n{chunk['text'].strip()}")
    return "\n\n".join(parts)


def with_context(messages: list[dict], chunks: list[dict]) -> list[dict]:
    """`messages` with the chunks put before the last user turn's question, in that turn (every chat template
    takes a user turn; not all take a second system message). No chunks: the messages as they are."""
    if not chunks:
        return list(messages)
    last = last_user_index(messages)
    if last is None:
        return list(messages)
    out = [dict(m) for m in messages]
    content, context = out[last].get("content"), context_text(chunks)
    if isinstance(content, list):
        out[last]["content"] = [{"type": "text", "text": context + "\n\nQuestion: "}, *content]
    else:
        out[last]["content"] = f"{context}\n\nQuestion: {text_of(content)}"
    return out


def tokens(texts: list[str]) -> list[list[str]]:
    """Lower-cased words of two letters or more, English stopwords left out (bm25s' own tokenizer): the words
    every BM25 index of the package compares."""
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def bm25_index(tokenized: list[list[str]]):
    """The BM25 index (`bm25s`, Lucene's formula and defaults) over tokenized texts: the one the retriever,
    the evaluation's retrieved shots (`evaluate/retrieval.py`) and drift (`monitor/drift.py`) score with."""
    import bm25s

    index = bm25s.BM25()
    index.index(tokenized, show_progress=False)
    return index


class Retriever:
    """The k chunks most similar to a query: BM25 (`embedding` None) or a sentence-transformers model's
    cosine."""

    def __init__(self, chunks: list[dict], embedding: str | None = None, k: int = 3):
        self.chunks, self.embedding, self.k = list(chunks), embedding or None, k
        self._index = None

    @property
    def kind(self) -> str:
        return self.embedding or BM25

    def _built(self):
        if self._index is None and self.chunks:
            texts = [c["text"] for c in self.chunks]
            if self.embedding:
                from sentence_transformers import SentenceTransformer

                model = SentenceTransformer(self.embedding)
                self._index = (model, model.encode(texts, normalize_embeddings=True, show_progress_bar=False))
            else:
                self._index = bm25_index(tokens(texts))
        return self._index

    def scores(self, queries: list[str]):
        """One row of scores over the chunks per query (higher: more similar)."""
        import numpy as np

        index = self._built()
        if index is None:
            return np.zeros((len(queries), 0))
        if self.embedding:
            model, vectors = index
            return model.encode(queries, normalize_embeddings=True, show_progress_bar=False) @ vectors.T
        rows = []
        for words in tokens(queries):
            rows.append(index.get_scores(words) if words else np.zeros(len(self.chunks)))
        return np.asarray(rows, dtype=float).reshape(len(queries), len(self.chunks))

    def search_many(self, queries: list[str], k: int | None = None) -> list[list[dict]]:
        """For each query, the `k` (default: the retriever's) most similar chunks, best first; equal scores
        keep the chunks' order, so a run repeats."""
        import numpy as np

        k = self.k if k is None else k
        if not queries:
            return []
        found = []
        for row in self.scores(queries):
            order = np.argsort(-np.asarray(row), kind="stable")[:k]
            found.append([{**self.chunks[int(i)], "score": float(row[int(i)])} for i in order])
        return found

    def search(self, query: str, k: int | None = None) -> list[dict]:
        return self.search_many([query], k)[0]

    def save(self, folder: str | Path) -> Path:
        """The chunks and the settings as files under `folder` (a logged model's `RETRIEVAL_DIR` artifact)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / CHUNKS_FILE, "w", encoding="utf-8") as f:
            for chunk in self.chunks:
                f.write(json.dumps({k: v for k, v in chunk.items() if k != "score"}, ensure_ascii=False)
                        + "\n")
        (folder / SETTINGS_FILE).write_text(json.dumps({"embedding": self.embedding, "k": self.k}),
                                            encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Retriever:
        folder = Path(folder)
        settings = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
        with open(folder / CHUNKS_FILE, encoding="utf-8") as f:
            chunks = [json.loads(line) for line in f if line.strip()]
        return cls(chunks, settings.get("embedding"), int(settings.get("k") or 3))

    def requirements(self) -> list[str]:
        """What a deployed model needs to retrieve as this one does."""
        return ["bm25s", "numpy"] if not self.embedding else ["sentence-transformers"]
