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
              type=click.Choice(["auto", "chat", "sharegpt", "alpaca", "prompt_completion", "preference"]),
              help="Data format; auto detects it from the first rows.")
@click.option("--eval", "eval_files", multiple=True, type=click.Path(),
              help="Held-out file: checked too, and for prompts that are also in FILES (train/eval overlap).")
@click.option("--column", "columns", multiple=True, metavar="FIELD=COLUMN",
              help="The file's column for a field (messages, prompt, completion, chosen, rejected, system, tools, "
                   "instruction, input, output), like data.columns in finetune.yaml. Repeatable.")
@click.option("--tag", "tags", multiple=True, metavar="TAG=VALUE",
              help="ShareGPT role tag (role_tag, content_tag, user_tag, assistant_tag, observation_tag, function_tag, "
                   "system_tag), like data.tags in finetune.yaml. Repeatable.")
@click.option("--model", default=None, help="Tokenizer for lengths and tool support (hub id or path); default: the "
                                            "tiny model.")
@click.option("--max-length", default=1024, show_default=True, help="Rows longer than this many tokens are flagged.")
@click.option("--strict", is_flag=True, help="Warnings count as errors (exit 1), like data.strict in finetune.yaml.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def data_check_cmd(files, fmt, eval_files, columns, tags, model, max_length, strict, as_json):
    """Check data FILES (JSONL, JSON, CSV, parquet, or hf:ORG/NAME[:SPLIT]): format, lengths, duplicates and
    near-duplicates, contradictions, train/eval overlap, tool support, errors by line."""
    from mlflow_finetune_plugin.data_check import run_check
    from mlflow_finetune_plugin.data_formats import COLUMNS, SHAREGPT_TAGS

    sys.exit(run_check(list(files), fmt=fmt, model=model, max_length=max_length, as_json=as_json,
                       eval_files=list(eval_files), columns=_assignments(columns, "--column", COLUMNS),
                       tags=_assignments(tags, "--tag", SHAREGPT_TAGS), strict=strict))


def _assignments(values, option: str, valid) -> dict:
    out = {}
    for item in values:
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint=option)
        if key not in valid:
            raise click.BadParameter(f"{key!r} is not one of {', '.join(valid)}", param_hint=option)
        out[key] = value
    return out


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
    from mlflow_finetune_plugin.backend import check_combination, check_recipe_data
    from mlflow_finetune_plugin.data_check import check_data
    from mlflow_finetune_plugin.job import run
    from mlflow_finetune_plugin.recipe import load_recipe

    recipe = load_recipe(project, method=method, overrides=_pairs(params, ctx.args))
    check_combination(recipe)
    check_recipe_data(recipe, check_data)
    sys.exit(run(recipe))


@main.command("cancel")
@click.argument("run_id")
def cancel_cmd(run_id):
    """Stop the job of RUN_ID (local, torchrun or ray launcher) and end the run KILLED."""
    from mlflow_finetune_plugin.cancel import cancel_run

    status, stopped = cancel_run(run_id)
    click.echo(f"Run {run_id} cancelled ({status})" if stopped else f"Run {run_id} had already ended {status}")


@main.command("evaluate")
@click.argument("model_uri")
@click.option("--data", default=None, metavar="FILE",
              help="Eval data, in any format and file type training reads (JSONL, JSON, CSV, parquet, or "
                   "hf:ORG/NAME[:SPLIT]); default: the eval file (or held-out split) of the model's source run.")
@click.option("--train", "train_data", default=None, metavar="FILE",
              help="Where few-shot examples come from (same file types); default: the source run's train file.")
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


@main.command("serve")
@click.argument("model_uris", nargs=-1, required=True)
@click.option("--engine", type=click.Choice(["vllm", "transformers"]), default="transformers", show_default=True,
              help="vllm: `vllm serve --enable-lora` (base + every adapter given, one process, CUDA); "
                   "transformers: `transformers serve` on a merged copy (one model per server, CPU is fine).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address (loopback unless you mean it).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--server-args", default="", help="Extra flags for the server, e.g. \"--max-model-len 4096\".")
