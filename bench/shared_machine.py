"""Two jobs on one machine: does each take about twice as long as alone, or far more (issue 70)?

Default settings, no thread variable set (OMP_NUM_THREADS, OMP_WAIT_POLICY and MKL_NUM_THREADS are removed
from every child's environment): what a user gets. Per repetition, in rotated order:

  plugin alone        one `mlflow run recipes/support-bot -e lora --backend finetune -P model=smollm2 ...`,
  --steps plugin x2           two of the same started together, on the same data and settings
  plain alone         bench/plain_train.py (transformers Trainer + PEFT, no plugin), the same batches,
  --plain-steps plain x2            two of those started together
  serve alone         `mlflow-finetune serve` (transformers) answering 16 requests at once, nothing else
  running run beside serve    one plugin run of --beside-steps, while serve answers bursts of 16 requests from
  its first
                      training step to its end (only bursts answered wholly while it trained are counted)

Figures: seconds per step and tokens/s of each training process (the plugin's from what its run logged,
plain's from the Trainer), each against the same side alone; the answers' median round trip and the burst's
wall time against serve alone. Goal (issue 70): each of two plugin runs at no worse than 2.2x its time alone.
The plugin runs' `finetune.threads` tag says what each took.

    python bench/shared_machine.py                           # 30 steps of 8 rows, 2 reps: ~50 min on 2 cores
    python bench/shared_machine.py --sides "plugin x2,run beside serve"     # the plugin's sides only: ~35 min
    python bench/shared_machine.py --steps 2 --batch-size 2 --reps 1 --requests 4 --max-tokens 8   # smoke
    test

The smoke test checks the script, not the machine: 2 steps are over before a second run re-counts (every 2 s)
and before a burst of requests can be answered within the run's training loop, so its beside-serve row stays
empty.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import common

SIDES = ("plugin alone", "plugin x2", "plain alone", "plain x2", "serve alone", "run beside serve")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT",
                    "KMP_BLOCKTIME", "MLFLOW_FINETUNE_AUTO_THREADS")
QUESTIONS = ["How do I reset my password?", "Can I change my plan mid-month?", "Where do I find my invoices?",
             "How do I delete my account?"]


def plugin_run(args, env, work, tag: str, steps: int | None = None) -> dict:
    steps = steps or args.steps
    params = {"model": args.model, "max_steps": steps, "train.batch_size": args.batch_size,
              "data.max_length": args.max_length, "data.packing": "false", "train.logging_steps": 1,
              "train.save_steps": steps + 1000, "train.seed": 42, "eval.enabled": "false",
              "registry.enabled": "false"}
    run = common.mlflow_run(params, env, work, tag)
    figures = common.training_figures(run["run_id"])
    from mlflow_finetune_plugin import tags

    threads = common.client().get_run(run["run_id"]).data.tags.get(tags.THREADS, "-")
    return {**figures, "step_s": figures["seconds"] / steps, "threads": threads.split(" (")[0]}


def plain_run(args, model_dir: str, env, work, tag: str) -> dict:
    argv = [common.REPO / "bench" / "plain_train.py", "--model", model_dir, "--data",
            common.SUPPORT_BOT / "data" / "train.jsonl", "--precision", args.plain_precision, "--max-length",
            args.max_length, "--batch-size", args.batch_size, "--steps", args.plain_steps, "--output-dir",
            work / f"plain-out-{tag}"]
    figures = common.run_json(argv, env, work, tag)
    return {**figures, "step_s": figures["seconds"] / args.plain_steps, "threads": "torch's default"}


def together(job, n: int = 2) -> list[dict]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(job, range(n)))


def ask_burst(port: int, args) -> dict:
    """`args.requests` chat requests at once: each one's round trip, and the burst's wall time."""
    import httpx

    served = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models"))["data"][0]["id"]

    def ask(i: int) -> float:
        started = time.perf_counter()
        got = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=900, trust_env=False, json={
            "model": served, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": args.max_tokens, "temperature": 0.0})
        got.raise_for_status()
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(args.requests) as pool:
        trips = list(pool.map(ask, range(args.requests)))
    return {"trip": statistics.median(trips), "wall": time.perf_counter() - started}


def serve_side(side: str, args, version: str, env, work, tag: str) -> list[dict]:
    """serve alone: one burst. run beside serve: the run's figures, and the bursts while it trained."""
    port = args.port
    proc = common.serve(f"shared-bot/{version}", port, env, work / "logs" / f"{tag}-serve.log")
    try:
        ask_burst(port, args)  # the first requests pay for the model's warm-up
        if side == "serve alone":
            return [ask_burst(port, args)]
        bursts, done = [], threading.Event()

        def keep_asking():
            client = common.client()
            while not done.is_set():  # from the run's first training step to its end
                runs = client.search_runs(["0"], "attributes.status = 'RUNNING'", max_results=5)
                if any(client.get_metric_history(r.info.run_id, "train/loss") for r in runs):
                    burst = ask_burst(port, args)
                    if not done.is_set():  # only bursts answered wholly while the run trained
                        bursts.append(burst)
                else:
                    time.sleep(0.5)

        asker = threading.Thread(target=keep_asking, daemon=True)
        asker.start()
        try:
            run = plugin_run(args, env, work, tag, args.beside_steps or 2 * args.steps)
        finally:
            done.set()
            asker.join(timeout=900)
        return [run, *bursts]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2 (the real built-in model) or tiny.")
    p.add_argument("--steps", type=int, default=30,
                   help="Steps of each plugin run (30: two runs started together "
                        "overlap for most of their training; with 10 they overlapped only in part).")
    p.add_argument("--plain-steps", type=int, default=10,
                   help="Steps of each plain run (they do not re-count their "
                        "threads, so two overlap from the start; two at once run about 9x slower than one).")
    p.add_argument("--beside-steps", type=int, default=None,
                   help="Steps of the run beside serve (default: twice --steps): long enough for whole "
                        "bursts of answers to land while it trains (a burst beside training takes several "
                        "times its time alone).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--plain-precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--requests", type=int, default=16, help="requests in flight at once, per burst")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--port", type=int, default=8794)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--sides", default=",".join(SIDES),
                   help="comma-separated subset of: " + ", ".join(SIDES) + " (each x2 side runs with its "
                                                                           "alone side)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        p.error(f"--sides: unknown {', '.join(unknown)}; choose from {', '.join(SIDES)}")
    for pair in (("plugin x2", "plugin alone"), ("plain x2", "plain alone"),
                 ("run beside serve", "plugin alone"), ("run beside serve", "serve alone")):
        if pair[0] in sides and pair[1] not in sides:
            sides.append(pair[1])

    from mlflow_finetune_plugin.models.base import resolve_model_path
    from mlflow_finetune_plugin.tracking import ensure_store

    work, env = common.setup(args.workdir)
    for name in THREAD_VARIABLES:
        env.pop(name, None)
    ensure_store(env["MLFLOW_TRACKING_URI"])  # before two runs open it at once
    model_dir = resolve_model_path(args.model)
    version = common.registered_version("shared-bot", env, work, args.model) \
        if {"serve alone", "run beside serve"} & set(sides) else None
    sides = [s for s in SIDES if s in sides]
    results = {side: [] for side in sides}  # side -> per rep: list of figures (one per process or burst)
    for rep in range(args.reps):
        for side in common.rotated(sides, rep):
            common.log(f"rep {rep + 1}/{args.reps}: {side}")
            tag = f"shared-{side.replace(' ', '-')}-{rep}"
            if side == "plugin alone":
                got = [plugin_run(args, env, work, tag)]
            elif side == "plugin x2":
                got = together(lambda i, tag=tag: plugin_run(args, env, work, f"{tag}-{i}"))
            elif side == "plain alone":
                got = [plain_run(args, model_dir, env, work, tag)]
            elif side == "plain x2":
                got = together(lambda i, tag=tag: plain_run(args, model_dir, env, work, f"{tag}-{i}"))
            else:
                got = serve_side(side, args, version, env, work, tag)
            common.log("  " + "; ".join(f"{k} {v:.2f}" for g in got for k, v in g.items()
                                        if k in ("step_s", "tokens_per_s", "trip", "wall")))
            results[side].append(got)
    report(args, results)


