"""Served traffic as MLflow traces (`serve --trace EXPERIMENT`, `playground --trace EXPERIMENT`), and feedback
on it.

Each answered chat completion is one trace with one CHAT_MODEL span (a version that retrieves: with a
RETRIEVER child holding the chunks, `retrieving.py`), in the shape `mlflow.openai.autolog()` records
and `data/traces.py` reads: inputs the request (`messages` in OpenAI's format, `model`, the settings sent),
outputs the ChatCompletion (a streamed answer joined into one). The trace names the served version's logged
model (MLflow 3's `m-...` id of the registered version, the `mlflow.modelId` metadata that
`search_traces(model_id=)` and `data.traces.model_id` select), so a version's own traffic, with the feedback
on it, is the next fine-tune's `traces:` data. Feedback becomes assessments under the names `data/traces.py`
counts by default.

Traces hold user data (prompts and answers): nothing is recorded unless asked. The tracking store failing
never fails a request or a vote: the first failure is logged as a warning, and the answer goes out untraced.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from mlflow_finetune_plugin import tags, tracking
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.serving.base import ModelChoice

TRACE_HEADER = "x-mlflow-trace-id"   # on every traced answer: the trace to send feedback on
SPAN_NAME = "chat.completions"
# Assessment names: FEEDBACK and EXPECTATION are among data.traces.feedback / .expectations' defaults (a
# thumbs verdict; the answer to learn instead). A rating (1-5) and a comment alone are recorded, not read as a
# verdict.
FEEDBACK = "user_feedback"
EXPECTATION = "expected_response"
RATING = "user_rating"
COMMENT = "user_comment"
RATINGS = range(1, 6)
SETTLE_S = 30.0  # at most this long feedback waits for the trace it names to end (a stream still answering)
# completion id -> trace id, for feedback that names the completion (the oldest forgotten first)
_KEEP_IDS = 10_000


def served_choice(served: str) -> ModelChoice | None:
    """The model choice behind a name `mlflow-finetune serve` serves (`bot-v3`, `bot-v3-base`); None for
    others."""
    text, base = (served[:-5], True) if served.endswith("-base") else (served, False)
    name, _, version = text.rpartition("-v")
    return ModelChoice(name, version, base) if name and version.isdigit() else None


def experiment_id(experiment: str) -> str:
    """The id of experiment `experiment` (a name, or an id), created when it does not exist; raises
    FinetuneError naming the tracking store when it cannot be read."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None and experiment.isdigit():
            found = client.get_experiment(experiment)
        if found is not None:
            return found.experiment_id
        return tracking.experiment_id(experiment, client)  # created at once by another process: found
    except Exception as e:  # noqa: BLE001 - any store failure: say which store and what it said
        raise FinetuneError(
            f"--trace {experiment}: cannot use the tracking store {mlflow.get_tracking_uri()} "
            f"({str(e).splitlines()[0]}); set MLFLOW_TRACKING_URI, or serve without --trace") from None


