"""The openai engine: answers come from OpenAI-compatible servers (`vllm serve --enable-lora`, `transformers
serve`), typically started with `mlflow-finetune serve`.

Each model choice maps to (server URL, model name). By default every choice goes to the one `base_url` under
`served_name(choice)` (`bot-v3`, `bot-v3-base`), the names `mlflow-finetune serve` gives; `urls` and `models`
override that per choice (two `transformers serve` processes, or a server someone else named).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.serving.base import Engine, ModelChoice, Settings, plain_messages
from mlflow_finetune_plugin.serving.server import served_name


class OpenAIEngine(Engine):
    """Streams chat completions from OpenAI-compatible endpoints."""

    name = "openai"
    # its server is `mlflow-finetune serve`, which retrieves per request (retrieving.py)
    retrieves_itself = True

    def __init__(self, base_url: str | None = None, urls: dict[str, str] | None = None,
                 models: dict[str, str] | None = None, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 600.0):
        if not base_url and not urls:
            raise FinetuneError(
                "the openai engine needs a server: --openai-url http://127.0.0.1:8000/v1 (start one "
                "with `mlflow-finetune serve models:/NAME@ALIAS --engine vllm|transformers`)")
        self.base_url = base_url.rstrip("/") if base_url else None
        self.urls = {k: v.rstrip("/") for k, v in (urls or {}).items()}
        self.models = dict(models or {})
        self.api_key = api_key or "not-needed"  # local servers ignore it; the client insists on one
        self.concurrency = concurrency
        self.timeout = timeout
        self._clients: dict[str, object] = {}
        self._lock = threading.Lock()

    def endpoint(self, choice: ModelChoice) -> tuple[str, str]:
        """(server URL, model name) that serves `choice`."""
        url = self.urls.get(choice.key) or self.base_url
        if not url:
            raise FinetuneError(
                f"no server is configured for {choice.key}: add --openai-url {choice.key}=URL "
                "(or a default --openai-url URL)")
        return url, self.models.get(choice.key) or served_name(choice)

    def _client(self, url: str):
        try:
            from openai import OpenAI
        except ImportError:
            raise FinetuneError("the openai engine needs the `openai` package: pip install openai "
                                "(from the project's clone: pip install -e '.[serving]')") from None
        with self._lock:
            if url not in self._clients:
                self._clients[url] = OpenAI(base_url=url, api_key=self.api_key, timeout=self.timeout,
                                            max_retries=0)
            return self._clients[url]

    def stream(self, choice: ModelChoice, messages: list[dict], settings: Settings) -> Iterator[str]:
        """Stream the answer from the server; connection and model errors become FinetuneErrors with the
        fix."""
        # ranges only: the playground applies its own cap
        settings = settings.checked(max_new_tokens_cap=None)
        if settings.num_beams > 1:
            raise FinetuneError(
                f"num_beams={settings.num_beams}: the OpenAI API has no beam search (transformers "
                "serve ignores it; vLLM's is an extension); use num_beams 1 here, or the playground's "
                "transformers or vllm engine")
        url, model = self.endpoint(choice)
        client = self._client(url)
        import openai  # importable: _client checked
        try:
            stream = client.chat.completions.create(
                model=model, messages=plain_messages(messages), stream=True, temperature=settings.temperature,
                top_p=settings.top_p, max_tokens=settings.max_new_tokens)
            with stream:
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
        except openai.APIConnectionError as e:
            raise FinetuneError(f"cannot reach the server for {choice.key} at {url} ({e}); start it with "
                                f"`mlflow-finetune serve models:/{choice.name}/{choice.version}"
                                f"{':base' if choice.base else ''} --engine transformers`, or fix "
                                "--openai-url"
                                ) from None
        except openai.APIStatusError as e:
            hint = (f"it may not serve a model named {model!r}: name it with --served-model {choice.key}=NAME"
                    if e.status_code in (400, 404) else "see the server's log")
            raise FinetuneError(f"{url} answered {e.status_code} for {choice.key} (model {model!r}): "
                                f"{_detail(e)}; {hint}") from None

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


def _detail(error) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("message") or body.get("error") or body)
    return getattr(error, "message", None) or str(error)
