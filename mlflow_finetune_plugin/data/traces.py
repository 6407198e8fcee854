"""Traces as a data source: `data.train: traces:EXPERIMENT` reads the model calls an application logged to
MLflow (`mlflow.openai.autolog()`: one `CHAT_MODEL` span per call, nested in the app's own spans or not) as
training rows.

One row per conversation: a call whose messages extend an earlier call's messages and answer supersedes it. An
expectation on a trace (`data.traces.expectations`) is the answer to learn instead of the logged one; feedback
(`data.traces.feedback`) keeps a thumbs-down answer out of supervised rows, labels `unpaired_preference` rows
(kto), and pairs two answers to one prompt into `preference` rows (dpo). Failed traces, empty answers and
answers cut at the length limit are left out and counted. A user's images come back as data URLs
(`trace_images.py`), which `data.read` reads into the canonical image rows. Traces hold user data: nothing
here writes them anywhere; the rows live in the training process (and in the file `data from-traces -o`
writes, where asked for).
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass, field

from mlflow_finetune_plugin.config.traces import TracesConfig, moment_ms
from mlflow_finetune_plugin.data.formats import DataIssue
from mlflow_finetune_plugin.data.trace_calls import message_of, read_call, read_images, unknown_shape
from mlflow_finetune_plugin.data.trace_rows import (
    FAILED,
    IMAGE,
    NEGATIVE,
    NO_CALL,
    REPEATED,
    UNKNOWN,
    UNPAIRED,
    UNRATED,
    Call,
    conversations,
    make_rows,
)

TRACES_PREFIX = "traces:"
# The message formats a CHAT_MODEL span is read in, as error messages name them.
READ_FORMATS = ("OpenAI chat completions (inputs.messages, outputs.choices[0].message)",
                "OpenAI responses (inputs.input, outputs.output)",
                "messages in, text out (inputs.messages, outputs a string)")
DEFAULT_FEEDBACK = tuple(TracesConfig.model_fields["feedback"].default)
DEFAULT_EXPECTATIONS = tuple(TracesConfig.model_fields["expectations"].default)
_UP = {"yes", "y", "true", "good", "up", "thumbs_up", "thumbsup", "positive", "pass", "correct", "helpful",
       "1", "+1"}
_DOWN = {"no", "n", "false", "bad", "down", "thumbs_down", "thumbsdown", "negative", "fail", "incorrect",
         "unhelpful", "0", "-1"}


@dataclass(frozen=True)
class TraceQuery:
    """Which traces to read (`traces:EXPERIMENT` and `data.traces`) and the rows to make of them."""

    experiment: str
    filter: str | None = None
    since: str | None = None
    until: str | None = None
    run_id: str | None = None
    model_id: str | None = None
    feedback: tuple[str, ...] = DEFAULT_FEEDBACK
    expectations: tuple[str, ...] = DEFAULT_EXPECTATIONS
    unrated: bool = True
    rows: str = "chat"  # chat | preference | unpaired_preference | prompt_only

    def __str__(self) -> str:
        return TRACES_PREFIX + self.experiment

    def describe(self) -> dict:
        """The query as the run's lineage records it (no trace content)."""
        return {k: v for k, v in (("experiment", self.experiment), ("filter", self.filter),
                                  ("since", self.since), ("until", self.until), ("run_id", self.run_id),
                                  ("model_id", self.model_id), ("rows", self.rows)) if v}


def is_traces(value) -> bool:
    return isinstance(value, TraceQuery) or isinstance(value, str) and value.startswith(TRACES_PREFIX)


def query_of(spec: str, config=None, rows: str = "chat") -> TraceQuery:
    """The TraceQuery of `traces:EXPERIMENT` with the recipe's `data.traces` section (or None: the
    defaults)."""
    given = config.model_dump() if hasattr(config, "model_dump") else dict(config or {})
    for key in ("feedback", "expectations"):
        if given.get(key) is not None:
            given[key] = tuple(given[key])
        else:
            given.pop(key, None)
    return TraceQuery(experiment=spec[len(TRACES_PREFIX):].strip(), rows=rows, **given)


# ---------------------------------------------------------------- assessments


def polarity(value) -> bool | None:
    """A feedback value as thumbs up (True) or down (False); None where it says neither."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1, -1):
        return value == 1
    if isinstance(value, str):
        word = value.strip().lower().replace(" ", "_").replace("-", "_")
        return True if word in _UP else False if word in _DOWN else None
    return None


def _answer_of(value) -> dict | None:
    """An expectation's value as the assistant message to learn: text, a message, or {content: ...}."""
    if isinstance(value, str) and value.strip():
        return {"role": "assistant", "content": value}
    if isinstance(value, dict) and (value.get("content") or value.get("tool_calls")):
        return message_of({"role": "assistant", **value})
    return None


