"""The data axis: the training rows and the held-out rows of a recipe, from one data set or a weighted mixture
of tasks, the general text replayed beside them (`data.replay`), and their record in the run (MLflow dataset
inputs).

One set: `data.train`, with `data.eval` or a `data.eval_split` share held out. A mixture: `data.tasks`, each
task with its own files (or held-out share) and weight; rows are drawn from the tasks with probabilities
proportional to the weights (`datasets.interleave_datasets`), so a small task with a high weight is repeated
rather than drowned. This module does not depend on the adapter or the objective.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_finetune_plugin.config.checks import OBJECTIVE_FORMATS
from mlflow_finetune_plugin.data.formats import DataError, DataIssue
from mlflow_finetune_plugin.data.images import has_images, in_image_form
from mlflow_finetune_plugin.data.read import load_training_dataset
from mlflow_finetune_plugin.data.replay import read_replay, replay_path
from mlflow_finetune_plugin.data.traces import TraceQuery, is_traces, query_of, read_traces

# The formats rows made from traces can take, in the order an objective's accepted formats are tried.
TRACE_ROWS = ("chat", "preference", "unpaired_preference", "prompt_only")


@dataclass
class Splits:
    train: object                     # datasets.Dataset: the training stream (a mixture's interleaved rows)
    eval: object | None               # the held-out rows of one set (None for a mixture: see task_evals)
    # the training data's format ("chat", ...; "chat+alpaca" for a mixture of two)
    fmt: str
    tasks: dict = field(default_factory=dict)       # a mixture: task -> its training rows
    task_evals: dict = field(default_factory=dict)  # a mixture: task -> its held-out rows
    formats: dict = field(default_factory=dict)     # label of each file read (as `data_files`) -> its format
    # data.replay's general texts, mixed in by the sft objective
    replay: list = field(default_factory=list)
    # label of a traces source (`data.train`) -> (TraceRows, ids)
    traces: dict = field(default_factory=dict)

    @property
    def is_mixture(self) -> bool:
        return bool(self.tasks)


def hold_out(ds, share: float, seed: int):
    """(train, held-out): the one place a share of a file's training rows is held out, seeded (rows read from
    traces: `hold_out_groups`)."""
    split = ds.train_test_split(test_size=share, seed=seed)
    return split["train"], split["test"]


def source_of(recipe, value):
    """A data value as the reader takes it: a file or `hf:` name as written, a `traces:` source as the query
    of it (with `data.traces`) that makes rows in the format the objective trains on."""
    if not is_traces(value):
        return value
    accepts = OBJECTIVE_FORMATS[recipe.objective]
    fmt = recipe.data.format
    rows = fmt if fmt in accepts and fmt in TRACE_ROWS else next(f for f in accepts if f in TRACE_ROWS)
    return query_of(value, recipe.data.traces, rows)


def hold_out_groups(groups: list[str], share: float, seed: int):
    """(train indices, held-out indices): a seeded share of the groups (conversations) held out whole, so that
    no conversation has rows on both sides."""
    import random

    names = sorted(set(groups))
    if len(names) < 2:
        raise ValueError(f"{len(names)} conversation{'s' if len(names) != 1 else ''} cannot be split.")
    random.Random(seed).shuffle(names)
    held = set(names[: min(len(names) - 1, max(1, round(share * len(names))))])
    return ([i for i, g in enumerate(groups) if g not in held],
            [i for i, g in enumerate(groups) if g in held])


def _one_set(owner: str, train_path, eval_path, fmt, system_prompt, recipe, columns=None, tags=None,
             traces=None):
    """(train rows, held-out rows or None, {label: format}) of one set; `owner` is its recipe key (`data`,
    `data.tasks.NAME`). Each file's format is resolved from its own rows: a ShareGPT train file and a chat
    eval file both read under `format: auto`. A traces source is read once; `traces` gets, per split, what was
    read and the ids of the traces behind its rows."""
    data = recipe.data
    formats, read = {}, {}

    def load(split, path):
        records = None
        if isinstance(path, TraceQuery):
            read[split] = got = read_traces(path)
            if got.issues:
                raise DataError(got.issues)
            records = got.records
        ds, formats[f"{owner}.{split}"] = load_training_dataset(
            path, fmt, system_prompt, columns, tags, format_key=f"{owner}.format",
            accepts=OBJECTIVE_FORMATS[recipe.objective], records=records)
        return ds

    train_ds = load("train", train_path)
    got = read.get("train")
    train_rows = list(range(len(train_ds)))
    if data.max_rows:
        train_rows = train_rows[: data.max_rows]
        train_ds = train_ds.select(train_rows)
    eval_ds, eval_rows = None, []
    if recipe.eval.enabled and eval_path:
        eval_ds = load("eval", eval_path)
    elif recipe.eval.enabled and data.eval_split > 0 and got is not None:  # whole conversations held out
        try:
            kept, eval_rows = hold_out_groups([got.groups[i] for i in train_rows], data.eval_split,
                                              recipe.train.seed)
        except ValueError as e:
            raise DataError([DataIssue(str(train_path), None,
                                       f"{owner}.eval_split {data.eval_split}: {e} Give "
                                       f"more traces, or an eval source ({owner}.eval)")]) from None
        train_ds, eval_ds = train_ds.select(kept), train_ds.select(eval_rows)
        eval_rows, train_rows = [train_rows[i] for i in eval_rows], [train_rows[i] for i in kept]
    elif recipe.eval.enabled and data.eval_split > 0:
        try:
            train_ds, eval_ds = hold_out(train_ds, data.eval_split, recipe.train.seed)
        except ValueError as e:  # datasets: a share that leaves no training or no held-out row
            raise DataError([DataIssue(str(train_path), None, f"{owner}.eval_split {data.eval_split} of "
                                                              f"{len(train_ds)} rows: {e} Give more rows, or "
                                                              f"an eval file ({owner}.eval)")]) from None
    if traces is not None and got is not None:
        traces[f"{owner}.train"] = (got, sorted({t for i in train_rows for t in got.row_traces[i]}))
        if eval_rows:
            traces[f"{owner}.eval"] = (got, sorted({t for i in eval_rows for t in got.row_traces[i]}))
    if traces is not None and "eval" in read:
        traces[f"{owner}.eval"] = (read["eval"], read["eval"].trace_ids)
    return train_ds, eval_ds, formats


def load_splits(recipe) -> Splits:
    """Read and check the recipe's data (errors name file and line) into training and held-out rows. The
    pipeline calls it, and so does the pre-flight check (`data/preflight.py`) before any run exists: what this
    refuses is refused before a run is created."""
    data = recipe.data
    if not data.tasks:
        traces = {}
        train_ds, eval_ds, formats = _one_set("data", source_of(recipe, data.train),
                                              source_of(recipe, data.eval), data.format, data.system_prompt,
                                              recipe, data.columns, data.tags, traces)
        return Splits(train_ds, eval_ds, formats["data.train"], formats=formats, replay=read_replay(recipe),
                      traces=traces)
    from datasets import interleave_datasets

    trains, evals, formats = {}, {}, {}
    for name, task in data.tasks.items():
        trains[name], task_eval, task_formats = _one_set(f"data.tasks.{name}", task.train, task.eval,
                                                         task.format, task.system_prompt, recipe)
        formats.update(task_formats)
        if task_eval is not None:
            evals[name] = task_eval
    total = sum(t.weight for t in data.tasks.values())
    try:
        parts = list(trains.values())
        if like := next((ds for ds in parts if has_images(ds)), None):  # text-only tasks take the image form
            parts = [ds if has_images(ds) else in_image_form(ds, like) for ds in parts]
        mixed = interleave_datasets(parts, probabilities=[t.weight / total for t in data.tasks.values()],
                                    seed=recipe.train.seed, stopping_strategy=data.stopping)
    except (ValueError, TypeError, KeyError) as e:  # datasets: the tasks' columns do not align (e.g. per-turn
        # weights in one task only; other columns beside images in one task)
        files = ", ".join(task.train for task in data.tasks.values())
        raise DataError([DataIssue(files, None,
                                   f"the tasks' rows cannot be mixed ({str(e).splitlines()[0]}); give "
                                   "every task's messages the same keys (e.g. `weight` on all of them "
                                   "or none)")]) from None
    train_formats = {f for label, f in formats.items() if label.endswith(".train")}
    return Splits(mixed, None, "+".join(sorted(train_formats)), trains, evals, formats, read_replay(recipe))


def data_files(recipe) -> list[tuple[str, str, str, str | None]]:
    """(label, path, format, system prompt) of every data file, for the data check before any model loads."""
    data = recipe.data
    if not data.tasks:
        return [(f"data.{split}", source_of(recipe, getattr(data, split)), data.format, data.system_prompt)
                for split in ("train", "eval") if getattr(data, split)]
    return [(f"data.tasks.{name}.{split}", getattr(task, split), task.format, task.system_prompt)
            for name, task in data.tasks.items() for split in ("train", "eval") if getattr(task, split)]


def log_inputs(recipe, splits: Splits) -> dict:
    """Log the data as MLflow dataset inputs (each task under its own name, each input tagged with the format
    its file was read in); returns the lineage tags."""
    import mlflow

    from mlflow_finetune_plugin.data.read import mlflow_dataset
    from mlflow_finetune_plugin.data.traces import log_traces_input
    from mlflow_finetune_plugin.tags import lineage_tags

    def log(ds, path, name, context, owner, split, **tags):
        # a held-out share of the train file has the train file's format
        fmt = "text" if split == "replay" else splits.formats.get(f"{owner}.{split}") or splits.formats.get(
            f"{owner}.train")
        tags = {**tags, **({"format": fmt} if fmt else {})}
        if f"{owner}.{split}" in splits.traces:  # the query and the trace ids, never the texts
            got, ids = splits.traces[f"{owner}.{split}"]
            return despite_race(lambda: log_traces_input(ds, got, ids, name, context, tags))
        logged = mlflow_dataset(ds, path, name=name)
        despite_race(lambda: mlflow.log_input(logged, context=context, tags=tags))
        return logged

    if splits.replay:  # the replay corpus, a training input of its own
        from datasets import Dataset

        log(Dataset.from_dict({"text": splits.replay}), replay_path(recipe), "replay", "training", "data",
            "replay", share=str(recipe.data.replay_share))
    if not splits.is_mixture:
        train_path = recipe.data.train
        train_input = log(splits.train, train_path, _input_name(train_path), "training", "data", "train")
        if splits.eval is not None:
            eval_path = recipe.data.eval or train_path
            log(splits.eval, eval_path, _input_name(eval_path) + ("-eval" if eval_path == train_path and
                                                                  is_traces(eval_path) else ""),
                "eval", "data", "eval")
        return lineage_tags(dataset_digest=train_input.digest, data_format=splits.fmt)
    digests = []
    for name, ds in splits.tasks.items():
        task, owner = recipe.data.tasks[name], f"data.tasks.{name}"
        digests.append(log(ds, task.train, name, "training", owner, "train", task=name,
                           weight=str(task.weight)).digest)
        if name in splits.task_evals:
            log(splits.task_evals[name], task.eval or task.train, f"{name}-eval", "eval", owner, "eval",
                task=name)
    digest = hashlib.sha256(",".join(digests).encode()).hexdigest()[:16]
    return lineage_tags(dataset_digest=digest, data_format=splits.fmt,
                        tasks=",".join(f"{n}:{t.weight:g}" for n, t in recipe.data.tasks.items()))


# What a SQL store says when another run created the same dataset (experiment, name, digest) between its
# look-up and its insert (PostgreSQL, MySQL, SQLite). SqlAlchemyStore.log_inputs looks for the dataset,
# inserts it when absent and commits; the commit's IntegrityError comes back as BAD_REQUEST, which its HTTP
# client does not retry. Asked again, the store finds the dataset the other run committed and only links it.
DATASET_RACE = ("dataset_pk", "duplicate key value violates unique constraint", "Duplicate entry",
                "UNIQUE constraint failed: datasets")


def despite_race(log_once, attempts: int = 4):
    """`log_once()` (logging a dataset input), asked again when the store refused it because another run
    logged the same dataset at the same moment (tracking.despite_race)."""
    from mlflow_finetune_plugin.tracking import despite_race as retried

    return retried(log_once, attempts, DATASET_RACE)


def _input_name(path: str) -> str:
    """The name of a data input: the file's stem, or `traces-EXPERIMENT`."""
    return "traces-" + path[len("traces:"):].strip() if is_traces(path) else Path(path).stem
