"""Start-up overhead: from `mlflow run` to the first training step, split into its parts, against a plain script.

Three measurements per repetition, each in fresh processes:
  outside  `mlflow run PROJECT -e lora --backend finetune`, timed from the launch by anchors the run leaves:
           interpreter start of each process (a bench-only sitecustomize on PYTHONPATH notes it), the run's
           start_time (created by the backend), the mtime of `recipe.yaml` (the training process's first log)
           and the timestamp of the first logged metric (after optimizer step 1).
  probe    bench/startup_probe.py: the same package functions in the same order in one process, each timed,
           to split the big segments further.
  plain    bench/plain_train.py (transformers + PEFT, no MLflow): launch -> first step logged.
Plus `python -X importtime` of what the training process imports, grouped by top-level package.

    python bench/startup.py            # 5 reps, ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

PARAMS = {"train.max_steps": 2, "eval.enabled": "false", "registry.enabled": "false", "train.save_steps": 1000}
SEGMENTS = [
    ("launch -> `mlflow` CLI interpreter up", "cli_start", "t0"),
    ("CLI: imports (mlflow, plugin), recipe + data validation, run created", "run_created", "cli_start"),
    ("launcher: run created -> training process interpreter up", "train_start", "run_created"),
    ("training process: imports, start run, log params + recipe", "recipe_logged", "train_start"),
    ("training process: data, model, LoRA, trainer, step 1 logged", "first_metric", "recipe_logged"),
]


def outside(project: Path, env: dict, work: Path, rep: int) -> dict:
    plog = work / "logs" / f"startup-procs-{rep}.jsonl"
    plog.unlink(missing_ok=True)
    env = common.with_probes(env, BENCH_PROCESS_LOG=plog)
    res = common.run_plugin(project, "lora", PARAMS, env, work, work / "logs" / f"startup-plugin-{rep}.log")
    procs = [json.loads(line) for line in plog.read_text().splitlines()]
    client = common.mlflow_client(env)
    run = client.get_run(res["run_id"])
    loss = client.get_metric_history(res["run_id"], "train/loss")
    artifacts = urlparse(run.info.artifact_uri).path
    t = {
        "t0": res["t0"],
        "cli_start": min(p["t"] for p in procs if any(a.endswith("mlflow") for a in p["argv"][:2])),
        "run_created": run.info.start_time / 1000,
        "train_start": min(p["t"] for p in procs if "mlflow_finetune_plugin.train" in p["argv"]),
        "recipe_logged": Path(artifacts, "recipe.yaml").stat().st_mtime,
        "first_metric": min(loss, key=lambda m: m.step).timestamp / 1000,
    }
    return {name: t[end] - t[start] for name, end, start in SEGMENTS} | {"total": t["first_metric"] - t["t0"]}


def plain(model: Path, data: Path, env: dict, work: Path, rep: int) -> dict:
    plog = work / "logs" / f"startup-plain-procs-{rep}.jsonl"
    plog.unlink(missing_ok=True)
    env = common.with_probes(env, BENCH_PROCESS_LOG=plog)
    args = [str(Path(__file__).with_name("plain_train.py")), "--model", str(model), "--data", str(data),
            "--max-length", "256", "--batch-size", "16", "--steps", "2", "--output-dir", str(work / "plain-out")]
    r = common.run_python(args, env, work, work / "logs" / f"startup-plain-{rep}.log")
    start = min(json.loads(line)["t"] for line in plog.read_text().splitlines())
    return {"launch -> interpreter up": start - r["t0"],
            "imports, tokenize, model, LoRA, Trainer, step 1 logged": r["first_log_at"] - start,
            "total": r["first_log_at"] - r["t0"]}


def probe(project: Path, env: dict, work: Path, rep: int) -> dict:
    args = [str(Path(__file__).with_name("startup_probe.py")), str(project)]
    for k, v in PARAMS.items():
        args += ["-P", f"{k}={v}"]
    return common.run_python(args, env, work, work / "logs" / f"startup-probe-{rep}.log")


def import_costs(env: dict, work: Path) -> list[tuple[str, float]]:
    """Seconds of import time per top-level package for what the training process imports (one -X importtime)."""
    code = ("import mlflow_finetune_plugin.train, mlflow_finetune_plugin.backend; import transformers, peft, trl; "
            "from transformers import LlamaForCausalLM, Trainer; from trl import SFTTrainer")
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env, cwd=work, capture_output=True,
                         text=True).stderr
    per_pkg: dict[str, float] = defaultdict(float)
    for line in out.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            per_pkg[m.group(2).split(".")[0]] += int(m.group(1)) / 1e6
    return sorted(per_pkg.items(), key=lambda kv: -kv[1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default); see train_throughput.")
    common.output_args(p)
    args = p.parse_args(argv)
    common.measure_or_render("startup", args, measure, render)


def measure(args, work: Path) -> dict:
    (work / "logs").mkdir(exist_ok=True)
    threads = common.thread_env(args.threads)
    env = common.bench_env(work, **threads)
    common.use_env(env)
    model = common.tiny_model_dir(env)
    info = common.machine()
    data = common.SUPPORT_BOT / "data" / "train.jsonl"
    recipe = {"data": {"format": "chat", "max_length": 256, "packing": False},
              "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
              "train": {"batch_size": 16, "learning_rate": 3e-3, "logging_steps": 5}}
    project = common.write_project(work / "projects" / "startup", recipe, data)

    outs, plains, probes = [], [], []
    for rep in range(args.reps):
        for kind in (("outside", "plain", "probe")[rep % 3:] + ("outside", "plain", "probe")[:rep % 3]):
            common.log(f"rep {rep + 1}/{args.reps}: {kind} (load {common.loadavg()})")
            if kind == "outside":
                outs.append(outside(project, env, work, rep))
                common.log(f"  total {outs[-1]['total']:.1f}s")
            elif kind == "plain":
                plains.append(plain(model, data, env, work, rep))
                common.log(f"  total {plains[-1]['total']:.1f}s")
            else:
                probes.append(probe(project, env, work, rep))
                common.log(f"  total {probes[-1]['total']:.1f}s")
    imports = import_costs(env, work)
    return {"outs": outs, "plains": plains, "probes": probes, "imports": imports, "args": vars(args), "info": info,
            "load": common.loadavg()}


def render(raw: dict, no_doc: bool) -> None:
    outs, plains, probes, imports, info = raw["outs"], raw["plains"], raw["probes"], raw["imports"], raw["info"]
    args = argparse.Namespace(**raw["args"])

    total_plugin = common.median(o["total"] for o in outs)
    total_plain = common.median(p["total"] for p in plains)
    ratios = [o["total"] / p["total"] for o, p in zip(outs, plains)]
    rows = [[name, common.median(o[name] for o in outs), common.spread([o[name] for o in outs]),
             f"{100 * common.median(o[name] / o['total'] for o in outs):.0f}%"] for name, _, _ in SEGMENTS]
    rows.append(["**total: launch -> first step**", total_plugin, common.spread([o["total"] for o in outs]), "100%"])
    t_outside = common.table(["plugin (`mlflow run`), measured from outside", "seconds (median)", "range",
                              "share"], rows)
    rows = [[name, common.median(p[name] for p in plains), common.spread([p[name] for p in plains])]
            for name in plains[0]]
    rows.append(["**plugin / plain (median of per-rep ratios)**", common.median(ratios), common.spread(ratios)])
    t_plain = common.table(["plain transformers + PEFT script", "seconds (median)", "range"], rows)
    stage_names = list(probes[0]["stages"])
    rows = [[name, common.median(pr["stages"][name] for pr in probes),
             common.spread([pr["stages"][name] for pr in probes])] for name in stage_names]
    rows.append(["**sum (one process: imports paid once)**", common.median(pr["total"] for pr in probes),
                 common.spread([pr["total"] for pr in probes])])
    t_probe = common.table(["the same steps in one process (bench/startup_probe.py)", "seconds (median)",
                            "range"], rows)
    t_imports = common.table(["package", "import seconds (own modules)"],
                             [[name, secs] for name, secs in imports[:10]])
    print("\n\n".join([t_outside, t_plain, t_probe, t_imports]))
    if no_doc:
        return
    plot = _plot(outs, plains, probes)
    seg = {i: common.median(o[name] for o in outs) for i, (name, _, _) in enumerate(SEGMENTS)}
    probe_med = {name: common.median(pr["stages"][name] for pr in probes) for name in stage_names}
    body = f"""## 2. Start-up overhead: `mlflow run` to the first training step

