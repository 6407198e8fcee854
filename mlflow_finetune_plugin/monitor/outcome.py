"""What one `monitor NAME [--retrain]` pass ended in, for a scheduler: one exit code per outcome, and the same
outcome as one JSON object (`--json`). 1 and 2 are click's (an error, a usage error), so a failure reads as
one whatever failed."""

from __future__ import annotations

import datetime

from mlflow_finetune_plugin.monitor.watch import Report

# outcome -> exit code; the retrain's outcome wins over the alerts (the JSON lists both)
EXIT_CODES = {"no_alert": 0, "failed": 1, "alert": 3, "promoted": 4, "challenger": 5}
SAID = {"no_alert": "no window over a monitor gate",
        "failed": "failed: the error is above (nothing was promoted)",
        "alert": "a window over a monitor gate, nothing retrained",
        "promoted": "retrained, and the new version was promoted",
        "challenger": "retrained, and the new version stays on @challenger (the champion kept)"}


def outcome_of(report: Report | None, retrained=None, failed: bool = False) -> str:
    """The pass's outcome (a key of EXIT_CODES); `retrained`: monitor/retrain.Outcome, when it trained."""
    if failed or report is None:
        return "failed"
    if retrained is not None:
        return "promoted" if retrained.promoted else "challenger"
    return "alert" if report.alerts else "no_alert"


def as_dict(name: str, report: Report | None, retrained=None, error: str | None = None,
            run_id: str | None = None) -> dict:
    """The --json object: the outcome and its exit code, the alerts (trace ids, never texts), and what a
    retrain trained, compared and left out."""
    outcome = outcome_of(report, retrained, failed=error is not None)
    alerts = [] if report is None else [
        {"version": a.window.label, "window_start": _iso(a.window.start_s),
         "window_seconds": a.window.seconds, "metric": a.metric, "value": a.value, "limit": a.limit,
         "trace_ids": a.trace_ids}
        for a in report.alerts]
    return {"model": name, "outcome": outcome, "exit_code": EXIT_CODES[outcome], "said": SAID[outcome],
            "requests": len(report.requests) if report else None,
            "windows": len(report.windows) if report else None, "alerts": alerts,
            "monitoring_run": run_id, "retrain": retrained.as_dict() if retrained is not None else None,
            "error": error}


def _iso(start_s: int) -> str:
    return datetime.datetime.fromtimestamp(start_s, datetime.timezone.utc).isoformat(timespec="seconds")