class Tracer:
    """Records answers as traces in one experiment and logs feedback on them; every store failure is caught
    (the first one is told through `echo`)."""

    def __init__(self, experiment: str, by: str, echo=print):
        self.experiment = experiment
        self.experiment_id = experiment_id(experiment)
        self.by = by                      # serve | playground (a tag on each trace)
        self.echo = echo
        self._models: dict[str, str | None] = {}
        self._ids: OrderedDict[str, str] = OrderedDict()
        # traces started and not ended yet: feedback waits for them
        self._open: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._warned = False

    def warn(self, what: str, error: BaseException | str) -> None:
        """Tell the first tracking failure; later ones stay quiet (a failing store would flood the log)."""
        with self._lock:
            if self._warned:
                return
            self._warned = True
        import mlflow

        detail = (str(error).splitlines() or [""])[0]
        if isinstance(error, BaseException):
            detail = f"{type(error).__name__}: {detail}"
        self.echo(
            f"Warning: {what} failed ({detail}); answers are still served, untraced where the tracking store "
            f"{mlflow.get_tracking_uri()} fails. Further tracking failures are not shown.")

    def model_id(self, choice: ModelChoice | None) -> str | None:
        """The logged model (m-...) of a registered version; None for a base model, or a version registered
        from a run's artifacts rather than a logged model."""
        if choice is None or choice.base:
            return None
        if choice.key not in self._models:
            from mlflow_finetune_plugin.registry import versions as registry

            self._models[choice.key] = registry.logged_model_id(registry.get_version(choice.name,
                                                                                     choice.version))
        return self._models[choice.key]

    def start(self, choice: ModelChoice | None, asked: str, inputs: dict, extra: dict | None = None):
        """A CHAT_MODEL span for one request (the trace id is known from here on); None when tracing
        failed."""
        import mlflow
        from mlflow.entities import SpanType
        from mlflow.entities.span import NO_OP_SPAN_TRACE_ID
        from mlflow.tracing.constant import TraceMetadataKey

        try:
            model_id = self.model_id(choice)
            trace_tags = {tags.SERVED_BY: self.by, tags.SERVED_NAME: asked, **(extra or {})}
            if choice is not None:
                trace_tags[tags.SERVED_MODEL] = choice.key
            span = mlflow.start_span_no_context(
                SPAN_NAME, span_type=SpanType.CHAT_MODEL, inputs=inputs, experiment_id=self.experiment_id,
                tags=trace_tags, metadata={TraceMetadataKey.MODEL_ID: model_id} if model_id else None)
        except Exception as e:  # noqa: BLE001 - tracing never fails the request
            self.warn("starting a trace", e)
            return None
        # MLflow could not start it (it logged why) or tracing is off
        if span.trace_id == NO_OP_SPAN_TRACE_ID:
            self.warn("starting a trace", "MLflow returned a no-op span")
            return None
        with self._lock:
            self._open[span.trace_id] = threading.Event()
        return span

    def end(self, span, outputs, error: str | None = None) -> None:
        """End `span` with `outputs` (a ChatCompletion dict), failed with `error` when there is one."""
        if span is None:
            return
        try:
            if error:
                span.record_exception(error)
            span.end(outputs=outputs)
            completion_id = outputs.get("id") if isinstance(outputs, dict) else None
            if completion_id:
                with self._lock:
                    self._ids[str(completion_id)] = span.trace_id
                    while len(self._ids) > _KEEP_IDS:
                        self._ids.popitem(last=False)
        except Exception as e:  # noqa: BLE001
            self.warn("ending a trace", e)
        finally:
            with self._lock:
                ended = self._open.pop(span.trace_id, None)
            if ended is not None:
                ended.set()

    def settle(self, trace_id: str | None = None, timeout: float = SETTLE_S) -> None:
        """Wait until trace `trace_id` (None: every trace now open) has ended: a client may send feedback as
        soon as it has the answer, a moment before the server ends the answer's trace."""
        with self._lock:
            events = [self._open[trace_id]] if trace_id in self._open else [] if trace_id else list(
                self._open.values())
        for event in events:
            event.wait(timeout)

    def flush(self) -> None:
        """Wait until the traces ended so far are in the store (they are exported in the background)."""
        import mlflow

        try:
            mlflow.flush_trace_async_logging()
        except Exception as e:  # noqa: BLE001
            self.warn("writing traces", e)

    # ------------------------------------------------------------------------------------------- feedback
    def trace_of(self, given: str) -> str | None:
        """A trace id, or the id of a completion answered here (`chatcmpl-...`), as the trace id."""
        if given.startswith(("tr-", "trace:/")):
            return given
        with self._lock:
            known = self._ids.get(given)
        if known is None:
            self.settle()  # an answer just given: its id is known once its trace has ended
            with self._lock:
                known = self._ids.get(given)
        return known

    def log(self, trace_id: str, feedback: Feedback) -> list[dict]:
        """Log `feedback` on trace `trace_id` (one of this tracer's experiment). Raises FinetuneError (unknown
        trace) or the store's error."""
        import mlflow
        from mlflow.entities import AssessmentSource

        self.settle(trace_id)
        # a trace answered a moment ago may still be on its way to the store
        mlflow.flush_trace_async_logging()
        trace = mlflow.get_trace(trace_id)
        if trace is None or trace.info.experiment_id != self.experiment_id:
            raise FinetuneError(f"no trace {trace_id!r} in experiment {self.experiment!r}: send the "
                                f"{TRACE_HEADER} header of a traced answer (or the answer's id, while this "
                                "server runs)")
        source = AssessmentSource(source_type="HUMAN", source_id=feedback.user or "anonymous")
        logged = []
        for name, value, rationale in feedback.assessments():
            if name == EXPECTATION:
                a = mlflow.log_expectation(trace_id=trace_id, name=name, value=value, source=source,
                                           metadata=feedback.metadata or None)
            else:
                a = mlflow.log_feedback(trace_id=trace_id, name=name, value=value, source=source,
                                        rationale=rationale, metadata=feedback.metadata or None)
            logged.append({"name": name, "value": value, "assessment_id": a.assessment_id})
        return logged

    def log_quietly(self, trace_id: str | None, feedback: Feedback) -> list[dict]:
        """`log`, with failures told once and swallowed (a vote must not fail because its traces cannot be
        rated)."""
        if not trace_id:
            return []
        try:
            return self.log(trace_id, feedback)
        except Exception as e:  # noqa: BLE001
            self.warn(f"logging feedback on trace {trace_id}", e)
            return []

    def answer_feedback(self, body) -> tuple[int, dict]:
        """`POST /v1/feedback`: (HTTP status, JSON answer)."""
        try:
            feedback = Feedback.parse(body)
            trace_id = self.trace_of(feedback.target)
            if trace_id is None:
                raise FinetuneError(
                    f"{feedback.target!r} is neither a trace id (tr-...) nor the id of an answer "
                    "this server gave since it started: send the answer's "
                    f"{TRACE_HEADER} header as trace_id")
        except FinetuneError as e:
            return 400, _error(str(e), "invalid_request_error")
        try:
            logged = self.log(trace_id, feedback)
        except FinetuneError as e:
            return 404, _error(str(e), "invalid_request_error")
        except Exception as e:  # noqa: BLE001 - the store's failure, said, not raised
            return 503, _error(f"the tracking store could not log the feedback: {str(e).splitlines()[0]}",
                               "server_error")
        return 200, {"object": "feedback", "trace_id": trace_id, "assessments": logged}


