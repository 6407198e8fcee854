"""A recipe that starts from the user's documents (`data.documents`, docs/documents.md): how the chunks are
retrieved and how retrieval enters training (`retrieval:`), and the teacher that writes question rows from the
chunks where the user has none (`questions:`)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from mlflow_finetune_plugin.config.distill import TeacherConfig
from mlflow_finetune_plugin.config.section import Section

# The document files `data.documents` reads, by suffix.
DOCUMENT_SUFFIXES = (".md", ".markdown", ".txt", ".text", ".html", ".htm", ".pdf")
# What to do when data.documents is set and data.train holds no question rows (recipe loading and the preflight).
NO_QUESTIONS = ("data.documents gives the documents, but nothing gives the questions: give data.train question rows "
                "(with `source` keys naming the document each answer comes from), or a questions.teacher to write "
                "them from the chunks (docs/documents.md)")


class RetrievalConfig(Section):
    """Retrieval over the chunks of `data.documents`: the `rag` contender (the base model with the top-k chunks in
    its prompt), the `tuned-rag` contender (the tuned model with them), training RAFT-style, and what a version
    trained this way carries and does when served."""

    k: int = Field(3, ge=1, description="Chunks put in the prompt, most similar to the question first.")
    embedding: str | None = Field(
        None, description="Empty: BM25 over the chunks' words (bm25s). A sentence-transformers model (hub id or "
                          "local folder) to rank chunks by embedding similarity instead.")
    raft: bool = Field(True, description="Train with retrieved chunks in each question's prompt (RAFT): the tuned "
                                         "model learns to answer from them. false: questions alone (closed book).")
    oracle_share: float = Field(
        0.8, ge=0.0, le=1.0, description="RAFT: share of the rows whose chunks include the one the answer comes "
                                         "from (put in among the distractors when retrieval missed it); the rest "
                                         "carry distractors only, so the model also learns the facts themselves.")
    closed_book: bool = Field(
        True, description="RAFT: each question also trains without chunks, so the tuned model answers without "
                          "retrieval too (the `tuned` contender) and not only with it (`tuned-rag`).")


class QuestionsConfig(TeacherConfig):
    """A teacher that writes question-answer rows from the chunks of `data.documents`, asked once per chunk; each
    answer must quote its chunk, and rows whose quote is not in it are dropped and counted."""

    SECTION: ClassVar[str] = "questions"
    per_chunk: int = Field(3, ge=1, description="Questions asked for per chunk.")
    max_chunks: int | None = Field(
        None, gt=0, description="The most chunks the teacher is asked about (a paid teacher is paid per token); "
                                "empty: every chunk of the training documents and of data.documents_holdout.")
    dedupe: float = Field(0.9, gt=0.0, le=1.0,
                          description="Questions this similar to an earlier one (0-1, word overlap) are removed.")
    max_tokens: int = Field(512, gt=0, description="The longest reply asked for (one chunk's questions).")
