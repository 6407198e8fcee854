"""The user's documents (`data.documents`) as chunks for retrieval and for the questions a teacher writes:
found
(a folder or a glob under the project), read (`data/document_text.py`), chunked along their structure, checked
(empty files, duplicate chunks, unreadable files: `DocumentsReport`), and logged as an MLflow dataset input.

Chunking: a chunk never crosses a heading (Markdown `#` lines, HTML h1-h6) or a PDF page. Within a section,
consecutive paragraphs are merged up to `chunk_tokens`; a longer paragraph is split at sentence ends, a longer
sentence between words. Tokens are the model's tokenizer's where one is given, else estimated (words x 1.3).

A chunk's text starts with its heading path as a plain line ("Returns > Refunds"), no `#` markup, when it has
one: a paragraph often leaves its subject to the heading ("Within 30 days of delivery."), and BM25 or an
embedding finds the chunk by that subject only if the text carries it. The path is in `heading` too, and
counts against `chunk_tokens`. Chunk dicts are those of `retriever.py`: `id` (`SOURCE#N`, N from 1 within the
file, numbered before duplicates are dropped, so ids do not shift when another file changes), `source`,
`text`, and `line`, `page`, `heading` where known.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import math
import random
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlflow_finetune_plugin.config.documents import DOCUMENT_SUFFIXES
from mlflow_finetune_plugin.data.document_text import Block, Unreadable, read_blocks
from mlflow_finetune_plugin.errors import FinetuneError

KEY = "data.documents"
HOLDOUT_KEY = "data.documents_holdout"
REPORT_FILE = "documents/report.json"
WORDS_TO_TOKENS = 1.3  # the estimate where no tokenizer is at hand


@dataclass
class DocumentsReport:
    """What reading the documents found; `lines()` for a terminal, `as_dict()` for JSON."""

    root: str
    files: int = 0
    chunks: int = 0
    tokens: int = 0
    tokens_estimated: bool = True
    empty: list[str] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (dropped chunk id, the id it repeats)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def summary(self) -> str:
        how = "estimated: words x 1.3" if self.tokens_estimated else "by the model's tokenizer"
        return (
            f"Documents ({self.root}): {self.files} file{'s' if self.files != 1 else ''} read, {self.chunks} "
            f"chunk{'s' if self.chunks != 1 else ''} ({self.tokens} tokens, {how}), {len(self.empty)} empty, "
            f"{len(self.duplicates)} duplicate chunk{'s' if len(self.duplicates) != 1 else ''} dropped, "
            f"{len(self.unreadable)} unreadable")

    def lines(self) -> list[str]:
        return ([self.summary()] + [f"  empty: {path}" for path in self.empty]
                + [f"  duplicate: {dropped} repeats {kept} (dropped)" for dropped, kept in self.duplicates]
                + [f"  unreadable: {path}: {reason}" for path, reason in self.unreadable])

    def as_dict(self) -> dict:
        out = asdict(self)
        out["duplicates"] = [{"id": d, "duplicates": k} for d, k in self.duplicates]
        out["unreadable"] = [{"path": p, "reason": r} for p, r in self.unreadable]
        return out


@dataclass
class Documents:
    root: Path
    files: list[str]  # every file read (empty ones too), relative to root, posix
    chunks: list[dict]
    report: DocumentsReport
    digest: str  # sha256 over the chunks' sources and texts, 12 hex


# ------------------------------------------------------------------------------------------------------
# finding


def find_documents(spec: str, project_dir: str | None) -> tuple[Path, list[Path]]:
    """(root folder, files) of `data.documents`: a folder (every file under it with a document suffix, hidden
    ones aside), one file, or a glob (the files it matches; root: the folder before its first wildcard)."""
    base = Path(project_dir) if project_dir else Path.cwd()
    target = base / spec  # an absolute spec stays itself
    if glob.has_magic(spec):
        parts = target.parts
        fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        root = Path(*parts[:fixed])
        files = sorted(p for p in (Path(f) for f in glob.glob(str(target), recursive=True)) if p.is_file())
    elif target.is_dir():
        root = target
        files = sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(target).parts))
    else:
        root, files = target.parent, [target] if target.is_file() else []
    if not files:
        what = "no file matches" if glob.has_magic(spec) else "not found" if not target.exists() else \
            f"holds no document ({', '.join(DOCUMENT_SUFFIXES)})"
        raise FinetuneError(
            f"{KEY}: {spec!r}: {what} (looked for {target}). Point it at a folder of Markdown, "
            "text, HTML or PDF files, or a glob like docs/**/*.md, relative to the project folder.")
    return root, files


# -----------------------------------------------------------------------------------------------------
# chunking


def token_counter(tokenizer=None):
    """Tokens of a text: the tokenizer's count without special tokens, else words x 1.3 rounded up."""
    if tokenizer is None:
        return lambda text: math.ceil(len(text.split()) * WORDS_TO_TOKENS)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pack(text: str, spans: list[tuple[int, int]], budget: int, count) -> list[tuple[int, int]]:
    """Consecutive spans of `text` joined while the joined text fits `budget` tokens."""
    out: list[tuple[int, int]] = []
    for start, end in spans:
        if out and count(text[out[-1][0]:end]) <= budget:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def _split_long(text: str, budget: int, count) -> list[tuple[int, int]]:
    """A paragraph over `budget` as spans: sentences packed together, a sentence over budget by its words."""
    ends = [m.start() for m in re.finditer(r"(?<=[.!?])[\"')\]]*\s+", text)] + [len(text)]
    units, start = [], 0
    for end in ends:
        sentence = text[start:end]
        lead = len(sentence) - len(sentence.lstrip())
        if count(sentence) > budget:
            units += [(start + m.start(), start + m.end()) for m in re.finditer(r"\S+", sentence)]
        elif sentence.strip():
            units.append((start + lead, start + len(sentence.rstrip())))
        start = end
    return _pack(text, units, budget, count)


