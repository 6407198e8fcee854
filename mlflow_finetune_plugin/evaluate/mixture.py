"""A mixture's evaluation: each task scored on its own held-out rows, and the mean over tasks under the names
one set's evaluation logs, so promotion gates read the same names for both."""

from __future__ import annotations


def evaluate_tasks(recipe, model, tokenizer, trains: dict, evals: dict, base_model=None) -> None:
    """Each task scored on its own held-out rows (`eval/<task>/<metric>`, `eval/<task>/base/<metric>`, ...);
    `eval/<contender>/<metric>` is the mean over tasks. With one adapter per task, each task is scored with
    its own adapter."""
    import hashlib

    from mlflow_finetune_plugin.data.teacher import teachers
    from mlflow_finetune_plugin.evaluate.contenders import conversations, run_evaluation
    from mlflow_finetune_plugin.evaluate.report import EvalResult, log_evaluation
    from mlflow_finetune_plugin.metrics import comparison_table, mean

    per_task, merged_rows, examples, expected, prompts, generation = {}, [], 0, 0, [], {}
    for name, ds in evals.items():
        print(f"\nTask {name}:")
        if recipe.data.adapters == "per_task":
            model.set_adapter(name)
        result = run_evaluation(model, tokenizer, conversations(ds), conversations(trains[name]), recipe.eval,
                                base_model=base_model, teachers=teachers(ds))
        print(comparison_table(result.metrics))
        per_task[name] = result.metrics
        merged_rows += [{"task": name, **row} for row in result.rows]
        # the tuned answers' record (parity)
        prompts, generation = prompts + result.prompts, result.generation
        examples += int(result.metrics.get("eval/n_examples", 0))
        # rows whose target replaced a teacher's answer
        expected += int(result.metrics.get("eval/n_expected", 0))
    metrics = {}
    for name, task_metrics in per_task.items():
        for key, value in task_metrics.items():
            if key.count("/") != 2:
                continue
            _, contender, metric = key.split("/")
            named = f"eval/{name}/{metric}" if contender == "tuned" else f"eval/{name}/{contender}/{metric}"
            metrics[named] = value
    overall = {}
    for key in dict.fromkeys(k for m in per_task.values() for k in m if k.count("/") == 2):
        values = [m[key] for m in per_task.values() if key in m]
        overall[key] = mean(values)
    print("\nAll tasks (mean over tasks):")
    print(comparison_table(overall))
    digest = hashlib.sha256(",".join(sorted(per_task)).encode()).hexdigest()[:12]
    counts = {"eval/n_examples": examples, **({"eval/n_expected": expected} if expected else {})}
    log_evaluation(EvalResult({**overall, **metrics, **counts}, merged_rows, data_digest=digest,
                              traces=recipe.eval.traces, prompts=prompts, generation=generation))
