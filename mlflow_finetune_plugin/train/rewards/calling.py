"""Reward functions for GRPO, in TRL's signature: `fn(prompts, completions, **kwargs) -> list[float | None]`.

`prompts` and `completions` hold one entry per completion (a prompt repeats once per generation); each is text, or
a list of chat messages (a completion: `[{"role": "assistant", "content": ...}]`). Every other column of the data
arrives as a keyword argument holding one value per completion (`answer=[...]`), as do TRL's own (`completion_ids`,
`trainer_state`, `log_metric`, ...): a function declares the ones it uses, or takes `**kwargs`. None means "cannot
score this one" (TRL leaves it out of the means).

Built-ins: `exact_answer`, `regex`, `json_schema`. User functions are plain Python in the project folder: a function
in `rewards.py` by its name, or `file.py:function` for another file. The recipe names them in `grpo.rewards`:

    rewards:
      - exact_answer                                   # a built-in, or a function in rewards.py
      - {name: regex, pattern: '^\\d+$', weight: 0.5}  # a mapping: parameters and a weight (default 1)
      - {name: json_schema, schema: {type: object}}
      - {name: checks.py:brevity, weight: 2}

The weighted sum of the functions is the reward GRPO maximizes (TRL's `reward_weights`). A built-in's name wins over
a function of that name in rewards.py; write `rewards.py:NAME` for yours.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError

USER_FILE = "rewards.py"
# What TRL passes to every reward function besides the data's columns (GRPOTrainer._calculate_rewards).
TRL_KWARGS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments")
_PROMPT_SHOWN = 80

# ---------------------------------------------------------------- built-ins

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def completion_text(completion) -> str:
    """A completion as text: the string itself, or the content of its (last) assistant message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        contents = [m.get("content") for m in completion if isinstance(m, dict) and m.get("role") == "assistant"]
        content = contents[-1] if contents else None
        if isinstance(content, list):  # content parts
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content or ""
    return "" if completion is None else str(completion)


def _as_number(text: str) -> float | None:
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    return float(text.replace(",", ""))


def _plain(text: str) -> str:
    """Case folded, whitespace collapsed, a final full stop dropped: 'Paris.' equals 'paris'."""
    return " ".join(text.split()).casefold().removesuffix(".").strip()


def final_answer(text: str) -> str:
    """The part of a completion that is its final answer: the last <answer>...</answer>, else the whole text."""
    tagged = _ANSWER_TAG.findall(text)
    return (tagged[-1] if tagged else text).strip()


def answer_matches(completion: str, reference) -> bool:
    """Whether `completion`'s final answer equals `reference`.

    The final answer is the last <answer>...</answer> of the completion, else the whole completion. A numeric
    reference (`68`, `-3.5`, `1,234`) matches when the LAST number in the final answer equals it (so "23 + 45 = 68"
    and "The answer is 68." match 68, "68 or 69" does not); any other reference matches the whole final answer,
    compared case-insensitively with whitespace collapsed and a trailing full stop ignored.
    """
    answer = final_answer(completion)
    expected = _as_number(str(reference))
    if expected is not None:
        numbers = _NUMBER.findall(answer)
        if not numbers:
            return False
        got = float(numbers[-1].replace(",", ""))
        return math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9)
    return _plain(answer) == _plain(str(reference))


def exact_answer(prompts, completions, answer, **kwargs) -> list[float | None]:
    """1.0 when the completion's final answer equals the row's `answer` column (see `answer_matches`), else 0.0;
    None for a row without an answer."""
    return [None if ref is None else float(answer_matches(completion_text(c), ref))
            for c, ref in zip(completions, answer)]


def regex(prompts, completions, pattern: str, fullmatch: bool = False, **kwargs) -> list[float]:
    """1.0 when the completion matches `pattern` (Python `re`, `.` matching newlines too), else 0.0. With
    `fullmatch: true` the whole completion (stripped) must match; else a match anywhere counts, so anchor the
    pattern (^...$) for a format rule."""
    compiled = re.compile(pattern, re.DOTALL)
    match = compiled.fullmatch if fullmatch else compiled.search
    return [float(match(completion_text(c).strip() if fullmatch else completion_text(c)) is not None)
            for c in completions]


