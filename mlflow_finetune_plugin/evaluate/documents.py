"""The evaluation of a recipe that starts from documents (`data.documents`, docs/documents.md): four
contenders on two held-out sets.

The contenders: the base model zero-shot (`base`), the base model with the k chunks retrieval finds for the
question in its prompt (`rag`), the tuned model alone (`tuned`), and the tuned model with those chunks
(`tuned-rag`). The sets (`data/document_rows.py`): questions on known documents (their documents trained),
logged as `eval/<contender>/ <metric>` like any evaluation, so gates and the model card read them; and
questions on unseen documents (held out whole), logged as `eval/unseen/<contender>/<metric>`. Each answer's
cost is measured as for the other contenders (`cost.py`): the retrieved chunks show as prompt tokens and
latency. How often the chunk holding the answer was among the k retrieved is `eval/rag/recall_at_k` (and
`eval/unseen/rag/recall_at_k`). Beside the text metrics, each contender's `fact_recall`
(`scoring.fact_recall`): the share of the reference's numbers, codes and names its answer says, where a text
metric also rewards an answer in the right form with the wrong fact. What to deploy is
`documents_verdict.py`'s verdict.
"""

from __future__ import annotations

import contextlib
import hashlib
import json

from mlflow_finetune_plugin.data.document_rows import KNOWN, UNSEEN, oracle_ids, prompt_of
from mlflow_finetune_plugin.evaluate.answering import (
    _base_context,
    answer_all_ended,
    context_limit,
    generation_settings,
    lora_merged,
)
from mlflow_finetune_plugin.evaluate.cost import answer_costs, answer_lengths, parameter_counts
from mlflow_finetune_plugin.evaluate.report import (
    TUNED_FILE,
    EvalResult,
    add_answers,
    log_evaluation,
    table_rows,
)
from mlflow_finetune_plugin.evaluate.scoring import contender_metrics, fact_recall
from mlflow_finetune_plugin.evaluate.shots import prompt_length
from mlflow_finetune_plugin.evaluate.verdict import per_example_scores
from mlflow_finetune_plugin.messages import text_of
from mlflow_finetune_plugin.metrics import FACT_RECALL, RAG, RECALL, TUNED_RAG, UNSEEN_PREFIX, mean
from mlflow_finetune_plugin.retriever import query_of, with_context

DOCUMENT_CONTENDERS = ("base", RAG, "tuned", TUNED_RAG)
UNSEEN_TABLE, UNSEEN_SCORES = "eval/unseen_examples.json", "eval/unseen_scores.json"
RETRIEVED_CHUNKS = "eval/retrieved_chunks.json"
# The other prompt-only contenders, and why a documents recipe does not score them (promotion's default gate
# reads it).
NOT_SCORED = ("fewshot", "retrieval", "optimized")
NOT_SCORED_WHY = "a documents recipe: its prompt-only contenders are zero-shot and RAG over the documents"


def evaluate_documents(cfg, model, tokenizer, sets: dict[str, list[dict]], retriever, base_model=None,
                       served_with_retrieval: bool = False) -> dict[str, EvalResult]:
    """Score the four contenders on each non-empty set (`KNOWN`, `UNSEEN`: question rows, the first
    `cfg.max_examples` of each) and log them into the active run; returns set name -> result. With
    `served_with_retrieval`, the tuned answers recorded for serving parity (`report.TUNED_FILE`) are
    `tuned-rag`'s, as the logged model retrieves when served."""
    import mlflow

    results, retrieved_log = {}, {}
    for name in (KNOWN, UNSEEN):
        rows = [r for r in sets.get(name) or [] if r["messages"][-1]["role"]
                == "assistant"][: cfg.max_examples]
        if not rows:
            print(f"Documents: no held-out questions on {name} documents; that set is not scored.")
            continue
        print(f"\nQuestions on {name} documents ({len(rows)}):")
        result, retrieved = score_set(cfg, model, tokenizer, rows, retriever, base_model)
        results[name] = result
        retrieved_log[name] = retrieved
    if KNOWN in results:
        log_evaluation(results[KNOWN])
        if served_with_retrieval:
            mlflow.log_dict(_tuned_rag_record(results[KNOWN]), TUNED_FILE)
    if UNSEEN in results:
        _log_unseen(results[UNSEEN])
    mlflow.log_dict(retrieved_log, RETRIEVED_CHUNKS)
    return results


