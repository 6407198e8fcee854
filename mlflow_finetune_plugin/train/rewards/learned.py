"""A learned reward: a registered reward model (`-e reward`) named in `grpo.rewards` beside or instead of code
rewards:

    rewards:
      - models:/support-bot-rm@champion              # or models:/NAME/VERSION
      - {name: models:/support-bot-rm/3, weight: 0.5}
      - exact_answer

It scores each (prompt, completion) with its own tokenizer and chat template (`reward_model.score`), so its
base may differ from the policy's, as TRL's GRPOTrainer allows for reward models. The version is checked in
the registry before a run exists (its `finetune.objective` tag must say `reward`); its weights load on the
first call, in the training process.
"""

from __future__ import annotations

import re

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.errors import FinetuneError

PREFIX = "models:/"
_BATCH = 8


def is_model_uri(name: str) -> bool:
    return name.startswith(PREFIX)


def label_of(uri: str) -> str:
    """The reward's name in TRL's metrics (`rewards/<name>/mean`): the URI without `models:/`, `/` and `@` as
    `_`."""
    return re.sub(r"[/@]", "_", uri[len(PREFIX):]) or "reward_model"


def check_reward_model(uri: str, where: str) -> str | None:
    """The problem with naming `uri` as a reward (no such version, or a version that is not a reward
    model)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    ref = uri[len(PREFIX):]
    name, alias = ref.split("@", 1) if "@" in ref else (ref, None)
    name, _, version = name.partition("/") if alias is None else (name, "", "")
    if not name or (alias is None and not version.isdigit()):
        return (f"{where}: {uri!r}: name a registered reward model as models:/NAME/VERSION or "
                "models:/NAME@ALIAS")
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name,
                                                                                                   version)
    except MlflowException as e:
        return f"{where}: {uri!r}: no such registered version ({e.message.splitlines()[0]})"
    objective = mv.tags.get(tags.OBJECTIVE)
    if objective != "reward":
        return (
            f"{where}: {uri!r} (version {mv.version}) is not a reward model: it was trained with objective "
            f"{objective or 'unknown'}. Train one on preference pairs with `mlflow run DIR -e reward "
            "--backend finetune` and name that version")
    return None


class LearnedReward:
    """TRL's reward-function signature over a registered reward model, loaded on the first call."""

    def __init__(self, uri: str):
        self.uri = uri
        self.__name__ = label_of(uri)
        self._loaded = None

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        from mlflow_finetune_plugin.reward_model import load_registered_reward, score

        if self._loaded is None:
            try:
                self._loaded = load_registered_reward(self.uri)
            except FinetuneError:
                raise
            except Exception as e:  # noqa: BLE001 - a store or download error, named with the reward it stops
                raise FinetuneError(f"grpo.rewards: cannot load the reward model {self.uri}: {e}") from None
        loaded = self._loaded
        return score(loaded.model, loaded.tokenizer, list(prompts), list(completions), _BATCH)
