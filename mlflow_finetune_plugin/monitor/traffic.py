"""The served traffic of a registered model's versions: every trace `serve --trace` or `playground --trace`
recorded for NAME (tagged `finetune.served.model` = NAME/V or NAME/V:base), read as one `Request` per model
call.

The texts stay in this process: a Request holds the question and the answer for scoring and drift, and nothing
here writes them anywhere."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.config.traces import moment_ms
from mlflow_finetune_plugin.data.trace_calls import read_call
from mlflow_finetune_plugin.data.traces import (
    DEFAULT_EXPECTATIONS,
    DEFAULT_FEEDBACK,
    TraceQuery,
    assess,
)
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.messages import last_user_text, text_of
from mlflow_finetune_plugin.monitor.judge import verdict_of

PAGE = 500  # traces fetched per call: a page of spans stays a few MB


@dataclass
class Request:
    """One answered (or failed) request to a served version."""

    trace_id: str
    time_ms: int
    served: str                      # the version that answered: `3`, or `3:base` for its base model
    ok: bool
    latency_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cut: bool                        # the answer stopped at the length limit (finish_reason length)
    question: str                    # the last user turn
    answer: str
    verdict: bool | None = None      # thumbs: True up, False down, None none
    correction: str | None = None    # the answer a user gave instead
    prompt: list | None = None       # the request's messages (kept for --retrain's rows)
    experiment_id: str | None = None
    # the latest verdict of NAME's LLM judge stored on the trace (monitor/judge.py)
    judge: bool | None = None

    @property
    def version(self) -> str:
        """The registered version behind the answer (`3` for both `3` and its base side `3:base`)."""
        return self.served.split(":")[0]

    @property
    def base(self) -> bool:
        return self.served.endswith(":base")


def experiment_ids(experiments: tuple[str, ...] | list[str]) -> list[str]:
    """The ids of the named experiments (names or ids); every experiment in the store when none is named.
    Raises FinetuneError naming an experiment that does not exist."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    if not experiments:
        return [e.experiment_id for e in client.search_experiments()]
    ids = []
    for name in experiments:
        found = client.get_experiment_by_name(name) or (client.get_experiment(name) if name.isdigit()
                                                        else None)
        if found is None:
            raise FinetuneError(f"--experiment {name}: no such experiment in the tracking store "
                                f"{mlflow.get_tracking_uri()}; name the one `serve --trace` records to")
        ids.append(found.experiment_id)
    return ids


def read_requests(name: str, experiments: list[str], since: str | None = None, until: str | None = None
                  ) -> list[Request]:
    """Every traced request to a version of `name` (or its base side) in `experiments`, oldest first."""
    from mlflow import MlflowClient

    clauses = [served_clause(name)]
    if since:
        clauses.append(f"trace.timestamp_ms >= {moment_ms(since)}")
    if until:
        clauses.append(f"trace.timestamp_ms < {moment_ms(until)}")
    query = TraceQuery(experiment="", feedback=DEFAULT_FEEDBACK, expectations=DEFAULT_EXPECTATIONS)
    out: list[Request] = []
    token = None
    while True:
        page = MlflowClient().search_traces(locations=experiments, filter_string=" AND ".join(clauses),
                                            max_results=PAGE, page_token=token)
        out += [r for trace in page if (r := _request(trace, name, query)) is not None]
        token = getattr(page, "token", None)
        if not token:
            break
    return sorted(out, key=lambda r: r.time_ms)


def served_clause(name: str) -> str:
    """The trace filter selecting the traces of `name`'s versions (and their base sides); LIKE's `_` matches
    any one character, so readers check the tag again."""
    return f"tag.`{tags.SERVED_MODEL}` LIKE '{_quoted(name)}/%'"


def _quoted(text: str) -> str:
    return text.replace("'", "''")


def _request(trace, name: str, query: TraceQuery) -> Request | None:
    served = (trace.info.tags or {}).get(tags.SERVED_MODEL, "")
    if not served.startswith(name + "/"):  # LIKE's `_` matches any one character
        return None
    spans = [s for s in trace.data.spans if str(s.span_type) == "CHAT_MODEL"]
    if not spans:
        return None
    call = read_call(trace.info.trace_id, spans[-1])
    if call.answer is not None:
        assess([call], trace.info.assessments, query)
    failed = str(trace.info.state).endswith("ERROR") or call.answer is None
    cost = call.cost or {}
    latency = cost.get("latency_s")
    if latency is None and trace.info.execution_duration:
        latency = trace.info.execution_duration / 1000
    question = last_user_text(call.prompt)
    correction = text_of(call.correction.get("content")) if call.correction else None
    return Request(trace.info.trace_id, trace.info.request_time, served[len(name) + 1:], not failed, latency,
                   cost.get("prompt_tokens"), cost.get("completion_tokens"), call.finish_reason == "length",
                   question or "", text_of(call.answer.get("content")) if call.answer else "", call.verdict,
                   correction, call.prompt or None, trace.info.experiment_id,
                   verdict_of(trace.info.assessments, name))