def _error(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind}}


@dataclass
class Feedback:
    """What a user says about one answer: thumbs up/down, a rating, a comment, the answer it should have
    been."""

    target: str                  # trace id, or the completion id
    thumbs: bool | None = None
    rating: int | None = None
    comment: str | None = None
    correction: str | None = None
    user: str | None = None
    metadata: dict = field(default_factory=dict)

    FIELDS = ("trace_id", "id", "thumbs", "rating", "comment", "correction", "user")

    @classmethod
    def parse(cls, body) -> Feedback:
        """From the endpoint's JSON; every problem at once as a FinetuneError."""
        from mlflow_finetune_plugin.data.traces import polarity

        if not isinstance(body, dict):
            raise FinetuneError("send a JSON object: {\"trace_id\": \"tr-...\", \"thumbs\": \"up\"}")
        problems = [f"unknown field {k!r} (fields: {', '.join(cls.FIELDS)})" for k in body
                    if k not in cls.FIELDS]
        target = body.get("trace_id") or body.get("id")
        if not isinstance(target, str) or not target:
            problems.append("trace_id: the x-mlflow-trace-id header of the answer (or id: the answer's id)")
        thumbs = None
        if body.get("thumbs") is not None:
            thumbs = polarity(body["thumbs"])
            if thumbs is None:
                problems.append(f"thumbs {body['thumbs']!r}: use up/down (or true/false)")
        rating = body.get("rating")
        if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int)
                                   or rating not in RATINGS):
            problems.append(f"rating {rating!r}: use a whole number from {RATINGS[0]} to {RATINGS[-1]}")
        for key in ("comment", "correction", "user"):
            if body.get(key) is not None and not isinstance(body[key], str):
                problems.append(f"{key}: a string")
        if not problems and thumbs is None and rating is None and not body.get("comment") and not body.get(
                "correction"):
            problems.append("nothing to log: give thumbs, rating, comment or correction")
        if problems:
            raise FinetuneError("invalid feedback: " + "; ".join(problems))
        return cls(target, thumbs, rating, body.get("comment") or None, body.get("correction") or None,
                   body.get("user") or None)

    def assessments(self) -> list[tuple[str, object, str | None]]:
        """(name, value, rationale) of each assessment to log; the comment is the rationale of the verdict or
        the rating, or its own feedback when there is neither."""
        out = []
        if self.thumbs is not None:
            out.append((FEEDBACK, self.thumbs, self.comment))
        if self.rating is not None:
            out.append((RATING, self.rating, self.comment if self.thumbs is None else None))
        if self.comment and self.thumbs is None and self.rating is None:
            out.append((COMMENT, self.comment, None))
        if self.correction:
            out.append((EXPECTATION, self.correction, None))
        return out


