"""Multi-task: several datasets in one recipe, mixed by weight into one training stream and one shared LoRA adapter
(`adapters: shared`, the default), or one LoRA adapter per task (`adapters: per_task`).

Each task names its files (`multitask.tasks.<task>.train`/`eval`) and a mixing `weight`: rows are drawn from the
tasks with probabilities proportional to the weights (`datasets.interleave_datasets`), so a small task with a high
weight is repeated rather than drowned. After training every task's held-out rows are scored on their own
(`eval/<task>/<metric>` for the tuned model, `eval/<task>/base/<metric>`, `eval/<task>/fewshot/<metric>`), and
`eval/<contender>/<metric>` is the mean over tasks, so promotion gates read the same names as for one task.

With `adapters: per_task` the tasks share the frozen base and nothing else: one PEFT adapter per task in one
PeftModel, trained one task after another on that task's rows alone (the weights do not apply), each logged as its
own MLflow model (`model-<task>`) and registered as `<registry.name>-<task>`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from mlflow_finetune_plugin.methods import lora
from mlflow_finetune_plugin.recipe_base import Section

ARTIFACT = "adapter"
DATA_FORMATS = ("chat", "sharegpt", "alpaca", "prompt_completion")
OWN_DATA = True  # the data comes from `multitask.tasks`, not from `data.train`/`data.eval`


class Task(Section):
    train: str = Field(description="Training file of this task (JSONL/JSON/CSV/parquet), relative to the project.")
    eval: str | None = Field(None, description="Held-out file; empty: `data.eval_split` of train, or none.")
    weight: float = Field(1.0, gt=0, description="Mixing weight; rows are sampled in proportion to the weights.")
    format: Literal["auto", "chat", "sharegpt", "alpaca", "prompt_completion"] = "auto"
    system_prompt: str | None = Field(None, description="System message added to this task's rows.")


class Config(lora.Config):
    tasks: dict[str, Task] = Field(default_factory=dict, description="Task name -> its data and weight.")
    adapters: Literal["shared", "per_task"] = Field(
        "shared", description="One adapter trained on the mixture, or one adapter per task (registered apart).")
    stopping: Literal["all_exhausted", "first_exhausted"] = Field(
        "all_exhausted", description="End an epoch of the mixture when every task (or the first one) has run out.")

    @field_validator("tasks")
    @classmethod
    def _names(cls, tasks):
        bad = [n for n in tasks if not n.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"task names {bad} must be letters, digits, '-' or '_' (they become metric names)")
        return tasks


def check_recipe(recipe, project_dir: Path) -> list[str]:
    """Problems with the tasks (at least two, files present); makes their paths absolute."""
    cfg = recipe.multitask
    problems = []
    if len(cfg.tasks) < 2:
        problems.append(f"multitask.tasks: {len(cfg.tasks)} task(s) given; a mixture needs at least two, e.g.\n"
                        "    multitask:\n      tasks:\n        faq: {train: data/faq.jsonl, weight: 2}\n"
                        "        tone: {train: data/tone.jsonl}\n  (one task: use the `lora` method)")
    for name, task in cfg.tasks.items():
        for split in ("train", "eval"):
            value = getattr(task, split)
            if value:
                path = (project_dir / value).resolve()
                if not path.exists():
                    problems.append(f"multitask.tasks.{name}.{split}: file not found: {value} (looked in {project_dir})")
                setattr(task, split, str(path))
    if {"train", "eval"} & recipe.data.model_fields_set and (recipe.data.train or recipe.data.eval):
        problems.append("data.train/data.eval: the multitask method reads its files from multitask.tasks; "
                        "move them into a task")
    recipe.data.train = recipe.data.eval = None
    if cfg.adapters == "per_task" and recipe.train.resume:
        problems.append("train.resume: resuming is not supported with multitask.adapters: per_task; "
                        "use adapters: shared, or start the run again")
    return problems


def data_files(recipe) -> list[tuple[str, str, str, str | None]]:
    """(label, path, format, system prompt) of every file, for the data check before any model loads."""
    out = []
    for name, task in recipe.multitask.tasks.items():
        out += [(f"{name}.{split}", getattr(task, split), task.format, task.system_prompt)
                for split in ("train", "eval") if getattr(task, split)]
    return out


def task_splits(recipe) -> tuple[dict, dict, set]:
    """({task: train}, {task: eval}, formats). load_data, log_inputs, build_trainer and evaluate all need them:
    the files are read and validated once per process, keyed by everything that decides the splits."""
    key = json.dumps({"tasks": recipe.multitask.model_dump(mode="json")["tasks"], "max_rows": recipe.data.max_rows,
                      "eval": recipe.eval.enabled, "eval_split": recipe.data.eval_split, "seed": recipe.train.seed})
    # not sort_keys: the task order is the order of the weights in load_data
    return _task_splits(key)


@functools.lru_cache(maxsize=2)
def _task_splits(key: str) -> tuple[dict, dict, set]:
    from mlflow_finetune_plugin.data import load_training_dataset

    spec = json.loads(key)
    trains, evals, fmts = {}, {}, set()
    for name, task in spec["tasks"].items():
        ds, fmt = load_training_dataset(task["train"], task["format"], task["system_prompt"])
        fmts.add(fmt)
        if spec["max_rows"]:
            ds = ds.select(range(min(spec["max_rows"], len(ds))))
        if spec["eval"] and task["eval"]:
            evals[name], _ = load_training_dataset(task["eval"], task["format"], task["system_prompt"])
        elif spec["eval"] and spec["eval_split"] > 0:
            split = ds.train_test_split(test_size=spec["eval_split"], seed=spec["seed"])
            ds, evals[name] = split["train"], split["test"]
        trains[name] = ds
    return trains, evals, fmts


def load_data(recipe):
    """(mixed train dataset, {task: eval dataset} or None, format) with rows drawn by weight."""
    from datasets import interleave_datasets

    cfg = recipe.multitask
    trains, evals, fmts = task_splits(recipe)
    total = sum(t.weight for t in cfg.tasks.values())
    mixed = interleave_datasets(list(trains.values()), probabilities=[t.weight / total for t in cfg.tasks.values()],
                                seed=recipe.train.seed, stopping_strategy=cfg.stopping)
    return mixed, (evals or None), "+".join(sorted(fmts))


def log_inputs(recipe, train_ds, eval_ds, fmt) -> dict:
    """Each task's train (and eval) split as an MLflow input named after the task."""
    import mlflow

    from mlflow_finetune_plugin.data import mlflow_dataset
    from mlflow_finetune_plugin.registry import lineage_tags

    digests = []
    for name, ds in task_splits(recipe)[0].items():
        task = recipe.multitask.tasks[name]
        logged = mlflow_dataset(ds, task.train, name=name)
        mlflow.log_input(logged, context="training", tags={"task": name, "weight": str(task.weight)})
        digests.append(logged.digest)
        if eval_ds and name in eval_ds:
            mlflow.log_input(mlflow_dataset(eval_ds[name], task.eval or task.train, name=f"{name}-eval"),
                             context="eval", tags={"task": name})
    digest = hashlib.sha256(",".join(digests).encode()).hexdigest()[:16]
    return lineage_tags(dataset_digest=digest, data_format=fmt,
                        tasks=",".join(f"{n}:{t.weight:g}" for n, t in recipe.multitask.tasks.items()))


