"""`mlflow-finetune studio`: one configuration (`StudioConfig`), the objects behind the page (`Studio`: the
workspace of uploads, the run queue, the chat), and the checks that keep a page reachable by others safe:
above
loopback it needs a login, and every path a request names must lie under the recipes, the uploads or the
folders the studio was started with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.serving.server import LOOPBACK


@dataclass
class StudioConfig:
    host: str = "127.0.0.1"
    port: int = 7870
    auth: str | None = None
    project_dirs: tuple[Path, ...] = ()
    workdir: Path = Path(".")
    experiment: str | None = None
    backend_config: dict = field(default_factory=dict)
    max_parallel: int = 1
    max_upload_bytes: int = 200 * 2**20
    engine: str = "transformers"


def credentials(config: StudioConfig) -> tuple[str, str] | None:
    """Gradio's auth tuple; refused above loopback without one (anyone who reaches the port could start
    runs)."""
    from mlflow_finetune_plugin.serving.playground.launch import parse_auth

    auth = parse_auth(config.auth)
    if config.host not in LOOPBACK and auth is None:
        raise FinetuneError(
            f"the studio starts training runs: on {config.host} (above loopback) it needs a login. "
            "Give --auth USER:PASSWORD (or set MLFLOW_FINETUNE_STUDIO_AUTH), or keep --host "
            "127.0.0.1.")
    return auth


class Studio:
    """What the page works with: uploads and their projects (`workspace`), the queue (`launcher`), the
    chat."""

    def __init__(self, config: StudioConfig):
        from mlflow_finetune_plugin.studio.chat import Chats
        from mlflow_finetune_plugin.studio.files import Workspace
        from mlflow_finetune_plugin.studio.runs import Launcher

        self.config = config
        config.workdir.mkdir(parents=True, exist_ok=True)
        self.workspace = Workspace(config.workdir, [Path(d).resolve() for d in config.project_dirs],
                                   max_upload_bytes=config.max_upload_bytes)
        self.launcher = Launcher(config.workdir / "jobs", backend_config=config.backend_config or None,
                                 max_parallel=config.max_parallel)
        self.chats = Chats(config.host, config.auth, config.workdir, config.engine)

    def start(self) -> Studio:
        self.launcher.start()
        return self

    def close(self) -> None:
        self.chats.close()
        self.launcher.close()

    def projects(self):
        """The bundled recipes, the projects under --project-dir, and the ones made from uploads."""
        from mlflow_finetune_plugin.studio.recipe_form import project_choices

        return project_choices(extra_roots=(*self.config.project_dirs, self.workspace.root / "projects"))

    def project(self, value: str) -> Path:
        """A project folder a request named, refused outside the allowed folders."""
        if not value:
            raise FinetuneError(
                "pick a project (a bundled recipe, a folder given with --project-dir, or upload "
                "data files)")
        return self.workspace.check_request(value, {})


def run_studio(config: StudioConfig, echo=print) -> None:
    """Start the studio and serve it until interrupted; runs it started go on after it stops."""
    import os
    import signal

    from mlflow_finetune_plugin.studio.app import build, launch

    # a stop signal ends the page as Ctrl-C does: the chat child is stopped with it
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    auth = credentials(config)
    studio = Studio(config).start()
    echo(
        f"Studio on http://{config.host}:{config.port} (uploads and jobs in {config.workdir}); the runs it "
        "starts are ordinary MLflow runs and go on if it stops.")
    try:
        launch(build(studio), config, auth, block=True)
    finally:
        studio.close()
