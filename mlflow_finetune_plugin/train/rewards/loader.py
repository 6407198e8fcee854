"""Loading a recipe's reward functions (`grpo.rewards`) and checking them before a model loads: the built-ins
by name, the project's own from its `rewards.py` (or `file.py:function`), their parameters and weights, and
the data columns they need.

User functions are plain Python in the project folder: a function in `rewards.py` by its name, or
`file.py:function` for another file. The recipe names them in `grpo.rewards`:

    rewards:
      - exact_answer                                   # a built-in, or a function in rewards.py
      - {name: regex, pattern: '^\\d+$', weight: 0.5}  # a mapping: parameters and a weight (default 1)
      - {name: json_schema, schema: {type: object}}
      - {name: checks.py:brevity, weight: 2}
      - models:/support-bot-rm@champion                # a registered reward model (rewards/learned.py)

The weighted sum of the functions is the reward GRPO maximizes (TRL's `reward_weights`). A built-in's name
wins over a function of that name in rewards.py; write `rewards.py:NAME` for yours.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.train.rewards.builtins import BUILTINS, check_builtin_params, json_schema
from mlflow_finetune_plugin.train.rewards.calling import Reward, wrap
from mlflow_finetune_plugin.train.rewards.learned import (
    LearnedReward,
    check_reward_model,
    is_model_uri,
    label_of,
)

USER_FILE = "rewards.py"
# What TRL passes to every reward function besides the data's columns (GRPOTrainer._calculate_rewards).
TRL_KWARGS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
              "environments")


def load_rewards(specs: list, project_dir: str | Path | None, key: str = "grpo.rewards") -> list[Reward]:
    """The recipe's reward functions, loaded and checked; FinetuneError lists every problem at once."""
    rewards, problems = resolve_rewards(specs, project_dir, key)
    if problems:
        raise FinetuneError(
            "\n".join([f"{len(problems)} problem{'s' if len(problems) != 1 else ''} with the reward "
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
        # a registered reward model: checked in the registry, loaded when GRPO first calls it
        if is_model_uri(name):
            problem = check_reward_model(name,
                                         where) or (f"{where} ({name}): a reward model takes no parameters "
                                                    f"besides weight; got {', '.join(params)}" if params
                                                    else None)
            if problem:
                problems.append(problem)
            else:
                label = _unique(label_of(name), taken)
                rewards.append(Reward(label, wrap(LearnedReward(name), label, {}), weight, ()))
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
        rewards.append(Reward(label, wrap(func, label, params), weight, columns))
    return rewards, problems


def _parse_spec(spec, where: str) -> tuple[str, dict, float, str | None]:
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        return "", {}, 1.0, (
            f"{where}: must be a reward's name or a mapping {{name: ..., weight: ..., <parameters>}}, "
            f"got {type(spec).__name__}")
    params = dict(spec)
    name, weight = params.pop("name", None), params.pop("weight", 1.0)
    if not isinstance(name, str) or not name.strip():
        return "", {}, 1.0, (f"{where}: a mapping needs `name` (a built-in, a function in {USER_FILE}, or "
                             "file.py:function)")
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
        return None, (f"{where}: {name!r}: file not found: {path} (paths are relative to the project folder "
                      f"{project})")
    module, problem = _module(path, modules) if path.is_file() else (None, None)
    if problem:
        return None, f"{where}: {problem}"
    if module is None or not hasattr(module, fn):
        return None, f"{where}: unknown reward {name!r}. " + _known(_functions(module), path,
                                                                    module is not None, fn)
    func = getattr(module, fn)
    if not callable(func):
        return None, f"{where}: {fn!r} in {file} is not a function (it is a {type(func).__name__})"
    return func, None


def _known(found: list[str], path: Path, exists: bool, wanted: str) -> str:
    mine = (
        (f"functions in {path.name}: {', '.join(found)}" if found else f"{path.name} defines no functions")
        if exists
        else f"no {path.name} in {path.parent}"
    )
    close = difflib.get_close_matches(wanted, [*BUILTINS, *found], n=1, cutoff=0.6)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return f"Built-ins: {', '.join(BUILTINS)}; {mine}.{hint}"


def _module(path: Path, cache: dict) -> tuple[object | None, str | None]:
    """The user's file, imported by path (once per load); a file that fails to import is a problem, not a
    crash."""
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
    """A built-in's parameters are its own (required ones given, patterns compile, schemas are schemas); a
    user function must take prompts and completions by name (or **kwargs) and every parameter the recipe
    gives."""
    if builtin:
        return check_builtin_params(builtin, params, where)
    label = getattr(func, "__name__", "reward")
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
        return (f"{where} ({label}): {label}() has no parameter {', '.join(unknown)} (it takes "
                f"{', '.join(sig.parameters)})")
    return None


def _unique(name: str, taken: set) -> str:
    """`name`, or `name_2`, `name_3`, ... when another reward of the recipe has it (TRL names metrics by
    it)."""
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
            out.append(
                f"reward {r.name!r} needs the column{'s' if len(lacking) > 1 else ''} {', '.join(lacking)} "
                f"(rows without a value are not scored); the data has: {', '.join(sorted(have))}"
                + (". Give json_schema a `schema` in the recipe, or a schema column"
                   if r.name.startswith("json_schema") else ""))
    return out
