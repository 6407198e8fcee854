"""The rows of a recipe that starts from documents (`data.documents`, docs/documents.md): question rows sorted
into what trains and the two held-out sets, and the training rows RAFT-style.

- **Known documents**: held-out questions whose documents train (`data.eval` rows, or a teacher's second
wording of
  a training question): they show what the tuned model learned of its documents.
- **Unseen documents**: every question on a document of `data.documents_holdout`, which never trains: what
only
  retrieval can answer.

A question row is a chat row (a user question, the assistant's answer) with the document it comes from
(`source`, its path under data.documents) and, where known, the text that holds the answer (`quote`) or its
chunk's id (`chunk`). Training RAFT-style (Zhang et al. 2024): each training question carries the chunks
retrieval finds for it; in `retrieval.oracle_share` of the rows the chunk holding the answer is among them
(put in over the last distractor when retrieval missed it), in the rest it is taken out, so the model learns
the facts too; with `retrieval.closed_book` every question also trains without chunks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from mlflow_finetune_plugin.data.formats import DataError, DataIssue
from mlflow_finetune_plugin.data.read import read_records, resolve_format, training_rows
from mlflow_finetune_plugin.messages import last_user_index
from mlflow_finetune_plugin.retriever import query_of, with_context

KNOWN, UNSEEN = "known", "unseen"


@dataclass
class DocumentSets:
    train: list[dict]                       # question rows that train (before RAFT)
    known: list[dict]                       # held out, on training documents
    unseen: list[dict]                      # held out, on data.documents_holdout
    notes: list[str] = field(default_factory=list)  # what was moved or left out, and why

    def counts(self) -> str:
        return f"{len(self.train)} training questions, {len(self.known)} held out on known documents, " \
               f"{len(self.unseen)} on unseen documents"


def question_rows(path: str, system_prompt: str | None = None, columns=None, tags=None) -> list[dict]:
    """Chat rows of a question file with their `source`, `quote` and `chunk` keys (the reader keeps only the
    chat)."""
    records = read_records(path, columns)
    fmt, _ = resolve_format(records, "auto", path, tags, "data.format", ("chat", "sharegpt", "alpaca",
                                                                         "prompt_completion"))
    rows, _, issues = training_rows(records, fmt, path, system_prompt, tags)
    if issues:
        raise DataError(issues)
    return [{**row, **{k: rec[k] for k in ("source", "quote", "chunk") if rec.get(k)}}
            for row, (_, rec) in zip(rows, records)]


def normalized(text: str) -> str:
    """Case and runs of whitespace folded: how a quote is found in its chunk."""
    return " ".join(str(text).casefold().split())


def oracle_ids(row: dict, chunks: list[dict]) -> set[str]:
    """The chunks a question's answer comes from: its `chunk`; else those of its source holding its quote;
    else every chunk of its source (recall is then counted by document). Empty when the row names no
    source."""
    if row.get("chunk"):
        return {row["chunk"]}
    source = row.get("source")
    if not source:
        return set()
    own = [c for c in chunks if c["source"] == source]
    if row.get("quote"):
        quote = normalized(row["quote"])
        holding = {c["id"] for c in own if quote in normalized(c["text"])}
        if holding:
            return holding
    return {c["id"] for c in own}


def sort_rows(train: list[dict], held: list[dict], holdout: set[str], sources: set[str], eval_share: float,
              seed: int) -> DocumentSets:
    """The three sets from the question rows of data.train (`train`) and data.eval (`held`).

    A row whose document is held out is an unseen question wherever it came from (it never trains); a row
    naming a document data.documents does not hold is an error. Without data.eval rows on known documents,
    `eval_share` of the training questions that carry a second wording (`rephrased`, a teacher's) are held out
    in that wording, and still train in the first."""
    unknown = sorted({r["source"] for r in train + held if r.get("source") and r["source"] not in sources})
    if unknown:
        raise DataError([DataIssue("data.train / data.eval", None,
                                   f"rows name documents that data.documents does not hold: {unknown[:5]}; "
                                   f"the `source` key is the document's path under data.documents "
                                   f"(e.g. {sorted(sources)[:3]})")])
    notes = []
    moved = [r for r in train if r.get("source") in holdout]
    if moved:
        notes.append(f"{len(moved)} question rows are on held-out documents (data.documents_holdout): "
                     "they are unseen held-out questions, not training rows")
    training = [r for r in train if r.get("source") not in holdout]
    unseen = moved + [r for r in held if r.get("source") in holdout]
    known = [r for r in held if r.get("source") not in holdout]
    if not known and eval_share > 0:
        worded = [r for r in training if r.get("rephrased")]
        picked = random.Random(seed).sample(worded, round(len(worded) * eval_share)) if worded else []
        known = [_reworded(r) for r in picked]
    return DocumentSets(training, known, unseen, notes)


def _reworded(row: dict) -> dict:
    messages = [dict(m) for m in row["messages"]]
    last_user = last_user_index(messages)
    messages[last_user]["content"] = row["rephrased"]
    return {**row, "messages": messages}


def prompt_of(row: dict) -> list[dict]:
    """The row's messages up to its last user turn: what is asked."""
    messages = row["messages"]
    last_user = last_user_index(messages)
    return messages[: last_user + 1]


def raft_rows(rows: list[dict], retriever, chunks: list[dict], oracle_share: float, closed_book: bool,
              seed: int) -> tuple[list[dict], dict]:
    """Training rows RAFT-style (see the module's note) and a summary: rows, with the oracle chunk, with
    distractors only, oracle put in over a miss, closed-book copies."""
    rng = random.Random(seed)
    k = retriever.k
    found = retriever.search_many([query_of(prompt_of(r)) for r in rows], k + 1)
    out, summary = [], {"questions": len(rows), "with_oracle": 0, "distractors_only": 0, "oracle_put_in": 0,
                        "closed_book": 0, "no_source": 0}
    by_id = {c["id"]: c for c in chunks}
    for row, hits in zip(rows, found):
        oracles = oracle_ids(row, chunks)
        hits = [{k_: v for k_, v in h.items() if k_ != "score"} for h in hits]
        if not oracles:
            context = hits[:k]
            summary["no_source"] += 1
        elif rng.random() < oracle_share:
            context = [h for h in hits if h["id"] in oracles][:1] or [by_id[sorted(oracles)[0]]]
            summary["oracle_put_in"] += not any(h["id"] in oracles for h in hits[:k])
            context += [h for h in hits if h["id"] not in oracles][: k - 1]
            rng.shuffle(context)  # the oracle anywhere among the distractors, not where retrieval ranks it
            summary["with_oracle"] += 1
        else:
            context = [h for h in hits if h["id"] not in oracles][:k]
            summary["distractors_only"] += 1
        out.append({"messages": _with_chunks(row["messages"], context)})
        if closed_book:
            out.append({"messages": row["messages"]})
            summary["closed_book"] += 1
    rng.shuffle(out)
    return out, summary


def _with_chunks(messages: list[dict], chunks: list[dict]) -> list[dict]:
    last_user = last_user_index(messages)
    return with_context(messages[: last_user + 1], chunks) + messages[last_user + 1:]
