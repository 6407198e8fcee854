"""`mlflow-finetune` command line: the front door to every layer. This module only assembles the commands;
each lives in the module of its group, and a new command goes there too:

- data.py: `data check`, `data from-traces`
- runs.py: `tiny-model`, `train`, `cancel`, `sweep`, `evaluate`, `plan`
- registry.py: `promote`, `models`, `export`
- serving.py: `serve`, `playground`, `votes export`, `votes summary`
- monitor.py, studio.py, openai_api.py: `monitor`, `studio`, `openai-api`
- _options.py: what several of them share (-P overrides, NAME=VALUE options, --trace, --follow-interval)
"""

from __future__ import annotations

import sys

import click

from mlflow_finetune_plugin.cli import data, monitor, openai_api, registry, runs, serving, studio
from mlflow_finetune_plugin.errors import FinetuneError


class _FriendlyGroup(click.Group):
    """Shows FinetuneError as a message with exit code 1, never as a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FinetuneError as e:
            click.secho(f"Error: {e}", fg="red", err=True)
            sys.exit(1)


@click.group(cls=_FriendlyGroup, epilog=(
    "A fine-tune starts with MLflow: mlflow run DIR -e METHOD --backend finetune (DIR: a folder with "
    "finetune.yaml; README.md, docs/reference.md)."))
@click.version_option(package_name="mlflow-finetune-plugin")
def main():
    """Fine-tune LLMs with MLflow: build, check, train, evaluate, register, chat."""
    from mlflow_finetune_plugin.runtime import installed
    from mlflow_finetune_plugin.vllm_rules import AFTER_INSTALL, torchvision_clash

    clash = torchvision_clash()
    if clash:  # every command would fail later in transformers' imports, with a message that does not say why
        raise click.ClickException(clash)
    installed.warn_once(AFTER_INSTALL)  # an extra that holds transformers back in this environment


for _command in (
    data.data_group,
    runs.tiny_model_cmd, runs.train_cmd, runs.cancel_cmd, runs.sweep_cmd, runs.evaluate_cmd, runs.plan_cmd,
    registry.promote_cmd, registry.models_cmd, registry.export_cmd,
    serving.serve_cmd, serving.playground_cmd, serving.votes_group,
    monitor.monitor_cmd, studio.studio_cmd, openai_api.openai_api_cmd,
):
    main.add_command(_command)