def evaluate(recipe, method, model, tokenizer, train_ds, eval_ds) -> None:
    """Score each task on its own held-out rows; the overall metrics are the mean over tasks."""
    from mlflow_finetune_plugin.evaluation import (
        EvalResult,
        comparison_table,
        conversations,
        log_evaluation,
        run_evaluation,
    )

    trains = task_splits(recipe)[0]
    per_task, merged_rows, examples = {}, [], 0
    for name, ds in eval_ds.items():
        print(f"\nTask {name}:")
        if recipe.multitask.adapters == "per_task":
            model.set_adapter(name)
        result = run_evaluation(model, tokenizer, conversations(ds), conversations(trains[name]), recipe.eval)
        print(comparison_table(result.metrics))
        per_task[name] = result.metrics
        merged_rows += [{"task": name, **row} for row in result.rows]
        examples += int(result.metrics.get("eval/n_examples", 0))
    metrics = {}
    for name, task_metrics in per_task.items():
        for key, value in task_metrics.items():
            if key.count("/") != 2:
                continue
            _, contender, metric = key.split("/")
            metrics[f"eval/{name}/{metric}" if contender == "tuned" else f"eval/{name}/{contender}/{metric}"] = value
    overall = {}
    for key in dict.fromkeys(k for m in per_task.values() for k in m if k.count("/") == 2):
        values = [m[key] for m in per_task.values() if key in m]
        overall[key] = sum(values) / len(values)
    print("\nAll tasks (mean over tasks):")
    print(comparison_table(overall))
    digest = hashlib.sha256(",".join(sorted(per_task)).encode()).hexdigest()[:12]
    log_evaluation(EvalResult({**overall, **metrics, "eval/n_examples": examples}, merged_rows,
                              data_digest=digest))


