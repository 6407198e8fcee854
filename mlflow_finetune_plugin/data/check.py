"""`mlflow-finetune data check` and the backend's pre-flight check: one report on a data file before any model
loads. Errors stop a run; warnings are advice (few rows, near-duplicates, train/eval overlap, answers cut by
max_length), errors too where the recipe says `data.strict`. Bad data never raises here."""

from __future__ import annotations

import json
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field

from mlflow_finetune_plugin.data.formats import detect_format, sharegpt_tags, summarize
from mlflow_finetune_plugin.data.image_check import (
    check_image_rows,
    count_image_tokens,
    render_images,
    text_model_issue,
)
from mlflow_finetune_plugin.data.images import has_images
from mlflow_finetune_plugin.data.read import (
    DataError,
    DataIssue,
    preference_row,
    read_records_lenient,
    resolve_format,
    to_messages,
    validate_records,
)
from mlflow_finetune_plugin.data.token_check import count_lengths, model_takes_images
from mlflow_finetune_plugin.data.traces import TraceQuery, is_traces, query_of, read_traces, traces_sentence
from mlflow_finetune_plugin.messages import text_messages
from mlflow_finetune_plugin.models.vision import processor_of

FEW_ROWS = 50  # below this, few-shot prompting is the first thing to try (the seeds of this project say so)
_SHOWN = 100  # lines listed per section in the text report; --json has every row
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
    near_duplicates: int = 0
    contradictions: int = 0
    empty_fields: int = 0
    too_long: int = 0
    cut_share: float | None = None  # share of the answer tokens (all tokens without assistant masks) cut
    eval_overlap: int = 0
    traces: dict | None = None  # a traces source: traces read, used, left out and why (TraceRows.summary)
    detected: str | None = None  # what the rows look like, whatever was declared
    inferred_from: str | None = None  # the declared format, where the objective's format replaced it
    # rows with images, images, URLs (not checked), sizes: image_check.check_images
    images: dict | None = None
    prompts: list[tuple[int, str]] = field(default_factory=list, repr=False)  # (line, normalized prompt)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        def issue(i: DataIssue) -> dict:
            return {"path": i.path, "line": i.line, "message": i.message, "severity": i.severity,
                    "text": str(i)}

        return {"path": self.path, "ok": self.ok, "format": self.format, "detected": self.detected,
                "inferred_from": self.inferred_from, "rows": self.rows,
                "token_stats": self.token_stats, "duplicates": self.duplicates,
                "near_duplicates": self.near_duplicates, "contradictions": self.contradictions,
                "empty_fields": self.empty_fields, "too_long": self.too_long, "cut_share": self.cut_share,
                "eval_overlap": self.eval_overlap, "traces": self.traces, "images": self.images,
                "errors": [issue(i) for i in self.errors],
                "warnings": [issue(i) for i in self.warnings]}

    def render(self) -> str:
        status = "OK" if self.ok else f"{len(self.errors)} error{'s' if len(self.errors) != 1 else ''}"
        lines = [
            f"{self.path}: {status}, {len(self.warnings)} warning{'s' if len(self.warnings) != 1 else ''}",
            f"  format          {self.format or '?'}", f"  rows            {self.rows}"]
        if self.traces:
            lines.append(f"  traces          {traces_sentence(self.traces)}")
        if self.token_stats:
            s = self.token_stats
            lines.append(
                f"  tokens          min {s['min']}  mean {s['mean']:.1f}  p50 {s['p50']}  p95 {s['p95']}  "
                f"max {s['max']}{_tokens_note(self.images)}")
        if self.images:
            lines += render_images(self.images)
        cut = f" ({self.cut_share:.1%} of the answer tokens cut)" if self.too_long and self.cut_share else ""
        lines += [f"  duplicates      {self.duplicates}",
                  f"  near-duplicates {self.near_duplicates}",
                  f"  contradictions  {self.contradictions}",
                  f"  eval overlap    {self.eval_overlap}",
                  f"  empty fields    {self.empty_fields}",
                  f"  too long        {self.too_long}{cut}"]
        for title, issues in (("errors", self.errors), ("warnings", self.warnings)):
            if issues:
                shown = summarize(issues)
                lines.append(f"{title}:")
                lines += [f"  {s}" for s in shown[:_SHOWN]]
                if len(shown) > _SHOWN:
                    lines.append(f"  ... and {len(shown) - _SHOWN} more (--json lists them all)")
        return "\n".join(lines)

    def make_strict(self) -> None:
        """`data.strict` / --strict: the warnings are errors."""
        self.errors += [DataIssue(w.path, w.line, w.message, "error", w.group) for w in self.warnings]
        self.warnings = []
        self.errors.sort(key=lambda i: (i.line is not None, i.line or 0))


