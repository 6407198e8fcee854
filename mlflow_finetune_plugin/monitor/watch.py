"""`mlflow-finetune monitor NAME`, top to bottom: read the served traffic of NAME's versions, sum it per
window and version, measure drift against each version's training questions, and check every window against
the gates."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow_finetune_plugin.config.gates import Gate
from mlflow_finetune_plugin.config.monitor import window_seconds
from mlflow_finetune_plugin.monitor import drift
from mlflow_finetune_plugin.monitor.judge import JudgeSpec, judged, stored
from mlflow_finetune_plugin.monitor.lineage import Lineage, lineage
from mlflow_finetune_plugin.monitor.traffic import Request, experiment_ids, read_requests
from mlflow_finetune_plugin.monitor.windows import Window, corrected_quality, group, summarize

EXAMPLES = 3  # trace ids (or texts, with --examples) shown per alert and per topic


@dataclass
class Alert:
    window: Window
    metric: str
    value: float
    limit: str                      # `<= 0.3`
    trace_ids: list[str]


@dataclass
class TopicReport:
    served: str
    topic: drift.Topic
    trace_ids: list[str]
    texts: list[str]                # shown only with --examples


@dataclass
class Report:
    name: str
    window: str
    requests: list[Request]
    windows: list[Window] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    topics: list[TopicReport] = field(default_factory=list)
    lineages: dict[str, Lineage] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    experiment_ids: list[str] = field(default_factory=list)
    new_ids: set[str] = field(default_factory=set)  # requests far from their version's training questions
    novelty: dict[str, drift.Novelty | None] = field(default_factory=dict)  # each version's calibrated index
    other_new: dict[str, int] = field(default_factory=dict)  # per version: new requests in no listed topic


def watch(name: str, experiments: tuple[str, ...] = (), window: str | None = None, since: str | None = None,
          until: str | None = None, gates: list[Gate] | None = None, min_requests: int | None = None,
          judge: JudgeSpec | str | None = None, store_judgments: bool = True,
          embedding: str | None = None) -> Report:
    """The monitoring report of `name`'s served versions (no logging, no printing); `judge` (a gateway
    endpoint or an OpenAI-compatible URL, monitor/judge.py) judges each answer for each window's judge pass
    rate, its verdicts stored on the traces unless `store_judgments` is False; without it, the verdicts
    already stored there (the online judge's, monitor/online.py) make the pass rate. `embedding` (a
    sentence-transformers model) measures drift instead of BM25, over the recipe's monitor.embedding."""
    ids = experiment_ids(experiments)
    requests = read_requests(name, ids, since, until)
    versions = sorted({r.version for r in requests}, key=int)
    lineages = {v: lineage(name, v) for v in versions}
    newest = lineages[versions[-1]] if versions else None
    window = window or (newest.monitor.window if newest else "1d")
    report = Report(name, window, requests, lineages=lineages, experiment_ids=ids)
    if not requests:
        report.notes.append(f"no traced requests to a version of {name} in {len(ids)} experiment(s)"
                            + (f" between {since or 'the start'} and {until or 'now'}" if since or until
                               else "")
                            + ": serve it with `mlflow-finetune serve NAME@champion --trace EXPERIMENT`")
        return report
    new, novelty = _novelty(requests, lineages, report.notes, embedding)
    report.novelty = novelty
    report.new_ids = {r.trace_id for r, is_new in zip(requests, new or []) if is_new}
    languages = [drift.language_of(r.question) for r in requests]
    passes = (judged(requests, judge, name=name, notes=report.notes, store=store_judgments) if judge
              else stored(requests, name, report.notes))
    seconds = window_seconds(window)
    for (start, served), index in group(requests, seconds).items():
        own = lineages[requests[index[0]].version]
        main_language = novelty[own.version].language if novelty.get(own.version) else None
        w = Window(start, seconds, served)
        w.metrics, w.examples = summarize(requests, index, new, languages, main_language, passes)
        w.metrics.update(corrected_quality(requests, index, own.structured, own.json_schema))
        report.windows.append(w)
        report.alerts += check(w, gates if gates is not None else own.monitor.gates,
                               min_requests or own.monitor.min_requests)
    report.topics, report.other_new = _topics(requests, new)
    return report


def check(w: Window, gates: list[Gate], min_requests: int) -> list[Alert]:
    """The gates `w` breaks; none for a window with fewer than `min_requests` requests."""
    if w.metrics.get("requests", 0) < min_requests:
        return []
    alerts = []
    for gate in gates:
        value = w.metrics.get(gate.metric)
        if value is None:
            continue
        if broken := gate.broken_limits(value):
            op, bound = broken[0]
            alerts.append(Alert(w, gate.metric, value, f"{op} {bound:g}",
                                w.examples.get(gate.metric, [])[:EXAMPLES]))
    return alerts


def _novelty(requests: list[Request], lineages: dict[str, Lineage], notes: list[str], embedding: str | None):
    """Per request: is it new to the training questions of the version that answered it (None where no
    version's training questions could be read); and each version's calibrated index."""
    novelty: dict[str, drift.Novelty | None] = {}
    for version, own in lineages.items():
        model = embedding or own.monitor.embedding
        novelty[version] = drift.calibrate(own.questions, own.monitor.novelty_quantile,
                                           model) if own.questions else None
        if novelty[version] is None:
            why = own.missing or f"{len(own.questions)} training questions, fewer than {drift.MIN_TRAIN}"
            notes.append(f"v{version}: drift not measured ({why})")
    if not any(novelty.values()):
        return None, novelty
    new = [False] * len(requests)
    for version, index in _by_version(requests).items():
        if novelty.get(version) is not None:
            for i, is_new in zip(index, novelty[version].is_new([requests[i].question for i in index])):
                new[i] = is_new
    return new, novelty


def _by_version(requests: list[Request]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        out.setdefault(r.version, []).append(i)
    return out


def _topics(requests: list[Request], new: list[bool] | None) -> tuple[list[TopicReport], dict[str, int]]:
    """The largest topics among each version's new requests, and per version how many new requests are in
    none of them."""
    if new is None:
        return [], {}
    out, other = [], {}
    for version, index in _by_version(requests).items():
        fresh = [i for i in index if new[i]]
        found = drift.topics([requests[i].question for i in fresh])
        for topic in found:
            members = [fresh[j] for j in topic.members]
            out.append(TopicReport(version, topic, [requests[i].trace_id for i in members[:EXAMPLES]],
                                   [requests[i].question for i in members[:EXAMPLES]]))
        if left := len(fresh) - sum(t.size for t in found):
            other[version] = left
    return out, other
