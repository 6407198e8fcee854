"""`mlflow-finetune data`: check training data, write traces as rows."""

from __future__ import annotations

import sys

import click

from mlflow_finetune_plugin.cli._options import assignments


@click.group("data", short_help="Check training data; write traces as rows.")
def data_group():
    """Inspect training data before any model loads."""


@data_group.command("check", short_help="Check data files before any model loads.")
@click.argument("files", nargs=-1, type=click.Path())
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "chat", "sharegpt", "alpaca", "prompt_completion", "preference",
                                 "prompt_only", "unpaired_preference"]),
              help="Data format; auto detects it from the first rows.")
@click.option("--eval", "eval_files", multiple=True, type=click.Path(),
              help="Held-out file: checked too, and for prompts that are also in FILES (train/eval overlap).")
@click.option("--column", "columns", multiple=True, metavar="FIELD=COLUMN",
              help="The file's column for a field (messages, prompt, completion, chosen, rejected, system, "
                   "tools, instruction, input, output, images), like data.columns in finetune.yaml. "
                   "Repeatable.")
@click.option("--tag", "tags", multiple=True, metavar="TAG=VALUE",
              help="ShareGPT role tag (role_tag, content_tag, user_tag, assistant_tag, observation_tag, "
                   "function_tag, system_tag), like data.tags in finetune.yaml. Repeatable.")
@click.option("--model", default=None,
              help="Tokenizer for lengths and tool support (hub id or path), and asked if it reads images "
                   "where rows have any; default: tiny's, not asked.")
@click.option("--max-length", default=1024, show_default=True,
              help="Rows longer than this many tokens are flagged.")
@click.option("--strict", is_flag=True,
              help="Warnings count as errors (exit 1), like data.strict in finetune.yaml.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--documents", metavar="PATH",
              help="Instead of FILES: a folder or glob of documents (data.documents).")
@click.option("--chunk-tokens", default=256, show_default=True,
              help="--documents: the longest chunk, in tokens.")
def data_check_cmd(files, fmt, eval_files, columns, tags, model, max_length, strict, as_json, documents,
                   chunk_tokens):
    """Check data FILES (JSONL, JSON, CSV, parquet, or hf:ORG/NAME[:SPLIT]): format, lengths, duplicates and
    near-duplicates, contradictions, train/eval overlap, tool support, images (each opened), errors by
    line."""
    from mlflow_finetune_plugin.data.check import run_check
    from mlflow_finetune_plugin.data.documents import run_documents_check
    from mlflow_finetune_plugin.data.formats import COLUMNS, SHAREGPT_TAGS

    # --documents PATH: chunks, empty, duplicate and unreadable files (data/documents.py)
    if documents or not files:
        sys.exit(run_documents_check(documents, chunk_tokens, model, strict, as_json))
    sys.exit(run_check(list(files), fmt=fmt, model=model, max_length=max_length, as_json=as_json,
                       eval_files=list(eval_files), columns=assignments(columns, "--column", COLUMNS),
                       tags=assignments(tags, "--tag", SHAREGPT_TAGS), strict=strict))


@data_group.command("from-traces", short_help="Write the rows an experiment's traces train on.")
@click.argument("experiment")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="JSONL file to write the rows to.")
@click.option("--format", "fmt", default="chat", show_default=True,
              type=click.Choice(["chat", "preference", "unpaired_preference", "prompt_only"]),
              help="chat: one row per conversation (sft); preference: pairs by feedback (dpo); "
                   "unpaired_preference: answers labelled by feedback (kto); prompt_only: the prompts "
                   "(grpo).")
@click.option("--filter", "filter_string", default=None,
              help="MLflow trace filter string, like data.traces.filter.")
@click.option("--since", default=None,
              help="Traces from this moment: ISO date/time or a duration ago (7d, 12h).")
@click.option("--until", default=None, help="Traces before this moment (the same forms).")
@click.option("--run-id", default=None, help="Only the traces logged under this run.")
@click.option("--model-id", default=None, help="Only the traces of this logged model (m-...).")
@click.option("--feedback", "feedback", multiple=True, metavar="NAME",
              help="Feedback name that counts as a user's verdict (repeatable; default: "
                   "data.traces.feedback's).")
@click.option("--expectation", "expectations", multiple=True, metavar="NAME",
              help="Expectation name whose value replaces the answer (repeatable; default: "
                   "data.traces.expectations').")
@click.option("--rated-only", is_flag=True,
              help="chat: only answers with positive feedback or an expectation.")
def data_from_traces_cmd(experiment, output, fmt, filter_string, since, until, run_id, model_id, feedback,
                         expectations, rated_only):
    """Write the rows `data.train: traces:EXPERIMENT` trains on to a JSONL file, to inspect or edit (then
    train on the file). Traces hold user data: the file holds their texts; keep it where the traces may be
    kept."""
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
