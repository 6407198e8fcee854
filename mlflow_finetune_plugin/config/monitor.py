"""`monitor`: how `mlflow-finetune monitor NAME` reads a served version's traffic, and when a window is an
alert (docs/monitoring.md). The reading and scoring are `monitor/`; this is the recipe section the version's
run recorded."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from mlflow_finetune_plugin.config.gates import Gate
from mlflow_finetune_plugin.config.section import Section

WINDOW = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
WINDOW_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# What a window reports (monitor/windows.py computes them), each a metric a monitor gate can limit.
WINDOW_METRICS = ("requests", "error_share", "latency_p50", "latency_p95", "prompt_tokens",
                  "completion_tokens", "cut_share", "feedback", "thumbs_down_share", "corrections",
                  "novel_share", "input_chars", "other_language_share", "json_valid", "judge_pass")
# of corrected answers, against the corrections
QUALITY_METRICS = ("rougeL", "token_f1", "exact_match", "chrf")


def check_gate_metric(metric: str) -> None:
    """Raise ValueError naming the window metrics (and the nearest) when `metric` is not one of them."""
    import difflib

    known = WINDOW_METRICS + QUALITY_METRICS
    if metric not in known:
        near = difflib.get_close_matches(metric, known, n=1)
        raise ValueError(f"no window metric {metric!r}" + (f" (did you mean {near[0]}?)" if near else "")
                         + f"; a monitor gate limits one of: {', '.join(known)}")


def window_seconds(value: str) -> int:
    """`1h`, `1d`, `15m`, `1w` (or `30s`) in seconds; raises ValueError for anything else."""
    m = WINDOW.match(value or "")
    if not m or int(m.group(1)) <= 0:
        raise ValueError(
            f"window {value!r}: expected a whole number of seconds, minutes, hours, days or weeks: "
            "30s, 15m, 1h, 1d, 1w")
    return int(m.group(1)) * WINDOW_SECONDS[m.group(2)]


def _default_gates() -> list[Gate]:
    return [Gate(metric="novel_share", at_most=0.3), Gate(metric="thumbs_down_share", at_most=0.3),
            Gate(metric="error_share", at_most=0.05), Gate(metric="cut_share", at_most=0.2)]


class MonitorConfig(Section):
    """Served traffic after promotion: what one window is, how far a request must be from the training data to
    count as new, and the limits that make a window an alert."""

    window: str = Field("1d", description="one window of traffic: `30s`, `15m`, `1h`, `1d`, `1w`")
    min_requests: int = Field(
        20, ge=1, description="windows with fewer requests of a version are shown, never an alert")
    novelty_quantile: float = Field(
        0.05, gt=0, lt=0.5, description="a request is new when its similarity to the nearest training "
                                        "question is below this quantile of the training questions' own")
    embedding: str | None = Field(
        None, json_schema_extra={"default_text": "empty (BM25)"},
        description="a sentence-transformers model (hub id or folder) whose embeddings measure drift "
                    "instead of BM25")
    gates: list[Gate] = Field(
        default_factory=_default_gates,
        json_schema_extra={
            "default_text": "`novel_share` <= 0.3, `thumbs_down_share` <= 0.3, `error_share` <= 0.05, "
                            "`cut_share` <= 0.2"},
        description="a gate as in `registry.promote_if`, with `at_most` / `at_least` only, on a window "
                    "metric: `requests`, `error_share`, `latency_p50`, `latency_p95`, `prompt_tokens`, "
                    "`completion_tokens`, `cut_share`, `feedback`, `thumbs_down_share`, `corrections`, "
                    "`novel_share`, `input_chars`, `other_language_share`, `json_valid`, `judge_pass`, or a "
                    "quality metric against corrections (`rougeL`, `token_f1`, `exact_match`, `chrf`)")

    @field_validator("window")
    @classmethod
    def _window(cls, value):
        window_seconds(value)
        return value

    @field_validator("gates")
    @classmethod
    def _limits_only(cls, gates):
        for gate in gates:
            check_gate_metric(gate.metric)
            if gate.at_most is None and gate.at_least is None:
                raise ValueError(
                    f"gate on {gate.metric}: a monitor gate is a limit (at_most or at_least); a window "
                    "has no contender to beat")
        return gates
