"""The backend contract: validate before any run exists; SubmittedRun waits, reports status, cancels;
every run ends FINISHED, FAILED or KILLED, never RUNNING. Real training subprocesses on the tiny model."""

from __future__ import annotations

import json
import os
import signal
import time

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import ExecutionException

from mlflow_finetune_plugin.backend import FinetuneBackend
from tests.helpers import chat_rows, wait_for, write_project

FAST = ("train:\n  max_steps: 3\n  batch_size: 4\n  logging_steps: 1\n  save_steps: 2\neval:\n  enabled: "
        "false\n")


def _submit(proj, tracking_uri, params=None, config=None, entry_point="lora", synchronous=True):
    exp_id = mlflow.set_experiment("backend-test").experiment_id
    backend_config = {"SYNCHRONOUS": synchronous, **(config or {})}
    return FinetuneBackend().run(str(proj), entry_point, params or {}, None, backend_config, tracking_uri,
                                 exp_id)


def _runs():
    exp = mlflow.get_experiment_by_name("backend-test")
    return [] if exp is None else MlflowClient().search_runs([exp.experiment_id])




def test_bad_recipe_is_refused_before_a_run_exists(tmp_path, tracking_uri):
    proj = write_project(tmp_path / "p", FAST, rows=chat_rows(8))
    with pytest.raises(ExecutionException) as info:
        _submit(proj, tracking_uri, params={"train.lerning_rate": "1e-4", "lora.r": "zero"})
    text = str(info.value)
    assert "train.lerning_rate: unknown key" in text and "lora.r" in text
    assert _runs() == []


def test_bad_data_is_refused_with_file_and_line(tmp_path, tracking_uri):
    proj = write_project(tmp_path / "p", FAST, rows=chat_rows(5))
    lines = (proj / "data" / "train.jsonl").read_text().splitlines()
    lines[2] = '{"messages": [{"role": "user", "content": "hi"'  # broken JSON on line 3
    (proj / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ExecutionException) as info:
        _submit(proj, tracking_uri)
    assert "train.jsonl:3" in str(info.value)
    assert _runs() == []


def test_unknown_backend_config_key_lists_valid_ones(tmp_path, tracking_uri):
    proj = write_project(tmp_path / "p", FAST, rows=chat_rows(8))
    with pytest.raises(ExecutionException) as info:
        _submit(proj, tracking_uri, config={"detatch": True, "launcher": "slurm"})
    text = str(info.value)
    assert "'detatch'" in text and "did you mean 'detach'" in text and "launcher 'slurm'" in text
    assert "nproc_per_node" in text
    assert _runs() == []


def test_run_finishes_logs_and_registers(tmp_path, tracking_uri):
    proj = write_project(tmp_path / "bot", FAST, rows=chat_rows(16))
    submitted = _submit(proj, tracking_uri)
    assert submitted.get_status() in ("RUNNING", "FINISHED")
    assert submitted.wait() is True
    assert submitted.get_status() == "FINISHED"
    run = MlflowClient().get_run(submitted.run_id)
    assert run.data.params["train.max_steps"] == "3"
    assert run.data.tags["finetune.method"] == "lora"
    assert "train/loss" in run.data.metrics
    assert run.data.tags["finetune.registered_model"] == "bot"
    version = MlflowClient().get_model_version_by_alias("bot", "challenger")
    assert version.run_id == submitted.run_id
    # Checkpoints every save_steps (2), and at the last step (3), whatever save_steps says (issue 69).
    assert [a.path for a in MlflowClient().list_artifacts(submitted.run_id, "checkpoints")] == [
        "checkpoints/checkpoint-2", "checkpoints/checkpoint-3"]
    assert run.data.tags["finetune.last_checkpoint"] == "checkpoints/checkpoint-3"


def test_failure_ends_failed_with_the_error(tmp_path, tracking_uri):
    # A hub id that cannot be reached (the tests run with HF_HUB_OFFLINE=1): fails inside the training
    # process.
    proj = write_project(tmp_path / "p", FAST + "model:\n  name: no-such-org/no-such-model\n",
                         rows=chat_rows(8))
    submitted = _submit(proj, tracking_uri)
    assert submitted.wait() is False
    run = MlflowClient().get_run(submitted.run_id)
    assert run.info.status == "FAILED"
    assert "could not load model 'no-such-org/no-such-model'" in run.data.tags["finetune.error"]
    error_txt = mlflow.artifacts.load_text(f"runs:/{submitted.run_id}/error.txt")
    assert "no-such-org/no-such-model" in error_txt


def test_cli_style_wait_raises_when_the_run_fails(tmp_path, tracking_uri):
    proj = write_project(tmp_path / "p", FAST + "model:\n  name: no-such-org/no-such-model\n",
                         rows=chat_rows(8))
    with pytest.raises(ExecutionException) as info:
        _submit(proj, tracking_uri, synchronous=False)  # as from `mlflow run`: the backend waits itself
    assert "FAILED" in str(info.value) and "could not load model" in str(info.value)


