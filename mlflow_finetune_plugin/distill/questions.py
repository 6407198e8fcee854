"""Questions from the user's documents (`questions:`, docs/documents.md): a teacher reads each chunk of
`data.documents` and writes question-answer rows, each with a quote copied from its chunk.

Nothing the teacher writes is taken on trust: a row whose quote is not in its chunk (after collapsing
whitespace and case; otherwise word for word) is dropped, as are rows missing a field, near-duplicate
questions, replies that are not JSON and replies cut at `questions.max_tokens`, each counted by reason. A
request that fails on one chunk is counted and the other chunks go on; a teacher that is down before the first
request stops the run, as in `-e distill`. Replies are cached per chunk like distill's answers
(`paths.cache_root()/questions`, one file per teacher and its settings): a rerun asks only the chunks not
answered yet.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from mlflow_finetune_plugin import paths
from mlflow_finetune_plugin import tags as tag_names
from mlflow_finetune_plugin.data.prompts import write_rows
from mlflow_finetune_plugin.distill.answers import AnswerCache, ask, cache_key
from mlflow_finetune_plugin.distill.estimate import APPROXIMATED, approximate_tokens
from mlflow_finetune_plugin.errors import FinetuneError

QUESTIONS_DIR = "questions"  # the run's artifact folder, the job's folder and the cache's
ROWS_ARTIFACT = f"{QUESTIONS_DIR}/rows.jsonl"
SUMMARY_ARTIFACT = f"{QUESTIONS_DIR}/summary.json"
DATASET_NAME = "questions"   # the rows as the run's MLflow dataset input

# Why a reply or a row makes no training row (the keys of the summary's `dropped`).
FAILED = "teacher error"                        # per chunk: the request failed (after retries)
CUT = "cut at max_tokens"                       # per reply: finish_reason length
UNPARSABLE = "unparsable reply"                 # per reply: no JSON array or object in it
MISSING = "missing question, answer or quote"   # per row
NOT_QUOTED = "quote not in chunk"               # per row: the teacher's evidence is not in the chunk
# per row: word overlap with a kept question >= questions.dedupe
DUPLICATE = "near-duplicate question"

PROMPT = """Write up to {n} question-answer pairs about the document excerpt below: questions a reader of \
the \
document could ask, each answered by the excerpt alone.

Reply with a JSON array only, of objects with these keys:
- "question": the question, understandable without the excerpt
- "rephrased": the same question in other words
- "answer": the answer, a short, complete sentence
- "quote": the words of the excerpt that hold the answer, copied exactly

Source: {where}

Excerpt:
{text}"""


@dataclass(eq=False)
class _Ask:
    """One chunk's request, as `distill.answers.ask` takes it."""
    key: str
    chunk: dict
    messages: list[dict] = field(default_factory=list)
    tools: list | None = None


def prompt_of(chunk: dict, per_chunk: int) -> list[dict]:
    """The messages that ask the teacher for one chunk's questions."""
    where = chunk.get("source", "")
    if chunk.get("page"):
        where += f", page {chunk['page']}"
    if chunk.get("heading"):
        where += f", section {chunk['heading']!r}"
    return [{"role": "user", "content": PROMPT.format(n=per_chunk, where=where, text=chunk["text"].strip())}]


def _ask_of(chunk: dict, per_chunk: int) -> _Ask:
    messages = prompt_of(chunk, per_chunk)
    # the chunk's id, and a hash of the prompt (its text, source and per_chunk); the teacher's settings name
    # the file
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True,
                                       ensure_ascii=False).encode()).hexdigest()[:16]
    return _Ask(f"{chunk['id']}|{digest}", chunk, messages)


