"""How long until my fine-tuned model is registered? The README's command, from launch to the registered
version.

Runs `mlflow run recipes/support-bot -e lora --backend finetune` (the recipe as it ships: smollm2, 2 epochs,
evaluation, registration) and splits its wall time into stages read from what the run recorded; installing the
package is not part of it:
  check      launch -> the run's start_time: the `mlflow` CLI, recipe + data validation, run created
  load       -> start of training (the `train/summary_runtime` metric's timestamp minus its value): data,
  tokenizer,
             model (converted on first use: `--cold` points MLFLOW_FINETUNE_CACHE at an empty folder), LoRA,
             trainer
  train      the Trainer's `train_runtime`
  evaluate   -> the last `eval/...` metric: base zero-shot, base few-shot and tuned answers to the held-out
  rows register   -> the model version's creation_timestamp: log the model, register it
  finish     -> the CLI exits (run ended)
There is no plain baseline for a whole pipeline; bench/train_throughput.py compares the training part.

    python bench/time_to_model.py --cold           # ~7 min on 2 cores (1 rep)
    python bench/time_to_model.py --recipe it-helpdesk  # another bundled recipe
    python bench/time_to_model.py -P max_steps=2 -P eval.max_examples=2 -P eval.max_new_tokens=8   # smoke,
    ~1.5 min
"""

from __future__ import annotations

import argparse

import common

STAGES = ("check", "load", "train", "evaluate", "register", "finish")


def stages(run_id: str, launched: float, exited: float) -> dict:
    """Seconds per stage of one `mlflow run`, from the run's times, metric timestamps and model version."""
    c = common.client()
    run = c.get_run(run_id)
    summary = c.get_metric_history(run_id, "train/summary_runtime")[-1]
    train_end = summary.timestamp / 1000
    train_start = train_end - summary.value
    evals = [m.timestamp / 1000 for key in run.data.metrics if key.startswith("eval/")
             for m in c.get_metric_history(run_id, key) if m.timestamp / 1000 >= train_end]
    eval_end = max(evals, default=train_end)
    tags = run.data.tags
    version = c.get_model_version(tags["finetune.registered_model"], tags["finetune.registered_version"])
    registered = version.creation_timestamp / 1000
    marks = [launched, run.info.start_time / 1000, train_start, train_end, eval_end, registered, exited]
    out = {stage: b - a for stage, a, b in zip(STAGES, marks, marks[1:])}
    out["to registered version"], out["to CLI exit"] = registered - launched, exited - launched
    return out


QUALITY = ("precision", "eval/tuned/rougeL", "eval/tuned/exact_match", "eval/tuned/misrouted",
           "eval/forgetting/ppl_ratio")


def quality(run_id: str) -> dict:
    """What the timed run produced: its training precision, the tuned model's rougeL, exact match and
    misrouted share, forgetting."""
    run = common.client().get_run(run_id)
    out = {key: f"{run.data.metrics[key]:.3f}" if key in run.data.metrics else "-" for key in QUALITY[1:]}
    return {"precision": run.data.tags.get("finetune.precision", "-"), **out}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cold", action="store_true", help="An empty model cache: smollm2's conversion included.")
    p.add_argument("-P", dest="params", action="append", default=[], metavar="KEY=VALUE",
                   help="Extra recipe overrides (as `mlflow run -P`).")
    p.add_argument("--recipe", default="support-bot",
                   help="A bundled recipe (recipes/<name>); default: the README's.")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    work, env = common.setup(args.workdir)
    # each rep timed as a first run on the machine: the base model answers too (not eval.reuse_answers' cache)
    params = {"eval.reuse_answers": "false", **dict(kv.split("=", 1) for kv in args.params)}
    results = []
    for rep in range(args.reps):
        run_env = {**env, "MLFLOW_FINETUNE_CACHE": str(work / f"cold-cache-{rep}")} if args.cold else env
        if args.cold:
            import shutil

            shutil.rmtree(run_env["MLFLOW_FINETUNE_CACHE"], ignore_errors=True)
        common.log(f"rep {rep + 1}/{args.reps}: mlflow run recipes/{args.recipe} -e lora --backend finetune")
        run = common.mlflow_run(params, run_env, work, f"time-to-model-{rep}",
                                project=common.REPO / "recipes" / args.recipe)
        results.append(stages(run["run_id"], run["launched"], run["exited"]))
        results[-1].update(quality(run["run_id"]))
        common.log(f"  {results[-1]['to registered version']:.0f} s to the registered version")

    extra = "".join(f" -P {kv}" for kv in args.params)
    common.header(
        f"Time to a fine-tuned model: `mlflow run recipes/{args.recipe} -e lora --backend finetune{extra}`"
        f"{', empty model cache' if args.cold else ''}; {args.reps} rep(s): median (range)")
    total = common.summary(r["to registered version"] for r in results)
    rows = [[stage, common.summary(r[stage] for r in results),
             common.summary(100 * r[stage] / r["to registered version"] for r in results)]
            for stage in STAGES[:-1]]
    rows += [["**launch -> registered version**", total, "100"],
             ["(then) finish: run ended, CLI exits", common.summary(r["finish"] for r in results), "-"]]
    print(common.table(["stage", "seconds", "% of the time to the registered version"], rows))
    print()
    print(common.table(["rep", *QUALITY], [[str(i + 1), *(r[k] for k in QUALITY)] for i,
                                           r in enumerate(results)]))


if __name__ == "__main__":
    main()