{common.machine_line(info)}
Shared 2-core machine (load average at the end: {raw["load"]}); ratios within one repetition are what counts.

`python bench/startup.py --reps {args.reps} --threads {args.threads}`: the support-bot data (419 rows) on the built-in tiny model, LoRA,
`mlflow run PROJECT -e lora --backend finetune -P train.max_steps=2 -P eval.enabled=false`, with
`data.packing: false` in the recipe (what `auto` resolves to without flash attention), so that step 1 is the same
work as the plain script's. Each process is fresh (the OS page cache is warm: every repetition reads
the same files).

How it is split without touching the package: a bench-only `sitecustomize.py` (bench/_probe, put on PYTHONPATH
for these runs only) notes when each Python process starts; the run's `start_time` marks run creation in the
backend; the mtime of the `recipe.yaml` artifact marks the training process's first log; the timestamp of the
first `train/loss` marks the end of optimizer step 1 (`logging_first_step`). The last segment is then split by
`bench/startup_probe.py`, which runs the same package functions in the same order in one process with a timer
around each (imports shared by CLI and training process are paid once there, so its sum is lower).

{t_outside}

{t_plain}

{t_probe}

What the training process imports (`python -X importtime`, self time summed per top-level package; the probe's
stages include these where they are first imported):

{t_imports}

