"""What several test modules share: project folders and rows, the tracking-store reset, waiting on processes
and servers, and registry versions made to order. Fixtures and pytest hooks stay in conftest.py.

conftest.py imports this module, so imports that cost seconds (torch, transformers, the training code) stay
inside the helpers that need them: a light test file does not pay for them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUPPORT_BOT = REPO / "recipes" / "support-bot"

# -P overrides that make a tiny-model run take seconds: 2 steps, 2 held-out rows, short answers.
FAST_OVERRIDES = {"train.max_steps": 2, "train.batch_size": 2, "train.logging_steps": 1,
                  "train.save_steps": 2,
                  "eval.max_examples": 2, "eval.max_new_tokens": 4, "eval.fewshot_k": 1,
                  "eval.traces": False}  # tests/test_genai_view.py checks the traces

# Short rows, short sequences: a step takes a fraction of a second on 2 CPU cores.
QUICK_RECIPE = ("data:\n  max_length: 64\n  packing: false\n"
                "train:\n  max_steps: 10\n  batch_size: 2\n  learning_rate: 5.0e-3\n  logging_steps: 1\n"
                "  save_steps: 5\n"
                "eval:\n  enabled: false\n")
# The same, training until it is stopped.
LONG_RECIPE = QUICK_RECIPE.replace("max_steps: 10", "max_steps: 100000").replace("save_steps: 5",
                                                                                 "save_steps: 1000")

# The registered model that promotion and arena tests put their versions in.
MODEL_NAME = "bot"


# ----------------------------------------------------------------------------------------------- projects and
# data


def write_project(root: Path, recipe_yaml: str, rows: list[dict] | None = None,
                  eval_rows: list[dict] | None = None):
    """A minimal project folder: finetune.yaml plus data/train.jsonl (and data/eval.jsonl)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "finetune.yaml").write_text(recipe_yaml)
    if rows is not None:
        (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if eval_rows is not None:
        (root / "data" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    return root


def use_store(mp, root: Path) -> str:
    """A module fixture's sqlite tracking + registry store in `root` (its working folder too), set through the
    MonkeyPatch `mp` for this process and the servers and runs it starts: the store's URI."""
    return use_server_store(mp, f"sqlite:///{root / 'mlflow.db'}", root)


def use_server_store(mp, uri: str, root: Path) -> str:
    """Tracking and registry at `uri` (a sqlite store, or a tracking server: see `mlflow_server`) for this
    process and the runs and servers it starts, set through the MonkeyPatch `mp` (undone with it); `root` is
    the working folder. Returns `uri`."""
    import mlflow

    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_REGISTRY_URI", uri)
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    forget_active_experiment()
    return uri


def train_in_process(project: Path, cwd: Path, overrides: dict, experiment: str, method: str = "lora"):
    """`project`'s recipe trained in this process (`train.job.run`, as the training process runs it) from
    `cwd`, in `experiment`: (its exit code, the experiment's one run)."""
    import mlflow
    from mlflow import MlflowClient

    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.train.job import run

    mlflow.set_experiment(experiment)
    before = os.getcwd()
    os.chdir(cwd)
    try:
        code = run(load_recipe(project, method=method, overrides=overrides))
    finally:
        os.chdir(before)
    client = MlflowClient()
    (finished,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return code, finished


def chat_rows(n: int, offset: int = 0) -> list[dict]:
    """n small, distinct chat rows."""
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
            for i in range(offset, offset + n)]


def jsonl(path: Path, rows: list[dict]) -> str:
    """Write `rows` as a JSONL file (parent folders made); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------------------------- tracking
# store


def forget_active_experiment():
    """`mlflow.set_experiment` caches the id in a module global and in MLFLOW_EXPERIMENT_ID; a later test with
    a fresh store would otherwise look for an experiment that only existed in the previous one."""
    import mlflow.tracking.fluent as fluent

    fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


# ----------------------------------------------------------------------------------------------- processes


def subprocess_env(tracking_uri: str) -> dict:
    """The environment for `mlflow run` and the jobs it starts: this store, the package from this checkout."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_EXPERIMENT_ID", None)  # set by mlflow.set_experiment in this process
    return env


def send_json(handler, body: dict) -> None:
    """Answer a `http.server` request with `body` as JSON (200): the loopback servers tests stand up."""
    data = json.dumps(body).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=180, what="condition", interval=0.3):
    """Poll `predicate` every `interval` seconds until it is true; fail naming `what` after `timeout`
    seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def training_started(run_id):
    """A predicate for `wait_for`: the run has logged a training loss."""
    from mlflow import MlflowClient

    return lambda: "train/loss" in MlflowClient().get_run(run_id).data.metrics


def job_processes(session: int, run_id: str | None) -> list:
    """Live processes of the job: in the `mlflow run` session, or naming the run (ranks run in sessions of
    their own), or orphans (PPID 1) of this plugin started after the test began."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "ppid", "cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
                continue
            cmdline = " ".join(p.info["cmdline"] or [])
            if (os.getsid(p.pid) == session
                    or run_id and (run_id in cmdline or p.environ().get("MLFLOW_RUN_ID") == run_id)):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue
    return found