def assess(calls: list[Call], assessments, query: TraceQuery) -> None:
    """Put each trace's feedback and expectations on the call they are about: the span they name, else the
    trace's last call. The latest valid assessment of each kind wins."""
    by_span = {c.span_id: c for c in calls}
    for a in sorted(assessments or [], key=lambda a: a.last_update_time_ms or a.create_time_ms or 0):
        if getattr(a, "valid", True) is False or not calls:
            continue
        call = by_span.get(a.span_id) or calls[-1]
        if a.feedback is not None and a.name in query.feedback:
            if (up := polarity(a.feedback.value)) is not None:
                call.verdict = up
        elif a.expectation is not None and a.name in query.expectations:
            if (answer := _answer_of(a.expectation.value)) is not None:
                call.correction = answer


# ---------------------------------------------------------------- reading


@dataclass
class TraceRows:
    """What one read made of the traces: the rows, the conversation of each row (held-out rows are split by
    it), the traces behind each row, and the counts of the report."""

    query: TraceQuery
    records: list[tuple[int, dict]] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    row_traces: list[list[str]] = field(default_factory=list)
    read: int = 0
    left_out: Counter = field(default_factory=Counter)
    experiment_id: str | None = None
    issues: list[DataIssue] = field(default_factory=list)

    @property
    def trace_ids(self) -> list[str]:
        return sorted({t for ids in self.row_traces for t in ids})

    @property
    def used(self) -> int:
        return len(self.trace_ids)

    def summary(self) -> dict:
        return {"read": self.read, "used": self.used, "rows": len(self.records), "format": self.query.rows,
                "left_out": sum(self.left_out.values()), "why": dict(self.left_out.most_common())}

    def sentence(self) -> str:
        return traces_sentence(self.summary())


def traces_sentence(summary: dict) -> str:
    """`40 traces read, 31 used (31 chat rows), 9 left out: 3 failed (...), ...`"""
    why = ", ".join(f"{n} {reason}" for reason, n in summary["why"].items())
    return (f"{summary['read']} trace{'s' if summary['read'] != 1 else ''} read, {summary['used']} used "
            f"({summary['rows']} {summary['format']} rows), {summary['left_out']} left out"
            + (f": {why}" if why else ""))


def read_traces(query: TraceQuery) -> TraceRows:
    """The rows of the traces `query` names, with the report's counts; problems as DataIssues (never raises
    for what the traces hold)."""
    import mlflow

    out, where = TraceRows(query), str(query)
    experiment = mlflow.get_experiment_by_name(query.experiment)
    if experiment is None and query.experiment.isdigit():
        experiment = mlflow.get_experiment(query.experiment)
    if experiment is None:
        out.issues.append(DataIssue(where, None,
                                    f"no experiment named {query.experiment!r} in the tracking store "
                                    f"{mlflow.get_tracking_uri()}; name the experiment the application "
                                    "logs its traces to (mlflow.set_experiment in the app)"))
        return out
    out.experiment_id = experiment.experiment_id
    try:
        traces = _search(experiment.experiment_id, query)
    except (ValueError, mlflow.exceptions.MlflowException) as e:
        out.issues.append(DataIssue(where, None,
                                    f"data.traces.filter {query.filter!r} is not a trace filter MLflow "
                                    f"reads ({str(e).splitlines()[0]}); e.g. \"tags.app = 'support'\" or "
                                    "\"trace.status = 'OK'\""))
        return out
    out.read = len(traces)
    if not traces:
        out.issues.append(DataIssue(where, None, _none_found(experiment, query)))
        return out
    calls, unknown = [], []
    for trace in traces:
        spans = [s for s in trace.data.spans if str(s.span_type) == "CHAT_MODEL"]
        found = sorted((read_call(trace.info.trace_id, s) for s in spans), key=lambda c: c.start_ns)
        for c in found:
            read_images(c, trace.info)
        assess([c for c in found if c.answer is not None], trace.info.assessments, query)
        if str(trace.info.state).endswith("ERROR"):
            for c in found:
                c.problem = FAILED
        calls.append((trace, found))
        unknown += [unknown_shape(s) for s, c in zip(spans, found) if c.problem == UNKNOWN]
    records = _rows(out, calls)
    if unknown and not any(c.answer is not None for _, found in calls for c in found):
        out.issues.append(DataIssue(where, None,
                                    f"{len(unknown)} model call{'s' if len(unknown) != 1 else ''} in a "
                                    f"message format not read here (first: {unknown[0]}); read: " + "; ".join(
                                        READ_FORMATS)))
    elif not records:
        why = ", ".join(f"{n} {reason}" for reason, n in out.left_out.most_common())
        out.issues.append(DataIssue(where, None,
                                    f"none of the {out.read} traces makes a {query.rows} row ({why})" + _hint(
                                        query)))
    return out


