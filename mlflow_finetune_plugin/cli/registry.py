"""Commands on registered models: `promote`, `models` (versions and checkpoints), `export`."""

from __future__ import annotations

import sys

import click


@click.command("promote", short_help="Move the champion alias when the gates pass.")
@click.argument("name")
@click.option("--version", "version", required=True, help="Version to promote (a number, or @ALIAS).")
@click.option("--alias", default=None, help="Alias to move; default: the recipe's registry.champion_alias "
                                            "(champion).")
@click.option("--gate", "gates", multiple=True, metavar="METRIC[:MARGIN[:BEATS]]",
              help="Replaces the recipe's registry.promote_if. BEATS: base, fewshot, retrieval, optimized, "
                   "champion, @ALIAS or versions, comma-separated (default: all five, passing over one its "
                   "run did not score, and its run's verdict must say paid off); MARGIN is absolute (default "
                   "0); lower is better for loss, perplexity and misrouted. Limits: METRIC<=VALUE or "
                   "METRIC>=VALUE. Votes: arena_above:champion (Bradley-Terry interval above it). "
                   "Repeatable: every gate must pass. E.g. --gate rougeL:0.01 --gate "
                   "'forgetting/ppl_ratio<=1.2'")
@click.option("--force", is_flag=True, help="Move the alias even if gates fail or metrics are missing.")
@click.option("--reason", default=None, help="Why the gates are overridden or parity is off; required then, "
                                             "recorded.")
@click.option("--parity", type=click.Choice(["transformers", "vllm", "off"]), default=None,
              help="Serving parity before @champion moves: the engine that answers the held-out prompts, or "
                   "off (needs --reason); default: the recipe's registry.parity (transformers).")
def promote_cmd(name, version, alias, gates, force, reason, parity):
    """Move the champion alias of NAME to --version when it passes the gates (default: the recipe's
    promote_if) and serving parity (served answers match its evaluation). Prints the comparison; exits 1 when
    the alias stays."""
    from mlflow_finetune_plugin.registry.promotion import parse_gate
    from mlflow_finetune_plugin.serving.parity import promote_checked

    result = promote_checked(name, version, alias=alias,
                             gates=[parse_gate(g) for g in gates] if gates else None,
                             force=force, reason=reason, parity=parity)
    click.echo(result.report())
    if not (result.promoted or result.previous == result.version):
        sys.exit(1)


@click.command("models", short_help="List a model's versions, aliases and key metrics.")
@click.argument("name")
@click.option("--metric", "metrics", multiple=True, help="eval/tuned/<metric> columns to show (repeatable); "
              "default: rougeL, token_f1, exact_match, loss. With --checkpoints the first one ranks them "
              "(default: loss; lower is better for loss, perplexity and misrouted).")
@click.option("--checkpoints", "checkpoints_of", metavar="RUN_ID", default=None,
              help="Rank the checkpoints of training run RUN_ID (one per save step) by their eval metric "
                   "instead.")
@click.option("--register-checkpoint", "checkpoint", metavar="STEP|MODEL_ID", default=None,
              help="Register a checkpoint as a new version of NAME: its step in --run, or its model id "
                   "(m-..., from --checkpoints). It is evaluated in a run of its own, so `promote` gates on "
                   "its scores.")
@click.option("--run", "run_id", metavar="RUN_ID", default=None,
              help="The training run of --register-checkpoint STEP.")
def models_cmd(name, metrics, checkpoints_of, checkpoint, run_id):
    """List the versions of registered model NAME with their aliases, method, base and key metrics; or rank a
    training run's checkpoints (--checkpoints RUN_ID), or register one of them (--register-checkpoint)."""
    from mlflow_finetune_plugin.registry import versions as registry

    if checkpoints_of and checkpoint:
        raise click.UsageError("--checkpoints lists a run's checkpoints, --register-checkpoint registers "
                               "one: give one of them (the run of --register-checkpoint STEP is --run "
                               "RUN_ID)")
    if run_id and not checkpoint:
        raise click.UsageError("--run names the run of --register-checkpoint STEP; to list a run's "
                               "checkpoints use --checkpoints RUN_ID")
    if checkpoint:
        from mlflow_finetune_plugin.train.publish import register_checkpoint

        register_checkpoint(name, checkpoint, run_id)
    elif checkpoints_of:
        click.echo(registry.checkpoints_table(checkpoints_of, list(metrics) or ["loss"]))
    else:
        click.echo(registry.versions_table(name,
                                           list(metrics) or ["rougeL", "token_f1", "exact_match", "loss"]))


@click.command("export", short_help="Write a version as a model folder (or GGUF).")
@click.argument("model_uri")
@click.option("--to", "out_dir", required=True, type=click.Path(file_okay=False),
              help="New or empty folder to write the model into.")
@click.option("--gguf", is_flag=True, help="Also write a GGUF file with llama.cpp's convert_hf_to_gguf.py "
                                           "(f16 unless --gguf-type says otherwise).")
@click.option("--gguf-type", type=click.Choice(["f32", "f16", "q8_0"]), default=None,
              help="GGUF tensor type (implies --gguf): f32 keeps the weights exactly; f16 halves the file; "
                   "q8_0 (8-bit) quarters it.")
@click.option("--llama-cpp", "llama_cpp", default=None, metavar="PATH",
              help="llama.cpp checkout holding convert_hf_to_gguf.py, or llama-cpp-python's source "
                   "distribution (.tar.gz, or the folder `pip download` put it in; extracted once into the "
                   "cache). Default: $LLAMA_CPP_DIR, a checkout on PATH, or the copy in the cache.")
@click.option("--no-log", is_flag=True, help="Do not log the export back to the version's source run.")
def export_cmd(model_uri, out_dir, gguf, gguf_type, llama_cpp, no_log):
    """Write MODEL_URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model) as a plain transformers
    folder: the adapter merged into its base (a full fine-tune as is), safetensors, tokenizer and chat
    template, loadable with AutoModelForCausalLM.from_pretrained(DIR) and servable by vLLM or `transformers
    serve`.

    The export is logged to the version's source run under exports/ and recorded as finetune.export.* tags on
    the version.
    """
    from mlflow_finetune_plugin.registry.export import export_model

    if llama_cpp and not (gguf or gguf_type):
        raise click.UsageError("--llama-cpp names the GGUF converter: give it with --gguf or --gguf-type")
    result = export_model(model_uri, out_dir, gguf_type=gguf_type or ("f16" if gguf else None),
                          log=not no_log, echo=click.echo, llama_cpp=llama_cpp)
    click.echo(f"Exported {'merged model' if result.merged else 'full fine-tune'} to {result.folder}"
               + (f"\nGGUF: {result.gguf_file}" if result.gguf_file else "")
               + (f"\nLogged as {result.artifact_uri}" if result.artifact_uri else ""))
