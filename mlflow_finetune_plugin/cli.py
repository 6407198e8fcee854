"""`mlflow-finetune` command line: the front door to every layer."""

from __future__ import annotations

import sys

import click

from mlflow_finetune_plugin.errors import FinetuneError


class _FriendlyGroup(click.Group):
    """Shows FinetuneError as a message with exit code 1, never as a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FinetuneError as e:
            click.secho(f"Error: {e}", fg="red", err=True)
            sys.exit(1)


@click.group(cls=_FriendlyGroup)
@click.version_option(package_name="mlflow-finetune-plugin")
def main():
    """Fine-tune LLMs with MLflow: build, check, train, evaluate, register, chat."""


@main.command("tiny-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed of the random initial weights.")
def tiny_model_cmd(directory, seed):
    """Build the built-in tiny Llama model (and its locally trained tokenizer) into DIRECTORY."""
    from mlflow_finetune_plugin.tiny_model import build_tiny_model

    path = build_tiny_model(directory, seed=seed)
    click.echo(f"Tiny model written to {path}")


@main.group("data")
def data_group():
    """Inspect training data before any model loads."""


@data_group.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "chat", "alpaca", "prompt_completion", "preference"]),
              help="Data format; auto detects it from the first rows.")
@click.option("--model", default=None, help="Tokenizer for length stats (hub id or path); default: the tiny model.")
@click.option("--max-length", default=1024, show_default=True, help="Rows longer than this many tokens are flagged.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def data_check_cmd(files, fmt, model, max_length, as_json):
    """Check data FILES (JSONL, JSON, CSV, parquet): format, lengths, duplicates, contradictions, errors by line."""
    from mlflow_finetune_plugin.data_check import run_check

    sys.exit(run_check(list(files), fmt=fmt, model=model, max_length=max_length, as_json=as_json))


def _pairs(values, extra_args) -> dict:
    """`-P key=value` options plus `--key value` pairs (how MLflow's local backend passes undeclared params)."""
    out = {}
    for item in values:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not key=value (e.g. -P train.max_steps=20)", param_hint="-P")
        key, value = item.split("=", 1)
        out[key] = value
    args = list(extra_args)
    while args:
        key = args.pop(0)
        if not key.startswith("--") or not args:
            raise click.UsageError(f"unexpected argument {key!r}; pass recipe overrides as -P key=value")
        out[key[2:]] = args.pop(0)
    return out


@main.command("train", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("project", default=".", type=click.Path(exists=True, file_okay=False))
@click.option("--method", "-m", default=None, help="Fine-tuning method (default: the recipe's `method`).")
@click.option("-P", "params", multiple=True, help="Recipe override, dotted key: -P train.max_steps=20")
@click.pass_context
def train_cmd(ctx, project, method, params):
    """Fine-tune PROJECT (a folder with finetune.yaml) in this process.

    Inside `mlflow run` (local backend) it trains in the run MLflow created; otherwise it starts a new run.
    Prefer `mlflow run PROJECT -e METHOD --backend finetune`, which also validates before starting a run.
    """
    from mlflow_finetune_plugin.backend import _check_data
    from mlflow_finetune_plugin.data_check import check_data
    from mlflow_finetune_plugin.recipe import load_recipe
    from mlflow_finetune_plugin.train import run

    recipe = load_recipe(project, method=method, overrides=_pairs(params, ctx.args))
    _check_data(recipe, check_data)
    sys.exit(run(recipe))


@main.command("evaluate")
@click.argument("model_uri")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Eval data (chat JSONL); default: the eval file (or held-out split) of the model's source run.")
@click.option("--train", "train_data", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Where few-shot examples come from; default: the source run's train file.")
@click.option("--run-id", default=None, help="Log into this run (e.g. the version's source run) instead of a new one.")
@click.option("--max-examples", type=int, default=None, help="Score the first N rows (default: the recipe's).")
@click.option("--max-new-tokens", type=int, default=None, help="Answer length limit (default: the recipe's).")
@click.option("--fewshot-k", type=int, default=None, help="Examples in the few-shot prompt; 0 skips few-shot.")
def evaluate_cmd(model_uri, data, train_data, run_id, max_examples, max_new_tokens, fewshot_k):
    """Score MODEL_URI (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/model) against its base model,
    zero-shot and few-shot: logs eval/<contender>/<metric>, a per-example table and a chart, prints the table.

    Promotion reads metrics from a version's source run: to (re)score a version for `promote`, pass that run
    as --run-id.
    """
    from mlflow_finetune_plugin.evaluation import comparison_table, evaluate_model_uri

    result, logged_run = evaluate_model_uri(model_uri, data=data, train_data=train_data, run_id=run_id,
                                            max_examples=max_examples, max_new_tokens=max_new_tokens,
                                            fewshot_k=fewshot_k)
    click.echo(comparison_table(result.metrics))
    click.echo(f"Logged to run {logged_run} ({int(result.metrics['eval/n_examples'])} examples)")


@main.command("promote")
@click.argument("name")
@click.option("--version", "version", required=True, help="Version to promote (a number, or @ALIAS).")
@click.option("--alias", default=None, help="Alias to move; default: the recipe's registry.champion_alias (champion).")
@click.option("--gate", "gates", multiple=True, metavar="METRIC[:MARGIN[:BEATS]]",
              help="Replaces the recipe's registry.promote_if. BEATS is a comma list of base, fewshot, champion, "
                   "@ALIAS or version numbers (default base,fewshot,champion); MARGIN is absolute (default 0); "
                   "lower is better for loss and perplexity. Repeatable: every gate must pass. "
                   "E.g. --gate rougeL:0.01 --gate loss:0:base")
@click.option("--force", is_flag=True, help="Move the alias even if gates fail or metrics are missing.")
@click.option("--reason", default=None, help="Why the gates are overridden; required with --force, recorded.")
def promote_cmd(name, version, alias, gates, force, reason):
    """Move the champion alias of model NAME to --version when it passes the promotion gates.

    Gates default to `registry.promote_if` in the recipe.yaml of the version's source run. Prints the comparison
    and exits 1 when the alias stays. --force records who forced it, when and why as version tags.
    """
    from mlflow_finetune_plugin.promotion import parse_gate, promote

    result = promote(name, version, alias=alias, gates=[parse_gate(g) for g in gates] if gates else None,
                     force=force, reason=reason)
    click.echo(result.report())
    if not (result.promoted or result.previous == result.version):
        sys.exit(1)


@main.command("models")
@click.argument("name")
@click.option("--metric", "metrics", multiple=True, help="eval/tuned/<metric> columns to show (repeatable); "
              "default: rougeL, token_f1, exact_match, loss.")
def models_cmd(name, metrics):
    """List the versions of registered model NAME with their aliases, method, base and key metrics."""
    from mlflow_finetune_plugin.registry import versions_table

    click.echo(versions_table(name, list(metrics) or ["rougeL", "token_f1", "exact_match", "loss"]))