def _section_key(block: Block):
    return block.heading, block.page


def chunk_blocks(blocks: list[Block], source: str, chunk_tokens: int, count) -> list[dict]:
    """The chunks of one document (see the module's docstring), numbered `source#1`, `source#2`, ..."""
    pieces: list[tuple[Block, str]] = []  # (where it starts, its text) before merging
    for block in blocks:
        head = " > ".join(block.heading)
        budget = max(chunk_tokens - (count(head) if head else 0), chunk_tokens // 2)
        if count(block.text) <= budget:
            pieces.append((block, block.text))
            continue
        for start, end in _split_long(block.text, budget, count):
            line = None if block.line is None else block.line + block.text.count("\n", 0, start)
            pieces.append((Block(block.text[start:end], line, block.page, block.heading),
                           block.text[start:end]))
    merged: list[tuple[Block, str]] = []
    for block, text in pieces:
        if merged and _section_key(merged[-1][0]) == _section_key(block):
            head = " > ".join(block.heading)
            joined = merged[-1][1] + "\n\n" + text
            if count(f"{head}\n\n{joined}" if head else joined) <= chunk_tokens:
                merged[-1] = (merged[-1][0], joined)
                continue
        merged.append((block, text))
    chunks = []
    for n, (block, text) in enumerate(merged, 1):
        head = " > ".join(block.heading)
        chunk = {"id": f"{source}#{n}", "source": source, "text": f"{head}\n\n{text}" if head else text}
        for key, value in (("line", block.line), ("page", block.page), ("heading", head or None)):
            if value is not None:
                chunk[key] = value
        chunks.append(chunk)
    return chunks


# ------------------------------------------------------------------------------------------------------
# reading


def read_documents(spec: str, project_dir: str | None, tokenizer=None, chunk_tokens: int = 256) -> Documents:
    """Every document of `spec` read and chunked, duplicates dropped (kept once) and counted, unreadable and
    empty files reported; raises when no chunk is left."""
    documents = _read(*find_documents(spec, project_dir), tokenizer, chunk_tokens)
    if not documents.chunks:
        raise FinetuneError(f"{KEY}: no text in {spec!r} ({documents.root}): "
                            + "; ".join(line.strip() for line in documents.report.lines()[1:] or ["no file"])
                            + ". Give documents with text (a scanned PDF needs OCR first), or fix the files "
                              "above.")
    return documents


def _read(root: Path, paths: list[Path], tokenizer, chunk_tokens: int) -> Documents:
    count = token_counter(tokenizer)
    report = DocumentsReport(root=str(root), tokens_estimated=tokenizer is None)
    files, chunks, seen = [], [], {}
    for path in paths:
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() not in DOCUMENT_SUFFIXES:  # a glob can match anything
            report.unreadable.append((rel, f"unsupported suffix {path.suffix or '(none)'}: documents are "
                                           f"{', '.join(DOCUMENT_SUFFIXES)}; narrow the glob or convert the "
                                           "file"))
            continue
        try:
            blocks = read_blocks(path)
        except Unreadable as e:
            report.unreadable.append((rel, str(e)))
            continue
        except OSError as e:
            report.unreadable.append((rel, f"cannot be opened ({e.strerror or e}); check its permissions"))
            continue
        files.append(rel)
        found = chunk_blocks(blocks, rel, chunk_tokens, count)
        if not found:
            report.empty.append(rel)
        for chunk in found:
            same = " ".join(chunk["text"].lower().split())
            if same in seen:
                report.duplicates.append((chunk["id"], seen[same]))
            else:
                seen[same] = chunk["id"]
                chunks.append(chunk)
    report.files, report.chunks = len(files), len(chunks)
    report.tokens = sum(count(c["text"]) for c in chunks)
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(f"{chunk['source']}\0{chunk['text']}\0".encode())
    return Documents(root, files, chunks, report, digest.hexdigest()[:12])


def holdout_files(files: list[str], holdout: list[str] | float, seed: int) -> list[str]:
    """The documents kept out of training, sorted: those `holdout`'s paths or globs match (relative to
    data.documents; a folder holds out what is under it), or a share of them picked by `seed`."""
    if isinstance(holdout, (int, float)) and not isinstance(holdout, bool):
        if not 0 <= holdout < 1:
            raise FinetuneError(
                f"{HOLDOUT_KEY}: {holdout} is not a share; give one between 0 and 1 (0.2: a fifth "
                "of the documents), or a list of paths")
        n = max(1, round(holdout * len(files))) if holdout > 0 else 0
        held = sorted(random.Random(seed).sample(sorted(files), min(n, len(files))))
    else:
        held, unmatched = set(), []
        for pattern in holdout:
            folder = pattern.rstrip("/") + "/"
            hit = {f for f in files if fnmatch.fnmatchcase(f, pattern) or f == pattern
                   or f.startswith(folder)}
            held |= hit
            if not hit:
                unmatched.append(pattern)
        if unmatched:
            some = ", ".join(files[:8]) + (f", ... ({len(files)} in all)" if len(files) > 8 else "")
            verb = "matches" if len(unmatched) == 1 else "match"
            raise FinetuneError(
                f"{HOLDOUT_KEY}: {', '.join(map(repr, unmatched))} {verb} no document. Give paths "
                f"or globs relative to data.documents; its documents are: {some}")
        held = sorted(held)
    if held and len(held) >= len(files):
        raise FinetuneError(
            f"{HOLDOUT_KEY}: holds out every document ({len(files)}), which leaves none to train "
            "on; hold out fewer (a smaller share, or fewer paths)")
    return held


# ---------------------------------------------------------------------------------------------- logging,
# check


def log_documents(documents: Documents, name: str = "documents"):
    """The chunks as an MLflow dataset input of the active run (source: the documents' folder, digest: theirs)
    and the report as `documents/report.json`; returns the dataset."""
    import warnings

    import mlflow
    import pandas as pd
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    frame = pd.DataFrame([{key: c.get(key) for key in ("id", "source", "text", "line", "page", "heading")}
                          for c in documents.chunks])
    with warnings.catch_warnings():  # two local dataset source classes both claim a local path: same result
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(Path(documents.root).resolve()))
        dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=documents.digest)
    mlflow.log_input(dataset, context="documents", tags={"files": str(len(documents.files))})
    mlflow.log_dict(documents.report.as_dict(), REPORT_FILE)
    return dataset


