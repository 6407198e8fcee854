"""Production traffic for the distillation measurement (issue 53, point 6; docs/benchmarks.md, "A smaller
model from a larger one's traffic").

A registered "production" model answers the support-bot questions as an application would send them: through
`mlflow-finetune serve --engine transformers --trace EXPERIMENT` and the real `openai` client, one request at
a time, so each answer is an MLflow trace of that experiment. The train questions go to one experiment (the
traffic a student learns from); the held-out questions to another (the reviewed traffic), where a support
agent corrects every second answer with the bundled reference answer (`POST /v1/feedback` with a correction:
an expectation on the trace).

    python bench/distill_traffic.py --model support-teacher/1 --workdir /tmp/distill

Prints how many answers each experiment got and how long they took (one request at a time, this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

REPO = common.REPO
DATA = REPO / "recipes" / "support-bot" / "data"


def questions(path: Path, limit: int | None) -> list[tuple[list[dict], str]]:
    """(the prompt as the application sends it: system + user message, the reference answer) per row."""
    out = []
    for line in path.read_text().splitlines()[:limit]:
        messages = json.loads(line)["messages"]
        prompt = [m for m in messages if m["role"] in ("system", "user")][:2]
        reference = next(m["content"] for m in messages if m["role"] == "assistant")
        out.append((prompt, reference))
    return out


def serve(model: str, experiment: str, port: int, env: dict) -> subprocess.Popen:
    """The production model's server, every answer traced into `experiment`."""
    return common.serve(model, port, env, Path(env["FINETUNE_BENCH_WORK"]) / f"serve-{experiment}.log",
                        ("--trace", experiment))


def send(model_name: str, port: int, rows, correct_every: int, max_tokens: int) -> dict:
    import httpx
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    seconds, corrected, cut = [], 0, 0
    for i, (prompt, reference) in enumerate(rows):
        started = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(model=model_name, messages=prompt,
                                                               max_tokens=max_tokens, temperature=0.0)
        answer = raw.parse()
        seconds.append(time.perf_counter() - started)
        cut += answer.choices[0].finish_reason == "length"
        if correct_every and i % correct_every == 0:
            said = httpx.post(f"http://127.0.0.1:{port}/v1/feedback", timeout=60, trust_env=False, json={
                "trace_id": raw.headers["x-mlflow-trace-id"], "correction": reference,
                "user": "support-agent"})
            said.raise_for_status()
            corrected += 1
        if (i + 1) % 25 == 0:
            print(f"  {i + 1}/{len(rows)} answered, median {statistics.median(seconds):.2f} s", flush=True)
    return {"answers": len(rows), "corrected": corrected, "cut at max_tokens": cut,
            "median s": round(statistics.median(seconds), 2), "total s": round(sum(seconds), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the production model, NAME/VERSION")
    parser.add_argument("--workdir", default="/tmp/mlflow-finetune-distill")
    parser.add_argument("--train-experiment", default="support-traffic")
    parser.add_argument("--eval-experiment", default="support-traffic-reviewed")
    parser.add_argument("--n-train", type=int, default=None, help="train questions sent (default: all 419)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--port", type=int, default=8791)
    args = parser.parse_args()

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI",
                                                               f"sqlite:///{work}/mlflow.db"),
           "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "FINETUNE_BENCH_WORK": str(work),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    name, version = args.model.split("/")
    served_name = f"{name}-v{version}"
    report = {}
    for experiment, path, limit, correct_every in ((args.train_experiment, DATA / "train.jsonl", args.n_train,
                                                    0), (args.eval_experiment, DATA / "eval.jsonl", None, 2)):
        proc = serve(args.model, experiment, args.port, env)
        try:
            print(f"{experiment}: sending {path.name} questions to {served_name}", flush=True)
            report[experiment] = send(served_name, args.port, questions(path, limit), correct_every,
                                      args.max_tokens)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