def json_schema(prompts, completions, schema=None, **kwargs) -> list[float | None]:
    """1.0 when the completion parses as JSON (a single ```json fenced block is unwrapped) and conforms to `schema`:
    the recipe's (one for every row), else the row's `schema` column (an object, or its JSON text); with neither,
    any valid JSON scores 1.0. The same check as the evaluation's `json_valid` metric (`eval.json_schema`): the
    shipped module, with `jsonschema` where installed."""
    from mlflow_finetune_plugin.metrics import load_metric

    schemas = schema if isinstance(schema, list) else [schema] * len(completions)
    texts = [completion_text(c) for c in completions]
    out: list[float | None] = [None] * len(texts)
    groups: dict[str, list[int]] = {}
    for i, value in enumerate(schemas):
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else None
            except json.JSONDecodeError:
                continue  # an unreadable schema cannot score the answer: None
        if value is not None and not isinstance(value, dict):
            continue
        groups.setdefault(json.dumps(value, sort_keys=True), []).append(i)
    metric = load_metric("json_valid")
    for key, rows in groups.items():
        scores = metric.compute(predictions=[texts[i] for i in rows], schema=json.loads(key),
                                per_example=True)["json_valid_per_example"]
        for i, s in zip(rows, scores):
            out[i] = float(s)
    return out


BUILTINS: dict[str, Callable] = {"exact_answer": exact_answer, "regex": regex, "json_schema": json_schema}
# Each built-in's recipe parameters: name -> required (True) or optional (False).
_BUILTIN_PARAMS = {"exact_answer": {}, "regex": {"pattern": True, "fullmatch": False},
                   "json_schema": {"schema": False}}

# ---------------------------------------------------------------- loading


@dataclass(frozen=True)
class Reward:
    """One reward function of a recipe, ready for TRL: `func` keeps TRL's signature and is named `name`."""

    name: str                       # unique in the recipe; TRL logs it as rewards/<name>/mean
    func: Callable                  # the wrapped function (errors become FinetuneError)
    weight: float = 1.0
    columns: tuple[str, ...] = ()   # data columns the function needs (its parameters without a default)


def load_rewards(specs: list, project_dir: str | Path | None, key: str = "grpo.rewards") -> list[Reward]:
    """The recipe's reward functions, loaded and checked; FinetuneError lists every problem at once."""
    rewards, problems = resolve_rewards(specs, project_dir, key)
    if problems:
        raise FinetuneError("\n".join([f"{len(problems)} problem{'s' if len(problems) != 1 else ''} with the reward "
                                       "functions:", *("  - " + p for p in problems)]))
    return rewards


def resolve_rewards(specs: list, project_dir: str | Path | None, key: str = "grpo.rewards"
                    ) -> tuple[list[Reward], list[str]]:
    """(the rewards that load, every problem found): names, files, parameters, weights and signatures."""
    project = Path(project_dir or ".").resolve()
    modules: dict[Path, object] = {}
    rewards, problems, taken = [], [], set()
    if not specs:
        return [], [f"{key}: no reward function given; name at least one (built-ins: {', '.join(BUILTINS)})"]
    for i, spec in enumerate(specs):
        where = f"{key}[{i}]"
        name, params, weight, problem = _parse_spec(spec, where)
        if problem:
            problems.append(problem)
            continue
        func, problem = _find(name, project, modules, where)
        problem = problem or _check_params(name if func is BUILTINS.get(name) else None, func, params, where)
        if problem:
            problems.append(problem)
            continue
        label = _unique(name.rsplit(":", 1)[-1], taken)
        columns = _required_columns(func, params)
        if func is json_schema and params.get("schema") is None:
            columns = ("schema",)  # no schema in the recipe: each row brings its own
        rewards.append(Reward(label, _wrap(func, label, params), weight, columns))
    return rewards, problems


def _parse_spec(spec, where: str) -> tuple[str, dict, float, str | None]:
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        return "", {}, 1.0, (f"{where}: must be a reward's name or a mapping {{name: ..., weight: ..., <parameters>}}, "
                             f"got {type(spec).__name__}")
    params = dict(spec)
    name, weight = params.pop("name", None), params.pop("weight", 1.0)
    if not isinstance(name, str) or not name.strip():
        return "", {}, 1.0, f"{where}: a mapping needs `name` (a built-in, a function in {USER_FILE}, or file.py:function)"
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        return "", {}, 1.0, f"{where} ({name}): weight must be a number, got {weight!r}"
    return name.strip(), params, float(weight), None


def _find(name: str, project: Path, modules: dict, where: str) -> tuple[Callable | None, str | None]:
    """(the function, or the problem): a built-in, a function of rewards.py, or file.py:function."""
    if name in BUILTINS:
        return BUILTINS[name], None
    file, _, fn = name.rpartition(":") if ":" in name else (USER_FILE, "", name)
    path = (project / file).resolve()
    if ":" in name and not file.endswith(".py"):
        return None, f"{where}: {name!r}: name a Python file and a function in it, e.g. {USER_FILE}:{fn}"
    if ":" in name and not path.is_file():
        return None, f"{where}: {name!r}: file not found: {path} (paths are relative to the project folder {project})"
    module, problem = _module(path, modules) if path.is_file() else (None, None)
    if problem:
        return None, f"{where}: {problem}"
    if module is None or not hasattr(module, fn):
        return None, f"{where}: unknown reward {name!r}. " + _known(_functions(module), path, module is not None, fn)
    func = getattr(module, fn)
    if not callable(func):
        return None, f"{where}: {fn!r} in {file} is not a function (it is a {type(func).__name__})"
    return func, None


