"""`mlflow-finetune openai-api`: OpenAI's fine-tuning API over this backend (finetuning_api/)."""

from __future__ import annotations

import click

from mlflow_finetune_plugin.cli._options import OPENAI_API_PORT, port_free


@click.command("openai-api", short_help="OpenAI's fine-tuning API over this backend.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Listen address. Above loopback, --api-key is required.")
@click.option("--port", default=OPENAI_API_PORT, show_default=True, type=int)
@click.option("--api-key", default=None, envvar="MLFLOW_FINETUNE_API_KEY",
              help="The key clients must send (their OpenAI API key); required above loopback.")
@click.option("--state-dir", default=None, type=click.Path(file_okay=False),
              help="Where job records and projects are kept (default: the cache's openai-api folder).")
@click.option("--experiment", default="openai-fine-tuning", show_default=True,
              help="MLflow experiment of the runs.")
@click.option("--backend-config", "-b", default=None, metavar="JSON",
              help="The launcher of every job, as for `mlflow run --backend finetune` (detach is always on).")
@click.option("--max-jobs", default=1, show_default=True, type=click.IntRange(min=1),
              help="Jobs that run at once; the others wait in `queued`.")
@click.option("-P", "params", multiple=True, metavar="KEY=VALUE",
              help="Recipe override for every job (it wins over the job's hyperparameters): -P "
                   "train.max_steps=50")
@click.option("--model", "models", multiple=True, metavar="NAME",
              help="A base model jobs may name besides the built-in ones (hub id or folder), also answered "
                   "at /v1/chat/completions; repeatable.")
@click.option("--allow-python-graders", is_flag=True,
              help="Run `python` graders' source (in a subprocess with a time limit). Off: refused.")
@click.option("--python-grader-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds a python grader may take per batch of samples.")
@click.option("--max-upload-mb", default=512, show_default=True, type=click.IntRange(min=1),
              help="Largest file accepted by POST /v1/files.")
def openai_api_cmd(host, port, api_key, state_dir, experiment, backend_config, max_jobs, params, models,
                   allow_python_graders, python_grader_timeout, max_upload_mb):
    """OpenAI's fine-tuning API over this backend: client.files and client.fine_tuning.jobs (create, retrieve,
    list, cancel, pause, resume, list_events, checkpoints) run `mlflow run -e lora|dpo|grpo --backend
    finetune`, and each job's fine_tuned_model answers at /v1/chat/completions, beside the base models it
    fine-tunes (docs/openai.md)."""
    import json
    from pathlib import Path

    from mlflow_finetune_plugin import paths
    from mlflow_finetune_plugin.finetuning_api.app import run_api
    from mlflow_finetune_plugin.finetuning_api.jobs import Settings

    overrides = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.UsageError(f"-P {item!r}: write KEY=VALUE")
        overrides[key.strip()] = value
    try:
        config = json.loads(backend_config) if backend_config else {}
    except ValueError as e:
        raise click.UsageError(f"--backend-config is not JSON: {e}") from None
    port_free(host, port)
    settings = Settings(Path(state_dir) if state_dir else paths.cache_root() / "openai-api", overrides,
                        config, experiment, tuple(models), max_jobs, allow_python_graders,
                        python_grader_timeout)
    run_api(settings, host, port, api_key, max_upload_mb, click.echo)