def model_kwargs(cfg: Config) -> dict:
    return {}


def apply(model, cfg: Config):
    if cfg.adapters == "shared":
        return lora.apply(model, cfg)
    from peft import get_peft_model

    first, *rest = cfg.tasks
    model = get_peft_model(model, lora.peft_config(cfg), adapter_name=first)
    for name in rest:
        model.add_adapter(name, lora.peft_config(cfg))
    return model


def build_trainer(recipe, model, tokenizer, train_ds, eval_ds, args: dict):
    """Shared: TRL's SFTTrainer on the mixture. Per task: one SFTTrainer per task, run one after another."""
    from mlflow_finetune_plugin.train import sft_trainer

    if recipe.multitask.adapters == "shared":
        return sft_trainer(recipe, model, tokenizer, train_ds, eval_ds, args)
    return _OneAdapterPerTask(recipe, model, tokenizer, task_splits(recipe)[0], eval_ds or {}, args)


class _OneAdapterPerTask:
    """Trains each task's adapter on that task's rows only (`set_adapter` makes it the one trainable adapter)."""

    is_fsdp_enabled = False

    def __init__(self, recipe, model, tokenizer, trains: dict, evals: dict, args: dict):
        self.recipe, self.model, self.tokenizer, self.trains, self.evals, self.args = (
            recipe, model, tokenizer, trains, evals, args)
        self.accelerator = type("_OneProcess", (), {"num_processes": 1})()

    def train(self, resume_from_checkpoint=None):
        from mlflow_finetune_plugin.callbacks import CheckpointLogger, MlflowMetrics
        from mlflow_finetune_plugin.train import sft_trainer

        for name, ds in self.trains.items():
            print(f"\nTask {name}: training its adapter on {len(ds)} rows")
            self.model.set_adapter(name)
            args = {**self.args, "output_dir": str(Path(self.args["output_dir"]) / name)}
            trainer = sft_trainer(self.recipe, self.model, self.tokenizer, ds, self.evals.get(name), args,
                                  callbacks=[MlflowMetrics(prefix=f"{name}/"), CheckpointLogger()])
            trainer.train()


class _OneAdapter:
    """A view of one named adapter of a multi-adapter PeftModel that saves as a plain adapter folder."""

    def __init__(self, model, name: str):
        self.model, self.name = model, name

    def save_pretrained(self, path, **kwargs):
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp, selected_adapters=[self.name], **kwargs)
            src = Path(tmp) / self.name if (Path(tmp) / self.name).is_dir() else Path(tmp)
            shutil.copytree(src, path, dirs_exist_ok=True)


def log_and_register(recipe, model, tokenizer, config: dict, tags: dict) -> None:
    """Shared: one model. Per task: each task's adapter as `model-<task>`, registered as `<name>-<task>`."""
    from mlflow_finetune_plugin.evaluation import trained_system_prompt
    from mlflow_finetune_plugin.train import log_and_register as log_one

    if recipe.multitask.adapters == "shared":
        return log_one(recipe, model, tokenizer, config, tags)
    trains = task_splits(recipe)[0]
    for name, task in recipe.multitask.tasks.items():
        # Each adapter saw its own task's rows only: its system prompt is that task's, not the mixture's.
        system_prompt = trained_system_prompt(trains[name], task.system_prompt)
        log_one(recipe, _OneAdapter(model, name), tokenizer, {**config, "task": name, "system_prompt": system_prompt},
                {**tags, "finetune.task": name}, name=f"model-{name}",
                registered_name=f"{recipe.registry.name}-{name}")


def vllm_compatible(cfg: Config) -> tuple[bool, str]:
    return lora.vllm_compatible(cfg)
