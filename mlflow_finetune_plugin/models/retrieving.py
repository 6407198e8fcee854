"""A retrieving model's request: the chunks its retriever (`retriever.py`, carried with the logged model)
finds for a conversation's last user turn, put into that turn, and the search recorded as an MLflow RETRIEVER
span.

One function for every place that asks such a model: the logged model's `predict`, `serve`'s front, the
playground and serving parity, so each asks the model the same prompt. The span's outputs are the chunks as
MLflow's retriever spans hold documents (`mlflow.entities.Document`: `page_content`, `metadata` with
`doc_uri`, `id`), where MLflow's retrieval judges (`RetrievalGroundedness`, `RetrievalRelevance`) read a
trace's retrieved context.
"""

from __future__ import annotations

from mlflow_finetune_plugin.retriever import CONTEXT_HEADER, query_of, with_context

SPAN_NAME = "retrieve"
_CHUNK_DETAILS = ("source", "line", "page", "heading", "score")


def documents(chunks: list[dict]) -> list[dict]:
    """The chunks as the documents of a RETRIEVER span: the text as `page_content`, the source as `doc_uri`,
    the chunk's id as `id` and `chunk_id`, and where it sits (line, page, heading) and its score as
    metadata."""
    out = []
    for chunk in chunks:
        metadata = {"doc_uri": chunk.get("source", ""), "chunk_id": chunk.get("id")}
        metadata.update({k: chunk[k] for k in _CHUNK_DETAILS if k in chunk and k != "source"})
        out.append({"page_content": chunk.get("text", ""), "metadata": metadata, "id": chunk.get("id")})
    return out


def has_context(messages: list[dict]) -> bool:
    """Whether the last user turn carries retrieved chunks already (a conversation asked with them before, as
    evaluation records may hold it): it is not retrieved for again."""
    return query_of(messages).startswith(CONTEXT_HEADER)


def retrieved(retriever, messages: list[dict], parent=None, traced: bool = True) -> list[dict]:
    """`messages` as a retrieving model is asked them: the chunks `retriever` finds for the last user turn, in
    that turn (`retriever.with_context`). The search is a RETRIEVER span (inputs the query, outputs the
    documents) under `parent` (a live span: `serve`'s request span) or, without one, under the active span
    (`predict`'s); none with `traced` False. A conversation with no user turn, or one that carries its chunks
    already, is asked as it is."""
    import mlflow
    from mlflow.entities import SpanType

    query = query_of(messages)
    if not query.strip() or has_context(messages):
        return list(messages)
    if not traced:
        return with_context(messages, retriever.search(query))
    if parent is not None:
        span = mlflow.start_span_no_context(SPAN_NAME, span_type=SpanType.RETRIEVER, parent_span=parent,
                                            inputs={"query": query})
        try:
            chunks = retriever.search(query)
        except Exception as e:
            span.record_exception(e)
            span.end()
            raise
        span.end(outputs=documents(chunks))
        return with_context(messages, chunks)
    with mlflow.start_span(SPAN_NAME, span_type=SpanType.RETRIEVER) as span:
        span.set_inputs({"query": query})
        chunks = retriever.search(query)
        span.set_outputs(documents(chunks))
    return with_context(messages, chunks)