def run_documents_check(spec: str, chunk_tokens: int = 256, model: str | None = None, strict: bool = False,
                        as_json: bool = False) -> int:
    """The body of `mlflow-finetune data check --documents`: print the report; 1 when nothing is found, and
    with `strict` when a file is unreadable or empty or no chunk was read; else 0 (those are warnings)."""
    import click

    if not spec:
        raise click.UsageError("give data FILES to check, or --documents PATH (a folder or glob of "
                               "documents)")
    try:
        root, paths = find_documents(spec, None)
    except FinetuneError as e:
        click.echo(json.dumps({"error": str(e)}, indent=2) if as_json else str(e), err=not as_json)
        return 1
    tokenizer = None
    if model:
        from mlflow_finetune_plugin.models.base import load_tokenizer

        tokenizer = load_tokenizer(model)
    report = _read(root, paths, tokenizer, chunk_tokens).report
    click.echo(json.dumps(report.as_dict(), indent=2, ensure_ascii=False) if as_json
               else "\n".join(report.lines()))
    warned = report.unreadable or report.empty or not report.chunks
    if warned and not strict and not as_json:
        print(
            "Unreadable or empty files, or no chunk, are warnings here; --strict makes them errors (exit 1).",
            file=sys.stderr)
    return 1 if strict and warned else 0