def _known(found: list[str], path: Path, exists: bool, wanted: str) -> str:
    mine = (f"functions in {path.name}: {', '.join(found)}" if found else f"{path.name} defines no functions") \
        if exists else f"no {path.name} in {path.parent}"
    close = difflib.get_close_matches(wanted, [*BUILTINS, *found], n=1, cutoff=0.6)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return f"Built-ins: {', '.join(BUILTINS)}; {mine}.{hint}"


def _module(path: Path, cache: dict) -> tuple[object | None, str | None]:
    """The user's file, imported by path (once per load); a file that fails to import is a problem, not a crash."""
    if path in cache:
        return cache[path], None
    name = f"finetune_rewards_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickling and tracebacks look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error in the user's file is reported with its location
        sys.modules.pop(name, None)
        line = getattr(e, "lineno", None) or _user_line(e, path)
        return None, f"{path.name}{f':{line}' if line else ''}: cannot import it: {type(e).__name__}: {e}"
    cache[path] = module
    return module, None


def _user_line(error: BaseException, path: Path) -> int | None:
    frames = [f for f in inspect.getinnerframes(error.__traceback__, context=0) if Path(f.filename) == path]
    return frames[-1].lineno if frames else None


def _functions(module) -> list[str]:
    if module is None:
        return []
    return sorted(n for n, obj in vars(module).items()
                  if inspect.isfunction(obj) and obj.__module__ == module.__name__ and not n.startswith("_"))


