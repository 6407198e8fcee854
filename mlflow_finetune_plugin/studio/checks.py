"""The page's "Check": what `mlflow run --backend finetune` checks before a run exists (the backend's
`resolve_entry_point`: the recipe loaded and validated, the objective's own checks, the data preflight), run
by the same functions, with each problem located (a recipe key, `finetune.yaml:LINE`, `data/train.jsonl:LINE`)
and its fix, the data's format, rows and token lengths (the model's tokenizer, never its weights), and the
advice the CLI prints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_finetune_plugin.config import presets
from mlflow_finetune_plugin.config.loading import key_lines
from mlflow_finetune_plugin.config.schema import RECIPE_FILE, SHORT_KEYS
from mlflow_finetune_plugin.data.check import FEW_ROWS
from mlflow_finetune_plugin.data.formats import summarize
from mlflow_finetune_plugin.errors import FinetuneError, RecipeError
from mlflow_finetune_plugin.studio.capture import captured_stderr
from mlflow_finetune_plugin.studio.fixes import data_fix, recipe_fix
from mlflow_finetune_plugin.studio.recipe_form import expand_model

_LINE = re.compile(r"^line (\d+)(?:, column \d+)?: ")
_KEY = re.compile(r"^([A-Za-z_][\w-]*(?:\.[\w-]+)*)(?=: | \(|$)")
_DATA_HEAD = re.compile(r"^\d+ problems? in the (data|prompts for the teacher)")


@dataclass
class Problem:
    where: str  # "data/train.jsonl:7", "finetune.yaml:12", a recipe key, or "-e"
    message: str
    fix: str
    severity: str = "error"  # error | warning
    # the recipe key the problem is about, where there is one (the page marks its field)
    key: str | None = None


@dataclass
class CheckResult:
    problems: list[Problem] = field(default_factory=list)
    format: str | None = None  # the training data's format ("+"-joined where the files differ)
    rows: dict[str, int] = field(default_factory=dict)  # data.train, data.eval, data.tasks.NAME.train, ...
    # the training file's: min, median, p95, max, over_max_length
    token_lengths: dict = field(default_factory=dict)
    advice: list[str] = field(default_factory=list)
    recipe_ok: bool = False
    formats: dict[str, str] = field(default_factory=dict)  # per file
    memory: str = ""  # the memory plan on this machine's device (memory/plan.py), as `mlflow-finetune plan`

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def as_markdown(self) -> str:
        errors = sum(p.severity == "error" for p in self.problems)
        warnings = len(self.problems) - errors
        head = ("**Ready to start.**" if self.ok
                else f"**{errors} problem{'s' if errors != 1 else ''} to fix before "
                     "a run can start.**") + (f" {warnings} warning{'s' if warnings != 1 else ''}."
                                              if warnings else "")
        lines = [head, ""]
        if self.problems:
            lines += ["| | where | problem | fix |", "| --- | --- | --- | --- |"]
            lines += [f"| {'error' if p.severity == 'error' else 'warning'} | `{_cell(p.where)}` | "
                      f"{_cell(p.message)} | {_cell(p.fix)} |" for p in self.problems]
            lines.append("")
        if self.rows:
            data = [f"- `{label}`: {n} row{'s' if n != 1 else ''}" + (f", {self.formats[label]}"
                                                                      if label in self.formats
                                                                      else "") for label,
                    n in self.rows.items()]
            lines += ["**Data**", "", *data]
        if self.token_lengths:
            t = self.token_lengths
            lines.append(
                f"- tokens per training row: min {t['min']}, median {t['median']}, p95 {t['p95']}, max "
                f"{t['max']}; {t['over_max_length']} over data.max_length {t['max_length']}")
        if self.advice:
            lines += ["", "**Advice**", "", *(f"- {a}" for a in self.advice)]
        if self.memory:
            lines += ["", "**Memory**", "", "```", self.memory, "```"]
        return "\n".join(lines).strip() + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def check(project_dir, entry_point: str, overrides: dict) -> CheckResult:
    """Everything `mlflow run PROJECT -e ENTRY --backend finetune -P ...` would refuse or warn about before a
    run exists, as a CheckResult. The recipe's problems come first; the data is checked once the recipe loads.
    It reads what the project and the overrides name: the page passes them through `Workspace.check_request`
    first. The first call in a process imports the training code the objectives' checks need (seconds); later
    ones are quick."""
    from mlflow_finetune_plugin.backend import check_combination
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.data.check import check_data
    from mlflow_finetune_plugin.data.preflight import check_recipe_data

    project = Path(project_dir).resolve()
    result = CheckResult()
    if entry_point not in presets.PRESETS:
        result.problems.append(Problem("-e", f"unknown entry point {entry_point!r}",
                                       f"pick one of: {', '.join(presets.PRESETS)}"))
        return result
    try:
        overrides = expand_model(overrides)
    except FinetuneError as e:
        message = str(e).removeprefix("model.name: ")
        result.problems.append(Problem("model.name", message, recipe_fix(message, "model.name"),
                                       key="model.name"))
        return result
    reports: list = []

    def recording(path, **kwargs):  # the preflight's own check_data, its reports kept for the page
        report = check_data(path, **kwargs)
        reports.append(report)
        return report

    with captured_stderr() as printed:
        try:
            recipe = load_recipe(project, method=entry_point, overrides=overrides)
        except RecipeError as e:
            result.problems += _recipe_problems(e, project, overrides)
            result.advice += _notes(printed.getvalue())
            return result
        try:
            check_combination(recipe)
            result.recipe_ok = True
        except RecipeError as e:
            result.problems += _recipe_problems(e, project, overrides)
        refused = None
        try:
            check_recipe_data(recipe, recording)
        except FinetuneError as e:
            refused = str(e)
    _data_result(result, recipe, reports, project, refused, printed.getvalue())
    if result.ok:
        _memory(result, recipe)
    return result


def _memory(result: CheckResult, recipe) -> None:
    """The memory plan on this machine's device (the one the backend makes before a run starts), and on CUDA
    the backend's refusal of a recipe that cannot fit, as a problem naming the setting that fits."""
    from mlflow_finetune_plugin.memory.choose import is_auto, this_device
    from mlflow_finetune_plugin.memory.plan import check_fits, data_longest, plan

    device, memory = this_device()
    try:
        planned = plan(recipe, device_memory=memory, device=device, longest=data_longest(recipe)[0])
    except FinetuneError as e:  # the configuration cannot be read: training could not load the model either
        message = str(e)
        result.problems.append(Problem("model.name", message, recipe_fix(message, "model.name"),
                                       key="model.name"))
        return
    result.memory = planned.report()
    try:
        if device == "cuda" and (not is_auto(recipe) or planned.choice is None):  # as the backend refuses
            check_fits(planned)
    except FinetuneError as e:
        result.problems.append(Problem("train.batch_size", str(e).splitlines()[0],
                                       "lower train.batch_size (raise train.grad_accum), set "
                                       "train.gradient_checkpointing: true or auto, lower data.max_length, "
                                       "or use -e qlora", key="train.batch_size"))