def orphans(since: float) -> list:
    """Processes of this plugin started after `since` whose parent has died (adopted by PID 1), and which use
    this test's tracking store: another test running beside this one (pytest-xdist) has a store of its own."""
    import psutil

    store = os.environ.get("MLFLOW_TRACKING_URI")
    found = []
    for p in psutil.process_iter(["ppid", "cmdline", "create_time", "status"]):
        try:
            if (p.info["ppid"] == 1 and p.info["create_time"] >= since and p.info["status"]
                != psutil.STATUS_ZOMBIE and "mlflow_finetune_plugin" in " ".join(p.info["cmdline"] or [])
                and (store is None or p.environ().get("MLFLOW_TRACKING_URI") in (store, None))):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue
    return found


# ----------------------------------------------------------------------------------------------- servers


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    """Poll `url` until it answers 200; fail with the process's output if it exits or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"server exited with {proc.returncode}:\n{out[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.25)  # polling interval, not synchronization: the loop checks the real condition
    pytest.fail(f"{url} did not answer within {timeout:.0f} s")


def postgres_binaries() -> Path | None:
    """The folder of Debian's PostgreSQL programs (initdb, pg_ctl), the newest installed; None without."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


# CI sets FINETUNE_REQUIRE_POSTGRES=1 (.ci/run installs it): there a missing PostgreSQL fails, never skips.
needs_postgres = pytest.mark.skipif(
    (postgres_binaries() is None or importlib.util.find_spec("psycopg") is None)
    and not os.environ.get("FINETUNE_REQUIRE_POSTGRES"),
    reason="PostgreSQL is not installed (apt-get install postgresql; .ci/run does) or psycopg is missing "
           "(pip install 'psycopg[binary]', in the test extra)")


