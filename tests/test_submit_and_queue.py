"""The one way to start a run (launchers/submit.py) and the one job queue (launchers/queue.py).

The queue's tests start fake commands (a Python one-liner that prints what `mlflow run` prints once it has
started a run), so they check the order, the slots and a cancel in a second; submit's start a tiny fine-tune
for real."""

from __future__ import annotations

import sys
import time

import pytest

from mlflow_finetune_plugin.launchers.queue import JobStore, Queue
from tests.helpers import chat_rows, write_project

FAST = ("train:\n  max_steps: 2\n  batch_size: 4\n  logging_steps: 1\n  save_steps: 2\n"
        "eval:\n  enabled: false\nregistry:\n  enabled: false\n")


def _fake_start(run_id: str) -> list[str]:
    """A command that says what a detached `mlflow run` says once its run exists."""
    return [sys.executable, "-c", f"print('INFO mlflow.projects: === Run {run_id} started ===')"]


class _FakeQueue(Queue):
    """A Queue over job records whose command is a fake start; `ran` keeps the order the jobs started in."""

    def __init__(self, state_dir, max_parallel, starting=None):
        super().__init__(JobStore(state_dir), max_parallel, starting=starting, busy=("running",),
                         cwd=str(state_dir), env={})
        self.ran = []

    def command(self, record):
        return _fake_start(record["run"])

    def started(self, record, outcome):
        self.ran.append(record["id"])
        self.store.update(record["id"], lambda r: r.update(state="running", run_id=outcome.run_id,
                                                           error=outcome.error))


def _add(queue, n: int, created: float) -> str:
    job_id = f"job-{n:012x}"
    queue.store.save({"id": job_id, "state": "queued", "created": created, "run": f"{n:032x}",
                      "run_id": None})
    return job_id


def test_the_queue_starts_the_oldest_first_within_max_parallel_and_a_cancelled_job_never(tmp_path):
    queue = _FakeQueue(tmp_path / "state", max_parallel=2)
    now = time.time()
    third, first, second, fourth = _add(queue, 3, now + 2), _add(queue, 1, now), _add(queue, 2, now + 1), \
        _add(queue, 4, now + 3)
    dropped = queue.drop(second, {"state": "killed", "error": "stopped before it started"})
    assert dropped["state"] == "killed"
    queue.step()
    assert queue.ran == [first, third]  # two slots, oldest first; the dropped job passed over
    assert queue.store.get(first)["run_id"] == f"{1:032x}" and queue.store.get(second)["run_id"] is None
    queue.step()
    assert queue.ran == [first, third]  # both slots still held
    queue.store.update(first, lambda r: r.update(state="finished"))  # its run ended: a slot frees
    queue.step()
    assert queue.ran == [first, third, fourth]
    assert queue.drop(fourth, {"state": "killed"})["state"] == "running"  # started: not the queue's to drop
    assert [r["state"] for r in queue.store.all()] == ["running", "running", "killed", "finished"]


def test_a_claimed_job_holds_a_slot_and_is_recovered_when_its_starter_is_gone(tmp_path):
    from mlflow_finetune_plugin.launchers import queue as queues

    queue = _FakeQueue(tmp_path / "state", max_parallel=1, starting="starting")
    now = time.time()
    first, second = _add(queue, 1, now), _add(queue, 2, now + 1)
    claimed = queue.claim()
    assert claimed["id"] == first and queue.store.get(first)["state"] == "starting"
    assert queue.claim() is None  # the starting job holds the only slot
    # Its starter died before `mlflow run` created a run: the job waits again, and starts at the next pass.
    queues._LAUNCHING.discard(first)
    queue.store.update(first, lambda r: r.update(launcher={"pid": 2 ** 22 + 1, "since": 0.0}))
    assert queue.refresh(queue.store.get(first))["state"] == "queued"
    queue.step()
    assert queue.ran == [first] and queue.store.get(second)["state"] == "queued"
    # A start whose log names its run is that start's outcome: recovered as started, not run again.
    queue.store.update(second, lambda r: r.update(state="starting"))
    queue.log_path(queue.store.get(second)).write_text(f"=== Run {'e' * 32} started ===\n")
    assert queue.refresh(queue.store.get(second))["run_id"] == "e" * 32
    with pytest.raises(Exception, match="max_parallel"):
        _FakeQueue(tmp_path / "other", max_parallel=0)


def test_start_reads_the_run_id_or_why_no_run_started(tmp_path):
    from mlflow_finetune_plugin.launchers.submit import command, start

    started = start(_fake_start("a" * 32), tmp_path / "ok.log", tmp_path, {})
    assert started.run_id == "a" * 32 and started.error == ""
    refused = start([sys.executable, "-c", "print('ERROR mlflow.cli: === no such launcher ===')"],
                    tmp_path / "no.log", tmp_path, {})
    assert refused.run_id is None and refused.error == "no such launcher"
    again = start([sys.executable, "-c", "raise SystemExit(1)"], tmp_path / "ok.log", tmp_path, {})
    assert again.run_id == "a" * 32  # its log names a run already: not started twice
    argv = command("/p", "lora", {"train.max_steps": 3}, {"launcher": "local"}, "exp")
    assert argv[1:] == ["-m", "mlflow", "run", "/p", "-e", "lora", "--backend", "finetune",
                        "--experiment-name", "exp",
                        "--backend-config", '{"launcher": "local", "detach": true}',
                        "-P", "train.max_steps=3"]


@pytest.mark.integration
def test_submit_starts_a_tiny_run_followed_or_waited_for_and_says_why_it_started_none(tmp_path, tracking_uri):
    from mlflow import MlflowClient

    from mlflow_finetune_plugin.launchers.submit import submit

    project = write_project(tmp_path / "bot", FAST, rows=chat_rows(8))
    refused = submit(project, "lora", {"train.lerning_rate": "1e-4"}, mode="follow")
    assert refused.run_id is None and "train.lerning_rate: unknown key" in refused.error
    followed = submit(project, "lora", {}, experiment_name="doors", mode="follow", run_name="tiny")
    assert followed.run_id and followed.submitted.wait() is True
    run = MlflowClient().get_run(followed.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny" and "train/loss" in run.data.metrics
    assert followed.status() == "FINISHED"
    waited = submit(project, "lora", {"train.max_steps": "1"}, {"launcher": "local"})  # waits for its end
    assert waited.status() == "FINISHED" and waited.run_id != followed.run_id
