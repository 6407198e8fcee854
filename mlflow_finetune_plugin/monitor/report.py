"""Where a monitoring pass goes: a table in the terminal, metrics in one monitoring run per registered model
(the step is the window's start, in seconds since the epoch, so MLflow's charts show them over time), and a
PNG chart logged with that run. Only aggregates and trace ids are logged; request texts are printed only with
--examples."""

from __future__ import annotations

import datetime

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.metrics import format_table
from mlflow_finetune_plugin.monitor.watch import Report

COLUMNS = (("requests", "requests"), ("error_share", "errors"), ("latency_p50", "p50 s"),
           ("latency_p95", "p95 s"), ("prompt_tokens", "tok in"), ("completion_tokens", "tok out"),
           ("cut_share", "cut"), ("feedback", "rated"), ("thumbs_down_share", "down"), ("novel_share", "new"),
           ("other_language_share", "other lang"), ("input_chars", "chars"), ("corrections", "corrected"),
           ("rougeL", "rougeL vs corr"), ("json_valid", "json_valid"), ("judge_pass", "judge"))
CHART_METRICS = ("requests", "thumbs_down_share", "novel_share", "cut_share", "latency_p95", "error_share")
CHART_FILE = "monitor/chart.png"
PREFIX = "monitor/"


def when(start_s: int, seconds: int = 60) -> str:
    """A window's start in its natural unit (UTC): the day for whole days, else to the minute, to the second
    for windows that do not start on a minute."""
    at = datetime.datetime.fromtimestamp(start_s, datetime.timezone.utc)
    if seconds % 86400 == 0 and start_s % 86400 == 0:
        return at.strftime("%Y-%m-%d")
    return at.strftime("%Y-%m-%d %H:%M" if seconds % 60 == 0 and start_s % 60 == 0 else "%Y-%m-%d %H:%M:%S")


def text(report: Report, examples: bool = False) -> str:
    """The terminal report: the windows' table, the alerts and the new topics."""
    lines = [
        f"Served traffic of {report.name}: {len(report.requests)} requests, windows of {report.window} (UTC)"]
    for version, own in sorted(report.lineages.items(), key=lambda kv: int(kv[0])):
        if own.questions:
            novelty = report.novelty.get(version)
            about = (f"mean {novelty.mean_chars:.0f} chars, mostly {novelty.language or '?'}, drift by "
                     f"{novelty.method}; ") if novelty else ""
            lines.append(
                f"  v{version} trained on {len(own.questions)} questions ({about}{', '.join(own.sources)})")
    lines += [f"  note: {n}" for n in report.notes]
    shown = [(key, head) for key, head in COLUMNS if any(key in w.metrics for w in report.windows)]
    alerted = {(id(a.window), a.metric) for a in report.alerts}
    rows = [[when(w.start_s, w.seconds), w.label,
             *(_cell(k, w.metrics.get(k), (id(w), k) in alerted) for k, _ in shown)] for w in report.windows]
    if rows:
        lines += ["", format_table(["window", "version", *(h for _, h in shown)], rows)]
    if report.topics or report.other_new:
        lines += ["", "New topics (requests far from the training questions, grouped):"]
        for version in sorted({t.served for t in report.topics} | set(report.other_new), key=int):
            for t in (t for t in report.topics if t.served == version):
                shown = "; ".join(repr(x) for x in t.texts) if examples else ", ".join(t.trace_ids)
                about = ", ".join(t.topic.words) or "?"
                lines.append(f"  v{version}: {t.topic.size} requests about {about}: {shown}")
            if other := report.other_new.get(version):
                lines.append(f"  v{version}: {other} other new request{'s' if other > 1 else ''}, in no "
                             "topic above")
    if report.alerts:
        windows = len({id(a.window) for a in report.alerts})
        lines += ["", f"ALERT: {len(report.alerts)} alert(s) in {windows} window(s) over a monitor gate:"]
        for a in report.alerts:
            shown_ids = _examples(report, a.trace_ids) if examples else ", ".join(a.trace_ids)
            lines.append(
                f"  {a.window.label} {when(a.window.start_s, a.window.seconds)}: {a.metric} {a.value:.3f} "
                f"(limit {a.limit})"
                + (f"; e.g. {shown_ids}" if shown_ids else ""))
    elif report.windows:
        lines += ["", "No alerts: every window with enough requests is within the monitor gates."]
    return "\n".join(lines)


