"""The data axis: the training rows and the held-out rows of a recipe, from one data set or a weighted mixture of
tasks, and their record in the run (MLflow dataset inputs).

One set: `data.train`, with `data.eval` or a `data.eval_split` share held out. A mixture: `data.tasks`, each
task with its own files (or held-out share) and weight; rows are drawn from the tasks with probabilities
proportional to the weights (`datasets.interleave_datasets`), so a small task with a high weight is repeated
rather than drowned. This module does not depend on the adapter or the objective.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_finetune_plugin.data.read import load_training_dataset


@dataclass
class Splits:
    train: object                     # datasets.Dataset: the training stream (a mixture's interleaved rows)
    eval: object | None               # the held-out rows of one set (None for a mixture: see task_evals)
    fmt: str                          # the data format ("chat", ...; "chat+alpaca" for a mixture of two)
    tasks: dict = field(default_factory=dict)       # a mixture: task -> its training rows
    task_evals: dict = field(default_factory=dict)  # a mixture: task -> its held-out rows

    @property
    def is_mixture(self) -> bool:
        return bool(self.tasks)


def hold_out(ds, share: float, seed: int):
    """(train, held-out): the one place a share of the training rows is held out, seeded."""
    split = ds.train_test_split(test_size=share, seed=seed)
    return split["train"], split["test"]


def _one_set(train_path, eval_path, fmt, system_prompt, recipe, columns=None, tags=None):
    data = recipe.data
    train_ds, fmt = load_training_dataset(train_path, fmt, system_prompt, columns, tags)
    if data.max_rows:
        train_ds = train_ds.select(range(min(data.max_rows, len(train_ds))))
    eval_ds = None
    if recipe.eval.enabled and eval_path:
        eval_ds, _ = load_training_dataset(eval_path, fmt, system_prompt, columns, tags)
    elif recipe.eval.enabled and data.eval_split > 0:
        train_ds, eval_ds = hold_out(train_ds, data.eval_split, recipe.train.seed)
    return train_ds, eval_ds, fmt


def load_splits(recipe) -> Splits:
    """Read and check the recipe's data (errors name file and line) into training and held-out rows."""
    data = recipe.data
    if not data.tasks:
        train_ds, eval_ds, fmt = _one_set(data.train, data.eval, data.format, data.system_prompt, recipe,
                                          data.columns, data.tags)
        return Splits(train_ds, eval_ds, fmt)
    from datasets import interleave_datasets

    trains, evals, fmts = {}, {}, set()
    for name, task in data.tasks.items():
        trains[name], task_eval, fmt = _one_set(task.train, task.eval, task.format, task.system_prompt, recipe)
        fmts.add(fmt)
        if task_eval is not None:
            evals[name] = task_eval
    total = sum(t.weight for t in data.tasks.values())
    mixed = interleave_datasets(list(trains.values()), probabilities=[t.weight / total for t in data.tasks.values()],
                                seed=recipe.train.seed, stopping_strategy=data.stopping)
    return Splits(mixed, None, "+".join(sorted(fmts)), trains, evals)


def data_files(recipe) -> list[tuple[str, str, str, str | None]]:
    """(label, path, format, system prompt) of every data file, for the data check before any model loads."""
    data = recipe.data
    if not data.tasks:
        return [(f"data.{split}", getattr(data, split), data.format, data.system_prompt)
                for split in ("train", "eval") if getattr(data, split)]
    return [(f"data.tasks.{name}.{split}", getattr(task, split), task.format, task.system_prompt)
            for name, task in data.tasks.items() for split in ("train", "eval") if getattr(task, split)]


def log_inputs(recipe, splits: Splits) -> dict:
    """Log the data as MLflow dataset inputs (each task under its own name); returns the lineage tags."""
    import mlflow

    from mlflow_finetune_plugin.data.read import mlflow_dataset
    from mlflow_finetune_plugin.tags import lineage_tags

    if not splits.is_mixture:
        train_path = recipe.data.train
        train_input = mlflow_dataset(splits.train, train_path, name=Path(train_path).stem)
        mlflow.log_input(train_input, context="training")
        if splits.eval is not None:
            eval_path = recipe.data.eval or train_path
            mlflow.log_input(mlflow_dataset(splits.eval, eval_path, name=Path(eval_path).stem), context="eval")
        return lineage_tags(dataset_digest=train_input.digest, data_format=splits.fmt)
    digests = []
    for name, ds in splits.tasks.items():
        task = recipe.data.tasks[name]
        logged = mlflow_dataset(ds, task.train, name=name)
        mlflow.log_input(logged, context="training", tags={"task": name, "weight": str(task.weight)})
        digests.append(logged.digest)
        if name in splits.task_evals:
            mlflow.log_input(mlflow_dataset(splits.task_evals[name], task.eval or task.train, name=f"{name}-eval"),
                             context="eval", tags={"task": name})
    digest = hashlib.sha256(",".join(digests).encode()).hexdigest()[:16]
    return lineage_tags(dataset_digest=digest, data_format=splits.fmt,
                        tasks=",".join(f"{n}:{t.weight:g}" for n, t in recipe.data.tasks.items()))
