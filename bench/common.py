"""Shared helpers for the benchmark scripts: environment, `mlflow run` driver, data generators, report writing.

Benchmarks are run by hand (never in CI). Each script measures the plugin against a baseline in the same run,
repeats, reports medians of ratios, prints a markdown table and rewrites its own section of docs/benchmarks.md.
"""

from __future__ import annotations

import datetime as _dt
import json
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
DOC = REPO / "docs" / "benchmarks.md"
PLOTS = REPO / "docs" / "benchmarks"
SUPPORT_BOT = REPO / "recipes" / "support-bot"
PROBE_DIR = REPO / "bench" / "_probe"
DEFAULT_WORKDIR = Path(os.environ.get("BENCH_WORKDIR", "/tmp/mlflow-finetune-bench"))

# Sections of docs/benchmarks.md, in document order; each is owned and rewritten by one script.
SECTIONS = ["train_throughput", "packing_layouts", "startup", "data_pipeline", "serving", "gpu_train_throughput"]
_DOC_HEAD = """# Benchmarks

Measured by the scripts in `bench/` (run by hand, not in CI; see `bench/README.md`). Every figure is a ratio
against a baseline measured in the same run, interleaved with it, over several repetitions; the median is
reported. Absolute numbers depend on the machine and on what else ran on it; the ratios are what to compare.
Each section is rewritten by its script: do not edit between the `bench:` markers by hand.
"""


# ---------------------------------------------------------------- environment


def workdir(path: str | os.PathLike | None = None) -> Path:
    """The scratch folder of the benchmarks (tracking store, caches, generated data); created if missing."""
    out = Path(path) if path else DEFAULT_WORKDIR
    out.mkdir(parents=True, exist_ok=True)
    return out.resolve()


def bench_env(work: Path, **extra) -> dict:
    """Environment for every child process: the repo importable, a private cache and sqlite store, no hub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN_ID")}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        "MLFLOW_FINETUNE_CACHE": str(work / "cache"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


def with_probes(env: dict, **variables) -> dict:
    """`env` with the bench-only probes (bench/_probe/sitecustomize.py) importable and switched on by `variables`
    (BENCH_PROCESS_LOG, BENCH_CUDA_PEAK_FILE, BENCH_STEP_LOG: each probe is off unless its variable is set)."""
    return {**env, **{k: str(v) for k, v in variables.items()},
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROBE_DIR), env.get("PYTHONPATH")]))}


def use_env(env: dict) -> None:
    """Apply `bench_env` to this process too (in-process measurements, the MLflow client)."""
    os.environ.update({k: v for k, v in env.items() if k in (
        "MLFLOW_FINETUNE_CACHE", "MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
        "TOKENIZERS_PARALLELISM", "HF_DATASETS_DISABLE_PROGRESS_BARS")})
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def tiny_model_dir(env: dict) -> Path:
    """Build (once) and return the built-in tiny model in the bench cache, exactly as a recipe run gets it."""
    out = subprocess.run([sys.executable, "-c", "from mlflow_finetune_plugin.tiny_model import tiny_model_path;"
                          "print(tiny_model_path())"], env=env, capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- `mlflow run`


def run_plugin(project: Path, method: str, params: dict, env: dict, cwd: Path, log: Path) -> dict:
    """`mlflow run PROJECT -e METHOD --backend finetune -P ...`; returns run id, launch time and wall seconds."""
    cmd = ["mlflow", "run", str(project), "-e", method, "--backend", "finetune"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    text = log.read_text(errors="replace")
    match = re.search(r"=== Run ([0-9a-f]{32}) started", text)
    if proc.returncode != 0 or not match:
        tail = "\n".join(text.splitlines()[-30:])
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); log {log}:\n{tail}")
    return {"run_id": match.group(1), "t0": t0, "wall": wall}


def run_python(args: list[str], env: dict, cwd: Path, log: Path) -> dict:
    """Run `python ARGS`; the last stdout line must be a JSON object, which is returned (plus `wall`)."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.time() - t0
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"`python {' '.join(args)}` failed (exit {proc.returncode}); log {log}:\n{tail}")
    return {**json.loads(lines[-1]), "wall": wall, "t0": t0}


def mlflow_client(env: dict):
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])


def window_rate(points) -> float | None:
    """Steady-state tokens/s: the median over consecutive logging windows of tokens added / seconds elapsed.

    Robust to a load spike in one window and to the first step's warm-up; each window holds one logging call.
    """
    points = sorted(points)
    rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(points, points[1:]) if b[0] > a[0]]
    return statistics.median(rates) if rates else None


def train_loop_figures(client, run_id: str) -> dict:
    """Throughput of a plugin run's training loop from what the run logged.

    tokens: TRL's `num_tokens` at the last step (non-padding tokens: attention-mask sum, or the flattened length
    when packing); seconds: the Trainer's own `train_runtime` (the whole loop, callbacks included);
    window_tokens_per_s: `window_rate` over the timestamps of the logged `num_tokens`.
    """
    tokens = client.get_metric_history(run_id, "train/num_tokens")
    runtime = client.get_metric_history(run_id, "train/summary_runtime")
    tps = client.get_metric_history(run_id, "train/tokens_per_second")
    if not tokens or not runtime:
        raise RuntimeError(f"run {run_id} logged no train/num_tokens or train/summary_runtime")
    n = max(tokens, key=lambda m: m.step).value
    seconds = runtime[-1].value
    return {"tokens": n, "seconds": seconds, "tokens_per_s": n / seconds,
            "window_tokens_per_s": window_rate([(m.timestamp / 1000, m.value) for m in tokens]),
            "callback_tokens_per_s": statistics.median(m.value for m in tps) if tps else None}