def _check_params(builtin: str | None, func: Callable, params: dict, where: str) -> str | None:
    """A built-in's parameters are its own (required ones given, patterns compile, schemas are schemas); a user
    function must take prompts and completions by name (or **kwargs) and every parameter the recipe gives."""
    label = builtin or getattr(func, "__name__", "reward")
    if builtin:
        allowed = _BUILTIN_PARAMS[builtin]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            valid = ", ".join(["weight", *allowed])
            return f"{where} ({builtin}): unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; valid: {valid}"
        missing = [p for p, required in allowed.items() if required and p not in params]
        if missing:
            return f"{where} ({builtin}): needs {', '.join(missing)}, e.g. {{name: regex, pattern: '^\\d+$'}}"
        return _check_builtin_values(builtin, params, where)
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return None  # a builtin or C function: nothing to check before it runs
    takes_all = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    named = {n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not takes_all and not {"prompts", "completions"} <= named:
        return (f"{where} ({label}): a reward function takes (prompts, completions, **kwargs) by name; "
                f"it takes ({', '.join(sig.parameters)})")
    unknown = sorted(set(params) - named) if not takes_all else []
    if unknown:
        return f"{where} ({label}): {label}() has no parameter {', '.join(unknown)} (it takes {', '.join(sig.parameters)})"
    return None


def _check_builtin_values(builtin: str, params: dict, where: str) -> str | None:
    if builtin == "regex":
        if not isinstance(params["pattern"], str):
            return f"{where} (regex): pattern must be text, got {type(params['pattern']).__name__}"
        try:
            re.compile(params["pattern"])
        except re.error as e:
            return f"{where} (regex): pattern {params['pattern']!r} is not a valid regular expression: {e}"
        if not isinstance(params.get("fullmatch", False), bool):
            return f"{where} (regex): fullmatch must be true or false"
    if builtin == "json_schema" and params.get("schema") is not None:
        if not isinstance(params["schema"], dict):
            return f"{where} (json_schema): schema must be a mapping (a JSON Schema), got {type(params['schema']).__name__}"
        try:
            import jsonschema
        except ImportError:
            return None
        try:
            jsonschema.validators.validator_for(params["schema"]).check_schema(params["schema"])
        except jsonschema.SchemaError as e:
            return f"{where} (json_schema): schema is not a valid JSON Schema: {e.message}"
    return None


def _unique(name: str, taken: set) -> str:
    """`name`, or `name_2`, `name_3`, ... when another reward of the recipe has it (TRL names metrics by it)."""
    label, n = name, 1
    while label in taken:
        n += 1
        label = f"{name}_{n}"
    taken.add(label)
    return label


def _required_columns(func: Callable, params: dict) -> tuple[str, ...]:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return ()
    return tuple(n for n, p in sig.parameters.items()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
                 and n not in TRL_KWARGS and n not in params)


def missing_columns(rewards: list[Reward], columns) -> list[str]:
    """One problem per reward whose data columns (e.g. exact_answer's `answer`) the data does not have."""
    have = set(columns)
    out = []
    for r in rewards:
        lacking = [c for c in r.columns if c not in have]
        if lacking:
            out.append(f"reward {r.name!r} needs the column{'s' if len(lacking) > 1 else ''} {', '.join(lacking)} "
                       f"(rows without a value are not scored); the data has: {', '.join(sorted(have))}"
                       + (". Give json_schema a `schema` in the recipe, or a schema column"
                          if r.name.startswith("json_schema") else ""))
    return out


# ---------------------------------------------------------------- calling


def _wrap(func: Callable, name: str, params: dict) -> Callable:
    """`func` as TRL calls it: named `name` (TRL's metric name), the recipe's parameters bound, only the keyword
    arguments it takes passed, the result checked, and any error turned into a FinetuneError that names the
    function, the prompt it failed on and the original error."""
    try:
        sig = inspect.signature(func)
        takes_all = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        accepted = set(sig.parameters)
    except (TypeError, ValueError):
        takes_all, accepted = True, set()

    def call(prompts, completions, kwargs):
        given = {**kwargs, **params, "prompts": prompts, "completions": completions}
        return func(**(given if takes_all else {k: v for k, v in given.items() if k in accepted}))

    def reward(prompts, completions, **kwargs):
        try:
            out = call(prompts, completions, kwargs)
        except FinetuneError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's code: any error ends the run with its story
            i = _failing_row(call, prompts, completions, kwargs)
            raise RewardError(name, prompts[i] if prompts else None, e) from e
        return _checked(name, out, len(completions))

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = func.__doc__
    return reward


class RewardError(FinetuneError):
    """A reward function raised: names the function, the prompt (shortened) and the original error."""

    def __init__(self, name: str, prompt, error: BaseException):
        self.reward, self.original = name, error
        text = f" on the prompt {prompt_preview(prompt)!r}" if prompt is not None else ""
        super().__init__(f"reward function {name!r} failed{text}: {type(error).__name__}: {error}")


def prompt_preview(prompt, limit: int = _PROMPT_SHOWN) -> str:
    """The prompt's last user turn (or the text), on one line, cut to `limit` characters."""
    if isinstance(prompt, list):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else json.dumps(prompt, ensure_ascii=False)
    text = " ".join(str(prompt).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _failing_row(call, prompts, completions, kwargs) -> int:
    """The first row the function fails on alone (to name its prompt); 0 when it fails on none alone."""
    n = len(completions)
    for i in range(n):
        row = {k: v[i: i + 1] if isinstance(v, list) and len(v) == n else v for k, v in kwargs.items()}
        try:
            call(prompts[i: i + 1], completions[i: i + 1], row)
        except Exception:  # noqa: BLE001 - looking for the failing row only
            return i
    return 0


def _checked(name: str, out, n: int) -> list[float | None]:
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
        raise FinetuneError(f"reward function {name!r} returned {type(out).__name__}; it must return a list of {n} "
                            "numbers (one per completion; None for one it cannot score)")
    if len(out) != n:
        raise FinetuneError(f"reward function {name!r} returned {len(out)} rewards for {n} completions; it must "
                            "return one per completion (None for one it cannot score)")
    values = []
    for v in out:
        if v is None:
            values.append(None)
            continue
        try:
            values.append(float(v))
        except (TypeError, ValueError):
            raise FinetuneError(f"reward function {name!r} returned {v!r} ({type(v).__name__}) among its rewards; "
                                "each must be a number or None") from None
    return values


def score(rewards: list[Reward], prompts: list, completions: list, columns: dict[str, list]
          ) -> tuple[list[float | None], dict[str, list[float | None]]]:
    """(weighted total per completion, each function's rewards) the way GRPO sums them: functions returning None
    are left out of the sum, a completion no function scores has no total (None)."""
    per_fn = {r.name: r.func(prompts=prompts, completions=completions, **columns) for r in rewards}
    totals = []
    for i in range(len(completions)):
        scored = [(r.weight, per_fn[r.name][i]) for r in rewards if per_fn[r.name][i] is not None
                  and not math.isnan(per_fn[r.name][i])]
        totals.append(sum(w * v for w, v in scored) if scored else None)
    return totals, per_fn


def mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None and not math.isnan(v)]
    return sum(known) / len(known) if known else None
