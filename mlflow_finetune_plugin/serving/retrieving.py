"""A version trained with retrieval, served: each chat request for its name is asked with the chunks its
retriever finds for the last user turn, as its logged model's `predict` asks (`models/retrieving.retrieved`,
one function for both), before the request reaches the engine. The chunks and the retriever come with the
logged model (its `retrieval` artifact): no other service runs. Under `serve --trace`, the search is a
RETRIEVER span under the request's CHAT_MODEL span, where MLflow's retrieval judges read it. The base model's
name (`NAME-vN-base`) is served as it is."""

from __future__ import annotations

import json

from mlflow_finetune_plugin.models.retrieving import retrieved
from mlflow_finetune_plugin.serving.choices import retriever_of
from mlflow_finetune_plugin.serving.tracing import served_choice


def asked(retriever, messages: list[dict], span=None) -> list[dict]:
    """`messages` as a version with `retriever` (None: one that does not retrieve) is asked them: with the
    chunks it finds, the search a RETRIEVER child of `span` where the request is traced."""
    if retriever is None:
        return messages
    return retrieved(retriever, messages, parent=span, traced=span is not None)


def rewriter(retriever):
    """What the front does to a request for a retrieving version's name: a chat request's messages with the
    chunks (other requests as they are); the search recorded under the request's span where it is traced."""

    def rewrite(body: bytes, span=None) -> bytes:
        request = json.loads(body or b"{}")
        if isinstance(request, dict) and isinstance(request.get("messages"), list):
            request["messages"] = asked(retriever, request["messages"], span)
        return json.dumps(request).encode()

    return rewrite


def rewrite_for(served: str):
    """The front's rewrite for served name `served` (`Routes(rewrite_for=)`): `rewriter` for a version that
    retrieves, None for every other name."""
    choice = served_choice(served)
    retriever = retriever_of(choice) if choice is not None else None
    return rewriter(retriever) if retriever is not None else None