def questions_from_chunks(config, chunks: list[dict], cache_dir: Path, echo=print) -> tuple[list[dict], dict]:
    """The verified question rows the teacher (`config`, a QuestionsConfig) writes from `chunks` (at most
    `config.max_chunks`, in order), and the summary: chunks asked, cached, replies, rows written, drops by
    reason, the teacher, the tokens the requests of this call used. The plan (chunks to ask, estimated tokens)
    is echoed before the first request."""
    if not config.teacher:
        raise FinetuneError(
            f"{config.SECTION}.teacher is empty: name the teacher that writes questions from the "
            "documents (an OpenAI-compatible base URL http://HOST:PORT/v1, or models:/NAME@ALIAS)")
    asks = [_ask_of(c, config.per_chunk) for c in chunks[:config.max_chunks or None]]
    cache = AnswerCache(Path(cache_dir) / f"{cache_key(config)}.jsonl")
    todo = [a for a in asks if a.key not in cache.answers]
    plan = {"chunks_read": len(chunks), "chunks_used": len(asks), "to_ask": len(todo),
            "cached": len(asks) - len(todo), "prompt_tokens": approximate_tokens(a.messages for a in todo),
            "prompt_tokens_counted_by": APPROXIMATED, "reply_tokens_at_most": len(todo) * config.max_tokens}
    echo(plan_sentence(config, plan))
    failed: dict[str, str] = {}
    label = config.teacher
    if todo:
        label = ask(config, todo, cache, noun=("reply", "replies"), unit="chunk", failed=failed)
    rows, dropped = verified(asks, cache.answers, failed, config.dedupe)
    used = [cache.answers[a.key] for a in todo if a.key in cache.answers]
    summary = {"teacher": label, "cache_key": cache_key(config), "chunks": len(asks),
               "chunks_asked": len(todo), "cached": plan["cached"], "replies": len(asks) - len(failed),
               "rows_written": len(rows), "dropped": dict(dropped.most_common()),
               "prompt_tokens": sum(r.get("prompt_tokens") or 0 for r in used),
               "completion_tokens": sum(r.get("completion_tokens") or 0 for r in used), "estimate": plan,
               "errors": sorted(set(failed.values()))[:5]}
    return rows, summary


def plan_sentence(config, plan: dict) -> str:
    """`Teacher URL: questions from 5 of the 6 chunks (questions.max_chunks 5); 4 to ask, 1 cached: about
    1,234 prompt tokens (...) and at most 2,048 reply tokens (4 x questions.max_tokens 512)`"""
    s = config.SECTION
    head = (
        f"Teacher {config.teacher}: questions from {plan['chunks_used']} of the {plan['chunks_read']} chunk"
        f"{'s' if plan['chunks_read'] != 1 else ''}" + (f" ({s}.max_chunks {config.max_chunks})"
                                                        if plan["chunks_used"] < plan["chunks_read"] else ""))
    if not plan["to_ask"]:
        return f"{head}; every reply is cached: the teacher is not asked"
    cap = "" if config.max_chunks else f"; -P {s}.max_chunks=N caps them"
    return (
        f"{head}; {plan['to_ask']} to ask, {plan['cached']} cached: about {plan['prompt_tokens']:,} prompt "
        f"tokens ({plan['prompt_tokens_counted_by']}) and at most {plan['reply_tokens_at_most']:,} reply "
        f"tokens ({plan['to_ask']} x {s}.max_tokens {config.max_tokens}){cap}")


def verified(asks: list, replies: dict, failed: dict, dedupe: float) -> tuple[list[dict], Counter]:
    """The rows of the replies that pass every check, in chunk order, and the drops by reason."""
    rows, dropped, kept = [], Counter(), []
    for a in asks:
        if a.key in failed:
            dropped[FAILED] += 1
            continue
        reply = replies[a.key]
        if reply.get("finish_reason") == "length":
            dropped[CUT] += 1
            continue
        items = parsed_items(reply.get("answer") or "")
        if items is None:
            dropped[UNPARSABLE] += 1
            continue
        for item in items:
            row, reason = _row(item, a.chunk)
            if row is not None:
                words = _words(row["messages"][0]["content"])
                if any(_jaccard(words, other) >= dedupe for other in kept):
                    row, reason = None, DUPLICATE
                else:
                    kept.append(words)
                    rows.append(row)
            if reason:
                dropped[reason] += 1
    return rows, dropped


def _row(item, chunk: dict) -> tuple[dict | None, str | None]:
    fields = [item.get(k) if isinstance(item, dict) else None for k in ("question", "answer", "quote")]
    if not all(isinstance(f, str) and f.strip() for f in fields):
        return None, MISSING
    question, answer, quote = (f.strip() for f in fields)
    if normalised(quote) not in normalised(chunk["text"]):
        return None, NOT_QUOTED
    rephrased = item.get("rephrased")
    if not isinstance(rephrased,
                      str) or not rephrased.strip() or normalised(rephrased) == normalised(question):
        rephrased = None
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "source": chunk["source"], "chunk": chunk["id"], "quote": quote,
            "rephrased": rephrased.strip() if rephrased else None}, None


def normalised(text: str) -> str:
    """Runs of whitespace collapsed to one space, case folded: what a quote must match in its chunk."""
    return " ".join(text.split()).casefold()


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"\w+", text.casefold()))


def _jaccard(a: frozenset, b: frozenset) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 1.0