COUNTS = ("requests", "feedback", "corrections")


def _cell(metric: str, value, alert: bool):
    if value is None:
        return None
    shown = f"{value:.0f}" if metric in COUNTS else f"{value:.1f}" if value >= 10 else f"{value:.3f}"
    return shown + (" !" if alert else "")


def _examples(report: Report, trace_ids: list[str]) -> str:
    by_id = {r.trace_id: r for r in report.requests}
    return "; ".join(f"{t}: {by_id[t].question!r}" for t in trace_ids if t in by_id)


def log(report: Report) -> str | None:
    """Log the windows' metrics and the chart into the model's monitoring run (created on the first pass, in
    the experiment of its first traced request); returns the run id, None when there is nothing to log."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    if not report.windows:
        return None
    client = MlflowClient()
    experiment = report.requests[0].experiment_id or report.experiment_ids[0]
    run_id = _monitoring_run(client, experiment, report.name)
    metrics, last = [], {}
    for w in report.windows:
        if w.label not in last:
            logged = client.get_metric_history(run_id, f"{PREFIX}{w.label}/requests")
            last[w.label] = max((m.step for m in logged), default=-1)
        # windows logged by an earlier pass stay as they were; the last one may have grown
        if w.start_s < last[w.label]:
            continue
        alerts = sum(1 for a in report.alerts if a.window is w)
        for key, value in {**w.metrics, "alerts": float(alerts)}.items():
            metrics.append(Metric(f"{PREFIX}{w.label}/{key}", float(value), w.start_s * 1000, w.start_s))
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    client.set_tag(run_id, tags.MONITOR_WINDOW, report.window)
    client.set_tag(run_id, tags.MONITOR_ALERTS, "; ".join(
        f"{a.window.label} {a.metric} {a.value:.3f} ({a.limit}) at "
        f"{when(a.window.start_s, a.window.seconds)}"
        for a in report.alerts)[:5000] or "none")
    with mlflow.start_run(run_id=run_id):
        mlflow.log_figure(chart(report), CHART_FILE)
    return run_id


def _monitoring_run(client, experiment: str, name: str) -> str:
    found = client.search_runs([experiment], filter_string=f"tags.`{tags.MONITOR_MODEL}` = '{name}'",
                               max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment, run_name=f"monitor-{name}", tags={tags.MONITOR_MODEL: name})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def chart(report: Report):
    """A matplotlib figure: each CHART_METRICS figure over the windows, one line per version, alerts
    marked. A window without a value (no requests of that version, no feedback) is no point, and the line
    breaks there rather than joining its neighbours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7), sharex=True)
    labels = sorted({w.label for w in report.windows})
    for ax, metric in zip(axes.ravel(), CHART_METRICS):
        for label in labels:
            times, values = series(report, label, metric)
            if times:
                ax.plot(times, values, marker="o", label=label)
        for a in report.alerts:
            if a.metric == metric:
                ax.scatter([_moment(a.window.start_s)], [a.value], s=160, facecolors="none",
                           edgecolors="red", zorder=3)
        ax.set_title(metric)
        ax.set_ylim(bottom=0)
        ax.tick_params(axis="x", labelrotation=30)
    axes[0][0].legend()
    fig.suptitle(f"{report.name}: served traffic per {report.window} window (red: alert)")
    fig.tight_layout()
    return fig


def series(report: Report, label: str, metric: str) -> tuple[list, list[float]]:
    """(window starts, values) of one version's metric, with a NaN between two windows that have a window
    without a value between them (no requests of that version, no feedback): matplotlib draws no point there
    and breaks the line."""
    times: list = []
    values: list[float] = []
    last = None
    for w in sorted((w for w in report.windows if w.label == label), key=lambda w: w.start_s):
        if metric not in w.metrics:
            continue
        if last is not None and w.start_s - last > w.seconds:
            times.append(_moment(last + w.seconds))
            values.append(float("nan"))
        times.append(_moment(w.start_s))
        values.append(float(w.metrics[metric]))
        last = w.start_s
    return times, values


def _moment(start_s: int):
    return datetime.datetime.fromtimestamp(start_s, datetime.timezone.utc)