@contextlib.contextmanager
def postgres(root: Path) -> Iterator[str]:
    """A PostgreSQL server of this test's own (initdb into a fresh folder, a Unix socket there, no TCP port),
    started with Debian's binaries as the `postgres` user when run as root. Yields the SQLAlchemy URI of its
    `postgres` database (`postgresql+psycopg://`); stops it and removes its folder afterwards."""
    import shutil
    import tempfile

    binaries = postgres_binaries()
    # /tmp, not pytest's tmp_path: its folders are 0700 of root, and the server runs as postgres
    folder = Path(tempfile.mkdtemp(prefix="finetune-pg-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(folder, "postgres", "postgres")
    data, log = folder / "data", folder / "server.log"

    def pg(*args: str) -> None:
        done = subprocess.run([*as_postgres, str(binaries / args[0]), *args[1:]], capture_output=True,
                              text=True, timeout=120)
        if done.returncode:
            tail = log.read_text()[-3000:] if log.exists() else ""
            pytest.fail(f"PostgreSQL {args[0]} failed: {done.stdout}{done.stderr}{tail}")

    try:
        pg("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        pg("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-o",
           f"-k {folder} -c listen_addresses='' -c fsync=off -c max_connections=200", "start")
        try:
            yield f"postgresql+psycopg://postgres@/postgres?host={folder}"
        finally:
            pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
            root.mkdir(parents=True, exist_ok=True)
            (root / "postgres.log").write_text(log.read_text())  # kept beside the test's other logs
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(root: Path, *, jobs: bool = False, store: str | None = None) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1, as teams run it: a sqlite database `root/server.db` behind it
    (`store`: another database URI, e.g. `postgres()`'s) and artifacts proxied (`mlflow-artifacts:` URIs)
    into `root/artifacts`, one worker. Yields its URI (`http://127.0.0.1:PORT`) once `/health` answers; stops
    it and every process it started (uvicorn, the job runner) afterwards. Its log is `root/server.log`.

    `jobs=True` keeps the server's job runner (huey consumers: online scoring of arriving traces); off by
    default, since it starts half a dozen processes that would share the test's cores for nothing."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true" if jobs else "false"}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(var, None)  # the server's stores are its flags, not the test's client settings
    store = store or f"sqlite:///{root / 'server.db'}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    with open(root / "server.log", "w") as log:
        # A session of its own: stopping it reaches uvicorn and the job runner, which outlive a killed parent.
        server = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _answers(f"{uri}/health"):
            if server.poll() is not None or time.monotonic() > deadline:
                tail = (root / "server.log").read_text()[-4000:]
                pytest.fail(f"mlflow server did not start (exit {server.poll()}):\n{tail}")
            time.sleep(0.25)  # polling interval: the loop checks the real condition
        yield uri
    finally:
        _stop_session(server)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _stop_session(proc: subprocess.Popen) -> None:
    """SIGTERM to `proc`'s process group (it leads one), SIGKILL to what is left 20 s later."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the group outlives its leader while children finish shutting down
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def cli_process(*args: str) -> subprocess.Popen:
    """`mlflow-finetune ARGS` as a child process of this interpreter (the store and cache come from the
    env)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_DISABLE_UPDATE_CHECK": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    code = "import sys; from mlflow_finetune_plugin.cli import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def drain(proc: subprocess.Popen) -> list[str]:
    """Read `proc`'s output in a thread (a server logging a lot would block on a full pipe); the lines so
    far."""
    import threading

    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def stop(proc: subprocess.Popen) -> None:
    """Terminate `proc`, killing it if it has not exited 20 s later."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------------------------- registry


def register_version(name: str = "bot", seed: int = 0, alias: str | None = "challenger", r: int = 8,
                     use_dora: bool = False, metrics: dict | None = None, base: str = "tiny",
                     config: dict | None = None, chat_template: str | None = None,
                     source_run: str | None = None, retriever=None) -> str:
    """A registered LoRA version on the tiny model (or `base="smollm2"`) with random (non-zero) updates, so
    the adapter changes the answers; `metrics` are logged in its source run (what promotion reads); `config`
    adds to its model_config (e.g. the num_beams its evaluation used); `chat_template` replaces its
    tokenizer's; `source_run` names another run as the one that trained and evaluated it; `retriever` (a
    `retriever.Retriever`) makes it a version that retrieves. Returns the version number."""
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlflow_finetune_plugin.config.schema import LoraAdapter
    from mlflow_finetune_plugin.logged_model import log_finetuned_model
    from mlflow_finetune_plugin.models.base import model_reference, resolve_model_path
    from mlflow_finetune_plugin.registry.versions import register
    from mlflow_finetune_plugin.tags import lineage_tags
    from mlflow_finetune_plugin.train.adapters import lora

    torch.manual_seed(seed)
    folder, reference = resolve_model_path(base), model_reference(base)
    model = lora.apply(AutoModelForCausalLM.from_pretrained(folder),
                       LoraAdapter(r=r, alpha=2 * r, dropout=0.0, use_dora=use_dora))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0, 0.5 if base == "tiny" else 0.02)  # smollm2: changed answers that still read
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    with mlflow.start_run() as run:
        mlflow.log_metrics(metrics or {})
        info = log_finetuned_model(model.eval(), tokenizer,
                                   {"base_model": reference, "artifact": "adapter", "method": "lora",
                                    **(config or {})}, retriever=retriever)
    tags = lineage_tags(method="lora", base_model=reference, dataset_digest="d", recipe_hash="r",
                        chat_template_hash="c", source_run=source_run or run.info.run_id)
    return str(register(info.model_uri, name, tags, alias).version)


def register_eval_version(tuned: dict, base: dict | None = None, fewshot: dict | None = None,
                          recipe: dict | None = None, lineage: bool = True, retrieval: dict | None = None,
                          optimized: dict | None = None, run_tags: dict | None = None) -> str:
    """A run with eval metrics (and optionally a recipe.yaml and run tags), registered as a new version of
    MODEL_NAME; no model behind it (promotion reads only the metrics and tags)."""
    import mlflow
    from mlflow import MlflowClient

    from mlflow_finetune_plugin.tags import lineage_tags

    client = MlflowClient()
    with mlflow.start_run() as run:
        for contender, values in (("tuned", tuned), ("base", base or {}), ("fewshot", fewshot or {}),
                                  ("retrieval", retrieval or {}), ("optimized", optimized or {})):
            mlflow.log_metrics({f"eval/{contender}/{k}": v for k, v in values.items()})
        mlflow.set_tags(run_tags or {})
        if recipe is not None:
            mlflow.log_dict(recipe, "recipe.yaml")
    tags = lineage_tags(method="lora", base_model="builtin:tiny-llama", dataset_digest="d", recipe_hash="r",
                        chat_template_hash="c", source_run=run.info.run_id) if lineage else {}
    if not client.search_registered_models(f"name = '{MODEL_NAME}'"):
        client.create_registered_model(MODEL_NAME)
    mv = client.create_model_version(MODEL_NAME, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                     tags=tags)
    return str(mv.version)


def champion_version() -> str | None:
    """The version MODEL_NAME's `champion` alias points at, or None."""
    from mlflow import MlflowClient

    aliases = MlflowClient().get_registered_model(MODEL_NAME).aliases
    return str(aliases["champion"]) if "champion" in aliases else None


def random_lora(model_dir):
    """The tiny model with a LoRA (r 8) whose updates are random, not zero, so tuned and base answer
    differently."""
    import torch
    from transformers import AutoModelForCausalLM

    from mlflow_finetune_plugin.config.schema import LoraAdapter
    from mlflow_finetune_plugin.train.adapters import lora

    torch.manual_seed(0)
    model = lora.apply(AutoModelForCausalLM.from_pretrained(model_dir),
                       LoraAdapter(r=8, alpha=16, dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model.eval()
