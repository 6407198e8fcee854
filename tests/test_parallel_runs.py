"""Runs started at once against one tracking store that does not exist yet: all start, finish and register."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.helpers import SUPPORT_BOT

N_RUNS = 4


@pytest.mark.stress
@pytest.mark.integration
def test_runs_started_at_once_on_a_new_sqlite_store_all_finish_and_register(tmp_path, tracking_uri):
    assert not (tmp_path / "mlflow.db").exists()
    # One torch thread each: the runs share the machine's cores.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mlflow", "run", str(SUPPORT_BOT), "-e", "lora", "--backend", "finetune",
           "-P", "model=tiny", "-P", "max_steps=2", "-P", "eval.enabled=false"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(N_RUNS)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]
    assert not any("duplicate column" in out for out in outputs)

    client = MlflowClient()
    runs = client.search_runs(["0"])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * N_RUNS
    versions = client.search_model_versions("name='support-bot'")
    assert sorted(int(v.version) for v in versions) == list(range(1, N_RUNS + 1))
    assert {v.run_id for v in versions} == {r.info.run_id for r in runs}


def test_processes_opening_a_new_store_at_once_all_get_it(tmp_path):
    """The lock alone, without training: each process opens the new store as its first MLflow call."""
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    code = (
        "import sys, mlflow; from mlflow_finetune_plugin.tracking import ensure_store; "
        "ensure_store(sys.argv[1]); mlflow.set_tracking_uri(sys.argv[1]); "
        "print(mlflow.MlflowClient().get_experiment('0').name)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(N_RUNS)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * N_RUNS, "\n".join(o[-2000:] for o in outputs)
    assert all(out.strip().endswith("Default") for out in outputs)
