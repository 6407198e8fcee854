"""Launchers `local` (its training process started before the checks), `torchrun` and `ray`, and cancel on
every launcher: real processes on the tiny model.

torchrun runs 2 ranks on CPU (gloo); the Ray tests start a real Ray head on 127.0.0.1 and submit Ray Jobs to
it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import ExecutionException

from mlflow_finetune_plugin import paths
from mlflow_finetune_plugin.backend import FinetuneBackend, _check_backend_config
from mlflow_finetune_plugin.launchers import local
from mlflow_finetune_plugin.launchers.torchrun import torchrun_command
from tests.helpers import (
    LONG_RECIPE,
    QUICK_RECIPE,
    chat_rows,
    free_port,
    subprocess_env,
    training_started,
    wait_for,
    write_project,
)

TORCHRUN = {"launcher": "torchrun", "nproc_per_node": 2}
EXPERIMENT = "launchers"
CLI = [sys.executable, "-c", "from mlflow_finetune_plugin.cli import main; main()"]  # `mlflow-finetune`


def _submit(proj, tracking_uri, config=None, params=None, synchronous=True):
    exp_id = mlflow.set_experiment(EXPERIMENT).experiment_id
    return FinetuneBackend().run(str(proj), "lora", params or {}, None, {"SYNCHRONOUS": synchronous,
                                                                         **(config or {})}, tracking_uri,
                                 exp_id)


def _runs():
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    return [] if exp is None else MlflowClient().search_runs([exp.experiment_id])


def _processes_of(run_id) -> list:
    """Live processes whose command line or environment names the run: what an orphan would look like."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
                continue
            if any(run_id in part for part in p.info["cmdline"]
                   or []) or p.environ().get("MLFLOW_RUN_ID") == run_id:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


# ----------------------------------------------------------------------------------------------- unit: config


def test_torchrun_command_single_and_multi_node():
    train = [sys.executable, "-m", "mlflow_finetune_plugin.train.job", "--recipe-json", "r.json", "--run-id",
             "abc"]
    single = torchrun_command(train, "abc", nproc_per_node=2)
    assert single[:3] == [sys.executable, "-m", "mlflow_finetune_plugin.launchers.quiet_torchrun"]
    assert "--standalone" in single and single[single.index("--nproc-per-node") + 1] == "2"
    assert single[-6:] == ["-m", "mlflow_finetune_plugin.train.job", "--recipe-json", "r.json", "--run-id",
                           "abc"]
    multi = torchrun_command(train, "abc", nproc_per_node=4, nnodes=2, rdzv_endpoint="10.0.0.1:29400")
    assert "--standalone" not in multi
    assert multi[multi.index("--rdzv-endpoint") + 1] == "10.0.0.1:29400"
    assert multi[multi.index("--rdzv-id") + 1] == "abc"  # every node joins the same rendezvous: the run id
    assert torchrun_command(["bash", "-c", "echo "
                                           "hi"], "abc", 2)[-4:] == ["--no-python", "bash", "-c", "echo hi"]


