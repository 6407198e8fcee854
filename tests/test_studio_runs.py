"""The Train page's runs (studio/runs.py, watch.py, history.py) on the tiny model with a sqlite store: jobs
queued and started one at a time as detached `mlflow run ... --backend finetune` runs, watched, stopped,
resumed from the last checkpoint, judged, promoted, listed and compared, and a new Launcher on the same state
folder taking over.

One real run trains (stopped, then resumed to the end); the job queued before it is a run of the project's own
MLproject entry point that fails at once (a failed run without the seconds a training process takes to
import)."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import (
    MODEL_NAME,
    champion_version,
    chat_rows,
    register_eval_version,
    wait_for,
    write_project,
)
from tests.test_studio import SLOW_STEPS

# Stopped after its first checkpoint (step 10) and before its end (each step slowed: SLOW_STEPS); 4 held-out
# rows.
RECIPE = """\
data:
  eval: data/eval.jsonl
  max_length: 64
  packing: false
train:
  max_steps: 80
  batch_size: 2
  learning_rate: 5.0e-3
  logging_steps: 5
  save_steps: 10
  system_metrics_interval: 1
eval:
  max_examples: 4
  max_new_tokens: 4
  fewshot_k: 1
  traces: false
  contenders: [base, fewshot, retrieval]
"""
# An entry point of the project's own, run by the backend's launcher like a fine-tune: it fails once it has
# started.
MLPROJECT = """\
name: bot
entry_points:
  broken:
    command: "echo 'data/train.jsonl: the rows could not be read' >&2; exit 3"
