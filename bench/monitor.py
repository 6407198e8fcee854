"""How long does `mlflow-finetune monitor` take over a week of traffic, and does its cost grow linearly with
it?

Writes N synthetic served traces (the shape `serve --trace` records: a CHAT_MODEL span with the OpenAI request
and ChatCompletion, tagged with the served version; 80% questions from the support bot's held-out file, 20%
off-topic, every tenth answer cut at the length limit, every fifth rated) spread over 7 days into a sqlite
store, with a registered version whose source run names the support bot's train file. Then times, in separate
processes and interleaved, the baseline (reading the same traces with `MlflowClient.search_traces`, nothing
else) and `mlflow-finetune monitor bot --window 1d --no-log` (reading, scoring, drift, gates), at each N.

    python bench/monitor.py                      # 2,500 / 5,000 / 10,000 traces, 2 reps (~15 min, writing
    included) python bench/monitor.py --sizes 500 --reps 1 # smoke test (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OFF_TOPIC = ["What is the capital of France?", "Write a poem about the sea", "Who won the world cup in 2022?",
             "What is the boiling point of water?", "Who painted the Mona Lisa?"]
READ = ("import sys, time, mlflow; from mlflow import MlflowClient; c = MlflowClient(); t = time.time(); "
        "e = c.get_experiment_by_name('traffic').experiment_id; n, tok = 0, None\n"
        "while True:\n"
        "    p = c.search_traces(locations=[e], max_results=500, page_token=tok); n += len(p); tok = "
        "p.token\n    if not tok: break\n"
        "print(n)")


def write_traffic(store: Path, n: int) -> None:
    """N traces of `bot` v1 over the last 7 days (synchronous export: none dropped), and the registered
    version."""
    os.environ["MLFLOW_ENABLE_ASYNC_TRACE_LOGGING"] = "false"
    import mlflow
    from mlflow.entities import SpanType
    from mlflow.tracing.constant import TraceMetadataKey  # noqa: F401 - the shape serve --trace records

    from mlflow_finetune_plugin.data.read import load_training_dataset, mlflow_dataset

    mlflow.set_tracking_uri(f"sqlite:///{store}")
    train = REPO / "recipes" / "support-bot" / "data" / "train.jsonl"
    ds, _ = load_training_dataset(train)
    with mlflow.start_run() as run:
        mlflow.log_input(mlflow_dataset(ds, train, name="train"), context="training", tags={"format": "chat"})
    client = mlflow.MlflowClient()
    client.create_registered_model("bot")
    client.create_model_version("bot", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    known = [next(m["content"] for m in json.loads(x)["messages"] if m["role"] == "user")
             for x in (REPO / "recipes/support-bot/data/eval.jsonl").read_text().splitlines() if x.strip()]
    experiment = mlflow.set_experiment("traffic").experiment_id
    rng, start = random.Random(0), time.time_ns() - 7 * 86400 * 10**9
    for i in range(n):
        question = rng.choice(OFF_TOPIC) if rng.random() < 0.2 else rng.choice(known)
        at = start + int(i * 7 * 86400 * 10**9 / n)
        span = mlflow.start_span_no_context(
            "chat.completions", span_type=SpanType.CHAT_MODEL, experiment_id=experiment, start_time_ns=at,
            inputs={"model": "bot-v1", "messages": [{"role": "user", "content": question}], "max_tokens": 64},
            tags={"finetune.served.by": "serve", "finetune.served.name": "bot@champion",
                  "finetune.served.model": "bot/1"})
        cut = i % 10 == 0
        span.end(end_time_ns=at + rng.randint(200, 900) * 10**6, outputs={
            "id": f"chatcmpl-{i}", "object": "chat.completion", "model": "bot-v1",
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": "You can do that in Settings."},
                         "finish_reason": "length" if cut else "stop"}],
            "usage": {"prompt_tokens": 20 + len(question) // 4, "completion_tokens": 64 if cut else 9}})
        if i % 5 == 0:
            mlflow.log_feedback(trace_id=span.trace_id, name="user_feedback", value=rng.random() < 0.8)


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2500,5000,10000")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work, env = common.setup(args.workdir)
    common.header("monitor over N stored traces (no judge)")
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        store = work / f"monitor-{n}.db"
        if not store.exists():
            t = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--write", str(store), str(n)], env=env, check=True)
            common.log(f"wrote {n} traces in {time.perf_counter() - t:.0f} s")
        run_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
        read_cmd = [sys.executable, "-c", READ]
        monitor_cmd = [sys.executable, "-c", "from mlflow_finetune_plugin.cli import main; main()", "monitor",
                       "bot", "--window", "1d", "--no-log"]
        base, ours = [], []
        for rep in range(args.reps):
            for which in common.rotated(["read", "monitor"], rep):
                (base if which == "read" else ours).append(timed(read_cmd if which == "read" else monitor_cmd,
                                                                 run_env))
        rows.append([n, common.summary(base), common.summary(ours), common.summary(common.ratios(ours, base)),
                     common.fmt(min(ours) / n * 1000)])
    print(common.table(["traces", "read only (s)", "monitor (s)", "monitor / read",
                        "monitor s per 1k (best)"], rows))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--write":
        write_traffic(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
