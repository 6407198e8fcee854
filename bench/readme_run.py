"""README command 1's figures: run the command, record what it printed, and write the README's block from the
record.

    python bench/readme_run.py record            # the command 3 times: train.seed 42 (the recipe's), 1 and 2
    python bench/readme_run.py record --seeds 42 # once
    python bench/readme_run.py write             # README.md's block from the record (docs/readme_run.json)

`record` runs `mlflow run recipes/support-bot -e lora --backend finetune` as README command 1 does (the first
seed without -P train.seed, the recipe as it ships; the others with -P train.seed=N; every one with -P
eval.reuse_answers=false, so that each is timed as a first run on the machine, the base model answering as
well), each into a fresh sqlite store, and keeps per run: the evaluation table it printed, its verdict and
cost lines, the logged `eval/*` figures, the wall time, and the CPU. It checks that the printed table's rougeL
and exact-match cells are the figures the run logged. `write` puts the first seed's printed block in README.md
between the `readme-run` markers, with the spread over the seeds (mean, lowest, highest).
tests/test_readme_run.py fails when README.md's block is not what `write` makes of the record: a figure pasted
by hand, or a record with no README to match, fails CI.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "docs" / "readme_run.json"
README = REPO / "README.md"
BEGIN, END = "<!-- readme-run: bench/readme_run.py write -->", "<!-- /readme-run -->"
SPREAD = ("rougeL", "exact_match")  # the spread line's metrics, tuned and the best prompt-only contender
# the table's rows in README
SHOWN = ("exact_match", "rougeL", "loss", "misrouted", "prompt_tokens", "latency_s")


ROW = re.compile(r"^[A-Za-z][\w/.-]*(?:  +\S+(?: \*)?)+$")  # a table row: a metric, then a cell per contender


def eval_figures(metrics: dict) -> dict:
    """The run's logged quality figures the README quotes: `eval/CONTENDER/METRIC` for rougeL and exact
    match."""
    from mlflow_finetune_plugin.metrics import CONTENDERS

    return {k: v for k, v in sorted(metrics.items()) if k.count("/") == 2 and k.startswith("eval/")
            and k.split("/")[1] in CONTENDERS and k.split("/")[2] in SPREAD}


def table_cells(printed: str) -> dict:
    """(metric, contender) -> the cell's text (`0.8332 *` is 0.8332) of the evaluation table in `printed`."""
    lines = printed.splitlines()
    contenders = lines[0].split()[1:]
    out = {}
    for line in lines[2:]:
        if not ROW.match(line):
            break
        name, *cells = re.split(r"  +", line.strip())
        out.update({(name, c): cell.removesuffix(" *") for c, cell in zip(contenders, cells)})
    return out


def printed_block(log: str, figures: dict) -> str:
    """The evaluation table as the command printed it (the last one in its output), then its verdict and cost
    lines. Raises when the table's cells are not the figures the run logged."""
    lines = log.splitlines()
    heads = [i for i, line in enumerate(lines) if re.match(r"^metric  +base  ", line)]
    if not heads:
        raise SystemExit("the command printed no evaluation table (a `metric  base ...` header)")
    i = j = heads[-1]
    j += 2  # the header and its dashes
    while j < len(lines) and (ROW.match(lines[j]) or (not lines[j].strip() and j + 1 < len(lines)
                                                       and ROW.match(lines[j + 1]))):
        j += 1
    verdict = re.search(r"^Verdict: .*(?:\n(?!\n|=|🏃|🧪|\d{4}/).+)?", log, re.M)
    if not verdict:
        raise SystemExit("the command printed no `Verdict:` line")
    block = "\n".join(lines[i:j]).rstrip() + "\n\n" + verdict.group(0).rstrip()
    cells = table_cells(block)
    for key, value in figures.items():
        _, contender, metric = key.split("/")
        if cells.get((metric, contender)) != f"{value:.4f}":
            raise SystemExit(
                f"the printed table shows {cells.get((metric, contender))} for {key}, the run logged "
                f"{value:.4f}")
    return block


def best_alternative(figures: dict, metric: str) -> tuple[str, float] | None:
    """The prompt-only contender with the highest `metric` (teacher, tuned and tuned-rag are not
    prompt-only)."""
    scored = {k.split("/")[1]: v for k, v in figures.items() if k.endswith(f"/{metric}")
              and k.split("/")[1] not in ("tuned", "tuned-rag", "teacher")}
    return max(scored.items(), key=lambda kv: kv[1]) if scored else None


def spread(runs: list[dict]) -> str:
    """One line per metric: tuned's and the best prompt-only contender's mean, lowest and highest over the
    seeds."""
    seeds = ", ".join(str(r["seed"]) for r in runs)
    lines = []
    for metric in SPREAD:
        tuned = [r["figures"][f"eval/tuned/{metric}"] for r in runs if f"eval/tuned/{metric}" in r["figures"]]
        alternatives = [alt[1] for r in runs if (alt := best_alternative(r["figures"], metric))]
        if not tuned:
            continue

        def part(values):
            return f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})"

        lines.append(f"{metric:<12} tuned {part(tuned)}" + (f"; best prompt-only {part(alternatives)}"
                                                              if alternatives else ""))
    return f"Over train.seed {seeds}: mean (lowest-highest)\n" + "\n".join(lines)


