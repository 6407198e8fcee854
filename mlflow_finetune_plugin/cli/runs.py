"""Commands that make runs: `tiny-model` (a base to train), `train`, `cancel`, `sweep`, `evaluate`, `plan`
(the memory a run will take, before it starts)."""

from __future__ import annotations

import sys

import click

from mlflow_finetune_plugin.cli._options import pairs


@click.command("tiny-model", short_help="Build the built-in tiny Llama into a folder.")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed of the random initial weights.")
def tiny_model_cmd(directory, seed):
    """Build the built-in tiny Llama model (and its locally trained tokenizer) into DIRECTORY."""
    from mlflow_finetune_plugin.models.tiny import build_tiny_model

    click.echo(f"Tiny model written to {build_tiny_model(directory, seed=seed)}")



@click.command("train", short_help="Fine-tune a project in this process.",
              context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("project", default=".", type=click.Path(exists=True, file_okay=False))
@click.option("--method", "-m", default=None, help="Fine-tuning method (default: the recipe's `method`).")
@click.option("-P", "params", multiple=True, help="Recipe override, dotted key: -P train.max_steps=20")
@click.pass_context
def train_cmd(ctx, project, method, params):
    """Fine-tune PROJECT (a folder with finetune.yaml) in this process: inside `mlflow run` (local backend) in
    the run MLflow created, else in a new run. Prefer `mlflow run PROJECT -e METHOD --backend finetune` (it
    validates first)."""
    from mlflow_finetune_plugin.backend import check_combination
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.data.check import check_data
    from mlflow_finetune_plugin.data.preflight import check_recipe_data
    from mlflow_finetune_plugin.memory.choose import settle
    from mlflow_finetune_plugin.train.job import run

    recipe = load_recipe(project, method=method, overrides=pairs(params, ctx.args))
    check_combination(recipe)
    check_recipe_data(recipe, check_data)
    recipe, _ = settle(recipe)  # `auto` batch size and checkpointing chosen; on CUDA, refused if too large
    sys.exit(run(recipe))


@click.command("cancel", short_help="Stop a run's job; the run ends KILLED.")
@click.argument("run_id")
def cancel_cmd(run_id):
    """Stop the job of RUN_ID (local, torchrun or ray launcher) and end the run KILLED."""
    from mlflow_finetune_plugin.launchers.cancel import cancel_run

    status, stopped = cancel_run(run_id)
    click.echo(f"Run {run_id} cancelled ({status})" if stopped
               else f"Run {run_id} had already ended {status}")


@click.command("sweep", short_help="Hyperparameter sweep with Optuna.",
              context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("project", type=click.Path(exists=True, file_okay=False))
@click.option("-e", "--entry-point", default="lora", show_default=True, help="The method every trial trains.")
@click.option("--space", required=True, metavar="FILE",
              help="Search space YAML: recipe key -> {low, high[, log, step, type]} or {choices: [...]}; "
                   "looked up in PROJECT too.")
@click.option("--trials", required=True, type=click.IntRange(min=1), help="Number of trials (fine-tunes).")
@click.option("--metric", default="eval/tuned/loss", show_default=True,
              help="Logged metric to optimize, e.g. eval/tuned/rougeL (its last logged value).")
@click.option("--direction", type=click.Choice(["minimize", "maximize"]), default=None,
              help="Default: minimize for loss, perplexity and misrouted, else maximize.")
@click.option("-P", "params", multiple=True, help="Recipe override for every trial: -P train.max_steps=50")
@click.option("--backend-config", "-b", default=None, metavar="JSON",
              help="As for `mlflow run` (JSON or a .json file): launcher, address, num_workers, ...")
@click.option("--experiment-name", default=None, help="MLflow experiment of the sweep and its trials.")
@click.option("--register-all", is_flag=True,
              help="Register every completed trial (best last), not only the best.")
@click.option("--pruner", type=click.Choice(["median", "none"]), default="median", show_default=True,
              help="median: cancel a trial whose eval loss is worse than the median of earlier trials at "
                   "that step.")
@click.option("--startup-trials", type=click.IntRange(min=0), default=None,
              help="Random trials before TPE and the pruner use the history (default: a third of --trials, "
                   "1-10).")
@click.option("--seed", type=int, default=None, help="Seed of the sampler.")
@click.option("--enqueue", multiple=True, metavar="YAML",
              help="A trial to run first, e.g. '{train.learning_rate: 2.0e-4, lora.r: 16}'. Repeatable.")
@click.pass_context
def sweep_cmd(ctx, project, entry_point, space, trials, metric, direction, params, backend_config,
              experiment_name, register_all, pruner, startup_trials, seed, enqueue):
    """Hyperparameter sweep of PROJECT with Optuna (TPE): nested trial runs under one parent run, bad trials
    pruned from their eval loss, the best trial's model registered."""
    import json
    from pathlib import Path

    import yaml

    from mlflow_finetune_plugin.sweep.study import run_sweep

    if not Path(space).exists() and (Path(project) / space).exists():
        space = str(Path(project) / space)
    config = {}
    if backend_config:
        try:
            text = Path(backend_config).read_text() if backend_config.endswith(".json") else backend_config
            config = json.loads(text)
        except (OSError, ValueError) as e:
            raise click.BadParameter(f"not JSON or a .json file: {e}",
                                     param_hint="--backend-config") from None
    points = []
    for item in enqueue:
        point = yaml.safe_load(item)
        if not isinstance(point, dict):
            raise click.BadParameter(f"{item!r} is not a mapping like '{{lora.r: 8}}'",
                                     param_hint="--enqueue")
        points.append(point)
    result = run_sweep(project, entry_point, space, trials, metric=metric, direction=direction,
                       params=pairs(params, ctx.args), backend_config=config, experiment_name=experiment_name,
                       register_all=register_all,
                       pruner=pruner, startup_trials=startup_trials, seed=seed, enqueue=points)
    click.echo(result.report())


@click.command("evaluate", short_help="Score a version against its base and prompts.")
@click.argument("model_uri")
@click.option("--data", default=None, metavar="FILE",
              help="Eval data, in any format and file type training reads (JSONL, JSON, CSV, parquet, or "
                   "hf:ORG/NAME[:SPLIT]); default: the eval file (or held-out split) of the model's source "
                   "run.")
@click.option("--train", "train_data", default=None, metavar="FILE",
              help="Where few-shot and retrieved examples come from (same file types); default: the source "
                   "run's train file.")
@click.option("--run-id", default=None, help="Log into this run (e.g. the version's source run) instead of a "
                                             "new one.")
@click.option("--max-examples", type=int, default=None,
              help="Score the first N rows (default: the recipe's).")
@click.option("--max-new-tokens", type=int, default=None, help="Answer length limit (default: the recipe's).")
@click.option("--num-beams", type=int, default=None,
              help="Beam search in every contender's answers (default: the recipe's eval.num_beams; 1: "
                   "greedy).")
@click.option("--fewshot-k", type=int, default=None,
              help="Examples in the few-shot prompt; 0 skips few-shot.")
@click.option("--retrieval-k", type=int, default=None,
              help="Train conversations retrieved (BM25) as shots for each question; default: the few-shot "
                   "k; 0 skips retrieval.")
def evaluate_cmd(model_uri, data, train_data, run_id, max_examples, max_new_tokens, num_beams, fewshot_k,
                 retrieval_k):
    """Score MODEL_URI (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/model) against its base model,
    zero-shot, few-shot, with retrieved shots and with the optimized prompt: logs eval/<contender>/<metric>, a
    per-example table and a chart, prints the table, then the verdict (also tagged on the run): did it beat
    the best beyond noise, by eval.min_gain?

    Promotion reads metrics (and, for serving parity, the tuned answers) from a version's source run: to
    (re)score a version for `promote`, pass that run as --run-id."""
    from mlflow_finetune_plugin.evaluate.contenders import evaluate_model_uri
    from mlflow_finetune_plugin.evaluate.report import misrouted_note
    from mlflow_finetune_plugin.metrics import comparison_table

    result, logged_run = evaluate_model_uri(model_uri, data=data, train_data=train_data, run_id=run_id,
                                            max_examples=max_examples, max_new_tokens=max_new_tokens,
                                            num_beams=num_beams, fewshot_k=fewshot_k, retrieval_k=retrieval_k)
    click.echo(comparison_table(result.metrics))
    if note := misrouted_note(result.metrics):
        click.echo(note)
    click.echo(f"Logged to run {logged_run} ({int(result.metrics['eval/n_examples'])} examples)")
    # cost: cost.cost_line
    click.echo(f"Verdict: {result.verdict.sentence()}\n{result.verdict.cost}".rstrip())


@click.command("plan", short_help="The memory a recipe takes, before anything loads.",
               context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("project", default=".", type=click.Path(exists=True, file_okay=False))
@click.option("-e", "--entry-point", "method", default=None, help="The method (default: the recipe's).")
@click.option("-P", "params", multiple=True, help="Recipe override, dotted key: -P train.batch_size=4")
@click.option("--memory", default=None, metavar="SIZE", help="Memory to fit: 24GiB, 80GB, 40960MiB.")
@click.option("--gpu", default=None, metavar="NAME", help="A card to fit, by name: A100-80GB, RTX4090, H100.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
              help="Plan for this device (default: CUDA where there is one; cuda with --gpu).")
@click.option("--json", "as_json", is_flag=True, help="The plan as JSON, for scripts.")
@click.pass_context
def plan_cmd(ctx, project, method, params, memory, gpu, device, as_json):
    """What PROJECT's recipe will take in memory, part by part (weights, adapter, gradients, optimizer,
    activations, logits, overhead), read from the model's configuration and never its weights, and the
    batch size, gradient accumulation, checkpointing and max_length that fit --memory or --gpu."""
    import json

    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.memory.plan import data_longest, plan
    from mlflow_finetune_plugin.memory.sizes import gpu_memory, parse_size

    if memory and gpu:
        raise click.BadParameter("give --memory or --gpu, not both", param_hint="--memory")
    size = parse_size(memory) if memory else gpu_memory(gpu) if gpu else None
    recipe = load_recipe(project, method=method, overrides=pairs(params, ctx.args))
    longest, where = data_longest(recipe)
    result = plan(recipe, device_memory=size, device=device or ("cuda" if gpu else None), longest=longest)
    if as_json:
        click.echo(json.dumps(result.as_dict() | {"longest_row": longest, "rows_from": where}, indent=2))
        return
    click.echo(result.report())
    click.echo(f"Rows: the longest of {where} ({longest} tokens)" if longest
               else f"Rows: data.max_length, as the data's rows were not counted ({where})")