def report(args, results: dict) -> None:
    common.header(f"Two jobs on one machine, default settings (no thread variable set): {args.model}, LoRA, "
                  f"{args.steps} steps of {args.batch_size} support-bot rows (max_length {args.max_length}, "
                  f"padded), {args.reps} reps: median (range)")
    rows = []
    for side, alone in (("plugin x2", "plugin alone"), ("plain x2", "plain alone")):
        if side not in results:
            continue
        base = [r[0]["step_s"] for r in results[alone]]
        rows.append([alone, common.summary(base), common.summary(r[0]["tokens_per_s"]
                                                                 for r in results[alone]), "1",
                     results[alone][0][0]["threads"]])
        for i in range(2):
            steps = [r[i]["step_s"] for r in results[side]]
            rows.append([f"{side}, process {i + 1}", common.summary(steps),
                         common.summary(r[i]["tokens_per_s"] for r in results[side]),
                         common.summary(common.ratios(steps, base)), results[side][0][i]["threads"]])
    if "run beside serve" in results:
        beside = [r[0]["step_s"] for r in results["run beside serve"]]
        alone = [r[0]["step_s"] for r in results["plugin alone"]]
        rows.append([f"run beside serve ({args.beside_steps or 2 * args.steps} steps)",
                     common.summary(beside), common.summary(r[0]["tokens_per_s"]
                                                            for r in results["run beside serve"]),
                     common.summary(common.ratios(beside, alone)),
                     results["run beside serve"][0][0]["threads"]])
    print(common.table(["training process", "s/step", "tokens/s", "x alone (goal <= 2.2)", "threads"], rows))
    if "run beside serve" not in results:
        return
    print()
    served = [r[0] for r in results["serve alone"]]
    bursts = [statistics.median(b["trip"] for b in r[1:]) if len(r) > 1 else None
              for r in results["run beside serve"]]
    walls = [statistics.median(b["wall"] for b in r[1:]) if len(r) > 1 else None
             for r in results["run beside serve"]]
    counted = [len(r) - 1 for r in results["run beside serve"]]
    print(common.table(
        [f"{args.requests} requests at once, {args.max_tokens} tokens", "median round trip s", "burst wall s",
         "x alone (round trip)"],
        [["serve alone", common.summary(s["trip"] for s in served), common.summary(s["wall"] for s in served),
          "1"], [f"serve beside a training run ({common.summary(counted)} bursts)", common.summary(bursts),
                 common.summary(walls), common.summary(common.ratios(bursts, [s["trip"] for s in served]))]]))


if __name__ == "__main__":
    main()
