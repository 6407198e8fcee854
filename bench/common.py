"""What the bench scripts share: the scratch folder and environment, `mlflow run`, a run's logged figures,
tables.

Every script measures the plugin against a baseline in the same run, interleaved (rotated order), over several
repetitions, and prints markdown tables with the median and the range. Nothing here writes to docs/.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUPPORT_BOT = REPO / "recipes" / "support-bot"
WORKDIR = Path(os.environ.get("BENCH_WORKDIR", "/tmp/mlflow-finetune-bench"))


def setup(workdir: str | None = None) -> tuple[Path, dict]:
    """The scratch folder (sqlite store, logs, generated data) and the environment of every child process.

    The model cache is the user's (`smollm2` is converted once, not per benchmark); this process talks to the
    same store as the children.
    """
    work = Path(workdir or WORKDIR).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
                "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE",
                                           "TOKENIZERS_PARALLELISM")})
    return work, env


def mlflow_run(params: dict, env: dict, work: Path, log_name: str, project: Path = SUPPORT_BOT,
               entry: str = "lora") -> dict:
    """`mlflow run PROJECT -e ENTRY --backend finetune --env-manager local -P k=v ...`: run id, launch and
    exit times (epoch seconds)."""
    cmd = ["mlflow", "run", str(project), "-e", entry, "--backend", "finetune", "--env-manager", "local"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    log_file = work / "logs" / f"{log_name}.log"
    launched = time.time()
    with open(log_file, "w") as f:
        proc = subprocess.run(cmd, env=env, cwd=work, stdout=f, stderr=subprocess.STDOUT)
    exited = time.time()
    text = log_file.read_text(errors="replace")
    match = re.search(r"=== Run ([0-9a-f]{32}) started", text)
    if proc.returncode or not match:
        tail = "\n".join(text.splitlines()[-30:])
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); log {log_file}:\n{tail}")
    return {"run_id": match.group(1), "launched": launched, "exited": exited}


def run_json(args: list[str], env: dict, work: Path, log_name: str) -> dict:
    """`python ARGS` in a fresh process; its last stdout line that is a JSON object."""
    proc = subprocess.run([sys.executable, *map(str, args)], env=env, cwd=work, capture_output=True,
                          text=True)
    log_file = work / "logs" / f"{log_name}.log"
    log_file.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(
            f"`python {' '.join(map(str, args))}` failed (exit {proc.returncode}); log {log_file}:"
            f"\n{tail}")
    return json.loads(lines[-1])


def client():
    import mlflow

    return mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def training_figures(run_id: str) -> dict:
    """What a plugin run logged about its training loop: non-padding tokens (TRL's `num_tokens` at the last
    step), seconds (`train/summary_runtime`, the Trainer's `train_runtime`), their ratio and the mean training
    loss."""
    c = client()
    tokens = c.get_metric_history(run_id, "train/num_tokens")
    runtime = c.get_metric_history(run_id, "train/summary_runtime")
    if not tokens or not runtime:
        raise RuntimeError(f"run {run_id} logged no train/num_tokens or train/summary_runtime")
    n, seconds = max(tokens, key=lambda m: m.step).value, runtime[-1].value
    loss = c.get_metric_history(run_id, "train/summary_loss")
    return {"tokens": n, "seconds": seconds, "tokens_per_s": n / seconds,
            "loss": loss[-1].value if loss else None}


def plain_train(args: dict, env: dict, work: Path, log_name: str) -> dict:
    """bench/plain_train.py with `--key value` for each of `args` (True: a bare flag; False: left out)."""
    argv = [REPO / "bench" / "plain_train.py", "--output-dir", work / "plain-out"]
    for key, value in args.items():
        if value is not False:
            argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [value])
    return run_json(argv, env, work, log_name)


def registered_version(name: str, env: dict, work: Path, model: str = "smollm2") -> str:
    """A LoRA version of `model` in the bench store (2 training steps on support-bot; made once): its
    number."""
    versions = client().search_model_versions(f"name='{name}'")
    if not versions:
        log(f"training and registering {name} (2 steps)")
        mlflow_run({"model": model, "max_steps": 2, "train.batch_size": 2, "eval.enabled": "false",
                    "registry.name": name}, env, work, f"register-{name}")
        versions = client().search_model_versions(f"name='{name}'")
    return str(max(int(v.version) for v in versions))


def chat_rows(n: int, seed: int = 1, mean_words: float = 60, sigma: float = 1.0,
              max_words: int = 700) -> list[dict]:
    """`n` chat rows whose answers have log-normal word counts (many short, a long tail): the mixed lengths of
    real instruction data. Words from the built-in tiny model's corpus."""
    corpus = (REPO / "mlflow_finetune_plugin" / "assets" / "tiny_corpus.txt").read_text(encoding="utf-8")
    words = [w for w in re.findall(r"[A-Za-z][A-Za-z']+", corpus) if len(w) < 14]
    rng = random.Random(seed)

    def sentence(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(max(1, k))).capitalize() + "."

    mu = math.log(mean_words) - sigma * sigma / 2
    return [{"messages": [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
        {"role": "user", "content": f"Question {i}: " + sentence(int(rng.lognormvariate(math.log(12), 0.5)))},
        {"role": "assistant", "content": sentence(min(max_words, max(3,
                                                                     int(rng.lognormvariate(mu, sigma)))))}]}
        for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- repetitions and tables


def rotated(items: list, rep: int) -> list:
    """`items` starting at position rep: no side always runs first or last."""
    k = rep % len(items)
    return items[k:] + items[:k]


def fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def summary(values) -> str:
    """"median (min-max)" of the repetitions."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))})"


def ratios(a: list, b: list) -> list:
    """Per-repetition ratios a[i] / b[i]."""
    return [x / y for x, y in zip(a, b) if x is not None and y]


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def header(what: str) -> None:
    """The first lines of every report: what ran, when, where, with which libraries."""
    import importlib.metadata as md

    import torch

    cpu = platform.processor() or "?"
    if Path("/proc/cpuinfo").exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{cpu}, {os.cpu_count()} cores"
    versions = []
    for pkg in ("torch", "transformers", "peft", "trl", "mlflow"):
        try:
            versions.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"{what}\n\n*{datetime.date.today()}; {where}; torch threads {torch.get_num_threads()}; load average "
        f"{load}; {', '.join(versions)}.* `{' '.join(['python', *sys.argv])}`\n")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def serve(model: str, port: int, env: dict, log_file: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """`mlflow-finetune serve MODEL --engine transformers --port PORT [EXTRA]`, returned once /health answers;
    its output goes to `log_file` (a pipe nobody reads would fill and stop the server)."""
    import urllib.request

    code = "import sys; from mlflow_finetune_plugin.cli import main; sys.exit(main())"
    out = open(log_file, "w")
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", model, "--engine", "transformers", "--port",
                             str(port), *extra], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited {proc.returncode}: see {log_file}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"serve did not answer in 10 minutes: see {log_file}")