def _search(experiment_id: str, query: TraceQuery) -> list:
    import mlflow

    clauses = [query.filter] if query.filter else []  # MLflow joins clauses with AND only (no parentheses)
    if query.since:
        clauses.append(f"trace.timestamp_ms >= {moment_ms(query.since)}")
    if query.until:
        clauses.append(f"trace.timestamp_ms < {moment_ms(query.until)}")
    return mlflow.search_traces(locations=[experiment_id], filter_string=" AND ".join(clauses) or None,
                                run_id=query.run_id, model_id=query.model_id, return_type="list")


def _none_found(experiment, query: TraceQuery) -> str:
    import mlflow

    narrowed = [f"{k} {v!r}" for k, v in (("filter", query.filter), ("since", query.since),
                                          ("until", query.until), ("run_id", query.run_id),
                                          ("model_id", query.model_id)) if v]
    if narrowed and mlflow.search_traces(locations=[experiment.experiment_id], max_results=1,
                                         return_type="list", include_spans=False):
        return (
            f"no trace of experiment {experiment.name!r} matches data.traces ({', '.join(narrowed)}); widen "
            "the query, or check it in the MLflow UI's Traces tab")
    return (
        f"experiment {experiment.name!r} has no traces; an application logs them with "
        "mlflow.openai.autolog() (or mlflow.<flavor>.autolog()) under mlflow.set_experiment(NAME) "
        "(docs/traces.md)")


def _hint(query: TraceQuery) -> str:
    if query.rows == "preference":
        return (
            "; preference pairs need two answers to the same prompt, one with positive and one with negative "
            f"feedback ({', '.join(query.feedback)}), or an expectation that corrects an answer")
    if query.rows == "unpaired_preference":
        return f"; unpaired rows need feedback ({', '.join(query.feedback)}) or expectations on the traces"
    return ""


# ---------------------------------------------------------------- rows


def _rows(out: TraceRows, traced: list) -> list:
    query = out.query
    calls = [c for _, found in traced for c in found if c.answer is not None]
    conversations(calls)
    rows = make_rows(calls, query)  # (record, group, trace ids) in the order of the calls
    out.records = [(n, rec) for n, (rec, _, _) in enumerate(rows, 1)]
    out.groups = [g for _, g, _ in rows]
    out.row_traces = [ids for _, _, ids in rows]
    used = set(out.trace_ids)
    for trace, found in traced:
        if trace.info.trace_id in used:
            continue
        reasons = [c.problem for c in found if c.problem]
        rated = [c for c in found if c.verdict is False]
        reason = (NO_CALL if not found else FAILED if FAILED in reasons else UNKNOWN if UNKNOWN in reasons
                  else IMAGE if IMAGE in reasons else REPEATED if query.rows == "prompt_only"
                  else reasons[0] if reasons else NEGATIVE if rated and query.rows == "chat"
                  else UNRATED if query.rows != "chat" and not any(c.verdict is not None or c.correction
                                                                   for c in found) else UNPAIRED if query.rows
                  == "preference" else UNRATED)
        out.left_out[reason] += 1
    return out.records


# ---------------------------------------------------------------- lineage


def log_traces_input(ds, got: TraceRows, trace_ids: list[str], name: str, context: str, tags: dict):
    """Log rows read from traces as an MLflow dataset input whose source is the query and the trace ids (never
    the texts); ids that do not fit the source's 64 KB go to the run as `inputs/<name>-trace-ids.json`, named
    there."""
    import hashlib

    import mlflow
    import mlflow.data

    source = {"experiment_id": got.experiment_id, **got.query.describe(), "traces": len(trace_ids)}
    if len(json.dumps(trace_ids)) < 60_000:
        source["trace_ids"] = trace_ids
    else:
        artifact = f"inputs/{name}-trace-ids.json"
        mlflow.log_dict({"trace_ids": trace_ids}, artifact)
        source["trace_ids_artifact"] = artifact
    h = hashlib.sha256(json.dumps(source, sort_keys=True).encode())
    for batch in ds.iter(batch_size=1000):
        h.update(json.dumps(batch, sort_keys=True, default=str).encode())
    logged = mlflow.data.from_huggingface(ds, source=traces_source()(source), name=name,
                                          digest=h.hexdigest()[:16])
    mlflow.log_input(logged, context=context, tags={**tags, "source": "traces",
                                                    "traces": str(len(trace_ids))})
    return logged


@functools.cache
def traces_source():
    """The DatasetSource class of a traces input (MLflow's base class imported only where a run logs one)."""
    from mlflow.data.dataset_source import DatasetSource

    class TracesSource(DatasetSource):
        """MLflow traces read as training rows: the query and the ids of the traces used."""

        def __init__(self, spec: dict):
            self.spec = spec

        @staticmethod
        def _get_source_type() -> str:
            return "mlflow_traces"

        def load(self, **kwargs):
            raise NotImplementedError("re-read the traces with `mlflow-finetune data from-traces`")

        @staticmethod
        def _can_resolve(raw_source) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source):
            raise NotImplementedError

        def to_dict(self) -> dict:
            return self.spec

        @classmethod
        def from_dict(cls, source_dict: dict):
            return cls(source_dict)

    return TracesSource
