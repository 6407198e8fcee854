"""Calling reward functions safely, and scoring completions with them.

A reward function has TRL's signature: `fn(prompts, completions, **kwargs) -> list[float | None]`. `prompts`
and `completions` hold one entry per completion (a prompt repeats once per generation); each is text, or a
list of chat messages (a completion: `[{"role": "assistant", "content": ...}]`). Every other column of the
data arrives as a keyword argument holding one value per completion (`answer=[...]`), as do TRL's own
(`completion_ids`, `trainer_state`, `log_metric`, ...): a function declares the ones it uses, or takes
`**kwargs`. None means "cannot score this one" (TRL leaves it out of the means).

`wrap` turns a function into what TRL calls: the recipe's parameters bound, only the arguments it takes
passed, its result checked, and its errors turned into a `RewardError` that names the prompt. `Reward` lives
here rather than in `loader` because scoring takes Rewards while the loader needs `wrap`: the loader imports
this module, never the reverse.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

from mlflow_finetune_plugin.errors import FinetuneError

_PROMPT_SHOWN = 80


@dataclass(frozen=True)
class Reward:
    """One reward function of a recipe, ready for TRL: `func` keeps TRL's signature and is named `name`."""

    name: str                       # unique in the recipe; TRL logs it as rewards/<name>/mean
    func: Callable                  # the wrapped function (errors become FinetuneError)
    weight: float = 1.0
    columns: tuple[str, ...] = ()   # data columns the function needs (its parameters without a default)


def wrap(func: Callable, name: str, params: dict) -> Callable:
    """`func` as TRL calls it: named `name` (TRL's metric name), the recipe's parameters bound, only the
    keyword arguments it takes passed, the result checked, and any error turned into a FinetuneError that
    names the function, the prompt it failed on and the original error."""
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
        raise FinetuneError(
            f"reward function {name!r} returned {type(out).__name__}; it must return a list of {n} "
            "numbers (one per completion; None for one it cannot score)")
    if len(out) != n:
        raise FinetuneError(
            f"reward function {name!r} returned {len(out)} rewards for {n} completions; it must "
            "return one per completion (None for one it cannot score)")
    values = []
    for v in out:
        if v is None:
            values.append(None)
            continue
        try:
            values.append(float(v))
        except (TypeError, ValueError):
            raise FinetuneError(
                f"reward function {name!r} returned {v!r} ({type(v).__name__}) among its rewards; "
                "each must be a number or None") from None
    return values


def score(rewards: list[Reward], prompts: list, completions: list, columns: dict[str, list]
          ) -> tuple[list[float | None], dict[str, list[float | None]]]:
    """(weighted total per completion, each function's rewards) the way GRPO sums them: functions returning
    None are left out of the sum, a completion no function scores has no total (None)."""
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