def score_set(cfg, model, tokenizer, rows: list[dict], retriever, base_model=None) -> tuple[EvalResult, list]:
    """One held-out set: every contender's answers, scores and costs, and retrieval's recall@k."""
    from mlflow_finetune_plugin.metrics import comparison_table

    examples = [(prompt_of(r), text_of(r["messages"][-1]["content"])) for r in rows]
    questions, references = [p for p, _ in examples], [a for _, a in examples]
    asked = [query_of(q) for q in questions]
    found = retriever.search_many(asked, retriever.k)
    limit = context_limit(model, tokenizer) - cfg.max_new_tokens
    with_chunks = [_fit(tokenizer, q, chunks, limit) for q, chunks in zip(questions, found)]
    hits = [_hit(r, chunks, retriever.chunks) for r, chunks in zip(rows, found)]
    metrics: dict[str, float] = {"eval/n_examples": float(len(rows))}
    measured = [h for h in hits if h is not None]
    if measured:
        metrics[f"eval/{RAG}/{RECALL}"] = sum(measured) / len(measured)
    params = parameter_counts(model, base_model)
    runs = {"tuned": (lambda: lora_merged(model), questions), TUNED_RAG: (lambda: lora_merged(model),
                                                                          with_chunks)}
    if _base_context(model, base_model) is not None:
        runs = {"base": (lambda: _base_context(model, base_model), questions),
                RAG: (lambda: _base_context(model, base_model), with_chunks), **runs}
    table = table_rows(examples)
    for name in [c for c in DOCUMENT_CONTENDERS if c in runs]:
        context, prompts = runs[name]
        with context() as contender:
            answers, endings, nll, n_tokens, seconds = answer_all_ended(contender, tokenizer, prompts,
                                                                        references, cfg, name)
        totals, per_example = contender_metrics(answers, references, nll, n_tokens, cfg)
        facts = fact_recall(answers, references, asked)
        if any(f is not None for f in facts):
            per_example[FACT_RECALL] = facts
            totals[FACT_RECALL] = mean([f for f in facts if f is not None])
        totals.update(answer_costs([prompt_length(tokenizer, p) for p in prompts],
                                   answer_lengths(tokenizer, answers), seconds,
                                   params.get("base" if name in ("base", RAG) else "tuned")))
        metrics.update({f"eval/{name}/{k}": v for k, v in totals.items()})
        add_answers(table, name, answers, per_example, endings if name in ("tuned", TUNED_RAG) else None)
    for row, chunks, hit in zip(table, found, hits):
        row["retrieved"] = ", ".join(c["id"] for c in chunks)
        row["retrieved_answer_chunk"] = hit
    print(comparison_table(metrics))
    if measured:
        print(f"Retrieval: the chunk holding the answer was among the {retriever.k} retrieved for "
              f"{sum(measured)} of {len(measured)} questions (recall@{retriever.k} "
              f"{metrics[f'eval/{RAG}/{RECALL}']:.2f}).")
    digest = hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()[:12]
    retrieved = [{"question": query_of(q), "chunks": [c["id"] for c in chunks], "answer_chunk_retrieved": hit}
                 for q, chunks, hit in zip(questions, found, hits)]
    return EvalResult(metrics, table, [c for c in DOCUMENT_CONTENDERS if c in runs], data_digest=digest,
                      prompts=questions, traces=cfg.traces, notes=dict.fromkeys(NOT_SCORED, NOT_SCORED_WHY),
                      generation=generation_settings(cfg, model, tokenizer)), retrieved


def recorded_sets(source_run: str | None, data: str | None, recipe: dict) -> dict[str, list[dict]]:
    """The held-out sets of a documents run, to score one of its versions again: questions on known documents
    from `data` (else the recipe's data.eval), less those on the documents the run held out
    (`documents/sets.json`); the unseen documents' questions the run logged, and those of `data` on held-out
    documents."""
    import mlflow

    from mlflow_finetune_plugin.data.document_rows import question_rows
    from mlflow_finetune_plugin.errors import FinetuneError

    data_cfg = recipe.get("data") or {}
    recorded, unseen = {}, []
    if source_run:
        with contextlib.suppress(Exception):  # a run that predates the file: no held-out documents known
            recorded = mlflow.artifacts.load_dict(f"runs:/{source_run}/documents/sets.json")
        with contextlib.suppress(Exception):
            text = mlflow.artifacts.load_text(f"runs:/{source_run}/documents/unseen_questions.jsonl")
            unseen = [json.loads(line) for line in text.splitlines() if line.strip()]
    held = set(recorded.get("held_out_documents") or [])
    path = data or data_cfg.get("eval")
    if not path and not unseen:
        raise FinetuneError("no held-out questions: pass --data FILE (question rows with `source` keys)")
    rows = question_rows(path, data_cfg.get("system_prompt")) if path else []
    known = [r for r in rows if r.get("source") not in held]
    return {KNOWN: known, UNSEEN: unseen + [r for r in rows if r.get("source") in held and r not in unseen]}



def _fit(tokenizer, question: list[dict], chunks: list[dict], limit: int) -> list[dict]:
    """The question with the chunks, the last ones dropped until the prompt leaves room for the answer."""
    chunks = list(chunks)
    messages = with_context(question, chunks)
    while len(chunks) > 1 and prompt_length(tokenizer, messages) > limit:
        chunks.pop()
        messages = with_context(question, chunks)
    return messages


def _hit(row: dict, chunks: list[dict], all_chunks: list[dict]) -> bool | None:
    """Was a chunk holding the row's answer retrieved? None when the row names no source to tell by."""
    oracles = oracle_ids(row, all_chunks)
    return None if not oracles else any(c["id"] in oracles for c in chunks)


def _tuned_rag_record(result: EvalResult) -> dict:
    """TUNED_FILE for a model that retrieves when served: the questions, and tuned-rag's answers to them."""
    return {"settings": {**result.generation, "retrieval": True},
            "rows": [{"messages": messages, "reference": row["reference"],
                      "answer": row[f"{TUNED_RAG}_answer"],
                      "ending": row.get(f"{TUNED_RAG}_ending")} for messages,
                     row in zip(result.prompts, result.rows)]}


def _log_unseen(result: EvalResult) -> None:
    """The unseen set under its own names: metrics eval/unseen/..., its table and per-example scores."""
    import mlflow
    import pandas as pd

    from mlflow_finetune_plugin.tracking import log_results

    log_results({UNSEEN_PREFIX + k[len("eval/"):]: v for k, v in result.metrics.items()})
    mlflow.log_table(pd.DataFrame(result.rows), UNSEEN_TABLE)
    mlflow.log_dict(per_example_scores(result.rows), UNSEEN_SCORES)