def _start_long_run(tmp_path, tracking_uri, **kw):
    long = FAST.replace("max_steps: 3", "max_steps: 100000").replace("save_steps: 2", "save_steps: 20")
    proj = write_project(tmp_path / "p", long, rows=chat_rows(32))
    submitted = _submit(proj, tracking_uri, **kw)
    client = MlflowClient()
    wait_for(lambda: "train/loss" in client.get_run(submitted.run_id).data.metrics, timeout=120,
             what="training to start", interval=0.5)
    return submitted


def test_cancel_ends_killed_and_leaves_no_process(tmp_path, tracking_uri):
    submitted = _start_long_run(tmp_path, tracking_uri)
    assert submitted.get_status() == "RUNNING"
    submitted.cancel()
    assert submitted.get_status() == "KILLED"
    assert submitted.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(submitted.process.pid, 0)  # the whole process group is gone


# tests/test_faults.py kills a run the same way and checks the same (FAILED, SIGKILL in finetune.error) and
# more:
# this one is left to `-m stress` for CI time.
@pytest.mark.stress
def test_sigkill_mid_run_ends_failed_not_running(tmp_path, tracking_uri):
    submitted = _start_long_run(tmp_path, tracking_uri)
    os.killpg(submitted.process.pid, signal.SIGKILL)
    assert submitted.wait() is False
    run = MlflowClient().get_run(submitted.run_id)
    assert run.info.status == "FAILED"
    assert "SIGKILL" in run.data.tags["finetune.error"]


def test_detach_returns_at_once_and_the_job_ends_its_own_run(tmp_path, tracking_uri):
    proj = write_project(tmp_path / "p", FAST, rows=chat_rows(16))
    started = time.monotonic()
    submitted = _submit(proj, tracking_uri, config={"detach": True}, synchronous=False)
    assert time.monotonic() - started < 30
    client = MlflowClient()
    assert client.get_run(submitted.run_id).info.status == "RUNNING"
    # Nobody calls wait(): the supervisor process must end the run by itself.
    wait_for(lambda: client.get_run(submitted.run_id).info.status != "RUNNING", timeout=300,
             what="detached run", interval=0.5)
    assert client.get_run(submitted.run_id).info.status == "FINISHED"
    assert submitted.process.wait(timeout=60) == 0  # the supervisor exits once it has checked the run
    from mlflow_finetune_plugin.paths import job_dir

    job = json.loads((job_dir(submitted.run_id) / "job.json").read_text())
    assert job["detached"] is True
    assert "ended FINISHED" in (job_dir(submitted.run_id) / "job.log").read_text()


@pytest.mark.parametrize("last_step, evaluates", [(3, False), (4, True)])
def test_the_last_step_is_saved_but_not_evaluated_again(last_step, evaluates):
    """transformers saves and evaluates after the last step whatever save_steps/eval_steps say: the run keeps
    that checkpoint (its final state, to resume or register), and evaluates the final model itself, so only
    the regular evaluations (every 2 steps here) are kept."""
    from transformers import TrainerControl, TrainerState

    from mlflow_finetune_plugin.train.callbacks import CheckpointLogger

    state = TrainerState(global_step=last_step, save_steps=2, eval_steps=2)
    control = TrainerControl(should_training_stop=True, should_save=True, should_evaluate=True)
    control = CheckpointLogger().on_step_end(None, state, control)
    assert (control.should_save, control.should_evaluate) == (True, evaluates)
    mid = CheckpointLogger().on_step_end(None, TrainerState(global_step=2, save_steps=2, eval_steps=2),
                                         TrainerControl(should_save=True, should_evaluate=True))
    assert mid.should_save and mid.should_evaluate


def test_the_end_of_each_of_the_last_epochs_is_saved_once():
    """`train.save_last_epochs: 3` over 5 epochs of 4 steps: the ends of epochs 3, 4 and 5 are saved, whatever
    save_steps is; a step saved already at its end (a save step, the last step) is not saved twice."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from mlflow_finetune_plugin.train.callbacks import CheckpointLogger

    logger, saved = CheckpointLogger(last_epochs=3), []
    for epoch in range(1, 6):
        state = TrainerState(global_step=4 * epoch, epoch=float(epoch), num_train_epochs=5,
                             is_world_process_zero=False)
        if epoch in (2, 5):  # a save step (save_steps 8), and the last step: saved at the step's end
            logger.on_save(SimpleNamespace(world_size=1), state, TrainerControl())
        if logger.on_epoch_end(None, state, TrainerControl()).should_save:
            saved.append(state.global_step)
    assert saved == [12, 16]  # and 20, the last step, once at its own end
    assert not CheckpointLogger().on_epoch_end(None, state, TrainerControl()).should_save  # off by default
