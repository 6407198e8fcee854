"""Faults: a training process killed hard leaves its run FAILED with its last checkpoint logged, and resuming
it ends where an uninterrupted run ends; a dead rank fails the whole torchrun job; out of memory and disk full
say what to change."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from mlflow_finetune_plugin.backend import FinetuneBackend
from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.train import job, resume
from tests.helpers import chat_rows, wait_for, write_project

EXPERIMENT = "faults"
# Long enough that a SIGKILL right after the first checkpoint lands well before the end (~0.2 s a step).
RESUMABLE = ("data:\n  max_length: 64\ntrain:\n  max_steps: 20\n  batch_size: 2\n  learning_rate: 5.0e-3\n"
             "  logging_steps: 1\n  save_steps: 5\n  save_total_limit: 10\neval:\n  enabled: false\n")


def _submit(proj, tracking_uri, params=None, config=None):
    exp_id = mlflow.set_experiment(EXPERIMENT).experiment_id
    return FinetuneBackend().run(str(proj), "lora", params or {}, None, {"SYNCHRONOUS": True,
                                                                         **(config or {})}, tracking_uri,
                                 exp_id)




def _error(run_id) -> str:
    return MlflowClient().get_run(run_id).data.tags.get("finetune.error", "(no finetune.error tag)")


def _whole_checkpoints(run_id) -> list[str]:
    return resume.resumable_checkpoints(MlflowClient(), run_id)


def _final_adapter(run_id) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    run = MlflowClient().get_run(run_id)
    name, version = run.data.tags["finetune.registered_model"], run.data.tags["finetune.registered_version"]
    local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}")
    return load_file(os.path.join(local, "artifacts", "adapter", "adapter_model.safetensors"))


@pytest.mark.integration
def test_sigkill_leaves_failed_run_with_checkpoint_and_resume_matches_uninterrupted(tmp_path, tracking_uri,
                                                                                   record_property):
    proj = write_project(tmp_path / "resumable", RESUMABLE, rows=chat_rows(48))
    client = MlflowClient()

    a = _submit(proj, tracking_uri)
    assert a.wait() is True

    b = _submit(proj, tracking_uri)
    wait_for(lambda: _whole_checkpoints(b.run_id), interval=0.05, what="run B's first checkpoint")
    os.killpg(b.process.pid, signal.SIGKILL)
    assert b.wait() is False
    run_b = client.get_run(b.run_id)
    assert run_b.info.status == "FAILED"
    assert "SIGKILL" in run_b.data.tags["finetune.error"] and "checkpoints/" in run_b.data.tags[
        "finetune.error"]
    logged = _whole_checkpoints(b.run_id)
    last_step = max(int(p.rsplit("-", 1)[-1]) for p in logged)
    assert last_step < 20, "B was killed after it finished: nothing left to resume"

    c = _submit(proj, tracking_uri, params={"resume": b.run_id})
    assert c.wait() is True, _error(c.run_id)
    run_c = client.get_run(c.run_id)
    assert run_c.data.tags["finetune.resumed_from"] == f"{b.run_id}/checkpoints/checkpoint-{last_step}"

    # Same seed, same data order (data_seed), RNG state restored from the checkpoint: the same adapter.
    final_a, final_c = _final_adapter(a.run_id), _final_adapter(c.run_id)
    assert final_a.keys() == final_c.keys()
    worst = max((final_a[k] - final_c[k]).abs().max().item() for k in final_a)
    record_property("max_abs_diff_resumed_vs_uninterrupted", worst)
    assert worst < 1e-5, f"resumed adapter differs from the uninterrupted one by up to {worst}"
    # ... and it did train past the checkpoint: the adapter moved since step `last_step`.
    from safetensors.torch import load_file

    at_kill = load_file(mlflow.artifacts.download_artifacts(
        run_id=b.run_id, artifact_path=f"checkpoints/checkpoint-{last_step}/adapter_model.safetensors"))
    assert max((at_kill[k] - final_c[k]).abs().max().item() for k in final_c) > 1e-3


@pytest.mark.integration
def test_a_rank_killed_under_torchrun_fails_the_run_and_both_ranks_resume_it(tmp_path, tracking_uri):
    import psutil

    torchrun = {"launcher": "torchrun", "nproc_per_node": 2}
    long = RESUMABLE.replace("max_steps: 20", "max_steps: 100000").replace("save_steps: 5", "save_steps: 3")
    proj = write_project(tmp_path / "p", long, rows=chat_rows(32))
    b = _submit(proj, tracking_uri, config=torchrun)
    wait_for(lambda: _whole_checkpoints(b.run_id), what="a checkpoint")
    ranks = {}
    for p in psutil.Process(b.process.pid).children(recursive=True):
        try:
            if "mlflow_finetune_plugin.train.job" in " ".join(p.cmdline()):
                ranks[p.environ().get("RANK")] = p
        except psutil.NoSuchProcess:
            continue
    assert set(ranks) == {"0", "1"}
    ranks["1"].send_signal(signal.SIGKILL)
    assert b.wait() is False
    run_b = MlflowClient().get_run(b.run_id)
    assert run_b.info.status == "FAILED"  # not KILLED: nobody cancelled it
    # Rank 0 learns it from torchrun's SIGTERM or, first, from gloo losing its peer mid all-reduce.
    error = run_b.data.tags["finetune.error"]
    assert "another training process of this job failed" in error or "gloo" in error, error
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks.values()),
              timeout=60, what="rank 0 to stop too")

    # Rank 0 downloads B's last checkpoint; rank 1 waits for it, then both continue from that step.
    last_step = max(int(p.rsplit("-", 1)[-1]) for p in _whole_checkpoints(b.run_id))
    c = _submit(proj, tracking_uri, config=torchrun,
                params={"resume": b.run_id, "train.max_steps": str(last_step + 2)})
    assert c.wait() is True, _error(c.run_id)
    run_c = MlflowClient().get_run(c.run_id)
    assert run_c.data.tags["finetune.resumed_from"] == f"{b.run_id}/checkpoints/checkpoint-{last_step}"
    steps = [m.step for m in MlflowClient().get_metric_history(c.run_id, "train/loss")]
    assert sorted(steps) == [last_step + 1, last_step + 2]


@pytest.mark.parametrize("error, expected", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     ["out of memory", "train.batch_size", "train.gradient_checkpointing: true", "-e qlora"]),
    (
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 34359738368 bytes"), ["out of memory", "train.batch_size",
                                            "train.gradient_checkpointing: true", "-e qlora"]),
    (OSError(errno.ENOSPC, "No space left on device", "/cache/runs/x/checkpoints/checkpoint-5/optimizer.pt"),
     ["disk full", "checkpoint-5/optimizer.pt", "MLFLOW_FINETUNE_CACHE", "train.save_total_limit"]),
])
def test_out_of_memory_and_disk_full_say_what_to_change(tmp_path, tracking_uri, monkeypatch, capsys, error,
                                                        expected):
    proj = write_project(tmp_path / "p", RESUMABLE, rows=chat_rows(8))
    recipe = load_recipe(proj)

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(job, "fine_tune", fails)
    mlflow.set_experiment(EXPERIMENT)
    ctrl_c = signal.getsignal(signal.SIGINT)
    assert job.run(recipe) == 1
    assert signal.getsignal(signal.SIGINT) is ctrl_c  # ignored only while the run was being ended
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FAILED"
    message = run.data.tags["finetune.error"]
    for part in expected:
        assert part in message, message
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and expected[0] in stderr


def test_resume_skips_a_checkpoint_whose_copy_never_finished(tmp_path, tracking_uri):
    """A process killed while copying checkpoint-10 leaves its files (possibly truncated) without the
    completion mark: resume takes checkpoint-5, the last one the run marked; runs without any mark are judged
    by their files."""
    from mlflow_finetune_plugin.tags import LAST_CHECKPOINT

    def folder(step: int, optimizer: bytes = b"state") -> Path:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "trainer_state.json").write_text("{}")
        (d / "adapter_model.safetensors").write_bytes(b"weights")
        (d / "optimizer.pt").write_bytes(optimizer)
        return d

    client = MlflowClient()
    with mlflow.start_run() as marked:
        for step in (5, 10):
            mlflow.log_artifacts(str(folder(step)), f"checkpoints/checkpoint-{step}")
            if step == 5:
                mlflow.set_tag(LAST_CHECKPOINT, "checkpoints/checkpoint-5")
    with mlflow.start_run() as unmarked:
        mlflow.log_artifacts(str(tmp_path / "checkpoint-5"), "checkpoints/checkpoint-5")
        # empty file: cut short
        mlflow.log_artifacts(str(folder(15, optimizer=b"")), "checkpoints/checkpoint-15")
    assert resume.resumable_checkpoints(client, marked.info.run_id) == ["checkpoints/checkpoint-5"]
    assert resume.resumable_checkpoints(client, unmarked.info.run_id) == ["checkpoints/checkpoint-5"]

    with mlflow.start_run() as current:
        local = resume.resume_checkpoint(marked.info.run_id, current.info.run_id)
    assert Path(local).name == "checkpoint-5" and (Path(local) / "optimizer.pt").read_bytes() == b"state"
    assert client.get_run(current.info.run_id).data.tags["finetune.resumed_from"] == \
        f"{marked.info.run_id}/checkpoints/checkpoint-5"