def shown(printed: str) -> str:
    """The printed block as the README shows it: the table's header and its rows of SHOWN, verbatim, `...` for
    the rows left out, then the verdict."""
    table, verdict = printed.split("\n\nVerdict: ", 1)
    lines = table.splitlines()
    rows = [line for line in lines[2:] if line.split("  ")[0] in SHOWN]
    return "\n".join(lines[:2] + rows + ["..."]) + "\nVerdict: " + verdict


def render(record: dict) -> str:
    """The README's block: where and when, the first seed's printed table and verdict, the spread over the
    seeds."""
    runs = record["runs"]
    first = runs[0]
    minutes = statistics.median(r["wall_s"] for r in runs) / 60
    return "\n".join([
        BEGIN,
        f"What it printed on {record['date']} ({record['cpu']}; {minutes:.1f} min a run, the median of "
        f"{len(runs)}):",
        "```",
        shown(first["printed"]),
        "",
        spread(runs),
        "```",
        END,
    ])


def readme_block(text: str) -> str | None:
    """README.md's block between the markers, markers included; None when they are missing."""
    start, end = text.find(BEGIN), text.find(END)
    return text[start:end + len(END)] if start >= 0 and end > start else None


def cpu_name() -> str:
    import os

    from mlflow_finetune_plugin.models.precision import cpu_flags

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                "CPU")
    name = re.sub(r"\((R|TM|tm)\)", "", name)
    flags = cpu_flags()
    native = "AVX-512 BF16" if "avx512_bf16" in flags else ("AVX-512, no "
                                                            "BF16") if "avx512f" in flags else "AVX2"
    return f"{name}, {native}, {os.cpu_count()} cores"


def record(seeds: list[int], workdir: Path) -> dict:
    """Run README command 1 once per seed (the first as it ships), each into its own store; the record."""
    import os
    import subprocess

    import mlflow

    runs = []
    for i, seed in enumerate(seeds):
        work = workdir / f"seed-{seed}"
        work.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{work / 'mlflow.db'}"
        cmd = ["mlflow", "run", str(REPO / "recipes" / "support-bot"), "-e", "lora", "--backend", "finetune"]
        if i:
            cmd += ["-P", f"train.seed={seed}"]
        cmd += ["-P", "eval.reuse_answers=false"]  # each seed timed as a first run on this machine
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
        env.update({"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}  (seed {seed}; log {work / 'run.log'})",
              file=sys.stderr)
        started = time.time()
        with open(work / "run.log", "w") as f:
            proc = subprocess.run(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT)
        wall = time.time() - started
        log = (work / "run.log").read_text(errors="replace")
        if proc.returncode:
            raise SystemExit(f"exit {proc.returncode}; see {work / 'run.log'}:\n"
                             + "\n".join(log.splitlines()[-20:]))
        run_id = re.search(r"=== Run ([0-9a-f]{32}) started", log)
        if not run_id:
            raise SystemExit(f"no `=== Run ID started` line in {work / 'run.log'}")
        run = mlflow.MlflowClient(uri).get_run(run_id.group(1))
        figures = eval_figures(run.data.metrics)
        runs.append({"seed": seed, "run_id": run.info.run_id, "wall_s": round(wall, 1),
                     "printed": printed_block(log, figures), "figures": figures,
                     "paid_off": run.data.tags.get("finetune.verdict.paid_off")})
        print(runs[-1]["printed"], file=sys.stderr)
    return {"command": "mlflow run recipes/support-bot -e lora --backend finetune",
            "date": datetime.date.today().isoformat(), "cpu": cpu_name(), "runs": runs}


def write(record_: dict) -> None:
    text = README.read_text()
    old = readme_block(text)
    if old is None:
        raise SystemExit(f"README.md has no block between {BEGIN!r} and {END!r}: put the markers where the "
                         "command's output goes")
    README.write_text(text.replace(old, render(record_)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("record", "write"))
    parser.add_argument("--seeds", default="42,1,2",
                        help="record: train.seed per run; the first runs as shipped")
    parser.add_argument("--workdir", default="/tmp/mlflow-finetune-readme-run")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.action == "record":
        made = record([int(s) for s in args.seeds.split(",")], Path(args.workdir))
        RECORD.write_text(json.dumps(made, indent=1) + "\n")
        print(
            f"recorded {len(made['runs'])} run(s) in {RECORD.relative_to(REPO)}; `write` puts them in "
            "README.md")
    else:
        write(json.loads(RECORD.read_text()))
        print(f"README.md's block written from {RECORD.relative_to(REPO)}")


if __name__ == "__main__":
    main()
