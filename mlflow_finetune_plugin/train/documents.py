"""A fine-tune that starts from documents (`data.documents`, docs/documents.md), before the model loads: the
documents read and chunked with the model's tokenizer, the question rows (the user's `data.train` /
`data.eval` rows, a teacher's written from the chunks, or both), the three sets (`data/document_rows.py`), the
retriever over every chunk, and the training rows RAFT-style. After training, `evaluate/documents.py` scores
the four contenders and `evaluate/documents_verdict.py` says what to deploy; the retriever goes with the
logged model (`logged_model.py`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_finetune_plugin import tags as tag_names
from mlflow_finetune_plugin.data.document_rows import DocumentSets, question_rows, raft_rows, sort_rows
from mlflow_finetune_plugin.data.splits import Splits
from mlflow_finetune_plugin.retriever import Retriever
from mlflow_finetune_plugin.tags import lineage_tags

# The held-out share of teacher-written questions (in their second wording) when data.eval_split does not say.
DEFAULT_KNOWN_SHARE = 0.3


@dataclass
class Prepared:
    splits: Splits
    sets: DocumentSets
    retriever: Retriever
    digest: str
    raft: dict
    # the lineage tags of the data (rank 0; splits.log_inputs' for files)
    lineage: dict = field(default_factory=dict)


def prepare(recipe, tokenizer, run_id: str, main: bool = True) -> Prepared:
    """Everything a documents recipe trains and is evaluated on, printed and (on rank 0) logged."""
    from datasets import Dataset

    from mlflow_finetune_plugin.data.documents import holdout_files, read_documents

    data = recipe.data
    documents = read_documents(data.documents, recipe.project_dir, tokenizer, data.chunk_tokens)
    if main:
        print("\n".join(documents.report.lines()))
    held = set(holdout_files(documents.files, data.documents_holdout, recipe.train.seed))
    train, evaluated = _own_rows(recipe)
    if recipe.questions is not None and recipe.questions.teacher:
        from mlflow_finetune_plugin.distill.questions import written_questions

        train += written_questions(recipe, documents.chunks, run_id, documents.digest)
    sets = sort_rows(train, evaluated, held, set(documents.files), data.eval_split or DEFAULT_KNOWN_SHARE,
                     recipe.train.seed)
    if not sets.train:
        from mlflow_finetune_plugin.errors import FinetuneError

        raise FinetuneError(
            "data.documents: no question row trains (every row is on a held-out document, or none "
            "was given): give data.train rows with `source` keys on other documents, or fewer "
            "data.documents_holdout")
    retriever = Retriever(documents.chunks, recipe.retrieval.embedding, recipe.retrieval.k)
    cfg = recipe.retrieval
    if cfg.raft:
        rows, raft = raft_rows(sets.train, retriever, documents.chunks, cfg.oracle_share, cfg.closed_book,
                               recipe.train.seed)
    else:
        rows, raft = [{"messages": r["messages"]} for r in sets.train], {"questions": len(sets.train)}
    if main:
        for note in sets.notes:
            print(f"Documents: {note}.")
        print(f"Documents: {sets.counts()}; {len(held)} of {len(documents.files)} documents held out; "
              + _raft_line(raft, cfg))
    known = Dataset.from_list([{"messages": r["messages"]} for r in sets.known]) if sets.known else None
    prepared = Prepared(Splits(Dataset.from_list(rows), known, "chat"), sets, retriever, documents.digest,
                        raft)
    if main:
        prepared.lineage = _log(recipe, documents, prepared, held)
    return prepared


def _own_rows(recipe) -> tuple[list[dict], list[dict]]:
    """The user's question rows: data.train's and data.eval's, where given and present."""
    data = recipe.data

    def read(path):
        if not path or not Path(path).is_file():
            return []
        return question_rows(path, data.system_prompt, data.columns, data.tags)

    return read(data.train), read(data.eval)


def _raft_line(raft: dict, cfg) -> str:
    if not cfg.raft:
        return "training on the questions alone (retrieval.raft: false)."
    said = (f"RAFT training rows: {raft['with_oracle']} with the answer's chunk among {cfg.k} "
            f"({raft['oracle_put_in']} put in where retrieval missed it), {raft['distractors_only']} with "
            f"distractors only")
    if raft["closed_book"]:
        said += f", and each question once without chunks ({raft['closed_book']})"
    return said + "."


def _log(recipe, documents, prepared: Prepared, held: set[str]) -> dict:
    """The documents and the rows as the run's inputs; the held-out documents and the RAFT counts as a file.
    Returns the lineage tags: the training rows' digest (they are made from the documents and the questions),
    format chat."""
    import mlflow
    import mlflow.data
    import pandas as pd

    from mlflow_finetune_plugin.data.documents import log_documents

    log_documents(documents)
    mlflow.set_tag(tag_names.DOCUMENTS_DIGEST, documents.digest)
    sets = prepared.sets
    mlflow.log_dict({"held_out_documents": sorted(held), "raft": prepared.raft,
                     "train_questions": len(sets.train), "known_questions": len(sets.known),
                     "unseen_questions": len(sets.unseen), "notes": sets.notes}, "documents/sets.json")
    mlflow.log_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sets.unseen),
                    "documents/unseen_questions.jsonl")
    digests = {}
    for name, ds, context in (("documents-train", prepared.splits.train, "training"),
                              ("documents-known", prepared.splits.eval, "eval")):
        if ds is not None:
            frame = pd.DataFrame({"messages": [json.dumps(m, ensure_ascii=False) for m in ds["messages"]]})
            dataset = mlflow.data.from_pandas(frame, source=str(documents.root), name=name)
            mlflow.log_input(dataset, context=context, tags={"documents_digest": documents.digest})
            digests[context] = dataset.digest
    return lineage_tags(dataset_digest=digests["training"], data_format="chat")