# ----------------------------------------------------------------------------------------------- the recipe


def _recipe_problems(error: RecipeError, project: Path, overrides: dict) -> list[Problem]:
    source = Path(error.source).name if error.source else RECIPE_FILE
    written = _written_lines(project / RECIPE_FILE) if source == RECIPE_FILE else {}
    given = {SHORT_KEYS.get(k, k): k for k in overrides}
    out = []
    for text in error.problems:
        rest, line = text, None
        if m := _LINE.match(rest):
            line, rest = int(m.group(1)), rest[m.end():]
        for k, v in overrides.items():
            if rest.startswith(prefix := f"-P {k}={v}: "):
                rest = rest[len(prefix):]
                break
        m = _KEY.match(rest)
        key = m.group(1) if m else None
        if line is None and key and key not in given and key in written:
            line = written[key]
        where = f"{source}:{line}" if line else key or source
        if key == "method":
            where = "-e"
        message = rest[len(key) + 2:] if key and rest.startswith(f"{key}: ") else rest
        # a key of an older section (`lora.rr`) is reported by its section's check and again on the axis it
        # moves to
        if (where, message.split(". Valid")[0]) not in {(p.where, p.message.split(". Valid")[0])
                                                        for p in out}:
            out.append(Problem(where, message, recipe_fix(rest, key), "error", key))
    return out


