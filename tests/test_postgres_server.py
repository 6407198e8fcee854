"""The tracking server teams run: `mlflow server` on PostgreSQL (Debian's, started by the test in a folder of
its own), where writes are not serialized as on sqlite. Two runs that log the same dataset at the same moment
race in MLflow's store (it looks the dataset up, inserts it when absent, and the later commit fails on
`dataset_pk`): the race is made to happen here, and a run survives it (data/splits.despite_race). So is
MLflow's race in creating one new experiment from several processes, which `tracking.experiment_id` survives.
Then four tiny `mlflow run`s at once into one experiment all finish."""

from __future__ import annotations

import subprocess
import sys
import threading

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException

from mlflow_finetune_plugin.data.splits import DATASET_RACE, despite_race
from mlflow_finetune_plugin.tracking import experiment_id
from tests.helpers import (
    FAST_OVERRIDES,
    SUPPORT_BOT,
    forget_active_experiment,
    mlflow_server,
    needs_postgres,
    postgres,
    subprocess_env,
    use_server_store,
)

pytestmark = [pytest.mark.integration, needs_postgres]
AT_ONCE = 8  # runs logging one dataset at the same moment, per round


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on a fresh PostgreSQL, this process pointed at it: its URI."""
    root = tmp_path_factory.mktemp("postgres-server")
    (root / "client").mkdir()
    with postgres(root) as store, mlflow_server(root / "server", store=store) as uri, \
            pytest.MonkeyPatch.context() as mp:
        use_server_store(mp, uri, root / "client")
        try:
            yield uri
        finally:
            forget_active_experiment()
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)


def _at_once(log, experiment: str, round_: int) -> tuple[list[str], list[Exception]]:
    """AT_ONCE new runs of `experiment` log one new dataset through `log(client, run_id, input)`, released
    together by a barrier: (the run ids, the errors)."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = [client.create_run(experiment_id).info.run_id for _ in range(AT_ONCE)]
    given = DatasetInput(Dataset(name="train", digest=f"{round_:016x}", source_type="local",
                                 source='{"uri": "/data/train.jsonl"}'),
                         tags=[InputTag("mlflow.data.context", "training")])
    barrier, errors = threading.Barrier(AT_ONCE), []

    def one(run_id):
        barrier.wait()
        try:
            log(client, run_id, given)
        except MlflowException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(run_id,)) for run_id in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return runs, errors


def test_runs_logging_the_same_dataset_at_the_same_moment_all_keep_it(server):
    client = MlflowClient()
    client.create_experiment("race")

    def plain(c, run_id, given):  # what MLflow's client does: one request, no retry on the store's 400
        c.log_inputs(run_id, datasets=[given])

    raced = []
    for round_ in range(30):  # the race needs two commits in one moment: a few rounds make it happen
        _, errors = _at_once(plain, "race", round_)
        raced += errors
        if raced:
            break
    assert raced, "no round made the race happen: the test proves nothing on this machine"
    assert any(sign in str(raced[0]) for sign in DATASET_RACE), raced[0]

    for round_ in range(100, 110):
        def fixed(c, run_id, given):
            despite_race(lambda: plain(c, run_id, given))

        runs, errors = _at_once(fixed, "race", round_)
        assert not errors, errors[0]
        for run_id in runs:  # each run has the one dataset as its input
            (logged,) = client.get_run(run_id).inputs.dataset_inputs
            assert logged.dataset.digest == f"{round_:016x}"


def test_processes_creating_one_new_experiment_at_once_all_get_its_id(server):
    """MLflow's get-then-create of an experiment races on a SQL store (mlflow/mlflow#4123): made to happen
    with the plain client, then `tracking.experiment_id`, which every door of the plugin uses (and
    launchers.submit before `mlflow run --experiment-name`), gives every caller the one experiment."""
    def at_once(create, name):
        barrier, ids, errors = threading.Barrier(AT_ONCE), [], []

        def one():
            client = MlflowClient()
            barrier.wait()
            try:
                ids.append(create(client, name))
            except MlflowException as e:
                errors.append(e)

        threads = [threading.Thread(target=one) for _ in range(AT_ONCE)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        return ids, errors

    def plain(client, name):  # what `mlflow run --experiment-name` and mlflow.set_experiment do
        found = client.get_experiment_by_name(name)
        return found.experiment_id if found else client.create_experiment(name)

    raced = [e for i in range(30) for e in at_once(plain, f"plain-{i}")[1]][:1]
    assert raced, "no round made the race happen: the test proves nothing on this machine"
    assert "RESOURCE_ALREADY_EXISTS" in str(raced[0])
    for i in range(10):
        ids, errors = at_once(lambda client, name: experiment_id(name, client), f"guarded-{i}")
        assert not errors, errors[0]
        assert len(ids) == AT_ONCE and len(set(ids)) == 1, ids


def test_four_tiny_runs_at_once_into_one_experiment_all_finish(server, tmp_path):
    """As the issue saw it: four `mlflow run`s of the support bot at once; each logs the same train file.
    The experiment exists first, as the plugin's own doors make sure (launchers.submit): four bare `mlflow
    run --experiment-name` of a new name race in MLflow's own CLI, before the backend is reached."""
    experiment_id("at-once")
    params = [arg for key, value in {"model": "tiny", **FAST_OVERRIDES, "eval.max_examples": 2}.items()
              for arg in ("-P", f"{key}={value}")]
    env = subprocess_env(server)
    env.pop("MLFLOW_REGISTRY_URI", None)
    cmd = [sys.executable, "-m", "mlflow", "run", str(SUPPORT_BOT), "-e", "lora", "--backend", "finetune",
           *params, "--experiment-name", "at-once"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=1500)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("at-once").experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    logged = [{(i.dataset.name, i.dataset.digest) for i in r.inputs.dataset_inputs} for r in runs]
    assert logged[0] and all(one == logged[0] for one in logged), logged  # the same datasets, each run