def check_data(path, fmt="auto", tokenizer=None, max_length=1024, system_prompt=None, columns=None, tags=None,
               split="train", accepts=None, format_key="--format", model_label=None, model=None,
               model_revision=None, trust_remote_code=False, image_tokens=False) -> DataReport:
    """Everything wrong (errors) or suspicious (warnings) in one data file, by line; never raises for bad
    data.

    `accepts`: the formats the objective trains on; a declared format outside them gives way to the rows' own
    format when that one is accepted (`inferred_from` says so). `format_key` names the setting in messages.
    `model`: the model the data is for, asked whether it reads images where the rows have any (None: not
    asked). `image_tokens`: rows with images are counted with their image tokens where `tokenizer` is a
    vision-language model's (its processor, no weights), and refused when too long, as training refuses them
    before its first step.
    """
    report = DataReport(path=str(path))
    columns_key = "--column" if format_key.startswith("--") else format_key.rsplit(".", 1)[0] + ".columns"
    if is_traces(path):
        got = read_traces(path if isinstance(path, TraceQuery) else query_of(path))
        records, report.errors, report.traces = got.records, got.issues, got.summary()
    else:
        records, report.errors = read_records_lenient(path, columns, columns_key)
    path = str(path)
    report.rows = len(records)
    if not records:
        return report
    tags = sharegpt_tags(tags)
    try:
        report.detected = detect_format(records, path, tags)
    except DataError:
        pass
    try:
        report.format, _ = resolve_format(records, fmt, path, tags, format_key, accepts or ())
    except DataError as e:
        report.errors += e.issues
        return report
    if fmt not in (None, "auto") and report.format != fmt:  # the objective's format, read from the rows
        report.inferred_from = fmt
    row_errors = validate_records(records, report.format, path, tags)
    report.errors += row_errors
    report.empty_fields = sum(any(m in i.message for m in _EMPTY_MARKERS) for i in row_errors)
    bad = {i.line for i in report.errors}
    good = [(line, rec) for line, rec in records if line not in bad]
    counted = {}
    if has_images(good):
        found = _images(report, good, system_prompt, tags, format_key,
                        model and (model, model_revision, trust_remote_code))
        good, convs = found.records, found.conversations
        if image_tokens and tokenizer is not None and processor_of(tokenizer) is not None \
                and report.format != "prompt_only":
            bad = {i.line for i in report.errors}
            counted, issues = count_image_tokens(report.path, found, [ln for ln, _ in good if ln not in bad],
                                                 report.format, tokenizer, max_length, model_label or model)
            report.errors += issues
    else:
        convs = {line: _conversations(rec, report.format, system_prompt, tags) for line, rec in good}
    _duplicates(report, good, convs)
    # several answers to one prompt is the point; two thumbs is not
    if report.format == "unpaired_preference":
        _label_conflicts(report, good, convs)
    elif report.format not in ("preference", "prompt_only"):  # prompt-only rows have no answer to contradict
        _contradictions(report, convs)
    report.prompts = [(line, _normalized(_prompt(c[0]))) for line, c in convs.items()]
    if split == "train" and report.rows < FEW_ROWS:
        report.warnings.append(DataIssue(path, None, _few_rows(report.rows), "warning"))
    if tokenizer is not None and good:
        count_lengths(report, good, convs, tokenizer, max_length, model_label, counted)
    report.errors.sort(key=lambda i: (i.line is not None, i.line or 0))
    report.warnings.sort(key=lambda i: (i.line is not None, i.line or 0))
    return report


