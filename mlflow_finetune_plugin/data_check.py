"""`mlflow-finetune data check`: a report on a data file before any model loads; bad data never raises here."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from mlflow_finetune_plugin.data import (
    FORMATS,
    DataError,
    DataIssue,
    detect_format,
    preference_row,
    read_records_lenient,
    to_messages,
    validate_records,
)

_SHOWN = 100  # issues listed per section in the text report; --json has them all
_EMPTY_MARKERS = ("missing '", " is empty", "empty content", "is an empty list")


@dataclass
class DataReport:
    """What `data check` found in one file."""

    path: str
    format: str | None = None
    rows: int = 0
    errors: list[DataIssue] = field(default_factory=list)
    warnings: list[DataIssue] = field(default_factory=list)
    token_stats: dict | None = None
    duplicates: int = 0
    contradictions: int = 0
    empty_fields: int = 0
    too_long: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        def issue(i: DataIssue) -> dict:
            return {"path": i.path, "line": i.line, "message": i.message, "severity": i.severity, "text": str(i)}

        return {"path": self.path, "ok": self.ok, "format": self.format, "rows": self.rows,
                "token_stats": self.token_stats, "duplicates": self.duplicates,
                "contradictions": self.contradictions, "empty_fields": self.empty_fields,
                "too_long": self.too_long, "errors": [issue(i) for i in self.errors],
                "warnings": [issue(i) for i in self.warnings]}

    def render(self) -> str:
        status = "OK" if self.ok else f"{len(self.errors)} error{'s' if len(self.errors) != 1 else ''}"
        lines = [f"{self.path}: {status}, {len(self.warnings)} warning{'s' if len(self.warnings) != 1 else ''}",
                 f"  format          {self.format or '?'}",
                 f"  rows            {self.rows}"]
        if self.token_stats:
            s = self.token_stats
            lines.append(f"  tokens          min {s['min']}  mean {s['mean']:.1f}  p50 {s['p50']}  p95 {s['p95']}  "
                         f"max {s['max']}")
        lines += [f"  duplicates      {self.duplicates}",
                  f"  contradictions  {self.contradictions}",
                  f"  empty fields    {self.empty_fields}",
                  f"  too long        {self.too_long}"]
        for title, issues in (("errors", self.errors), ("warnings", self.warnings)):
            if issues:
                lines.append(f"{title}:")
                lines += [f"  {i}" for i in issues[:_SHOWN]]
                if len(issues) > _SHOWN:
                    lines.append(f"  ... and {len(issues) - _SHOWN} more (--json lists them all)")
        return "\n".join(lines)


def check_data(path, fmt="auto", tokenizer=None, max_length=1024, system_prompt=None) -> DataReport:
    """Everything wrong (errors) or suspicious (warnings) in one data file, by line; never raises for bad data."""
    path = str(path)
    report = DataReport(path=path)
    records, report.errors = read_records_lenient(path)
    report.rows = len(records)
    if not records:
        return report
    try:
        report.format = detect_format(records, path) if fmt in (None, "auto") else fmt
        if report.format not in FORMATS:
            raise DataError([DataIssue(path, None, f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")])
    except DataError as e:
        report.format = None
        report.errors += e.issues
        return report
    row_errors = validate_records(records, report.format, path)
    report.errors += row_errors
    report.empty_fields = sum(any(m in i.message for m in _EMPTY_MARKERS) for i in row_errors)
    bad = {i.line for i in row_errors}
    good = [(line, rec) for line, rec in records if line not in bad]
    _duplicates(report, good)
    if report.format != "preference":
        _contradictions(report, good)
    if tokenizer is not None and good:
        _lengths(report, good, tokenizer, max_length, system_prompt)
    report.errors.sort(key=lambda i: (i.line is not None, i.line or 0))
    report.warnings.sort(key=lambda i: (i.line is not None, i.line or 0))
    return report


def _key(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _duplicates(report: DataReport, records) -> None:
    first: dict[str, int] = {}
    for line, rec in records:
        key = _key(rec)
        if key in first:
            report.duplicates += 1
            report.warnings.append(DataIssue(report.path, line, f"duplicate of line {first[key]} (identical row)",
                                             "warning"))
        else:
            first[key] = line


def _contradictions(report: DataReport, records) -> None:
    """Same prompt (every message before the last assistant reply), different final answers."""
    answers: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for line, rec in records:
        messages = to_messages(rec, report.format)
        last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        answers[_key(messages[:last])][_key(messages[last].get("content"))].append(line)
    for by_answer in answers.values():
        if len(by_answer) > 1:
            report.contradictions += 1
            lines = sorted(line for group in by_answer.values() for line in group)
            report.warnings.append(DataIssue(
                report.path, lines[0], f"same prompt with {len(by_answer)} different answers on lines "
                                       f"{', '.join(map(str, lines))}: the model cannot learn both; keep one",
                "warning"))


def _conversations(rec: dict, fmt: str, system_prompt: str | None) -> list[list[dict]]:
    if fmt != "preference":
        return [to_messages(rec, fmt, system_prompt)]
    row = preference_row(rec, system_prompt, conversational=True)
    return [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]


def _count_tokens(tokenizer, messages: list[dict]) -> int:
    out = tokenizer.apply_chat_template(messages, tokenize=True)
    # transformers 5 returns a BatchEncoding here by default (len() of it is the number of keys, not tokens)
    return len(out["input_ids"] if isinstance(out, Mapping) else out)


def _lengths(report: DataReport, records, tokenizer, max_length, system_prompt) -> None:
    lengths = []
    for line, rec in records:
        try:
            n = max(_count_tokens(tokenizer, conv) for conv in _conversations(rec, report.format, system_prompt))
        except Exception as e:  # a template that raises on this row would fail training the same way
            report.errors.append(DataIssue(report.path, line, f"the tokenizer's chat template rejects this row: {e}"))
            continue
        lengths.append(n)
        if n > max_length:
            report.too_long += 1
            report.warnings.append(DataIssue(
                report.path, line, f"{n} tokens, more than max_length {max_length}: it will be truncated "
                                   "(raise data.max_length / --max-length, or shorten the row)", "warning"))
    if lengths:
        s = sorted(lengths)
        report.token_stats = {"min": s[0], "mean": round(sum(s) / len(s), 1), "p50": s[(len(s) - 1) // 2],
                              "p95": s[min(len(s) - 1, round(0.95 * (len(s) - 1)))], "max": s[-1]}


def run_check(files: list[str], fmt="auto", model=None, max_length=1024, as_json=False) -> int:
    """The body of `mlflow-finetune data check`: print one report per file; 1 when any file has errors, else 0."""
    import click

    from mlflow_finetune_plugin.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    reports = [check_data(f, fmt=fmt, tokenizer=tokenizer, max_length=max_length) for f in files]
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in reports], indent=2, ensure_ascii=False))
    else:
        click.echo("\n\n".join(r.render() for r in reports))
    return 0 if all(r.ok for r in reports) else 1