# ------------------------------------------------------------------------------------------ answers as
# outputs


def completion(text: str, model: str, finish_reason: str | None = None,
               completion_id: str | None = None) -> dict:
    """A whole answer as the ChatCompletion an OpenAI server returns (the shape data/traces.py reads)."""
    import time
    import uuid

    return {"id": completion_id or f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}]}


def joined_stream(raw: bytes) -> dict | None:
    """A streamed answer (server-sent `data:` chunks of a chat completion) joined into one ChatCompletion;
    None when no chunk could be read."""
    out, choices = None, {}
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            continue
        try:
            chunk = json.loads(line[5:])
        except ValueError:
            continue
        if not isinstance(chunk, dict):
            continue
        if out is None:
            out = {"id": chunk.get("id"), "object": "chat.completion", "created": chunk.get("created"),
                   "model": chunk.get("model"), "choices": []}
        if chunk.get("usage"):
            out["usage"] = chunk["usage"]
        for c in chunk.get("choices") or []:
            _add_delta(choices.setdefault(c.get("index", 0), {"index": c.get("index", 0), "message": {
                "role": "assistant", "content": ""}, "finish_reason": None}), c)
    if out is not None:
        out["choices"] = [choices[i] for i in sorted(choices)]
    return out


def _add_delta(choice: dict, chunk_choice: dict) -> None:
    delta, message = chunk_choice.get("delta") or {}, choice["message"]
    message["content"] += delta.get("content") or ""
    for call in delta.get("tool_calls") or []:
        calls = message.setdefault("tool_calls", [])
        while len(calls) <= call.get("index", 0):
            calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        whole = calls[call.get("index", 0)]
        whole["id"] = call.get("id") or whole["id"]
        function = call.get("function") or {}
        whole["function"]["name"] += function.get("name") or ""
        whole["function"]["arguments"] += function.get("arguments") or ""
    if chunk_choice.get("finish_reason"):
        choice["finish_reason"] = chunk_choice["finish_reason"]


class TracedRequest:
    """One request through `serve`'s front: the span, started before the request goes on; the answer's bytes
    as they pass (untouched); the span ended with the answer once it has gone out whole."""

    def __init__(self, tracer: Tracer, span, streamed: bool):
        self.tracer, self.span, self.streamed = tracer, span, streamed
        self.trace_id = span.trace_id
        self.status: int | None = None
        self._raw = bytearray()

    @classmethod
    def begin(cls, tracer: Tracer, served: str, asked: str, body: bytes,
              prompt: tuple[str, str] | None = None) -> TracedRequest | None:
        """The span of a request for served name `served` (asked as `asked`); a served prompt's (`prompt`: the
        served name of the model it asks, the prompt's URI) names that model as the one that answered, and the
        prompt."""
        try:
            request = json.loads(body)
        except ValueError:
            return None
        if not isinstance(request, dict):
            return None
        extra = {tags.SERVED_PROMPT: prompt[1]} if prompt else None
        span = tracer.start(served_choice(prompt[0] if prompt else served), asked, request, extra)
        return cls(tracer, span, bool(request.get("stream"))) if span is not None else None

    async def watch(self, chunks, status: int):
        self.status = status
        async for chunk in chunks:
            self._raw += chunk
            yield chunk

    def end(self, error: str | None = None) -> None:
        """End the span with what was answered: the ChatCompletion, the stream joined into one, or the
        error."""
        try:
            outputs, error = self._answer(error)
        except Exception as e:  # noqa: BLE001 - an answer this cannot read is traced as such, never raised
            outputs, error = None, f"the answer could not be read ({type(e).__name__}: {e})"
        self.tracer.end(self.span, outputs, error)

    def _answer(self, error: str | None) -> tuple[dict | None, str | None]:
        outputs = None
        if error is None and self.status is not None and self.status >= 400:
            error = f"the server answered {self.status}: {bytes(self._raw[:500]).decode('utf-8', 'replace')}"
        elif error is None:
            try:
                outputs = joined_stream(bytes(self._raw)) if self.streamed else json.loads(bytes(self._raw))
            except ValueError:
                outputs = None
            choices = outputs.get("choices") if isinstance(outputs, dict) else None
            if not choices:
                error = "no answer could be read from the server's response"
            elif self.streamed and not all(c.get("finish_reason") for c in choices):
                error = "the stream ended before the answer did (the client went away, or the server stopped)"
        return outputs, error