def _tokens_note(images: dict | None) -> str:
    if not images or not images["rows"]:
        return ""
    return "  (with image tokens)" if images.get("image_tokens") else "  (text only)"


def _few_rows(n: int) -> str:
    return (f"only {n} training row{'s' if n != 1 else ''}: with fewer than {FEW_ROWS} examples, few-shot "
            "prompting (a few examples in the prompt, no training) often does as well, so try it first. The "
            "evaluation's `fewshot` contender (eval.fewshot_k train examples in the prompt) is that "
            "comparison: the tuned model has to beat it")


def check_overlap(train: DataReport, held_out: DataReport) -> None:
    """Warn on held-out rows whose prompt (normalized) is also a training prompt: scoring them flatters the
    model."""
    seen = {}
    for line, key in train.prompts:
        seen.setdefault(key, line)
    for line, key in held_out.prompts:
        if key and key in seen:
            held_out.eval_overlap += 1
            held_out.warnings.append(DataIssue(
                held_out.path, line,
                f"same prompt as {train.path}:{seen[key]}: the evaluation scores the model on "
                "a prompt it was trained on, so it looks better than it is; drop it from one split",
                "warning",
                group=f"prompts that are also in the training data ({train.path}): the evaluation scores "
                      "the model on what it was trained on and looks better than it is; drop them from one "
                      "split"))
    held_out.warnings.sort(key=lambda i: (i.line is not None, i.line or 0))


