"""Two torchrun agents as two "nodes" on this machine (`nnodes: 2`, c10d rendezvous on 127.0.0.1), started the
way a user starts them: `mlflow run` on the first, and on the second the command `mlflow run` prints for the
other nodes.

One run and one version come out, the two nodes split the data, and a stop or a failure on either agent ends
the whole job: nothing of it is left on either side, the run is never left RUNNING.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import mlflow
import psutil
import pytest
import torch
from mlflow import MlflowClient

from mlflow_finetune_plugin.models.precision import SPEEDUP_ENV
from tests.helpers import (
    LONG_RECIPE,
    QUICK_RECIPE,
    chat_rows,
    free_port,
    job_processes,
    orphans,
    subprocess_env,
    training_started,
    wait_for,
    write_project,
)

EXPERIMENT = "multinode"
ROWS = 32


def _start_two_agents(tmp_path, tracking_uri, recipe: str):
    """`mlflow run` as the first node, then the printed command as the second, each in a session of its own
    (two terminals). Returns (first, second, run id, logs)."""
    proj = write_project(tmp_path / "proj", recipe, rows=chat_rows(ROWS))
    mlflow.set_experiment(EXPERIMENT)  # the store exists before either agent touches it
    config = {"launcher": "torchrun", "nproc_per_node": 1, "nnodes": 2,
              "rdzv_endpoint": f"127.0.0.1:{free_port()}"}
    logs = {"first": tmp_path / "first.log", "second": tmp_path / "second.log"}
    env = subprocess_env(tracking_uri)
    with open(logs["first"], "w") as out:
        first = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "run", str(proj), "-e", "lora", "--backend", "finetune",
             "--backend-config", json.dumps(config), "--experiment-name", EXPERIMENT],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        hint = re.compile(r"On each of them .*run:\n(.+)\n===")
        wait_for(lambda: first.poll() is not None or hint.search(logs["first"].read_text()), timeout=120,
                  what="the command for the other node")
        text = logs["first"].read_text()
        assert first.poll() is None, text[-3000:]
        line = hint.search(text).group(1)
        cwd, _, command = line.partition(" && ") if line.startswith("cd ") else (None, "", line)
        words = shlex.split(command)
        # as a shell reads them
        assignments = list(itertools.takewhile(lambda w: re.match(r"^[A-Z_][A-Z0-9_]*=", w), words))
        second_env = {**env, **dict(w.split("=", 1) for w in assignments)}
        # the first node's bf16 figure: every rank of both nodes decides alike
        if not torch.cuda.is_available():
            assert SPEEDUP_ENV in second_env, line
        with open(logs["second"], "w") as out:
            second = subprocess.Popen(words[len(assignments):], cwd=shlex.split(cwd)[1] if cwd else tmp_path,
                                      env=second_env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        (run_id,) = re.findall(r"--run-id ([0-9a-f]{32})", line)
    except BaseException:
        os.killpg(first.pid, signal.SIGKILL)
        raise
    return first, second, run_id, logs


def _wait_both(agents, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    try:
        for proc in agents:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in agents:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def _nothing_left(agents, run_id: str, since: float) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [p for a in agents for p in job_processes(a.pid, run_id)] + orphans(since)
        if not left:
            return
        time.sleep(0.3)
    raise AssertionError(f"left running: {[p.cmdline() for p in left]}")


@pytest.mark.integration
def test_two_agents_one_run_one_version_loss_falls(tmp_path, tracking_uri):
    first, second, run_id, logs = _start_two_agents(tmp_path, tracking_uri,
                                                    QUICK_RECIPE.replace("max_steps: 10", "max_steps: 20"))
    _wait_both([first, second])
    assert first.returncode == 0, logs["first"].read_text()[-3000:]
    assert second.returncode == 0, logs["second"].read_text()[-3000:]
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    (version,) = MlflowClient().search_model_versions("name='proj'")
    assert version.run_id == run_id
    history = sorted(MlflowClient().get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1,
                                                   21)), "every step logged once, by rank 0 of the first node"
    losses = [m.value for m in history]
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    # Two nodes x 1 rank x 2 rows a step over 32 rows: an epoch every 8 steps, where one node alone takes 16.
    assert run.data.metrics["train/epoch"] == pytest.approx(20 * 2 * 2 / ROWS)


@pytest.mark.integration
# Ctrl-C on the second agent goes through the same stop path as on the first, and a rank killed on the second
# node ends the job as tests/test_faults.py's killed rank does on one (both left to `-m stress` for CI time).
@pytest.mark.parametrize(("agent", "stop"), [("first", "Ctrl-C"), pytest.param("second", "Ctrl-C",
                                                                               marks=pytest.mark.stress),
                                             pytest.param("second", "kill -9 rank",
                                                          marks=pytest.mark.stress)])
def test_a_stop_or_failure_on_either_agent_ends_the_whole_job(tmp_path, tracking_uri, agent, stop):
    since = time.time()
    first, second, run_id, logs = _start_two_agents(tmp_path, tracking_uri, LONG_RECIPE)
    try:
        wait_for(training_started(run_id), timeout=180, what="both nodes to train")
    except AssertionError:
        _wait_both([first, second], timeout=1)
        raise
    target = {"first": first, "second": second}[agent]
    if stop == "Ctrl-C":
        os.killpg(target.pid, signal.SIGINT)  # the terminal's Ctrl-C: the agent's whole foreground group
    else:  # the training process on that node dies hard (out of memory, a bug in a kernel)
        (rank,) = [p for p in psutil.Process(target.pid).children(recursive=True)
                   if "mlflow_finetune_plugin.train.job" in " ".join(p.cmdline())]
        rank.kill()
    sent = time.monotonic()
    _wait_both([first, second], timeout=120)
    took = time.monotonic() - sent
    output = {name: path.read_text(errors="replace") for name, path in logs.items()}
    assert first.returncode != 0 and second.returncode != 0, output
    _nothing_left([first, second], run_id, since)
    run = MlflowClient().get_run(run_id)
    # A Ctrl-C on the node that owns the run is a cancel; anything on another node reads, on rank 0, as losing
    # a peer: it cannot tell a Ctrl-C there from a crash.
    expected = "KILLED" if agent == "first" else "FAILED"
    assert run.info.status == expected, (run.info.status, run.data.tags.get("finetune.error"),
                                         output["first"][-3000:])
    if expected == "FAILED":
        assert run.data.tags.get("finetune.error"), "a failed run says why"
    print(f"{stop} on the {agent} agent: both agents ended {took:.1f} s later, run {run.info.status}")