@click.option("--dry-run", is_flag=True, help="Print the server command and exit.")
def serve_cmd(model_uris, engine, host, port, server_args, dry_run):
    """Start an OpenAI-compatible server for MODEL_URIS (models:/NAME@ALIAS, NAME/3, NAME/3:base) from the registry.

    Models are served as NAME-vN (and NAME-vN-base), the names `playground --engine openai` asks for.
    """
    import shlex

    from mlflow_finetune_plugin.serving.server import serve

    serve(list(model_uris), engine, host=host, port=port, extra=tuple(shlex.split(server_args)), dry_run=dry_run,
          echo=click.echo)


@main.command("playground")
@click.option("--model", "model_ref", required=True, help="NAME@ALIAS, NAME/VERSION or models:/NAME@ALIAS.")
@click.option("--against", default="base", show_default=True,
              help="The other side: base (the model's base), NAME@champion, NAME/VERSION.")
@click.option("--engine", type=click.Choice(["transformers", "vllm", "openai"]), default="transformers",
              show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=7860, show_default=True, type=int)
@click.option("--auth", default=None, metavar="USER:PASS", envvar="MLFLOW_FINETUNE_PLAYGROUND_AUTH",
              help="Require a login (or set MLFLOW_FINETUNE_PLAYGROUND_AUTH).")
@click.option("--blind", is_flag=True, help="Start in blind mode: sides shuffled, names hidden until the vote.")
@click.option("--openai-url", "openai_urls", multiple=True, metavar="[REF=]URL",
              help="openai engine: the server (http://127.0.0.1:8000/v1); REF=URL sends one model elsewhere.")
@click.option("--served-model", "served_models", multiple=True, metavar="REF=NAME",
              help="openai engine: the name a server knows REF by (default NAME-vN / NAME-vN-base).")
@click.option("--max-new-tokens", default=512, show_default=True, help="Upper limit of the max-new-tokens slider.")
@click.option("--concurrency", type=int, default=None, help="Comparisons answered at once (default: per engine).")
@click.option("--device", default=None, help="transformers engine: cpu, cuda, cuda:1 (default: cuda if present).")
@click.option("--max-lora-rank", default=64, show_default=True, help="vllm engine: largest LoRA rank to serve.")
@click.option("--experiment", default=None, help="MLflow experiment for votes (default: playground-votes).")
def playground_cmd(model_ref, against, engine, host, port, auth, blind, openai_urls, served_models, max_new_tokens,
                   concurrency, device, max_lora_rank, experiment):
    """Chat with two registered models side by side (A/B), vote, and promote, in a Gradio page."""
    from gradio_app.launch import run_playground

    run_playground(model_ref, against, engine=engine, host=host, port=port, auth=auth, blind=blind,
                   openai_urls=openai_urls, served_models=served_models, max_new_tokens=max_new_tokens,
                   concurrency=concurrency, device=device, experiment=experiment, max_lora_rank=max_lora_rank,
                   echo=click.echo)


@main.group("votes")
def votes_group():
    """Playground votes: win rates and preference data."""


@votes_group.command("export")
@click.argument("name")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="JSONL file to write.")
@click.option("--experiment", default="playground-votes", show_default=True)
def votes_export_cmd(name, output, experiment):
    """Write the votes on NAME with a winner as prompt/chosen/rejected rows (the `dpo` entry point's data)."""
    from mlflow_finetune_plugin.votes import export

    click.echo(export(name, output, experiment).report())


@votes_group.command("summary")
@click.argument("name")
@click.option("--experiment", default="playground-votes", show_default=True)
def votes_summary_cmd(name, experiment):
    """Win rates per pair of compared versions of NAME."""
    from mlflow_finetune_plugin.registry import format_table
    from mlflow_finetune_plugin.votes import SUMMARY_HEADERS, summary_rows

    rows = summary_rows(name, experiment)
    click.echo(format_table(SUMMARY_HEADERS, rows) if rows else f"No votes on {name!r} in {experiment!r} yet.")