"""


def _launcher(state, **kwargs):
    from mlflow_finetune_plugin.studio.runs import Launcher

    launcher = Launcher(state, **kwargs)
    launcher.poll_s = 0.2
    return launcher


@pytest.mark.integration
def test_queue_watch_stop_resume_judge_list_and_a_new_launcher(tracking_uri, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from mlflow_finetune_plugin import tags
    from mlflow_finetune_plugin.studio import history, views, watch
    from mlflow_finetune_plugin.studio.runs import ENDED
    from mlflow_finetune_plugin.train.resume import resumable_checkpoints

    client = MlflowClient()
    # each training step a tenth of a second longer: stopped while it trains, 80 steps
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_STEPS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    project = write_project(tmp_path / "bot", RECIPE, chat_rows(24), chat_rows(4, 100))
    (project / "MLproject").write_text(MLPROJECT)
    state = tmp_path / "studio"
    first = _launcher(state)
    doomed = first.submit(project, "broken", {}, experiment="studio")
    job = first.submit(project, "lora", {"train.logging_steps": 5}, experiment="studio")
    assert job.argv[-4:] == ["--backend-config", '{"detach": true}', "-P", "train.logging_steps=5"]
    first.start()

    # One at a time: the second job stays queued while the first starts, runs and fails.
    waited = []

    def doomed_ended():
        states = {j.id: j.state for j in first.jobs()}
        if states[doomed.id] not in ENDED:
            waited.append(states[job.id])
        return states[doomed.id] in ENDED
    wait_for(doomed_ended, timeout=300, what="the first job to end", interval=0.2)
    assert set(waited) == {"queued"} and len(waited) >= 3
    doomed = first.job(doomed.id)
    assert doomed.state == "failed" and "exited with code 3" in doomed.error, doomed
    failed = watch.progress(doomed.run_id)
    assert failed.status == "FAILED" and failed.error == client.get_run(doomed.run_id).data.tags[tags.ERROR]
    assert "exited with code 3" in failed.error and "the rows could not be read" in failed.log_tail
    assert failed.eta_s is None and failed.charts["loss"] == []

    def training():
        j = first.job(job.id)
        return j.run_id is not None and watch.progress(j.run_id).charts["loss"]
    wait_for(training, timeout=300, what="the second job to train", interval=0.2)
    run_id = first.job(job.id).run_id
    assert client.get_run(run_id).info.start_time >= client.get_run(doomed.run_id).info.end_time
    assert client.get_run(run_id).data.tags[tags.STUDIO_JOB] == job.id

    # The app restarts while the run trains: a new Launcher on the folder follows it.
    first.close()
    second = _launcher(state).start()
    assert [(j.id, j.state, j.run_id) for j in second.jobs()] == [(job.id, "running", run_id),
                                                                   (doomed.id, "failed", doomed.run_id)]
    live = watch.progress(run_id)
    assert live.status == "RUNNING" and 0 < live.step < live.max_steps == 80 and live.epoch > 0
    assert live.charts["learning_rate"] and live.charts["grad_norm"] and live.tokens_per_s > 0
    assert live.log_tail and live.error is None

    wait_for(lambda: tags.LAST_CHECKPOINT in client.get_run(run_id).data.tags, timeout=120,
             what="a checkpoint", interval=0.2)
    stopped = second.stop(job.id)
    assert stopped.state == "killed", stopped
    assert client.get_run(run_id).info.status == "KILLED"
    checkpoints = resumable_checkpoints(client, run_id)
    kept = max(int(c.rsplit("-", 1)[1]) for c in checkpoints)
    halted = watch.progress(run_id)
    assert halted.step < 80 and halted.checkpoint == kept  # the page says where Resume starts
    assert f"checkpoint at step {kept}" in views.status_line(halted)

    resumed = second.resume(run_id)
    assert resumed.state == "queued" and resumed.params == {"train.logging_steps": "5",
                                                            "train.resume": run_id}
    assert resumed.argv[-2:] == ["-P", f"train.resume={run_id}"]
    wait_for(lambda: second.job(resumed.id).state in ENDED, timeout=300, what="the resumed run", interval=0.5)
    resumed = second.job(resumed.id)
    assert resumed.state == "finished", (resumed, second.log(resumed.id)[-2000:])
    done = watch.progress(resumed.run_id)
    assert done.status == "FINISHED" and done.step == 80 and done.eta_s is None
    assert done.charts["loss"][0][0] > kept and done.charts["eval_loss"]  # it went on from the checkpoint
    assert client.get_run(resumed.run_id).data.tags[tags.RESUMED_FROM].startswith(run_id)
    assert "cpu_utilization_percentage" in done.system and "Verdict: " in done.log_tail

    judged = watch.judgement(resumed.run_id)
    assert [c["contender"] for c in judged.contenders] == ["base", "fewshot", "retrieval", "tuned"]
    assert all("rougeL" in c and "latency_s" in c for c in judged.contenders)
    assert (
        judged.verdict == client.get_run(resumed.run_id).data.tags[tags.VERDICT]
        and judged.paid_off is not None
    )
    assert len(judged.examples) == 4 and {"prompt", "reference", "base", "tuned"} <= set(judged.examples[0])
    assert judged.examples[0]["reference"] == "100 plus 100 is 200."
    assert judged.forgetting["ppl_ratio"] > 0 and judged.model == "models:/bot/1"
    markdown = judged.as_markdown()
    assert "| metric | base | fewshot | retrieval | tuned |" in markdown and judged.verdict in markdown

    listed = {r.run_id: r for r in history.runs("studio")}
    assert set(listed) == {doomed.run_id, run_id, resumed.run_id}
    assert [listed[r].status for r in (doomed.run_id, run_id, resumed.run_id)] == ["FAILED", "KILLED",
                                                                                   "FINISHED"]
    final = listed[resumed.run_id]
    assert final.method == "lora" and final.model == "builtin:tiny-llama" and final.job == resumed.id
    assert (
        final.settings["lr"] == "0.005" and final.settings["steps"] == "80" and "epochs" not in final.settings
    )
    assert final.verdict == judged.verdict and final.registered == judged.model and final.duration_s > 0
    assert final.resumed_from.startswith(run_id) and listed[doomed.run_id].method == "broken"

    compared = history.compare(run_id, resumed.run_id)
    assert compared.params == {"train.resume": ("None", run_id)}
    # logged at
    assert "base_model" in compared.only_one and all(a is None for a, _ in compared.only_one.values())
    # the end, with the model
    assert compared.metrics["train/loss"][0] is not None and compared.metrics["eval/tuned/rougeL"][0] is None
    assert all(compared.charts["loss"]) and "| train.resume | None |" in compared.as_markdown()

    second.close()
    # another app on the same folder, its thread not started: the same jobs, as they are
    third = _launcher(state)
    assert [(j.id, j.state, j.run_id) for j in third.jobs()] == [
        (resumed.id, "finished", resumed.run_id), (job.id, "killed", run_id),
        (doomed.id, "failed", doomed.run_id)]


def test_the_command_the_queue_and_refusals_without_a_run(tracking_uri, tmp_path):
    """What a job runs, a queued job stopped, a launch `mlflow run` refuses, and the errors of bad
    requests."""
    from mlflow_finetune_plugin.errors import FinetuneError
    from mlflow_finetune_plugin.studio.runs import Launcher
    from mlflow_finetune_plugin.studio.watch import parse_version

    project = write_project(tmp_path / "bot", RECIPE, chat_rows(24), chat_rows(4, 100))
    state = tmp_path / "studio"
    torchrun = Launcher(state, backend_config={"launcher": "torchrun", "nproc_per_node": 2})
    job = torchrun.submit(project, "qlora", {"train.max_steps": 3, "adapter.use_dora": True},
                          experiment="exp")
    assert job.argv[1:] == ["-m", "mlflow", "run", str(project), "-e", "qlora", "--backend", "finetune",
                            "--experiment-name", "exp", "--backend-config",
                            json.dumps({"launcher": "torchrun", "nproc_per_node": 2, "detach": True}),
                            "-P", "train.max_steps=3", "-P", "adapter.use_dora=true"]
    stopped = torchrun.stop(job.id)
    assert stopped.state == "killed" and stopped.run_id is None and "before it started" in stopped.error

    # `mlflow run` refuses the backend config before any run exists: the job fails with its reason
    refused = _launcher(state, backend_config={"launchr": "local"})
    bad = refused.submit(project, "lora", {})
    refused.step()
    bad = refused.job(bad.id)
    assert bad.state == "failed" and bad.run_id is None and "launchr" in bad.error, bad
    assert "did you mean 'launcher'" in refused.log(bad.id)

    again = Launcher(state)
    assert [(j.id, j.state) for j in again.jobs()] == [(bad.id, "failed"), (job.id, "killed")]
    assert again.stop(job.id).state == "killed"  # ended: returned as it is

    for call, message in ((lambda: again.submit(tmp_path / "missing", "lora", {}), "does not exist"),
                          (lambda: again.submit(project, " ", {}), "entry_point is empty"),
                          (lambda: again.submit(project, "lora", {"train.max_steps": None}), "no value"),
                          (lambda: again.submit(project, "lora", {"a=b": "1"}), "dotted path"),
                          (lambda: again.resume("f" * 32), "not a run this page started"),
                          (lambda: again.stop("nonsense"), "neither a job id"),
                          (lambda: again.job("job-000000000000"), "no job"),
                          (lambda: Launcher(state, max_parallel=0), "max_parallel"),
                          (lambda: parse_version("bot"), "names no registered version")):
        with pytest.raises(FinetuneError, match=message):
            call()
    assert parse_version("models:/bot/3") == ("bot", "3") and parse_version("bot@champion") == ("bot",
                                                                                                "@champion")


def test_promote_moves_the_champion_only_past_the_gates(tracking_uri):
    """`watch.promote` is `mlflow-finetune promote`: the default gates against the run's prompt-only
    contenders, the result and each gate's outcome as text (versions with an evaluation's metrics only: parity
    is not checked)."""
    from mlflow_finetune_plugin.studio.watch import promote

    worse = register_eval_version({"rougeL": 0.2}, base={"rougeL": 0.3}, fewshot={"rougeL": 0.1},
                                  retrieval={"rougeL": 0.1})
    refused = promote(f"models:/{MODEL_NAME}/{worse}")
    assert not refused.promoted and [c.against for c in refused.checks if not c.passed] == ["base"]
    assert "FAIL" in refused.report() and "gates failed" in refused.report() and champion_version() is None
    better = register_eval_version({"rougeL": 0.5}, base={"rougeL": 0.3}, fewshot={"rougeL": 0.4},
                                   retrieval={"rougeL": 0.2})
    moved = promote(f"{MODEL_NAME}/{better}")
    assert moved.promoted and all(c.passed for c in moved.checks) and champion_version() == better
    forced = promote(f"models:/{MODEL_NAME}/{worse}", force=True, reason="the new data matters more")
    assert forced.promoted and forced.forced and champion_version() == worse


def test_the_runs_tab_lists_runs_started_from_a_terminal_beside_the_pages_jobs(tracking_uri, tmp_path):
    """After README command 1 a user opens the studio: the Runs tab lists that run (the newest, so the page
    opens on it), named as not the page's own, with the page's own jobs; runs of other backends are left out,
    and a run the page started is listed once, as its job."""
    import mlflow

    from mlflow_finetune_plugin import tags
    from mlflow_finetune_plugin.studio.views import job_label
    from tests.helpers import SUPPORT_BOT

    mlflow.set_experiment("terminal")
    with mlflow.start_run(run_name="not-ours"):
        mlflow.set_tag("mlflow.project.backend", "local")
    launcher = _launcher(tmp_path / "state")
    job = launcher.submit(SUPPORT_BOT, "lora", {"model": "tiny"})
    with mlflow.start_run(run_name="page-run") as page_run:
        mlflow.set_tags({"mlflow.project.backend": "finetune", tags.METHOD: "lora"})
    launcher.records.update(job.id, lambda r: r.update(state="running", run_id=page_run.info.run_id))
    with mlflow.start_run(run_name="charming-moth") as typed:
        mlflow.set_tags({"mlflow.project.backend": "finetune", tags.METHOD: "lora"})

    listed = launcher.listed()
    assert [j.id for j in listed] == [typed.info.run_id, job.id]
    outside = listed[0]
    assert outside.run_id == typed.info.run_id and outside.state == "finished"
    assert job_label(outside) == (f"finished · charming-moth · -e lora · run {typed.info.run_id[:8]} · from "
                                  "a terminal")
    assert listed[1].run_id == page_run.info.run_id and listed[1].state == "finished"
