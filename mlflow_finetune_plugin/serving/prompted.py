"""A registered optimized prompt applied to a client's conversation, as `serve --prompt` and the playground's
prompt side ask the base model with it (registry/prompts.py): the instruction after the conversation's system
message, then the shots before its turns. A prompt whose search picked retrieved shots asks with the `k` train
conversations nearest the conversation's user turns, drawn from the shot pool its run logged, by the same BM25
retrieval the evaluation scored it with (`evaluate/retrieval.py`); the evaluation's trimming to the context
length is not repeated here (a request too long for the model fails as it would without the prompt)."""

from __future__ import annotations

import json

from mlflow_finetune_plugin.evaluate.retrieval import nearest_shots
from mlflow_finetune_plugin.registry.prompts import ServedPrompt, apply_prompt


def asked(messages: list[dict], prompt: ServedPrompt) -> list[dict]:
    """`messages` as the base model is asked them with `prompt`."""
    retrieved = nearest_shots(prompt.pool, [messages], prompt.k)[0] if prompt.pool and prompt.k > 0 else None
    return apply_prompt(messages, prompt.template, retrieved)


def rewriter(prompt: ServedPrompt):
    """What the front does to a request for the prompt's name: a chat request with `asked` messages (other
    requests as they are); the request's span (`span`) is not needed."""

    def rewrite(body: bytes, span=None) -> bytes:
        request = json.loads(body or b"{}")
        if isinstance(request, dict) and isinstance(request.get("messages"), list):
            request["messages"] = asked(request["messages"], prompt)
        return json.dumps(request).encode()

    return rewrite