_FENCE = re.compile(r"```[A-Za-z]*[ \t]*\n?(.*?)```", re.S)


def parsed_items(text: str) -> list | None:
    """The rows in a reply: a JSON array (or one object, or an object holding the array) alone, inside ```
    fences, or with text around it. None: no JSON found."""
    for candidate in [m.group(1) for m in _FENCE.finditer(text)] + [text]:
        candidate = candidate.strip()
        spans = [candidate] + [candidate[candidate.find(o):candidate.rfind(c) + 1] for o,
                               c in (("[", "]"), ("{", "}")) if 0 <= candidate.find(o) < candidate.rfind(c)]
        for span in spans:
            try:
                items = _as_list(json.loads(span))
            except ValueError:
                continue
            if items is not None:
                return items
    return None


def _as_list(value) -> list | None:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        if "question" in value:
            return [value]
        return next((v for v in value.values() if isinstance(v, list)), None)  # {"questions": [...]}
    return None


def sentence(summary: dict) -> str:
    """`Questions from documents: 12 rows written from 5 chunks; dropped: quote not in chunk 5, ...`"""
    dropped = ", ".join(f"{reason} {n}" for reason, n in summary["dropped"].items())
    return (
        f"Questions from documents: {summary['rows_written']} "
        f"row{'s' if summary['rows_written'] != 1 else ''} written from {summary['chunks']} "
        f"chunk{'s' if summary['chunks'] != 1 else ''}; dropped: {dropped or 'none'} "
        f"({summary['chunks_asked']} chunks asked, {summary['cached']} from the cache)")


def written_questions(recipe, chunks: list[dict], run_id: str, documents_digest: str) -> list[dict]:
    """The run's question rows from the documents' `chunks` (`recipe.questions` is the teacher): logged as
    `questions/rows.jsonl` and `questions/summary.json` and as the MLflow dataset input `questions`, tagged
    with the documents' digest. Raises when no row survives."""
    import mlflow

    config = recipe.questions
    if config is None or not config.teacher:
        raise FinetuneError(
            "data.documents gives chunks but questions.teacher is empty, and data.train has no rows: "
            "set questions.teacher (an OpenAI-compatible base URL http://HOST:PORT/v1, or "
            "models:/NAME@ALIAS) to write questions from them, or give your own rows in data.train")
    echo = partial(print, file=sys.stderr)
    rows, summary = questions_from_chunks(config, chunks, paths.cache_root() / QUESTIONS_DIR, echo=echo)
    summary["documents_digest"] = documents_digest
    out_dir = paths.job_dir(run_id) / QUESTIONS_DIR
    write_rows(out_dir / "rows.jsonl", rows)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    echo(sentence(summary))
    mlflow.log_artifact(str(out_dir / "rows.jsonl"), QUESTIONS_DIR)
    mlflow.log_artifact(str(out_dir / "summary.json"), QUESTIONS_DIR)
    mlflow.set_tags({tag_names.QUESTIONS_TEACHER: summary["teacher"],
                     tag_names.QUESTIONS_DOCUMENTS_DIGEST: documents_digest,
                     tag_names.QUESTIONS_ROWS: sentence(summary).split(": ", 1)[1][:5000]})
    if not rows:
        raise FinetuneError(
            f"questions: no row survived from {summary['chunks']} chunks ({_why(summary)}); the counts are "
            f"the run's {SUMMARY_ARTIFACT}. Use a stronger teacher (-P questions.teacher=URL), more chunks "
            f"(questions.max_chunks{f' is {config.max_chunks}' if config.max_chunks else ''}), or give your "
            "own rows in data.train (chat rows with a `source` key naming their document)")
    _log_input(rows, out_dir / "rows.jsonl", documents_digest, summary["teacher"])
    return rows


def _why(summary: dict) -> str:
    why = ", ".join(f"{n} {reason}" for reason, n in summary["dropped"].items()) or "the replies held no rows"
    return why + (f"; the teacher said: {summary['errors'][0]}" if summary["errors"] else "")


def _log_input(rows: list[dict], path: Path, documents_digest: str, teacher: str) -> None:
    """The rows as the run's dataset input `questions`: its source the rows file, its tags the documents'
    digest and the teacher that wrote them."""
    import mlflow
    from datasets import Dataset

    from mlflow_finetune_plugin.data.read import mlflow_dataset

    dataset = mlflow_dataset(Dataset.from_list(rows), str(path), name=DATASET_NAME)
    mlflow.log_input(dataset, context="training",
                     tags={"format": "chat", "documents_digest": documents_digest, "teacher": teacher})