![startup](benchmarks/startup.png)

Reading: of the {common.fmt(total_plugin)} s from `mlflow run` to step 1, {common.fmt(seg[1])} s pass in the
`mlflow` CLI before the training process exists: importing MLflow's CLI and the plugin's backend (the CLI never
imports torch) and creating the run in the sqlite store ({common.fmt(probe_med["CLI: create the MLflow run"])} s in
the probe, first use of the store included); validating the recipe and the data takes
{common.fmt(1000 * probe_med["CLI: recipe + data validation"])} ms. The training process then spends
{common.fmt(seg[3])} s on imports (torch, transformers, PEFT, MLflow: see the import table) and on logging the
run's params and recipe, and {common.fmt(seg[4])} s loading data, tokenizer, model and trainer and running step 1.
That process alone ({common.fmt(seg[3] + seg[4])} s) takes {common.fmt(seg[3] + seg[4] - total_plain)} s more than
the whole plain script ({common.fmt(total_plain)} s), which imports torch, transformers and PEFT too but neither
MLflow nor TRL, and logs nothing. So the plugin's extra start-up is the CLI process ({common.fmt(seg[1])} s: MLflow's
imports and run creation) plus the training process's extra imports (MLflow, and TRL while the trainer is built);
the run bookkeeping itself (params, recipe, dataset inputs with their digest) is a fraction of a second. Median of
per-repetition ratios: the plugin reaches step 1 {common.fmt(common.median(ratios))}x later than the plain script.
"""
    common.write_section("startup", body)
    print(f"\nwrote {common.DOC} and {plot}")


def _plot(outs, plains, probes) -> Path:
    plt = common.pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(11, 7), gridspec_kw={"height_ratios": [1, 1.4]}, layout="constrained")
    ax = axes[0]
    left = 0.0
    cmap = plt.get_cmap("tab10")
    for i, (name, _, _) in enumerate(SEGMENTS):
        w = common.median(o[name] for o in outs)
        ax.barh(1, w, left=left, color=cmap(i), label=name)
        left += w
    left = 0.0
    for i, name in enumerate(plains[0]):
        if name == "total":
            continue
        w = common.median(p[name] for p in plains)
        ax.barh(0, w, left=left, color=cmap(i + 5), label=f"plain: {name}")
        left += w
    ax.set_yticks([0, 1], ["plain script", "mlflow run"])
    ax.set_xlabel("seconds from launch to first step (medians)")
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2)
    ax = axes[1]
    names = list(probes[0]["stages"])
    vals = [common.median(pr["stages"][n] for pr in probes) for n in names]
    ax.barh(range(len(names)), vals, color="#1f77b4")
    ax.set_yticks(range(len(names)), [n if len(n) < 60 else n[:57] + "..." for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median), stages in one process")
    return common.save_plot(fig, "startup.png")


if __name__ == "__main__":
    main()
