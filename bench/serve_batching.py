"""`mlflow-finetune serve --engine transformers` with and without transformers' continuous batching, asked as
`-e distill` asks a teacher: N support questions, C requests in flight (docs/benchmarks-history.md section
10).

    python bench/serve_batching.py --model support-teacher/1 --workdir /tmp/distill

Prints wall time, answers per second, median round trip, the ratio against the plain server, and how many
answers are the same as the plain server's (greedy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, header, serve, setup, table  # noqa: E402

SETTINGS = {"plain": [], "continuous batching": ["--server-args", "--continuous-batching"]}


def measure(model: str, extra: list[str], questions: list[str], concurrency: int, port: int, env: dict,
            work: Path, name: str) -> dict:
    import httpx

    proc = serve(model, port, env, work / "logs" / f"serve-{name.replace(' ', '-')}.log", tuple(extra))
    try:
        served = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models"))["data"][0]["id"]

        def ask(question: str) -> tuple[float, str]:
            started = time.perf_counter()
            got = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=900, trust_env=False,
                             json={"model": served, "messages": [{"role": "user", "content": question}],
                                   "max_tokens": 128, "temperature": 0.0})
            got.raise_for_status()
            return time.perf_counter() - started, got.json()["choices"][0]["message"]["content"]

        ask(questions[0])  # the first request pays for the model's warm-up
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            out = list(pool.map(ask, questions))
        return {"wall": time.perf_counter() - started, "trip": statistics.median(o[0] for o in out),
                "answers": [o[1] for o in out]}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a registered model, NAME/VERSION")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--port", type=int, default=8793)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work, env = setup(args.workdir)
    prompts = REPO / "recipes" / "distill" / "data" / "prompts.jsonl"
    questions = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()[:args.questions]]
    results = {name: measure(args.model, extra, questions, args.concurrency, args.port, env, work, name)
               for name, extra in SETTINGS.items()}
    plain = results["plain"]
    header(f"## serve --engine transformers: {len(questions)} questions, {args.concurrency} in flight")
    print(table(["server", "wall s", "answers/s", "median round trip s", "vs plain", "same answers as plain"],
                [[name, f"{r['wall']:.1f}", f"{len(questions) / r['wall']:.2f}", f"{r['trip']:.1f}",
                  f"{plain['wall'] / r['wall']:.2f}x",
                  f"{sum(a == b for a, b in zip(r['answers'], plain['answers']))}/{len(questions)}"]
                 for name, r in results.items()]))


if __name__ == "__main__":
    main()
