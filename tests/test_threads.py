"""Threads on a shared machine (issue 70): the cores a process may use, the registry of the project's heavy
processes, the plan each process takes from them, what a launcher hands the process it starts, and the
re-count while a process runs. Real processes stand for the others (a `sleep`), real files for the cgroup and
topology."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mlflow_finetune_plugin.runtime import claims, threads
from mlflow_finetune_plugin.runtime.cores import Cores, cgroup_quota, usable
from mlflow_finetune_plugin.runtime.threads import AUTO, child_env, plan, user_threads

TWO = Cores(2, "2 CPUs this process may run on")


@pytest.fixture
def sleeper():
    """A live process of this user, standing for another heavy process of the project."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A private claims folder, for this test and the code it calls."""
    where = tmp_path / "claims"
    where.mkdir()
    monkeypatch.setattr(claims, "folder", lambda: where)
    return where


def test_alone_a_process_takes_every_core_and_openmps_default_wait():
    alone = plan(None, env={}, cores=TWO, others=[], load=0.5)
    assert (alone.intra, alone.interop, alone.wait_policy, alone.source) == (2, 1, None, "auto")
    assert "no other heavy process" in alone.reason and alone.busy_note is None
    fixed = plan(None, env={}, cores=TWO, others=[], load=0.5, fixed=True)  # one that cannot re-count
    assert (fixed.intra, fixed.wait_policy) == (2, "PASSIVE")
    assert plan(None, env={"OMP_WAIT_POLICY": "ACTIVE"}, cores=TWO, others=[], load=0.5,
                fixed=True).wait_policy == "ACTIVE"  # the user's own choice stays


def test_two_live_claims_split_the_cores_and_the_new_process_waits_passively(folder, sleeper):
    claims.claim(2, "training", pid=sleeper.pid)
    found = claims.others()
    assert [(c.pid, c.threads, c.what) for c in found] == [(sleeper.pid, 2, "training")]
    second = plan(None, env={}, cores=TWO, others=found, load=0.0)
    assert (second.intra, second.wait_policy) == (1, "PASSIVE")
    assert "shared with 1 other heavy process of this project" in second.reason
    assert second.busy_note.startswith("This machine is already busy: 1 other heavy process")
    assert f"pid {sleeper.pid}: training, 2 threads" in second.busy_note and ("takes 1 "
                                                                              "intra-op") in second.busy_note
    # three processes on 8 cores: 8 // 3
    three = plan(None, env={}, cores=Cores(8, "8"), others=found + found, load=0.0)
    assert three.intra == 2


def test_a_dead_pids_claim_is_ignored_and_removed(folder):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True)
    dead = int(done.stdout)
    claims.claim(4, "serve engine", pid=dead)
    assert (folder / f"{dead}.json").exists()
    assert claims.others() == []
    assert not (folder / f"{dead}.json").exists()


def test_a_reused_pid_does_not_keep_a_claim_alive(folder, sleeper):
    claims.claim(1, "training", pid=sleeper.pid)
    record = (folder / f"{sleeper.pid}.json").read_text().replace('"started": "', '"started": "1')
    (folder / f"{sleeper.pid}.json").write_text(record)  # as if another process had this pid when it claimed
    assert claims.others() == []


def test_a_half_written_claim_is_skipped_not_removed(folder):
    (folder / "123.json").write_text('{"pid": 12')
    assert claims.others() == [] and (folder / "123.json").exists()


def test_a_process_does_not_count_itself(folder):
    claims.claim(2, "training")
    assert claims.others() == []
    claims.release()
    assert list(folder.glob("*.json")) == []


def test_the_users_omp_num_threads_and_the_recipe_override_the_share(sleeper):
    others = [claims.Claim(sleeper.pid, 2, "training")]
    user = plan(None, env={"OMP_NUM_THREADS": "2"}, cores=TWO, others=others, load=0.0)
    assert (user.intra, user.source, user.reason) == (2, "environment",
                                                      "OMP_NUM_THREADS=2 in the environment")
    recipe = plan(3, env={"OMP_NUM_THREADS": "2"}, cores=TWO, others=[], load=0.0)
    assert (recipe.intra, recipe.source, recipe.reason) == (3, "recipe", "train.threads: 3 in the recipe")
    assert recipe.wait_policy == "PASSIVE"  # 3 threads on 2 cores share them with each other
    assert plan(None, env={"OMP_WAIT_POLICY": "ACTIVE"}, cores=TWO, others=others,
                load=0.0).wait_policy == "ACTIVE"


