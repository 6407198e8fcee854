"""The tracking store a process talks to (created once, under a lock), an experiment found or created by name
(safe when several processes create it at once), and how a run records its own end: the error as a tag and an
artifact, and the terminal status."""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path

from mlflow import MlflowClient

from mlflow_finetune_plugin import tags


def ensure_store(tracking_uri: str | None = None) -> None:
    """Open the tracking store (and the registry, when it is the same database) before any other MLflow call.

    MLflow creates a new sqlite store by running its schema migration, unlocked: several processes opening one
    new store at once race in it (`duplicate column name: step`) and all but one fail. The first process to
    take the file lock creates the store; the others wait and then find it complete. Other stores are left to
    MLflow.
    """
    import mlflow
    from filelock import FileLock
    from mlflow.tracking._model_registry.utils import _get_store as registry_store
    from mlflow.tracking._tracking_service.utils import _get_store as tracking_store

    uri = tracking_uri or mlflow.get_tracking_uri()
    db = sqlite_path(uri)
    if db is None:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock"):
        tracking_store(uri)
        registry_uri = mlflow.get_registry_uri()
        if sqlite_path(registry_uri) == db:
            registry_store(registry_uri)


def pin_registry_uri() -> None:
    """Resolve the model registry's URI once, for the whole process, before any MLflow thread starts.

    Left unresolved, every `MlflowClient()` looks for an active Spark session (`from pyspark.sql import ...`),
    and without pyspark installed that failed import runs again each time: in MLflow's system-metrics thread
    once a sample. An import takes the interpreter's import lock, then MLflow's import-hook lock (its
    `ImportHookFinder`), while `mlflow.genai.evaluate` takes the two the other way round (it fires autologging
    hooks, which import flavor modules, under the import-hook lock): the run hung there for good once (issue
    58). Pinned, a client imports nothing and that thread never enters the import system.
    """
    import mlflow

    mlflow.set_registry_uri(mlflow.get_registry_uri())


def experiment_id(name: str, client: MlflowClient | None = None) -> str:
    """The id of the experiment `name`, created when there is none.

    Safe when several processes create the same new experiment at once: MLflow's get-then-create lets all but
    one fail with RESOURCE_ALREADY_EXISTS (mlflow/mlflow#4123; on PostgreSQL and MySQL, where writes are not
    serialized as on sqlite). The loser looks the experiment up again and gets the winner's id."""
    client = client or MlflowClient()

    def found_or_created() -> str:
        found = client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else client.create_experiment(name)

    return despite_race(found_or_created, signs=("RESOURCE_ALREADY_EXISTS",))


# A unique key another writer committed first, as each SQL store words it (PostgreSQL, MySQL, SQLite).
# MLflow's SQL store looks a row up and inserts it when absent (a dataset, an alias, a tag): two writers at
# one moment both insert, and the later commit fails; its HTTP client does not retry the BAD_REQUEST. Asked
# again, the store finds the row the other committed and links or updates it.
STORE_RACE = ("duplicate key value violates unique constraint", "Duplicate entry", "UNIQUE constraint failed")


def despite_race(call, attempts: int = 4, signs=STORE_RACE):
    """`call()` (one write to the tracking or registry store), asked again when the store refused it because
    another writer inserted the same row at the same moment (`signs`: what the refusal says)."""
    import time

    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return call()
        except MlflowException as e:
            said = f"{e.error_code} {e}"  # the code: a SQL store names it in its field only
            if attempt == attempts - 1 or not any(sign in said for sign in signs):
                raise
            time.sleep(0.1 * (attempt + 1))  # the other writer commits; then the row is found


def sqlite_path(uri: str | None) -> Path | None:
    """The database file of a `sqlite:///...` URI; None for any other store (and for in-memory sqlite)."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path).resolve()


def record_failure(run_id: str, exc: BaseException, status: str = "FAILED") -> None:
    """Mark the run terminated with `status`, the error as a tag and the traceback as `error.txt`.

    A FinetuneError's message is the tag and the start of error.txt; where it was raised from another error (a
    rehearsal stage's, a reward function's), that error's traceback follows in error.txt: the message says
    what to do, the traceback where it went wrong."""
    from mlflow_finetune_plugin.errors import FinetuneError

    client = MlflowClient()
    message = str(exc) if isinstance(exc, FinetuneError) else f"{type(exc).__name__}: {exc}"
    if status == "KILLED":
        message = "cancelled" + (f" ({exc})" if str(exc) else "")
    try:
        client.set_tag(run_id, tags.ERROR, message[:4900])
        text = _with_cause(message, exc) if isinstance(exc, FinetuneError) else "".join(
            traceback.format_exception(exc))
        client.log_text(run_id, text, "error.txt")
    finally:
        client.set_terminated(run_id, status)


def _with_cause(message: str, exc: BaseException) -> str:
    """A FinetuneError's text for error.txt: its message, then the traceback of the error it was raised
    from."""
    if exc.__cause__ is None:
        return message
    return f"{message}\n\nCaused by:\n{''.join(traceback.format_exception(exc.__cause__))}"


# The step the run's results are logged at: the training's last step while the pipeline evaluates
# (`results_at_step`), 0 otherwise (e.g. `mlflow-finetune evaluate`). At step 0 they would sit behind the
# Trainer's own `eval/tuned/loss` of the last save step, and MLflow's latest value of a metric (what gates and
# `models` read) is the one at the highest step: the final evaluation would not count.
_results_step = 0


@contextlib.contextmanager
def results_at_step(step: int):
    """Within the block, `log_results` logs at `step`; back to 0 after, so no later run in the process
    inherits it."""
    global _results_step
    _results_step = int(step)
    try:
        yield
    finally:
        _results_step = 0


def log_results(metrics: dict[str, float]) -> None:
    """Log the run's final results (evaluation, forgetting) at the last training step."""
    import mlflow

    mlflow.log_metrics(metrics, step=_results_step)
