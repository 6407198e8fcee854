"""The objective axis: what the training optimizes. One module per `objective`, each with the same interface
(no optional hooks), each building its TRL trainer:

  check(recipe) -> list[str]        problems only the objective's own code finds before any model loads
  (GRPO's
                                    reward functions, from the project's rewards.py)
  build_trainer(recipe, model, tokenizer, train_ds, eval_ds, args, callbacks) -> a transformers Trainer
  evaluate(recipe, model, tokenizer, train_ds, eval_ds, base_model=None)
                                    base zero-shot, base few-shot and tuned on the held-out rows, logged to
                                    the run, plus what the objective measures itself (preference margins,
                                    rewards)

`args` are the TrainingArguments every objective shares (`trainers.training_arguments`); `callbacks` report to
MLflow. `base_model` is given for a full fine-tune only (otherwise the base is the model with its adapter
off). The data formats each objective trains on, and what it cannot combine with, are tables and checks of
`config/checks.py`, applied when the recipe loads.
"""

from __future__ import annotations

import importlib

NAMES = ("sft", "dpo", "orpo", "simpo", "grpo", "reward", "kto")


def objective_of(recipe):
    """The module of the recipe's objective (imported on use: each one imports its TRL trainer)."""
    return importlib.import_module(f"mlflow_finetune_plugin.train.objectives.{recipe.objective}")