def test_a_launchers_own_omp_num_threads_is_not_the_users():
    assert user_threads({"OMP_NUM_THREADS": "4,2"}) == 4
    assert user_threads({"OMP_NUM_THREADS": "1", AUTO: "1"}) is None
    assert user_threads({"OMP_NUM_THREADS": "3", AUTO: "1"}) == 3  # changed since: the user's
    assert user_threads({"OMP_NUM_THREADS": "zero"}) is None and user_threads({}) is None


def test_the_child_env_carries_the_choice_and_leaves_the_users_settings(sleeper):
    shared = plan(None, env={}, cores=TWO, others=[claims.Claim(sleeper.pid, 1, "training")], load=0.0)
    env = child_env(shared, env={})
    assert env == {"OMP_NUM_THREADS": "1", AUTO: "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert plan(None, env=env, cores=TWO, others=[], load=0.0).source == "auto"  # the child plans afresh
    user = plan(None, env={"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "active"}, cores=TWO, others=[],
                load=0.0)
    assert child_env(user, env={"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "active"}) == {}
    assert child_env(plan(None, env={}, cores=TWO, others=[], load=0.0), env={}) == {"OMP_NUM_THREADS": "2",
                                                                                     AUTO: "2"}


def test_a_child_started_with_the_env_has_that_many_torch_threads(sleeper):
    shared = plan(None, env={}, cores=TWO, others=[claims.Claim(sleeper.pid, 1, "training")], load=0.0)
    code = "import torch; print(torch.get_num_threads())"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OMP_")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, **child_env(shared, env={})},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"


def test_a_busy_machine_outside_the_project_is_said_without_taking_threads_away():
    busy = plan(None, env={}, cores=TWO, others=[], load=3.4)
    assert busy.intra == 2 and busy.wait_policy == "PASSIVE"
    assert busy.busy_note.startswith("This machine is already busy: load average 3.4 on 2 cores")
    # read at start
    assert plan(None, env={}, cores=TWO, others=[], load=3.4, running=True).wait_policy is None


def test_a_running_process_gives_threads_back_and_takes_them_again(folder, monkeypatch, capsys):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable", lambda: TWO)
    monkeypatch.setattr(threads, "load_average", lambda: 0.0)
    monkeypatch.setattr(threads, "CHECK_EVERY_S", 0.0)
    before = torch.get_num_threads()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = threads.start(None, "training")
        assert started.intra == 2 and torch.get_num_threads() == 2
        assert (folder / f"{__import__('os').getpid()}.json").exists()
        claims.claim(2, "training", pid=other.pid)
        changed = threads.refit()
        assert changed.intra == 1 and torch.get_num_threads() == 1
        assert ("Threads: 2 -> 1 (2 CPUs this process may run on, shared with 1 "
                "other") in capsys.readouterr().err
        assert threads.refit() is None  # nothing changed
    finally:
        other.kill()
        other.wait()
    assert threads.refit().intra == 2 and torch.get_num_threads() == 2
    claims.release()
    monkeypatch.setattr(threads, "_share", None)
    torch.set_num_threads(before)


def test_cores_count_the_affinity_in_physical_cores_and_a_cgroup_quota(tmp_path):
    cpus = sorted(__import__("os").sched_getaffinity(0))
    topology = tmp_path / "cpu"
    for cpu in cpus:  # every CPU a hyperthread of core 0
        (topology / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (topology / f"cpu{cpu}" / "topology" / "physical_package_id").write_text("0\n")
        (topology / f"cpu{cpu}" / "topology" / "core_id").write_text("0\n")
    cgroup, own = tmp_path / "cgroup", tmp_path / "self_cgroup"
    (cgroup / "job").mkdir(parents=True)
    own.write_text("0::/job\n")
    assert usable(topology, cgroup, own).count == 1
    assert usable(tmp_path / "none", cgroup, own) == Cores(len(cpus),
                                                           f"{len(cpus)} CPUs this process may run on")
    (cgroup / "job" / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(cgroup, own) == 1.5
    if len(cpus) > 1:
        assert usable(tmp_path / "none", cgroup, own) == Cores(1, "a cgroup CPU quota of 1.5 CPUs")
    (cgroup / "job" / "cpu.max").write_text("max 100000\n")
    (cgroup / "cpu").mkdir()
    (cgroup / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (cgroup / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(cgroup, own) is None


def test_serves_engines_start_with_their_share_and_are_claimed(folder, monkeypatch, capfd):
    from mlflow_finetune_plugin.serving.front import Fleet, stop_group

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(threads, "usable", lambda: TWO)
    monkeypatch.setattr(threads, "load_average", lambda: 0.0)
    code = (
        "import os, sys, time; print('env', os.environ.get('OMP_NUM_THREADS'), "
        "os.environ.get('OMP_WAIT_POLICY'), flush=True); time.sleep(60)")
    fleet = Fleet()
    first = fleet.start([sys.executable, "-c", code], 1, ["a"])
    second = fleet.start([sys.executable, "-c", code], 2, ["b"])
    try:
        assert {c.pid for c in claims.others()} == {first.process.pid, second.process.pid}
        out, err = "", ""
        for _ in range(100):
            got = capfd.readouterr()
            out, err = out + got.out, err + got.err
            if out.count("env ") == 2:
                break
            __import__("time").sleep(0.1)
        # the first started alone and takes both cores, but waits passively too: it never re-counts, and a run
        # started beside it later would meet its spinning threads
        assert sorted(line for line in out.splitlines() if line.startswith("env ")) == ["env 1 PASSIVE",
                                                                                          "env 2 PASSIVE"]
        assert "This machine is already busy: 1 other heavy process" in err
    finally:
        for child in (first, second):
            stop_group(child.process)
    assert claims.others() == []


@pytest.mark.integration
def test_a_run_beside_another_heavy_process_takes_its_share_and_says_so(tmp_path, tracking_uri, sleeper):
    """`mlflow run` on the tiny model while another heavy process of the project holds the cores: the backend
    starts the job with its share and a passive OpenMP wait, the job tags what it took and prints the one
    line."""
    from mlflow import MlflowClient

    from mlflow_finetune_plugin import tags
    from mlflow_finetune_plugin.runtime.cores import usable
    from tests.helpers import SUPPORT_BOT

    runtime = tmp_path / "runtime"
    where = runtime / "mlflow-finetune" / "threads"
    where.mkdir(parents=True, mode=0o700)
    claims.claim(2, "training", pid=sleeper.pid, where=where)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OMP_")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, XDG_RUNTIME_DIR=str(runtime))
    cmd = [sys.executable, "-m", "mlflow", "run", str(SUPPORT_BOT), "-e", "lora", "--backend", "finetune",
           "-P", "model=tiny", "-P", "max_steps=2", "-P", "eval.enabled=false", "-P",
           "registry.enabled=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    share = max(1, usable().count // 2)
    assert (
        f"This machine is already busy: 1 other heavy process of this project runs on its {usable().count} "
        f"cores (pid {sleeper.pid}: training, 2 threads). This training takes {share} intra-op" in proc.stderr
    )
    (run,) = MlflowClient().search_runs(["0"])
    said = run.data.tags[tags.THREADS]
    assert said.startswith(f"{share} intra-op / 1 inter-op thread, OpenMP waits passive (")
    assert "shared with 1 other heavy process of this project" in said
    assert list(where.glob("*.json")) == [where / f"{sleeper.pid}.json"]  # the job's own claim went with it
    # the backend started the job on tcmalloc where it is installed (runtime/allocator.py), and the job says
    # which
    from mlflow_finetune_plugin.runtime import allocator

    assert ("Memory allocator: tcmalloc" if allocator.tcmalloc() else
            "Memory allocator: the C library's malloc; installing tcmalloc") in proc.stdout + proc.stderr
