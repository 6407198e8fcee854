"""Served traffic summed per time window and version: the figures `monitor` shows, logs and checks against
`monitor.gates` (config/monitor.py names them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow_finetune_plugin.monitor.traffic import Request


@dataclass
class Window:
    """One version's traffic in one window: its figures, and the requests behind the shares (for alerts'
    examples)."""

    start_s: int
    seconds: int
    served: str                                       # `3`, or `3:base`
    metrics: dict[str, float] = field(default_factory=dict)
    # metric -> trace ids of the requests it counts
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"v{self.served.replace(':base', '-base')}"


def group(requests: list[Request], seconds: int) -> dict[tuple[int, str], list[int]]:
    """(window start in seconds since the epoch, version) -> the indices of its requests; windows start at
    whole multiples of `seconds` (UTC), in order."""
    out: dict[tuple[int, str], list[int]] = {}
    for i, r in enumerate(requests):
        start = (r.time_ms // 1000) // seconds * seconds
        out.setdefault((start, r.served), []).append(i)
    return dict(sorted(out.items()))


def summarize(requests: list[Request], index: list[int], new: list[bool] | None, languages: list[str | None],
              main_language: str | None, passes: dict[str, bool] | None = None
              ) -> tuple[dict[str, float], dict[str, list[str]]]:
    """The figures of the requests at `index`: (metrics, metric -> the trace ids behind a share). `passes`:
    the
    judge's verdict per trace id (judge_pass: the share of judged answers that pass)."""
    import numpy as np

    rs = [requests[i] for i in index]
    answered = [r for r in rs if r.ok]
    rated = [r for r in answered if r.verdict is not None]
    latencies = [r.latency_s for r in answered if r.latency_s is not None]
    m: dict[str, float] = {"requests": float(len(rs)), "error_share": 1 - len(answered) / len(rs),
                           "cut_share": _share(answered, lambda r: r.cut), "feedback": float(len(rated)),
                           "input_chars": float(np.mean([len(r.question) for r in rs]))}
    if latencies:
        m["latency_p50"], m["latency_p95"] = (float(v) for v in np.percentile(latencies, [50, 95]))
    for key in ("prompt_tokens", "completion_tokens"):
        counts = [getattr(r, key) for r in answered if getattr(r, key) is not None]
        if counts:
            m[key] = float(np.mean(counts))
    if rated:
        m["thumbs_down_share"] = _share(rated, lambda r: r.verdict is False)
    examples = {
        "error_share": [r.trace_id for r in rs if not r.ok],
        "cut_share": [r.trace_id for r in answered if r.cut],
        "thumbs_down_share": [r.trace_id for r in rated if r.verdict is False],
    }
    if new is not None:
        m["novel_share"] = sum(new[i] for i in index) / len(index)
        examples["novel_share"] = [requests[i].trace_id for i in index if new[i]]
    told = [(i, languages[i]) for i in index if languages[i] is not None]
    if told and main_language:
        m["other_language_share"] = sum(lang != main_language for _, lang in told) / len(told)
        examples["other_language_share"] = [requests[i].trace_id for i, lang in told if lang != main_language]
    judged = [requests[i].trace_id for i in index if passes and requests[i].trace_id in passes]
    if judged:
        m["judge_pass"] = sum(passes[t] for t in judged) / len(judged)
        examples["judge_pass"] = [t for t in judged if not passes[t]]
    return m, examples


def corrected_quality(requests: list[Request], index: list[int], structured: bool = False,
                      json_schema: dict | None = None) -> dict[str, float]:
    """The recipe's quality metrics of the answers users corrected, against the corrections (none without
    any), and, for a recipe whose answers are JSON, the share of answers that parse (`json_valid`)."""
    from mlflow_finetune_plugin.metrics import load_metric, score

    corrected = [requests[i] for i in index if requests[i].ok and requests[i].correction]
    out: dict[str, float] = {"corrections": float(len(corrected))}
    if corrected:
        totals, _ = score([r.answer for r in corrected], [r.correction for r in corrected])
        out.update({k: v for k, v in totals.items() if k in ("exact_match", "token_f1", "rougeL", "chrf")})
    if structured:
        answers = [requests[i].answer for i in index if requests[i].ok]
        if answers:
            got = load_metric("json_valid").compute(predictions=answers, schema=json_schema,
                                                    per_example=False)
            out["json_valid"] = float(got["json_valid"])
    return out


def _share(rows: list, test) -> float:
    return sum(1 for r in rows if test(r)) / len(rows) if rows else 0.0
