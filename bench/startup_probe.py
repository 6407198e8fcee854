"""Worker of bench/startup.py: the steps between `mlflow run` and the first training step, timed one by one.

Runs in a fresh process the same package functions, in the same order, that the CLI (`backend.run`) and the
training process (`train.train`) run, with a timer around each; prints one JSON line of seconds per stage.

    python bench/startup_probe.py PROJECT_DIR [-P key=value ...]
"""

from __future__ import annotations

import gc
import json
import sys
import time

T0 = time.perf_counter()


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("project")
    p.add_argument("-P", dest="params", action="append", default=[])
    args = p.parse_args(argv)
    overrides = dict(kv.split("=", 1) for kv in args.params)
    stages: dict[str, float] = {}
    last = [T0]

    def mark(name: str) -> None:
        now = time.perf_counter()
        stages[name] = now - last[0]
        last[0] = now

    import mlflow_finetune_plugin.backend as backend
    import mlflow_finetune_plugin.train as train

    mark("import plugin + mlflow (train.py and backend.py imports)")

    from mlflow_finetune_plugin.data_check import check_data
    from mlflow_finetune_plugin.recipe import load_recipe

    recipe = load_recipe(args.project, method="lora", overrides=overrides)
    backend._check_data(recipe, check_data)
    mark("CLI: recipe + data validation")

    import mlflow

    exp = mlflow.set_experiment("startup-probe").experiment_id
    run = backend._create_run(args.project, exp, args.project, None, "lora", None)
    mark("CLI: create the MLflow run")

    from mlflow_finetune_plugin.methods import METHODS
    from mlflow_finetune_plugin.recipe import method_config

    active = mlflow.start_run(run_id=run.info.run_id)
    method, cfg = METHODS[recipe.method], method_config(recipe)
    tags = train._log_recipe(recipe, method, cfg, active.info.run_id, "builtin:tiny-llama")
    mark("train: start run, log params + recipe")

    train_ds, eval_ds, fmt = train.load_data_splits(recipe)
    tags.update(train._log_inputs(recipe, train_ds, eval_ds, fmt))
    mlflow.set_tags(tags)
    mark("train: load data + log dataset inputs")

    from mlflow_finetune_plugin.models import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
    model = load_base_model(recipe.model, **method.model_kwargs(cfg))
    mark("train: load tokenizer + base model (imports transformers' model code)")

    model = method.apply(model, cfg)
    mark("train: apply LoRA (imports peft)")

    trainer = train.sft_trainer(recipe, model, tokenizer, train_ds, eval_ds,
                                train.training_arguments(recipe, active.info.run_id, eval_ds))
    mark("train: build SFTTrainer (imports trl, tokenizes the data)")

    from transformers import TrainerCallback

    logged: list[float] = []

    class StopAfterFirstLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            logged.append(time.perf_counter())

        def on_log(self, args, state, control, **kwargs):
            # Runs after the plugin's MLflow callback (added first) has logged step 1's metrics.
            logged.append(time.perf_counter())
            control.should_training_stop = True

    trainer.add_callback(StopAfterFirstLog)
    gc.collect()  # as train.train() does before training (then the GC is frozen for the loop)
    gc.freeze()
    mark("train: GC collection + freeze before training")
    trainer.train()
    gc.unfreeze()
    end = time.perf_counter()
    stages["train: trainer.train() set-up (accelerate, optimizer, dataloader)"] = logged[0] - last[0]
    stages["train: optimizer step 1 and its metrics logged"] = logged[1] - logged[0]
    mlflow.end_run()
    print(json.dumps({"stages": stages, "total": sum(stages.values()), "wind_down_after_stop": end - logged[1]}))


if __name__ == "__main__":
    sys.exit(main())
