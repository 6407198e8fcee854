"""`mlflow-finetune studio`: the Train page (studio/)."""

from __future__ import annotations

import click

from mlflow_finetune_plugin.cli._options import STUDIO_PORT, port_free


@click.command("studio", short_help="The whole loop in the browser: recipe to promotion.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Listen address. Above loopback, --auth is required.")
@click.option("--port", default=STUDIO_PORT, show_default=True, type=int)
@click.option("--auth", default=None, metavar="USER:PASS", envvar="MLFLOW_FINETUNE_STUDIO_AUTH",
              help="Require a login (or set MLFLOW_FINETUNE_STUDIO_AUTH); required above loopback.")
@click.option("--project-dir", "project_dirs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="A folder whose projects (folders with finetune.yaml) the page may run; repeatable. The "
                   "bundled recipes and the studio's own uploads are always offered.")
@click.option("--workdir", default=None, type=click.Path(file_okay=False),
              help="Where uploads, the projects made from them and the job queue are kept (default: the "
                   "cache's studio folder).")
@click.option("--experiment", default=None, help="MLflow experiment of the runs (default: each project's "
                                                 "name).")
@click.option("--backend-config", "-b", default=None, metavar="JSON",
              help="The launcher of every run, as for `mlflow run --backend finetune` (detach is always on).")
@click.option("--max-parallel", default=1, show_default=True, type=click.IntRange(min=1),
              help="Runs that train at once; the others wait in the queue.")
@click.option("--max-upload-mb", default=200, show_default=True, type=click.IntRange(min=1),
              help="Largest file the page accepts.")
@click.option("--engine", type=click.Choice(["transformers", "vllm"]), default="transformers",
              show_default=True,
              help="What answers in the chat (the A/B playground) after a run.")
def studio_cmd(host, port, auth, project_dirs, workdir, experiment, backend_config, max_parallel,
               max_upload_mb, engine):
    """The Train page: pick a recipe or upload data, pick the model and the method, edit the recipe's keys,
    check it, start it as `mlflow run ... --backend finetune`, watch it, judge it against prompting, chat with
    it and promote it (docs/studio.md)."""
    import json
    from pathlib import Path

    from mlflow_finetune_plugin import paths
    from mlflow_finetune_plugin.studio.launch import StudioConfig, run_studio

    try:
        config = json.loads(backend_config) if backend_config else {}
    except ValueError as e:
        raise click.UsageError(f"--backend-config is not JSON: {e}") from None
    port_free(host, port)
    run_studio(StudioConfig(
        host=host, port=port, auth=auth, project_dirs=tuple(Path(d) for d in project_dirs),
        workdir=Path(workdir) if workdir else paths.cache_root() / "studio", experiment=experiment,
        backend_config=config, max_parallel=max_parallel, max_upload_bytes=max_upload_mb * 2**20,
        engine=engine), click.echo)