# ---------------------------------------------------------------- data


_WORDS: list[str] | None = None


def words() -> list[str]:
    """Words of the corpus the tiny tokenizer was trained on, so generated text tokenizes like real rows."""
    global _WORDS
    if _WORDS is None:
        text = (REPO / "mlflow_finetune_plugin" / "assets" / "tiny_corpus.txt").read_text(encoding="utf-8")
        _WORDS = [w for w in re.findall(r"[A-Za-z][A-Za-z']+", text) if len(w) < 14] or ["word"]
    return _WORDS


def _sentence(rng: random.Random, n_words: int) -> str:
    w = words()
    return " ".join(rng.choice(w) for _ in range(max(1, n_words))).capitalize() + "."


def chat_rows(n: int, seed: int = 0, mean_words: float = 60, sigma: float = 0.9, max_words: int = 600,
              system: bool = True) -> list[dict]:
    """`n` chat rows whose answer lengths are log-normal (many short, a few long): the mixed lengths of real
    instruction data. About 1.3 tokens per word with the tiny tokenizer."""
    import math

    rng = random.Random(seed)
    mu = math.log(mean_words) - sigma * sigma / 2
    rows = []
    for i in range(n):
        answer = min(max_words, max(3, int(rng.lognormvariate(mu, sigma))))
        question = max(3, int(rng.lognormvariate(math.log(12), 0.5)))
        messages = [{"role": "user", "content": f"Question {i}: " + _sentence(rng, question)},
                    {"role": "assistant", "content": _sentence(rng, answer)}]
        if system:
            messages.insert(0, {"role": "system", "content": "You are a helpful assistant. Answer briefly."})
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_project(root: Path, recipe: dict, train: Path) -> Path:
    """A fine-tuning project folder: `finetune.yaml` (from `recipe`) naming `train` as its data."""
    import copy

    import yaml

    recipe = copy.deepcopy(recipe)
    recipe.setdefault("data", {})["train"] = str(train)
    root.mkdir(parents=True, exist_ok=True)
    (root / "finetune.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return root


# ---------------------------------------------------------------- statistics and report


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def spread(values) -> str:
    """min-max of a list, for the tables: how noisy the repetitions were."""
    values = [v for v in values if v is not None]
    return f"{min(values):.3g}-{max(values):.3g}" if values else "-"


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, int) or (isinstance(value, float) and abs(value) >= 1000):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def machine() -> dict:
    """Date, CPU model and cores, memory, Python and library versions, git commit."""
    import importlib.metadata as md

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "?"
    mem = "?"
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        pass
    versions = {}
    for pkg in ("torch", "transformers", "peft", "trl", "mlflow", "datasets", "bitsandbytes"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cores": os.cpu_count(), "memory": mem, "python": platform.python_version(), "versions": versions,
            "commit": commit + ("+uncommitted changes" if dirty else "")}


def measure_or_render(name: str, args, measure, render) -> None:
    """Measure (keeping the raw results in the work folder), or with --render rebuild the output from the last ones."""
    work = workdir(args.workdir)
    raw_path = work / f"results-{name}.json"
    if args.render:
        raw = json.loads(raw_path.read_text())
    else:
        raw = measure(args, work)
        raw_path.write_text(json.dumps(raw))
    render(raw, args.no_doc)


def machine_line(info: dict | None = None, gpu: str | None = None) -> str:
    info = info or machine()
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    where = gpu or f"{info['cpu']}, {info['cores']} cores, {info['memory']} RAM"
    return (f"*{info['date']}; {where}; Python {info['python']}; {versions}; commit {info['commit']}.*")


def write_section(name: str, body: str) -> Path:
    """Replace (or add) section `name` of docs/benchmarks.md, keeping the others and the section order."""
    if name not in SECTIONS:
        raise ValueError(f"unknown section {name!r}; add it to bench.common.SECTIONS")
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    found = dict(re.findall(r"<!-- bench:(\w+):start -->\n(.*?)<!-- bench:\1:end -->", text, flags=re.S))
    found[name] = body.rstrip() + "\n"
    parts = [_DOC_HEAD]
    for section in SECTIONS:
        if section in found:
            parts.append(f"<!-- bench:{section}:start -->\n{found[section]}<!-- bench:{section}:end -->\n")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(parts), encoding="utf-8")
    return DOC


def save_plot(fig, name: str) -> Path:
    """Write `fig` to docs/benchmarks/NAME and close it."""
    PLOTS.mkdir(parents=True, exist_ok=True)
    out = PLOTS / name
    fig.savefig(out, dpi=110)
    pyplot().close(fig)
    return out


def output_args(parser, render: bool = True) -> None:
    """The options every bench script shares: where scratch files go, printing only, re-rendering."""
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--no-doc", action="store_true", help="Print the table only; leave docs/ alone.")
    if render:
        parser.add_argument("--render", action="store_true",
                            help="Re-render the table/doc from the last run's raw results.")


def thread_env(threads: int) -> dict:
    """OMP/MKL thread counts for the measured processes (0: leave torch's default)."""
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} if threads else {}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
