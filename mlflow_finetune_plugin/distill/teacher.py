"""The teacher of `-e distill` (and of `questions:`): an OpenAI-compatible server (`distill.teacher:
http://HOST:PORT/v1`), asked over HTTP with `distill.concurrency` requests in flight, or a registered model
(`models:/NAME@ALIAS`) run in this process, `distill.concurrency` prompts per batch. Either gives each
prompt's answer as the row key `teacher` holds it. Errors name the keys of the section the teacher was read
from (`config.SECTION`)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from mlflow_finetune_plugin.config.distill import is_registered
from mlflow_finetune_plugin.errors import FinetuneError

# The message keys an OpenAI-compatible server takes (the rows' own, such as `weight`, stay here).
_MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")
_RETRIES = (1.0, 3.0)  # seconds before each retry of a request the server failed (429, 5xx, connection lost)


def teacher_of(config):
    return LocalTeacher(config) if is_registered(config.teacher) else EndpointTeacher(config)


def _answer(text: str, model: str, finish_reason, prompt_tokens, completion_tokens, latency_s: float,
            **known) -> dict:
    return {"answer": text or "", "model": model, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "latency_s": round(latency_s, 3),
            "finish_reason": finish_reason, **known}


class EndpointTeacher:
    """An OpenAI-compatible chat-completions server."""

    def __init__(self, config):
        self.config, self.url = config, config.teacher.rstrip("/")
        self.model, self.section = config.model, config.SECTION
        key = os.environ.get(config.api_key_env)
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = None

    @property
    def label(self) -> str:
        return f"{self.url} ({self.model})" if self.model else self.url

    def _http(self):
        import httpx

        if self._client is None:
            self._client = httpx.Client(timeout=self.config.timeout_s, headers=self._headers, trust_env=False,
                                        limits=httpx.Limits(max_connections=self.config.concurrency))
        return self._client

    def _down(self, e) -> FinetuneError:
        return FinetuneError(
            f"{self.section}.teacher {self.url} does not answer ({type(e).__name__}: {e}); nothing "
            "was trained. Start the teacher's server (e.g. `mlflow-finetune serve models:/NAME@ALIAS "
            f"--port 8000`), or fix -P {self.section}.teacher=URL (an OpenAI-compatible base URL "
            "ending in /v1)")

    def start(self) -> None:
        """Check that the server answers and find the model to ask for, before any prompt is sent."""
        import httpx

        try:
            got = self._http().get(f"{self.url}/models", timeout=min(10.0, self.config.timeout_s))
        except httpx.HTTPError as e:
            raise self._down(e) from None
        if got.status_code in (401, 403):
            raise FinetuneError(
                f"{self.section}.teacher {self.url} refused the key ({got.status_code}): set the "
                f"environment variable {self.config.api_key_env} ({self.section}.api_key_env) to its "
                "key")
        if self.model:
            return
        if got.status_code != 200:
            raise FinetuneError(f"{self.section}.teacher {self.url} answered {got.status_code} at /models "
                                f"({_detail(got)}); give the OpenAI-compatible base URL (ending in /v1), or "
                                f"the model to ask for with -P {self.section}.model=NAME")
        names = [m.get("id") for m in (got.json().get("data") or []) if isinstance(m, dict)]
        if len(names) != 1:
            raise FinetuneError(f"{self.section}.teacher {self.url} serves {len(names)} models"
                                f"{' (' + ', '.join(map(str, names[:10])) + ')' if names else ''}: name the "
                                f"one to ask with -P {self.section}.model=NAME")
        self.model = names[0]

    def ask(self, messages: list[dict], tools=None) -> dict:
        import httpx

        body = {"model": self.model, "messages": [{k: m[k] for k in _MESSAGE_KEYS if m.get(k) is not None}
                                                  for m in messages],
                "max_tokens": self.config.max_tokens, "temperature": self.config.temperature}
        if tools:
            body["tools"] = tools
        if self.config.stop:
            body["stop"] = self.config.stop
        for attempt in range(len(_RETRIES) + 1):
            start = time.perf_counter()
            try:
                got = self._http().post(f"{self.url}/chat/completions", json=body)
            except httpx.HTTPError as e:
                if attempt < len(_RETRIES):
                    time.sleep(_RETRIES[attempt])
                    continue
                raise self._down(e) from None
            if (got.status_code == 429 or got.status_code >= 500) and attempt < len(_RETRIES):
                time.sleep(_RETRIES[attempt])
                continue
            if got.status_code != 200:
                raise FinetuneError(f"{self.section}.teacher {self.url} answered {got.status_code} for model "
                                    f"{self.model!r}{' (after retries)' if attempt else ''}: {_detail(got)}")
            out = got.json()
            choice = (out.get("choices") or [{}])[0]
            usage = out.get("usage") or {}
            # `latency_s` is this request's round trip; with others in flight it also waited for them, so the
            # evaluation divides it by `concurrency` for the teacher's seconds per answer (evaluate/cost.py)
            return _answer((choice.get("message") or {}).get("content") or "", self.model,
                           choice.get("finish_reason"), usage.get("prompt_tokens"),
                           usage.get("completion_tokens"), time.perf_counter() - start,
                           concurrency=self.config.concurrency)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def answers(self, prompts: list, keep_going: bool = False) -> Iterator[tuple[object, dict]]:
        """(prompt, answer) as each arrives, `distill.concurrency` requests in flight; the first error stops
        the rest (answers given so far were handed out, and are cached), or with `keep_going` comes as that
        prompt's `{"error": why}` and the others go on. A stop (Ctrl-C, cancel) does not wait for the requests
        in flight: their answers are dropped, and asked again next time."""
        pool = ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="teacher")
        waiting, running = iter(prompts), {}
        try:
            for p in waiting:
                running[pool.submit(self.ask, p.messages, p.tools)] = p
                if len(running) >= self.config.concurrency:
                    break
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    prompt = running.pop(future)
                    yield prompt, _result(future, keep_going)
                    nxt = next(waiting, None)
                    if nxt is not None:
                        running[pool.submit(self.ask, nxt.messages, nxt.tools)] = nxt
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class LocalTeacher:
    """A registered model (`models:/NAME@ALIAS`, `models:/NAME/VERSION`) loaded here and asked in batches."""

    def __init__(self, config):
        self.config, self.model, self._loaded, self.params = config, config.teacher, None, None

    @property
    def label(self) -> str:
        return self.model

    def start(self) -> None:
        from mlflow_finetune_plugin.evaluate.cost import parameter_counts
        from mlflow_finetune_plugin.logged_model import load_logged_model

        self._loaded = load_logged_model(downloaded(self.model, self.config.SECTION))
        self.params = parameter_counts(self._loaded.model)["tuned"]

    def _batch(self, prompts: list) -> list[dict]:
        import torch

        from mlflow_finetune_plugin.models.answers import answer_text
        from mlflow_finetune_plugin.models.chat_format import prompt_ids, stop_ids

        tok, model = self._loaded.tokenizer, self._loaded.model
        start = time.perf_counter()
        encs = [{"input_ids": (ids := prompt_ids(tok, p.messages)), "attention_mask": [1] * len(ids)}
                for p in prompts]
        enc = {k: v.to(model.device) for k, v in tok.pad(encs, padding_side="left",
                                                         return_tensors="pt").items()}
        stops = set(stop_ids(tok, model.generation_config))
        sampling = (
            {"do_sample": True, "temperature": self.config.temperature}
            if self.config.temperature > 0
            else {"do_sample": False}
        )
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=self.config.max_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=sorted(stops), **sampling)
        each = (time.perf_counter() - start) / len(prompts)
        answers = []
        for enc_one, row in zip(encs, out[:, enc["input_ids"].shape[1]:].tolist()):
            end = next((i for i, t in enumerate(row) if t in stops), None)
            text, used = answer_text(tok, row), len(row) if end is None else end + 1
            cut = min((i for i in (text.find(s) for s in self.config.stop) if i >= 0), default=None)
            if cut is not None:  # a stop sequence ends the answer before it, as a server's `stop` does
                text, end = text[:cut], cut
                used = len(tok(text, add_special_tokens=False)["input_ids"])
            answers.append(_answer(text, self.model, "length" if end is None else "stop",
                                   len(enc_one["input_ids"]), used, each, params=self.params))
        return answers

    def answers(self, prompts: list, keep_going: bool = False) -> Iterator[tuple[object, dict]]:
        size = self.config.concurrency
        for i in range(0, len(prompts), size):
            batch = prompts[i:i + size]
            try:
                answers = self._batch(batch)
            except Exception as e:  # noqa: BLE001 - keep_going: the batch's prompts are counted as failed
                if not keep_going:
                    raise
                answers = [{"error": f"{type(e).__name__}: {e}"}] * len(batch)
            yield from zip(batch, answers)

    def close(self) -> None:
        self._loaded = None


def _result(future, keep_going: bool) -> dict:
    """A request's answer; with `keep_going`, a request the server failed is `{"error": why}` instead of
    raising."""
    try:
        return future.result()
    except FinetuneError as e:
        if not keep_going:
            raise
        return {"error": str(e)}


def downloaded(uri: str, section: str = "distill") -> str:
    """The local folder of a registered teacher (`models:/NAME@ALIAS`), downloaded once per process by
    MLflow."""
    import mlflow

    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri)
    # MLflow raises several kinds for a name, alias or version not found
    except Exception as e:  # noqa: BLE001
        raise FinetuneError(
            f"{section}.teacher {uri}: cannot load it ({str(e).splitlines()[0]}); name a registered "
            "version (`mlflow-finetune models NAME` lists them)") from None


def teacher_model(uri: str, device):
    """The registered teacher as one frozen model on `device` (its adapter merged), for `distill.loss:
    logits`."""
    from mlflow_finetune_plugin.logged_model import load_logged_model

    model = load_logged_model(downloaded(uri), device=str(device)).model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval().requires_grad_(False)


def same_tokenizer(uri: str, student) -> str | None:
    """None where the registered teacher's tokenizer is the student's (`distill.loss: logits` compares their
    distributions token by token); else what differs."""
    from mlflow_finetune_plugin.logged_model import logged_tokenizer

    teacher = logged_tokenizer(downloaded(uri))
    if teacher.get_vocab() == student.get_vocab():
        return None
    ours, theirs = student.get_vocab(), teacher.get_vocab()
    return (f"{len(theirs)} tokens against the student's {len(ours)}, "
            f"{sum(1 for t, i in theirs.items() if ours.get(t) != i)} of them with another id or none")


def _detail(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        error = body.get("error")
        return str(body.get("detail") or (error.get("message") if isinstance(error, dict) else error)
                   or body)[:300]
    return str(body)[:300]