def _key(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _normalized(messages: list[dict]) -> str:
    """The conversation's text, case folded, punctuation dropped and whitespace collapsed: near-duplicates
    match."""
    parts = []
    for m in messages:
        content = m.get("content")
        text = content if isinstance(content, str) else _key(content) if content is not None else ""
        if m.get("tool_calls"):
            text += " " + _key(m["tool_calls"])
        text = "".join(c for c in unicodedata.normalize("NFKC", text).casefold()
                       if not unicodedata.category(c).startswith("P"))
        parts.append(f"{m.get('role')}: {' '.join(text.split())}")
    return "\n".join(parts)


def _prompt(messages: list[dict]) -> list[dict]:
    """Every message before the last assistant reply."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    return messages[:last]


def _duplicates(report: DataReport, records, convs) -> None:
    exact: dict[str, int] = {}
    near: dict[str, int] = {}
    for line, rec in records:
        key, loose = _key(rec), "\n\n".join(_normalized(c) for c in convs[line])
        if key in exact:
            report.duplicates += 1
            report.warnings.append(DataIssue(report.path, line,
                                             f"duplicate of line {exact[key]} (identical row)", "warning",
                                             group="duplicates of earlier rows (identical): keep one"))
        elif loose in near:
            report.near_duplicates += 1
            report.warnings.append(DataIssue(
                report.path, line,
                f"near-duplicate of line {near[loose]} (the same text ignoring case, whitespace "
                "and punctuation)", "warning",
                group="near-duplicates of earlier rows (the same text ignoring case, whitespace and "
                      "punctuation): keep one of each"))
        exact.setdefault(key, line)
        near.setdefault(loose, line)


def _contradictions(report: DataReport, convs) -> None:
    """Same prompt (every message before the last assistant reply), different final answers."""
    answers: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for line, (messages,) in convs.items():
        last = len(_prompt(messages))
        answers[_key(messages[:last])][_key(messages[last].get("content"))].append(line)
    for by_answer in answers.values():
        if len(by_answer) > 1:
            report.contradictions += 1
            lines = sorted(line for group in by_answer.values() for line in group)
            report.warnings.append(DataIssue(
                report.path, lines[0], f"same prompt with {len(by_answer)} different answers on lines "
                                       f"{', '.join(map(str, lines))}: the model cannot learn both; keep one",
                "warning"))


def _label_conflicts(report: DataReport, records, convs) -> None:
    """Unpaired rows: one answer labelled both desirable and undesirable, and a file with only one kind of
    label (KTO then learns only to raise or only to lower answers)."""
    labels: dict[str, dict[bool, list[int]]] = defaultdict(lambda: defaultdict(list))
    for line, rec in records:
        labels[_normalized(convs[line][0])][rec["label"]].append(line)
    for by_label in labels.values():
        if len(by_label) > 1:
            report.contradictions += 1
            up, down = by_label[True], by_label[False]
            report.warnings.append(DataIssue(
                report.path, min(up + down),
                f"the same answer is labelled desirable (line {', '.join(map(str, up))}) "
                f"and undesirable (line {', '.join(map(str, down))}): keep one label", "warning"))
    seen = {rec["label"] for _, rec in records}
    if len(seen) == 1 and report.rows >= 2:
        kind = "desirable (true)" if True in seen else "undesirable (false)"
        report.warnings.append(DataIssue(report.path, None,
                                         f"every label is {kind}: KTO learns from both kinds; "
                                         "add answers of the other kind", "warning"))


def _conversations(rec: dict, fmt: str, system_prompt: str | None, tags) -> list[list[dict]]:
    """The row's conversations (two for a preference pair), text given as parts read as strings, as training
    does."""
    if fmt != "preference":
        return [text_messages(to_messages(rec, fmt, system_prompt, tags))]
    row = preference_row(rec, system_prompt, conversational=True)
    return [text_messages(row["prompt"] + row["chosen"]), text_messages(row["prompt"] + row["rejected"])]


# ---------------------------------------------------------------- images


def _images(report: DataReport, records, system_prompt, tags, format_key: str, model):
    """Rows with images checked (`image_check`) and, where a model is named, whether it reads images: what was
    found (the rows left to check, their conversations, their canonical rows)."""
    found = check_image_rows(report.path, report.format, records, system_prompt, tags)
    report.images = found.stats
    report.errors += [i for i in found.issues if i.severity == "error"]
    report.warnings += [i for i in found.issues if i.severity != "error"]
    if model and found.first_line is not None:
        key = "--model" if format_key.startswith("--") else "model.name"
        if issue := text_model_issue(report.path, found, model[0], model_takes_images(*model), key):
            (report.errors if issue.severity == "error" else report.warnings).append(issue)
    return found


# ---------------------------------------------------------------- entry points


def run_check(files: list[str], fmt="auto", model=None, max_length=1024, as_json=False, eval_files=(),
              columns=None, tags=None, strict=False) -> int:
    """The body of `mlflow-finetune data check`: print one report per file; 1 when any file has errors, else
    0."""
    import click

    from mlflow_finetune_plugin.models.base import load_tokenizer

    tokenizer = load_tokenizer(model)
    label = model or "tiny"

    def check(path, split):
        return check_data(path, fmt=fmt, tokenizer=tokenizer, max_length=max_length, columns=columns,
                          tags=tags, split=split, model_label=label, model=model, image_tokens=True)

    reports = [check(f, "train") for f in files]
    held_out = [check(f, "eval") for f in eval_files]
    for report in held_out:
        for train in reports:
            check_overlap(train, report)
    reports += held_out
    if strict:
        for report in reports:
            report.make_strict()
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in reports], indent=2, ensure_ascii=False))
    else:
        click.echo("\n\n".join(r.render() for r in reports))
    return 0 if all(r.ok for r in reports) else 1