def test_the_training_process_answers_under_its_package_name_too():
    """`python -m mlflow_finetune_plugin.train` is the training process (train/job.py) under a shorter name
    for commands written by hand; its options are the job's."""
    out = subprocess.run([sys.executable, "-m", "mlflow_finetune_plugin.train", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--recipe-json" in out.stdout and "--run-id" in out.stdout


def test_the_ranks_of_one_node_share_one_measurement_of_bf16(monkeypatch):
    # quiet_torchrun measures once (or takes the launcher's figure) before its ranks start; each rank reads
    # it.
    from mlflow_finetune_plugin.models.precision import SPEEDUP_ENV

    # One write per rank: under PYTHONUNBUFFERED (CI) print() writes each piece apart, and the two ranks'
    # pieces interleaved on the shared pipe ("rankrank 0 ...").
    show = [sys.executable, "-c",
            "import os; os.write(1, ('rank %s %s\\n' % (os.environ['RANK'], "
            f"os.environ.get('{SPEEDUP_ENV}'))).encode())"]
    for given in ("", "1.234"):
        env = {**os.environ, SPEEDUP_ENV: given}
        out = subprocess.run(torchrun_command(show, "r", nproc_per_node=2), env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        ranks = {line.split()[1]: line.split()[2] for line in out.stdout.splitlines()
                 if line.startswith("rank")}
        assert sorted(ranks) == ["0", "1"] and len(set(ranks.values())) == 1, out.stdout
        figure = ranks["0"]
        assert figure == "1.234" if given else (figure == "none" or float(figure) > 0)


def test_the_other_nodes_are_told_the_first_node_s_figure():
    from mlflow_finetune_plugin.launchers.torchrun import other_nodes_hint
    from mlflow_finetune_plugin.models.precision import SPEEDUP_ENV

    hint = other_nodes_hint(["python", "-m", "x"], 2, "10.0.0.1:29400",
                            {"MLFLOW_TRACKING_URI": "http://10.0.0.1:5000", SPEEDUP_ENV: "2.412"})
    assert f"MLFLOW_TRACKING_URI=http://10.0.0.1:5000 {SPEEDUP_ENV}=2.412 python -m x" in hint


@pytest.mark.parametrize("config, expected", [
    ({"launcher": "torchrun", "nproc_per_node": 0}, "nproc_per_node must be a whole number >= 1 (got 0)"),
    ({"launcher": "torchrun", "nproc_per_node": "2"}, 'nproc_per_node must be a whole number >= 1 (got "2")'),
    ({"launcher": "torchrun", "nnodes": 2}, "nnodes=2 needs rdzv_endpoint"),
    ({"launcher": "torchrun", "rdzv_endpoint": "nohost"}, "rdzv_endpoint must be host:port"),
    ({"nproc_per_node": 2}, "'nproc_per_node' is a torchrun key: add \"launcher\": \"torchrun\""),
    ({"launcher": "torchrun", "address": "http://x:8265"}, "'address' is a ray key"),
    ({"launcher": "ray", "use_gpu": "yes"}, 'use_gpu must be true or false (got "yes")'),
    ({"launcher": "ray", "num_workers": True}, "num_workers must be a whole number >= 1 (got true)"),
    ({"launcher": 3}, "launcher must be a string (got 3)"),
    ({"detach": 1}, "detach must be true or false (got 1)"),
])
def test_bad_backend_config_says_what_to_change(config, expected):
    # FinetuneBackend.run checks the config first of all (test_backend: no run is created).
    with pytest.raises(ExecutionException) as info:
        _check_backend_config(config)
    assert expected in str(info.value)


def test_unreachable_ray_cluster_is_refused_before_a_run_exists(tmp_path, tracking_uri):
    pytest.importorskip("ray")
    proj = write_project(tmp_path / "p", QUICK_RECIPE, rows=chat_rows(8))
    with pytest.raises(ExecutionException) as info:
        _submit(proj, tracking_uri, config={"launcher": "ray", "address": f"http://127.0.0.1:{free_port()}"})
    assert "cannot reach the Ray cluster" in str(info.value) and "ray start --head" in str(info.value)
    assert _runs() == []


# ----------------------------------------------------------------------------------------------- local


def test_a_local_run_trains_in_the_process_started_before_its_checks(tmp_path, tracking_uri):
    proj = write_project(tmp_path / "p", QUICK_RECIPE, rows=chat_rows(8))
    submitted = _submit(proj, tracking_uri)
    assert submitted.wait() is True
    (run,) = _runs()
    assert run.info.status == "FINISHED"
    assert len(MlflowClient().get_metric_history(run.info.run_id, "train/loss")) == 10
    job = json.loads((paths.job_dir(run.info.run_id) / "job.json").read_text())
    assert job["warm"] is True and job["launcher"] == "local"
    assert job["cmd"][1:3] == ["-m", "mlflow_finetune_plugin.train.job"]


def test_failed_checks_stop_the_warm_process_at_once(tmp_path, tracking_uri, monkeypatch):
    started = []
    start_warm = local.start_warm
    monkeypatch.setattr(local, "start_warm", lambda *a, **k: started.append(start_warm(*a,
                                                                                       **k)) or started[-1])
    proj = write_project(tmp_path / "p", QUICK_RECIPE, rows=chat_rows(8))
    with pytest.raises(ExecutionException, match="train.learning_rate"):
        _submit(proj, tracking_uri, params={"train.learning_rate": "abc"})
    (warm,) = started
    assert warm.proc is None  # discarded: killed and waited for, not left importing
    assert _runs() == []


def test_a_warm_process_runs_exactly_the_command_it_is_handed(tmp_path, capfd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    warm = local.start_warm(env, str(tmp_path))
    missing = tmp_path / "missing-recipe.json"
    # Another folder or another command: not handed over, and the process is stopped.
    other = local.start_warm(env, str(tmp_path))
    assert other.hand_over([sys.executable, "-c", "pass"], env, str(tmp_path)) is None and other.proc is None
    assert warm.hand_over([sys.executable, "-m", local.TRAINING_MODULE, "--recipe-json", str(missing)], env,
                          str(tmp_path / "elsewhere")) is None
    warm = local.start_warm(env, str(tmp_path))
    proc = warm.hand_over([sys.executable, "-m", local.TRAINING_MODULE, "--recipe-json", str(missing),
                           "--run-id", "abc"], {**env, "MLFLOW_RUN_ID": "abc"}, str(tmp_path))
    assert proc is not None and warm.proc is None
    # job.main ran with those arguments: the recipe file it names is missing
    assert proc.wait(timeout=120) == 1
    assert "missing-recipe.json" in capfd.readouterr().err


@pytest.mark.parametrize("handed", [True, False])
def test_a_warm_process_whose_imports_failed_reports_it_only_when_handed_a_run(tmp_path, capfd, handed):
    broken = tmp_path / "site" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('a broken torch install, for the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken.parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    warm = local.start_warm(env, str(tmp_path))
    if handed:
        proc = warm.hand_over([sys.executable, "-m", local.TRAINING_MODULE, "--recipe-json", "r.json"], env,
                              str(tmp_path))
        assert proc.wait(timeout=120) == 1  # as a fresh training process fails: the traceback, exit code 1
        assert "a broken torch install, for the test" in capfd.readouterr().err
    else:
        proc = warm.proc
        proc.stdin.close()  # what `mlflow run` dying before the hand-over looks like to it
        assert proc.wait(timeout=120) == 0
        assert "broken torch" not in capfd.readouterr().err  # nothing to report: no run was handed over


# ----------------------------------------------------------------------------------------------- torchrun


# Rank 1 writes its RNG state 2 s late: the checkpoint copied into the run must hold it all the same.
SLOW_RANK_1 = """import os
if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RUN_ID"):
    import time
    from transformers import trainer

    save = trainer.Trainer._save_rng_state

    def late(self, output_dir):
        time.sleep(2)
        save(self, output_dir)

    trainer.Trainer._save_rng_state = late
"""


# -m stress: two ranks to one run and one version are covered by tests/test_multinode.py's two agents (one
# run, one version, the loss falls, the epoch counted over both ranks) and tests/test_faults.py's killed rank
# (both ranks resume and train to the end); this adds the single-agent rng states per rank.
@pytest.mark.stress
@pytest.mark.integration
def test_torchrun_two_ranks_one_run_one_version_loss_falls(tmp_path, tracking_uri, monkeypatch):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_RANK_1)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    proj = write_project(tmp_path / "ddp", QUICK_RECIPE, rows=chat_rows(32))
    submitted = _submit(proj, tracking_uri, config=TORCHRUN)
    assert submitted.wait() is True
    (run,) = _runs()  # rank 1 never creates a run of its own
    assert run.info.run_id == submitted.run_id and run.info.status == "FINISHED"
    assert run.data.tags["finetune.job.launcher"] == "torchrun"
    (version,) = MlflowClient().search_model_versions("name='ddp'")
    assert version.run_id == run.info.run_id
    history = MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    steps = [m.step for m in history]
    assert steps == sorted(set(steps)), "every step logged once: only rank 0 logs"
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    # The ranks split the data (2 ranks x 2 rows a step over 32 rows: an epoch every 8 steps, not 16) and the
    # Trainer all-gathers the loss before logging it (nested_gather(tr_loss).mean() in
    # _maybe_log_save_evaluate).
    assert run.data.metrics["train/epoch"] == pytest.approx(10 * 2 * 2 / 32)
    # Each rank's RNG state is in the logged checkpoint, whole: rank 0 copies it only once every rank has
    # saved.
    for step in (5, 10):
        sizes = {a.path.rsplit("/", 1)[-1]: a.file_size
                 for a in MlflowClient().list_artifacts(run.info.run_id, f"checkpoints/checkpoint-{step}")}
        assert sizes.get("rng_state_0.pth") and sizes.get("rng_state_1.pth") == sizes["rng_state_0.pth"], (
            sizes
        )


def _training_mlflow_run(tmp_path, tracking_uri, extra_args=()):
    """`mlflow run` of a long LoRA job in a session of its own (as from a terminal), returned once it trains:
    (process, log file, run id). The caller stops it and kills the session if it outlives the test."""
    proj = write_project(tmp_path / "p", LONG_RECIPE, rows=chat_rows(32))
    cmd = [sys.executable, "-m", "mlflow", "run", str(proj), "-e", "lora", "--backend", "finetune",
           *extra_args, "--experiment-name", EXPERIMENT]
    mlflow.set_experiment(EXPERIMENT)  # create the store first: two processes migrating one sqlite file race
    log = tmp_path / "mlflow-run.log"
    # a file, not a pipe: nobody reads until the end, and progress bars are chatty
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(tracking_uri), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or len(_runs()) == 1, what="the run to be created")
        assert proc.poll() is None, log.read_text()[-3000:]
        run_id = _runs()[0].info.run_id
        wait_for(training_started(run_id), what="training to start")
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc, log, run_id


def _stop(proc, log, signum) -> str:
    """Send `signum` to `mlflow run`, wait up to 120 s for it to end (its session is killed if it does not),
    and return what it printed."""
    try:
        proc.send_signal(signum)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return log.read_text()


# -m stress: Ctrl-C on a torchrun job is covered by tests/test_multinode.py's [first-Ctrl-C] (every rank of
# both agents gone, the run KILLED); this is the single-agent case.
@pytest.mark.stress
@pytest.mark.integration
def test_ctrl_c_on_mlflow_run_with_torchrun_kills_run_and_every_rank(tmp_path, tracking_uri):
    proc, log, run_id = _training_mlflow_run(tmp_path, tracking_uri,
                                             ["--backend-config", json.dumps(TORCHRUN)])
    ranks = [p for p in _processes_of(run_id) if "mlflow_finetune_plugin.train.job" in " ".join(p.cmdline())]
    output = _stop(proc, log, signal.SIGINT)  # what Ctrl-C does: the ranks run in sessions of their own
    assert len(ranks) >= 2
    assert proc.returncode != 0
    assert f"Run {run_id} cancelled" in output and "Traceback" not in output.split("Interrupted")[-1], output[
        -3000:]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED"
    wait_for(lambda: not _processes_of(run_id), timeout=30, what="no process of the run left")


@pytest.mark.integration
# SIGHUP goes through the same handler as SIGTERM (left to `-m stress` for CI time).
@pytest.mark.parametrize("stop_signal", ["SIGTERM", pytest.param("SIGHUP", marks=pytest.mark.stress)])
def test_a_stop_signal_to_mlflow_run_cancels_the_job(tmp_path, tracking_uri, stop_signal):
    """`kill` or a closed terminal ends `mlflow run` like Ctrl-C: the training process (in a session of its
    own, so the signal does not reach it) is stopped and the run is KILLED, not left running as an orphan."""
    proc, log, run_id = _training_mlflow_run(tmp_path, tracking_uri)
    output = _stop(proc, log, getattr(signal, stop_signal))
    assert proc.returncode != 0
    assert f"Run {run_id} cancelled" in output, output[-3000:]
    assert MlflowClient().get_run(run_id).info.status == "KILLED"
    wait_for(lambda: not _processes_of(run_id), timeout=30, what="no process of the run left")


# ----------------------------------------------------------------------------------------------- cancel CLI


@pytest.mark.integration
def test_cancel_command_stops_a_detached_run(tmp_path, tracking_uri):
    proj = write_project(tmp_path / "p", LONG_RECIPE, rows=chat_rows(32))
    submitted = _submit(proj, tracking_uri, config={"detach": True}, synchronous=False)
    wait_for(training_started(submitted.run_id), what="training to start")
    assert MlflowClient().get_run(submitted.run_id).data.tags["finetune.job.launcher"] == "local"
    proc = subprocess.run([*CLI, "cancel", submitted.run_id],
                          env=subprocess_env(tracking_uri), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"Run {submitted.run_id} cancelled (KILLED)" in proc.stdout
    assert MlflowClient().get_run(submitted.run_id).info.status == "KILLED"
    wait_for(lambda: not _processes_of(submitted.run_id), timeout=30, what="no process of the run left")
    again = subprocess.run([*CLI, "cancel", submitted.run_id],
                           env=subprocess_env(tracking_uri), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "had already ended KILLED" in again.stdout


def test_cancel_command_unknown_run_is_a_clear_error(tracking_uri):
    from click.testing import CliRunner

    from mlflow_finetune_plugin.cli import main

    result = CliRunner().invoke(main, ["cancel", "0123456789abcdef"])
    assert result.exit_code == 1
    assert "no run '0123456789abcdef'" in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------------------------- ray


@pytest.mark.integration
def test_ray_job_two_workers_finishes_registers_and_streams_its_log(tmp_path, tracking_uri, ray_head, capfd):
    proj = write_project(tmp_path / "rayproj", QUICK_RECIPE, rows=chat_rows(32))
    submitted = _submit(proj, tracking_uri, config={"launcher": "ray", "address": ray_head, "num_workers": 2})
    assert submitted.job_id == f"mlflow-finetune-{submitted.run_id}"
    assert submitted.wait() is True
    assert submitted.get_status() == "FINISHED"
    (run,) = _runs()
    assert run.data.tags["finetune.job.launcher"] == "ray"
    assert run.data.tags["finetune.job.job_id"] == submitted.job_id
    (version,) = MlflowClient().search_model_versions("name='rayproj'")
    assert version.run_id == submitted.run_id
    losses = [m.value for m in sorted(MlflowClient().get_metric_history(run.info.run_id, "train/loss"),
                                      key=lambda m: m.step)]
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    out = capfd.readouterr().out
    assert "Registered rayproj version 1" in out  # the job's log, followed by wait()


@pytest.mark.integration
def test_ray_job_cancel_stops_the_job_and_kills_the_run(tmp_path, tracking_uri, ray_head):
    from ray.job_submission import JobSubmissionClient

    from mlflow_finetune_plugin.launchers.cancel import cancel_run

    proj = write_project(tmp_path / "p", LONG_RECIPE, rows=chat_rows(32))
    submitted = _submit(proj, tracking_uri, config={"launcher": "ray", "address": ray_head, "detach": True},
                        synchronous=False)
    wait_for(training_started(submitted.run_id), what="training to start")
    assert submitted.get_status() == "RUNNING"
    assert cancel_run(submitted.run_id) == ("KILLED", True)  # what `mlflow-finetune cancel RUN_ID` does
    assert str(JobSubmissionClient(ray_head).get_job_status(submitted.job_id)) == "STOPPED"
    assert MlflowClient().get_run(submitted.run_id).info.status == "KILLED"
    wait_for(lambda: not _processes_of(submitted.run_id), timeout=30, what="no process of the run left")
