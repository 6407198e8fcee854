"""Does the playground hold up when a team uses it at once? N users each call `/compare` (both answers to one
prompt, greedy) and then vote, all at the same time, through `gradio_client`, against a real
`mlflow-finetune playground` process on 127.0.0.1 (the transformers engine, CPU).

Reports: errors, the time to the last answer and to the last vote, per-request latency (median, max), and the peak
RSS of the playground process (sampled every 0.1 s) against the same process idle with the model loaded, and
against one copy of the base weights: memory stays at one base copy plus adapters, whatever the number of users.
The baseline is the same N requests sent one after another (same process, same prompts), so the speed-up of
answering concurrently is a ratio measured side by side; so is whether the answers stay the same (greedy: the
concurrent round's answers, batched together, against the serial round's). `--answers FILE` writes every answer as
JSON, to compare runs of two versions of the engine.

    python bench/playground_load.py --model support-bot@challenger          # needs a registered version
    python bench/playground_load.py --model support-bot@challenger --users 16 --max-new-tokens 48

The store is the bench scratch store (bench/common.py), where `bench/time_to_model.py` registers support-bot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import common

QUESTIONS = [
    "How do I reset my password?", "Can I use Nimbus Notes offline?", "How do I export my notes as PDF?",
    "How do I share a notebook with a colleague?", "Where do I turn on two-factor authentication?",
    "How do I cancel my subscription?", "Can I restore a deleted note?", "How do I change the app's theme?",
]


def _rss_sampler(pid: int, stop: threading.Event, peak: list):
    import psutil

    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
        except psutil.NoSuchProcess:
            return
        peak[0] = max(peak[0], rss)
        time.sleep(0.1)


def _user(url: str, i: int, max_new_tokens: int) -> dict:
    from gradio_client import Client

    client = Client(url, verbose=False)
    started = time.monotonic()
    out = client.predict(QUESTIONS[i % len(QUESTIONS)], api_name="/compare",
                         system_prompt=client.predict(api_name="/system_prompt"),
                         max_new_tokens=max_new_tokens)
    answered = time.monotonic()
    client.predict(out["id"], "a" if i % 2 else "b", api_name="/vote")
    ok = all(out[side]["answer"] and not out[side]["error"] for side in ("a", "b"))
    return {"answer": answered - started, "voted": time.monotonic() - started, "ok": ok,
            "texts": [out["a"]["answer"], out["b"]["answer"]],
            "answered_at": answered, "voted_at": time.monotonic()}


def _round(url: str, users: int, max_new_tokens: int, concurrent: bool) -> dict:
    started = time.monotonic()
    if concurrent:
        with ThreadPoolExecutor(users) as pool:
            results = list(pool.map(lambda i: _user(url, i, max_new_tokens), range(users)))
    else:
        results = [_user(url, i, max_new_tokens) for i in range(users)]
    return {"last_answer": max(r["answered_at"] for r in results) - started,
            "last_vote": max(r["voted_at"] for r in results) - started,
            "latencies": [r["answer"] for r in results], "answered": sum(r["ok"] for r in results),
            "texts": [r["texts"] for r in results]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="support-bot@challenger")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=None, help="the playground's --concurrency (default: its own)")
    p.add_argument("--answers", default=None, help="write every answer here (JSON), to compare engines' answers")
    p.add_argument("--port", type=int, default=7871)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    work, env = common.setup(args.workdir)
    url = f"http://127.0.0.1:{args.port}/"
    log = open(work / "logs" / "playground-load.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-c", "from mlflow_finetune_plugin.cli import main; main()", "playground", "--model",
         args.model, "--port", str(args.port)] + ([] if args.concurrency is None else
                                                   ["--concurrency", str(args.concurrency)]),
        env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import httpx

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"the playground exited; see {log.name}")
            time.sleep(1)
        common.log("playground up; warming up with one comparison")
        _round(url, 1, args.max_new_tokens, concurrent=False)
        import psutil

        idle = psutil.Process(server.pid).memory_info().rss
        rows, rounds = [], []
        for concurrent in (False, True):  # the baseline first: serial requests
            peak, stop = [0], threading.Event()
            sampler = threading.Thread(target=_rss_sampler, args=(server.pid, stop, peak), daemon=True)
            sampler.start()
            common.log(f"{args.users} users, {'at once' if concurrent else 'one after another'}")
            result = _round(url, args.users, args.max_new_tokens, concurrent)
            stop.set()
            sampler.join()
            rounds.append(result)
            rows.append([("at once" if concurrent else "one after another (baseline)"),
                         f"{result['answered']}/{args.users}", f"{result['last_answer']:.1f}",
                         f"{result['last_vote']:.1f}", f"{statistics.median(result['latencies']):.1f}",
                         f"{max(result['latencies']):.1f}", f"{peak[0] / 2**20:.0f}"])
        speedup = rounds[0]["last_answer"] / rounds[1]["last_answer"]
        same = sum(a == b for a, b in zip(rounds[0]["texts"], rounds[1]["texts"]))
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
    common.header(f"Playground under load: {args.model}, {args.users} users each /compare (greedy, "
                  f"{args.max_new_tokens} new tokens) + /vote; transformers engine, --concurrency "
                  f"{args.concurrency or 'default'}")
    print(common.table(["requests", "answered", "last answer (s)", "last vote (s)", "median latency (s)",
                        "max latency (s)", "peak RSS (MiB)"], rows))
    print(f"\nIdle RSS with the model loaded: {idle / 2**20:.0f} MiB; at once vs one after another: "
          f"{speedup:.2f}x sooner to the last answer; median latency at once "
          f"{statistics.median(rounds[1]['latencies']):.1f} s. Comparisons answered the same at once as one after "
          f"another (both sides, greedy): {same}/{args.users}.")
    if args.answers:
        with open(args.answers, "w") as f:
            json.dump({"serial": rounds[0]["texts"], "at_once": rounds[1]["texts"]}, f, indent=1)


if __name__ == "__main__":
    main()