def _written_lines(path: Path) -> dict[str, int]:
    """{dotted key: line} of the keys written in the recipe file (the loader's own `key_lines`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    return {".".join(key): line for key, line in key_lines(text).items()}


def _data_result(result: CheckResult, recipe, reports: list, project: Path, refused: str | None,
                 printed: str) -> None:
    from mlflow_finetune_plugin.data.splits import data_files

    labels = {str(path): label for label, path, _, _ in data_files(recipe)}
    seen_errors, seen_warnings = set(), set()
    training = None
    for report in reports:
        label = labels.get(report.path, report.path)
        result.rows[label] = report.rows
        if fmt := report.format or report.detected:
            result.formats[label] = fmt
        if training is None and label.endswith(".train"):
            training = report
        for severity, issues, seen in (("error", report.errors, seen_errors), ("warning", report.warnings,
                                                                                seen_warnings)):
            for group in _groups(issues):
                text = summarize(group)[0]
                seen.add(text)
                first = group[0]
                message = _without_path(text, first.path)
                if severity == "warning" and f"fewer than {FEW_ROWS} examples" in message:
                    result.advice.append(f"{label}: {message}")
                    continue
                line = f":{first.line}" if first.line is not None else ""
                result.problems.append(Problem(_shown(first.path, project) + line, message,
                                               data_fix(message, label, first.line), severity, label))
    result.format = "+".join(dict.fromkeys(v for k,
                                           v in result.formats.items() if k.endswith(".train"))) or None
    if training is not None and training.token_stats:
        s = training.token_stats
        result.token_lengths = {"min": s["min"], "median": s["p50"], "p95": s["p95"], "max": s["max"],
                                "mean": s["mean"], "over_max_length": training.too_long,
                                "max_length": recipe.data.max_length, "model": recipe.model.name or "tiny"}
    # what the preflight refused beyond the files' own reports (a format the method cannot train, ...)
    if refused:
        for text in _listed(refused):
            if text not in seen_errors:
                result.problems.append(_loose_problem(text, project, "error", labels))
    warned, notes = _printed(printed)
    for text in warned:
        if text not in seen_warnings:
            result.problems.append(_loose_problem(text, project, "warning", labels))
    result.advice += notes


def _groups(issues) -> list[list]:
    """The issues grouped as `summarize` groups them: one problem on many rows is one entry."""
    groups: dict[tuple, list] = {}
    for issue in issues:
        groups.setdefault((issue.path, issue.severity, issue.group or issue.message), []).append(issue)
    return list(groups.values())


def _without_path(text: str, path: str) -> str:
    return re.sub(rf"^{re.escape(path)}(:\d+)?: ", "", text)


def _shown(path: str, project: Path) -> str:
    """A data file as the page names it: relative to the project where it is inside it."""
    try:
        return str(Path(path).resolve().relative_to(project))
    except (ValueError, OSError):
        return path


def _listed(message: str) -> list[str]:
    """The problems listed in the preflight's FinetuneError (its lines after the heading)."""
    lines = [ln.strip() for ln in message.splitlines()]
    if not lines or not _DATA_HEAD.match(lines[0]):
        return [message.strip()]
    return [ln for ln in lines[1:] if ln and not ln.startswith(("... and ",
                                                                "Run `mlflow-finetune data check"))]


def _printed(text: str) -> tuple[list[str], list[str]]:
    """(the data warnings, the notes) the preflight and the loader printed."""
    warned, notes, in_warnings = [], [], False
    for raw in text.splitlines():
        line = raw.strip()
        if raw.startswith("Data warnings"):
            in_warnings = True
            continue
        if in_warnings and raw.startswith("  "):
            warned.append(line)
            continue
        in_warnings = False
        if line.startswith(("Note:", "Traces", "Prompts", "Questions:", "Documents")):
            notes.append(line)
    return warned, notes


def _notes(text: str) -> list[str]:
    return _printed(text)[1]


def _loose_problem(text: str, project: Path, severity: str, labels: dict[str, str]) -> Problem:
    """A problem the preflight worded as one line `PLACE: message` (PLACE a file, FILE:LINE or a recipe
    key)."""
    place, sep, message = text.partition(": ")
    if not sep or " " in place.strip():
        place, message = "data", text
    m = re.match(r"^(.*?)(:\d+)?$", place)
    where = _shown(m.group(1), project) + (m.group(2) or "")
    key = place if place.startswith("data.") else labels.get(m.group(1))
    return Problem(where, message, data_fix(message, key or "data", None), severity, key)
