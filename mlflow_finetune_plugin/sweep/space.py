"""The search space of `mlflow-finetune sweep`: the space file, read and checked against the recipe schema.

The file maps dotted recipe keys (or nested mappings) to a range or a list of choices:

    train.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}
    lora.r: [4, 8, 16]                # the same as {choices: [4, 8, 16]}

Every malformed entry, unknown key and out-of-schema bound is reported at once, before any trial starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from mlflow_finetune_plugin.errors import FinetuneError, RecipeError

RANGE_KEYS = ("low", "high", "log", "step", "type")
EXAMPLE = "train.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}  or  lora.r: [4, 8, 16]"


@dataclass(frozen=True)
class Dimension:
    """One axis of the search space: a float or int range (optionally log-scaled, stepped) or a list of
    choices."""

    key: str
    kind: str  # float | int | choice
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        suggest = trial.suggest_int if self.kind == "int" else trial.suggest_float
        return suggest(self.key, self.low, self.high, log=self.log, step=self.step or (1 if self.kind == "int"
                                                                                       else None))

    def edges(self) -> list:
        """The values that bound the axis: checking these against the recipe checks the whole axis."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def __str__(self) -> str:
        return f"one of {list(self.choices)}" if self.kind == "choice" else (f"{self.kind} in [{self.low}, "
                                                                             f"{self.high}]")

    def contains(self, value) -> bool:
        if self.kind == "choice":
            return value in self.choices
        return isinstance(value, (int, float)) and not isinstance(value,
                                                                  bool) and self.low <= value <= self.high


def load_space(path: str | os.PathLike) -> list[Dimension]:
    """Read a space file; raises FinetuneError listing every malformed entry (recipe keys are checked
    apart)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FinetuneError(f"--space {path}: file not found") from None
    except yaml.YAMLError as e:
        raise FinetuneError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise FinetuneError(f"{path}: a space file maps recipe keys to ranges or choices, e.g.\n  {EXAMPLE}")
    dims, problems = [], []
    for key, spec in _flatten(raw):
        try:
            dims.append(_dimension(key, spec))
        except ValueError as e:
            problems.append(f"{key}: {e}")
    if problems:
        raise _space_error(path, problems)
    return dims


def _space_error(path, problems: list[str]) -> FinetuneError:
    n = len(problems)
    return FinetuneError(
        f"{path}: {n} problem{'s' if n != 1 else ''} in the search space; nothing was started:\n"
        + "\n".join(f"  - {p}" for p in problems) + f"\nAn axis reads e.g. {EXAMPLE}")


def _flatten(node: dict, prefix: str = ""):
    """`train: {learning_rate: {...}}` reads as `train.learning_rate: {...}`; a mapping with range or choices
    keys is an axis."""
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and not ({"choices", *RANGE_KEYS} & set(value)):
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value


def _dimension(key: str, spec) -> Dimension:
    if isinstance(spec, list):
        # a plain YAML list is choices, as W&B's `values:` or Optuna's suggest_categorical
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise ValueError(f"{json.dumps(spec, default=str)} is not a range or choices; write e.g. {EXAMPLE} "
                         "(a fixed value belongs in -P)")
    unknown = sorted(set(spec) - {"choices", *RANGE_KEYS})
    if unknown:
        raise ValueError(
            f"unknown field(s) {unknown}; a range takes {', '.join(RANGE_KEYS)}, a list takes choices")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"}:
            raise ValueError("give either choices or a range (low/high), not both")
        if not isinstance(choices, list) or not choices:
            raise ValueError("choices must be a non-empty list, e.g. choices: [4, 8, 16]")
        bad = [c for c in choices if not isinstance(c, (str, int, float, bool)) and c is not None]
        if bad:
            raise ValueError(f"choices must be single values (numbers, text, true/false); got {bad}")
        if len(set(map(repr, choices))) != len(choices):
            raise ValueError(f"choices {choices} repeat a value")
        return Dimension(key, "choice", choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise ValueError("a range needs both low and high, e.g. {low: 1.0e-4, high: 1.0e-2, log: true}")
    low, high = _number(spec["low"], "low"), _number(spec["high"], "high")
    kind = spec.get("type") or ("int" if all(isinstance(v, int) for v in (low, high)) else "float")
    if kind not in ("int", "float"):
        raise ValueError(f"type must be int or float (got {kind!r})")
    if kind == "int" and not all(float(v).is_integer() for v in (low, high)):
        raise ValueError(f"type int needs whole-number bounds (got low={low}, high={high})")
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise ValueError(f"log must be true or false (got {log!r})")
    if low >= high:
        raise ValueError(f"low ({low}) must be below high ({high}); swap them (a fixed value belongs in -P)")
    if log and low <= 0:
        raise ValueError(f"a log range needs low > 0 (got {low}); raise low or drop log: true")
    if step is not None and (log or _number(step, "step") <= 0):
        raise ValueError("step must be a positive number, and cannot be combined with log: true")
    cast = int if kind == "int" else float
    return Dimension(key, kind, cast(low), cast(high), log, cast(step) if step is not None else None)


def _number(value, name: str):
    """YAML reads `1e-4` (no dot) as text: accept any number written as text too."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number (got {value!r})")
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number (got {value!r})") from None


def cli_value(value) -> str:
    """A trial's value as the `-P` text that the recipe loader reads back to the same value (`1e-07` stays a
    float, `'true'` stays text)."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("...\n").strip()


def check_space(dims: list[Dimension], space_path, project: str, entry_point: str, params: dict,
                enqueue: list[dict] = ()) -> None:
    """Every key and every bound or choice against the recipe schema (`load_recipe` with the value as a `-P`
    override), the enqueued trials against the space; raises RecipeError naming each key and the fix."""
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.config.schema import SHORT_KEYS

    def canon(k):
        return SHORT_KEYS.get(k, k)

    # the recipe itself first: its errors are its own
    load_recipe(project, method=entry_point, overrides=params)
    fixed = {canon(k) for k in params}
    problems = []
    for dim in dims:
        if canon(dim.key) == "registry.enabled":
            problems.append(
                f"{dim.key}: cannot be swept: trials never register, the sweep registers the best one "
                "(-P registry.enabled=false: none)")
            continue
        if canon(dim.key) in fixed:
            problems.append(f"{dim.key}: also given as -P; drop one of the two")
        for value in dim.edges():
            try:
                load_recipe(project, method=entry_point, overrides={**params, dim.key: cli_value(value)})
            except RecipeError as e:
                flag = f"-P {dim.key}={cli_value(value)}: "
                for problem in (p.removeprefix(flag) for p in e.problems):
                    problems.append(problem if problem.startswith(dim.key)
                                    else f"{dim.key}={value!r}: {problem}")
                break  # an unknown key fails every value alike
    by_key = {d.key: d for d in dims}
    for i, point in enumerate(enqueue, 1):
        for key, value in point.items():
            if key not in by_key:
                problems.append(f"--enqueue #{i}: {key} is not in the space (keys: {', '.join(by_key)})")
            elif not by_key[key].contains(value):
                problems.append(f"--enqueue #{i}: {key}={value!r} is outside the space ({by_key[key]})")
    if problems:
        raise _space_error(space_path, problems)
