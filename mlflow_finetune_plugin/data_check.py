"""`mlflow-finetune data check`: a report on a data file before any training — never a traceback."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from mlflow_finetune_plugin.data import (
    DataError,
    DataIssue,
    detect_format,
    read_records_lenient,
    to_messages,
    validate_records,
)


@dataclass
class DataReport:
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
        data = asdict(self)
        data["errors"] = [str(i) for i in self.errors]
        data["warnings"] = [str(i) for i in self.warnings]
        data["ok"] = self.ok
        return data

    def render(self) -> str:
        status = "OK" if self.ok else f"{len(self.errors)} error(s)"
        lines = [f"{self.path}: {status}",
                 f"  format          {self.format or '?'}",
                 f"  rows            {self.rows}"]
        if self.token_stats:
            s = self.token_stats
            lines.append(f"  tokens          min {s['min']}  mean {s['mean']:.0f}  p50 {s['p50']}  p95 {s['p95']}  "
                         f"max {s['max']}")
        lines += [f"  duplicates      {self.duplicates}",
                  f"  contradictions  {self.contradictions}",
                  f"  empty fields    {self.empty_fields}",
                  f"  too long        {self.too_long}"]
        for title, issues in (("errors", self.errors), ("warnings", self.warnings)):
            if issues:
                lines.append(f"  {title}:")
                lines += [f"    {i}" for i in issues[:50]]
                if len(issues) > 50:
                    lines.append(f"    ... and {len(issues) - 50} more")
        return "\n".join(lines)


def check_data(path, fmt="auto", tokenizer=None, max_length=1024, system_prompt=None) -> DataReport:
    """Everything wrong or suspicious in one file, as errors and warnings with line numbers."""
    report = DataReport(path=str(path))
    records, report.errors = read_records_lenient(path)
    report.rows = len(records)
    if not records:
        return report
    try:
        report.format = detect_format(records, path) if fmt == "auto" else fmt
    except DataError as e:
        report.errors += e.issues
        return report
    report.errors += validate_records(records, report.format, path)
    report.empty_fields = sum("empty" in i.message or "missing field" in i.message for i in report.errors)
    bad_lines = {i.line for i in report.errors}
    good = [(line, r) for line, r in records if line not in bad_lines]
    _duplicates_and_contradictions(report, good, path)
    if report.format == "preference":
        return report
    if tokenizer is not None and good:
        _lengths(report, good, tokenizer, max_length, system_prompt, path)
    return report


def _duplicates_and_contradictions(report: DataReport, records, path) -> None:
    seen: dict[str, int] = {}
    answers: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for line, record in records:
        key = json.dumps(record, sort_keys=True)
        if key in seen:
            report.duplicates += 1
            report.warnings.append(DataIssue(str(path), line, f"duplicate of line {seen[key]}", "warning"))
        else:
            seen[key] = line
        if report.format != "preference":
            messages = to_messages(record, report.format)
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = json.dumps(messages[:last], sort_keys=True)
            answers[prompt][messages[last]["content"]].append(line)
    for by_answer in answers.values():
        if len(by_answer) > 1:
            report.contradictions += 1
            lines = sorted(line for group in by_answer.values() for line in group)
            report.warnings.append(DataIssue(
                str(path), lines[0], f"same prompt, {len(by_answer)} different answers (lines "
                                     f"{', '.join(map(str, lines))}): the model cannot learn both", "warning"))


def _lengths(report, records, tokenizer, max_length, system_prompt, path) -> None:
    lengths = []
    for line, record in records:
        ids = tokenizer.apply_chat_template(to_messages(record, report.format, system_prompt), tokenize=True,
                                            return_dict=False)
        n = len(ids)
        lengths.append(n)
        if n > max_length:
            report.too_long += 1
            report.warnings.append(DataIssue(str(path), line, f"{n} tokens, longer than max_length {max_length}: "
                                                              "it will be truncated", "warning"))
    ordered = sorted(lengths)
    report.token_stats = {"min": ordered[0], "mean": sum(ordered) / len(ordered),
                          "p50": ordered[len(ordered) // 2], "p95": ordered[min(len(ordered) - 1,
                                                                                int(len(ordered) * 0.95))],
                          "max": ordered[-1]}


def run_check(files: list[str], fmt="auto", model=None, max_length=1024, as_json=False) -> int:
    """The CLI body: print one report per file; 1 when any file has errors."""
    import click

    from mlflow_finetune_plugin.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    reports = [check_data(f, fmt=fmt, tokenizer=tokenizer, max_length=max_length) for f in files]
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        for r in reports:
            click.secho(r.render(), fg=None if r.ok else "red")
    return 0 if all(r.ok for r in reports) else 1
