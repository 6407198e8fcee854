"""kill -9 at the worst moments of a run: while a checkpoint is being uploaded, while the model is being
logged, and between registering a version and pointing the alias at it. Each leaves the run FAILED (never
RUNNING), nothing that `models:/NAME@challenger` resolves to comes from the killed run, and `-P resume=RUN_ID`
finishes the job.

The moments are reached for real, in the training process, by a `sitecustomize` put on its PYTHONPATH for the
test only: it lets the real call start (or get halfway), writes a marker file and waits to be killed.
"""

from __future__ import annotations

import os
import signal
import textwrap

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.backend import FinetuneBackend
from mlflow_finetune_plugin.train import resume
from tests.helpers import REPO, chat_rows, wait_for, write_project

EXPERIMENT = "kill-moments"
# The last step (15) is a save step: a run killed while publishing resumes from its final checkpoint.
RECIPE = ("data:\n  max_length: 64\ntrain:\n  max_steps: 15\n  batch_size: 2\n  learning_rate: 5.0e-3\n"
          "  logging_steps: 1\n  save_steps: 5\n  save_total_limit: 10\neval:\n  enabled: false\n"
          "registry:\n  alias: challenger\n")

HOOK = textwrap.dedent('''
    """Test-only fault injection (tests/test_kill_moments.py): pause the training process at one moment."""
    import os
    import time

    MOMENT, MARKER = os.environ["FINETUNE_TEST_PAUSE_AT"], os.environ["FINETUNE_TEST_MARKER"]


    def _pause():
        with open(MARKER, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)


    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    _log_artifacts = LocalArtifactRepository.log_artifacts


    def log_artifacts(self, local_dir, artifact_path=None):
        if MOMENT == "checkpoint" and (artifact_path or "").endswith("checkpoint-10"):
            # Halfway: one file of the second checkpoint is in, the rest never arrives.
            first = sorted(os.listdir(local_dir))[0]
            self.log_artifact(os.path.join(local_dir, first), artifact_path)
            _pause()
        _log_artifacts(self, local_dir, artifact_path)
        if MOMENT == "model" and os.path.isdir(os.path.join(local_dir, "artifacts")):
            _pause()  # the fine-tuned model's files are in; MLflow has not finalized it, nothing is \
registered


    LocalArtifactRepository.log_artifacts = log_artifacts

    from mlflow import MlflowClient

    _set_alias = MlflowClient.set_registered_model_alias


    def set_registered_model_alias(self, name, alias, version):
        if MOMENT == "register":
            _pause()  # the version exists; the alias does not point at it yet
        return _set_alias(self, name, alias, version)


    MlflowClient.set_registered_model_alias = set_registered_model_alias
''')


def _submit(proj, tracking_uri, params=None):
    exp_id = mlflow.set_experiment(EXPERIMENT).experiment_id
    return FinetuneBackend().run(str(proj), "lora", params or {}, None, {"SYNCHRONOUS": True}, tracking_uri,
                                 exp_id)




@pytest.mark.integration
# Killed while the model is logged or registered: later moments of the same resume path, left to `-m stress`
# for CI time (tests/test_faults.py kills a run in training and resumes it too).
@pytest.mark.parametrize("moment", ["checkpoint", pytest.param("model", marks=pytest.mark.stress),
                                    pytest.param("register", marks=pytest.mark.stress)])
def test_kill_9_at_the_worst_moment_then_resume_finishes(tmp_path, tracking_uri, monkeypatch, moment):
    proj = write_project(tmp_path / "bot", RECIPE, rows=chat_rows(48))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    marker = tmp_path / "paused"
    client = MlflowClient()

    with monkeypatch.context() as m:
        m.setenv("PYTHONPATH", os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")]))
        m.setenv("FINETUNE_TEST_PAUSE_AT", moment)
        m.setenv("FINETUNE_TEST_MARKER", str(marker))
        killed = _submit(proj, tracking_uri)
        try:
            wait_for(marker.exists, timeout=240, what=f"the job to reach the {moment} moment", interval=0.1)
        finally:
            os.killpg(killed.process.pid, signal.SIGKILL)
    assert killed.wait() is False
    run = client.get_run(killed.run_id)
    assert run.info.status == "FAILED", run.info.status
    assert "SIGKILL" in run.data.tags[tags.ERROR]

    # Nothing `@challenger` resolves to comes from the killed run.
    versions = client.search_model_versions("name='bot'")
    aliases = client.get_registered_model("bot").aliases if versions else {}
    assert "challenger" not in aliases or \
        client.get_model_version("bot", aliases["challenger"]).run_id != killed.run_id
    if moment == "checkpoint":  # the half-uploaded checkpoint-10 is never taken for a whole one
        assert resume.resumable_checkpoints(client, killed.run_id) == ["checkpoints/checkpoint-5"]
    else:
        # The last step is a save step: training had ended whole, only the publishing was cut short.
        assert "checkpoints/checkpoint-15" in resume.resumable_checkpoints(client, killed.run_id)
    if moment == "model":
        assert not versions

    resumed = _submit(proj, tracking_uri, params={"resume": killed.run_id})
    assert resumed.wait() is True
    run = client.get_run(resumed.run_id)
    assert run.info.status == "FINISHED"
    step = 5 if moment == "checkpoint" else 15
    assert run.data.tags[tags.RESUMED_FROM] == f"{killed.run_id}/checkpoints/checkpoint-{step}"
    holder = client.get_model_version_by_alias("bot", "challenger")
    assert holder.run_id == resumed.run_id
    if moment == "checkpoint":  # trained on from step 5 to the end
        assert [m.step for m in client.get_metric_history(resumed.run_id, "train/loss")] == list(range(6, 16))
