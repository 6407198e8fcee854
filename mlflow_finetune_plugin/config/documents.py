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
# What to do when data.documents is set and data.train holds no question rows (recipe loading and the
# preflight).
NO_QUESTIONS = (
    "data.documents gives the documents, but nothing gives the questions: give data.train question rows "
    "(with `source` keys naming the document each answer comes from), or a questions.teacher to write "
    "them from the chunks (docs/documents.md)")


class RetrievalConfig(Section):
    """Retrieval over the chunks of `data.documents`: the `rag` contender (the base model with the top-k
    chunks in its prompt), the `tuned-rag` contender (the tuned model with them), training RAFT-style, and
    what a version trained this way carries and does when served."""

    k: int = Field(3, ge=1, description="chunks put in the prompt, most similar first")
    embedding: str | None = Field(
        None, description="null: BM25 over the chunks' words (`bm25s`); a sentence-transformers model (hub "
                          "id or folder) ranks by cosine similarity instead (the logged model then requires "
                          "`sentence-transformers` and loads that model)")
    raft: bool = Field(
        True, description="train with retrieved chunks in each question's prompt; false: the questions "
                          "alone (the logged model then does not retrieve)")
    oracle_share: float = Field(
        0.8, ge=0.0, le=1.0, description="share of RAFT rows whose chunks include the answer's; the rest "
                                         "carry distractors only")
    closed_book: bool = Field(
        True, description="each question also trains without chunks, so `tuned` (no retrieval) is the same "
                          "model as `tuned-rag`")


class QuestionsConfig(TeacherConfig):
    """A teacher that writes question-answer rows from the chunks of `data.documents`, asked once per chunk;
    each answer must quote its chunk, and rows whose quote is not in it are dropped and counted."""

    SECTION: ClassVar[str] = "questions"
    per_chunk: int = Field(3, ge=1, description="questions asked for per chunk (at most)")
    max_chunks: int | None = Field(
        None, gt=0, description="the most chunks the teacher is asked about, the first ones in order (a "
                                "paid teacher is paid per token); null: every chunk")
    dedupe: float = Field(
        0.9, gt=0.0, le=1.0, description="a question whose word overlap (Jaccard, case folded) with a kept "
                                         "question is at least this is dropped")
    max_tokens: int = Field(
        512, gt=0, description="the longest reply (one chunk's questions); replies cut here are dropped and "
                               "counted")
