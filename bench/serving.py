"""Serving: the playground's transformers engine against plain `model.generate`, and A/B memory.

For each model size: a LoRA version is made with `mlflow run ... --backend finetune` (a few steps, registered in
the bench store), then, in fresh processes:
  speed       one process holds the engine (`TransformersEngine`, both sides of the A/B loaded: the version and
              its base) and the plain baseline (the same adapter folder on the same base with `PeftModel`, and the
              plain base model), and alternates: engine tuned, plain tuned, engine base, plain base. Greedy, same
              prompt (chat template with generation prompt), same max_new_tokens.
              Time to first token: engine = from calling `stream()` to its first text piece (what the playground
              shows); plain = from calling `generate()` to the first new token (a minimal streamer notes it).
              Tokens/s: new tokens / time from the call to the last token.
  mem-engine  the engine with both sides loaded (one base copy, adapter toggled)
  mem-two     the naive A/B: the base and a merged copy of the tuned model (two copies)
              Memory: bytes of distinct parameter/buffer storage held, and the process RSS growth.

    python bench/serving.py                  # tiny and medium (~77M) models, 5 reps (~4 min on 2 cores)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.models import model_dir, n_params  # noqa: E402


def _messages() -> list[dict]:
    row = json.loads((common.SUPPORT_BOT / "data" / "eval.jsonl").read_text().splitlines()[0])
    return [m for m in row["messages"] if m["role"] != "assistant"]


def _distinct_bytes(models) -> int:
    seen, total = set(), 0
    for m in models:
        for t in [*m.parameters(), *m.buffers()]:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def _rss() -> int:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss


def _plain_models(local, merged: bool = False):
    """The same base and adapter the engine serves, loaded the plain way."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlflow_finetune_plugin.models import resolve_model_path

    path = resolve_model_path(local.base_ref)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                      str(local.adapter_dir)).eval()
    if merged:
        tuned = tuned.merge_and_unload()
    return base, tuned


def _plain_generate(model, tokenizer, messages, max_new_tokens: int, eos) -> dict:
    import torch
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.puts, self.first = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2 and self.first is None:  # the 1st put is the prompt, the 2nd the first new token
                self.first = time.perf_counter()

        def end(self):
            pass

    streamer = FirstToken()
    t0 = time.perf_counter()
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, streamer=streamer)
    total = time.perf_counter() - t0
    new = out[0, enc["input_ids"].shape[1]:]
    return {"ttft": streamer.first - t0, "total": total, "tokens": int(new.shape[0]),
            "text": tokenizer.decode(new, skip_special_tokens=True).strip()}


def _engine_generate(engine, choice, messages, max_new_tokens: int) -> dict:
    from mlflow_finetune_plugin.serving.base import Settings

    t0 = time.perf_counter()
    first, pieces = None, []
    for piece in engine.stream(choice, messages, Settings(temperature=0.0, max_new_tokens=max_new_tokens)):
        if piece and first is None:
            first = time.perf_counter()
        pieces.append(piece)
    total = time.perf_counter() - t0
    return {"ttft": (first or time.perf_counter()) - t0, "total": total, "text": "".join(pieces).strip()}


def worker(kind: str, name: str, version: str, reps: int, max_new_tokens: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from mlflow_finetune_plugin.serving.base import ModelChoice
    from mlflow_finetune_plugin.serving.choices import local_model
    from mlflow_finetune_plugin.serving.transformers_engine import TransformersEngine, _eos_ids

    tuned_choice, base_choice = ModelChoice(name, version), ModelChoice(name, version, base=True)
    local = local_model(tuned_choice)
    tokenizer = AutoTokenizer.from_pretrained(local.tokenizer_dir)
    torch.set_grad_enabled(False)
    rss0 = _rss()
    if kind == "mem-engine":
        engine = TransformersEngine(device="cpu")
        engine.prepare(tuned_choice)
        engine.prepare(base_choice)
        return {"bytes": _distinct_bytes([s.model for s in engine._slots]), "rss": _rss() - rss0,
                "models_in_memory": len(engine._slots)}
    if kind == "mem-two":
        base, tuned = _plain_models(local, merged=True)
        return {"bytes": _distinct_bytes([base, tuned]), "rss": _rss() - rss0, "models_in_memory": 2}

    engine = TransformersEngine(device="cpu")
    engine.prepare(tuned_choice)
    engine.prepare(base_choice)
    plain_base, plain_tuned = _plain_models(local)
    messages = _messages()
    eos = _eos_ids(tokenizer, plain_base)
    sides = [("engine", "tuned"), ("plain", "tuned"), ("engine", "base"), ("plain", "base")]
    out = {f"{a}/{b}": [] for a, b in sides}
    for rep in range(reps + 1):  # rep 0 warms every path up and is dropped
        k = rep % len(sides)
        for who, which in sides[k:] + sides[:k]:
            if who == "engine":
                r = _engine_generate(engine, tuned_choice if which == "tuned" else base_choice, messages,
                                     max_new_tokens)
            else:
                r = _plain_generate(plain_tuned if which == "tuned" else plain_base, tokenizer, messages,
                                    max_new_tokens, eos)
            if rep:
                out[f"{who}/{which}"].append(r)
    for which in ("tuned", "base"):  # same greedy answer on both sides: the engine's token count is the plain one
        plain_runs, engine_runs = out[f"plain/{which}"], out[f"engine/{which}"]
        for e, p in zip(engine_runs, plain_runs):
            e["tokens"] = p["tokens"]
            e["same_text"] = e["text"] == p["text"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,medium")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default); see train_throughput.")
    common.output_args(p)
    p.add_argument("--worker", nargs=3, metavar=("KIND", "NAME", "VERSION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.reps, args.max_new_tokens)))
        return

    common.measure_or_render("serving", args, measure, render)


def measure(args, work: Path) -> dict:
    (work / "logs").mkdir(exist_ok=True)
    threads = common.thread_env(args.threads)
    env = common.bench_env(work, **threads)
    tiny = common.tiny_model_dir(env)
    info = common.machine()
    client = common.mlflow_client(env)
    results = {}
    for size in args.models.split(","):
        model = model_dir(size, tiny, work / "models")
        name = f"bench-serving-{size}"
        common.log(f"{size}: fine-tuning a LoRA version of {name} (load {common.loadavg()})")
        common.run_plugin(common.SUPPORT_BOT, "lora", {
            "model": model, "registry.name": name, "train.max_steps": 4, "train.batch_size": 4,
            "data.packing": "false", "eval.enabled": "false"}, env, work, work / "logs" / f"serving-train-{size}.log")
        version = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        r = {"params": n_params(model)}
        for kind in ("mem-engine", "mem-two", "speed"):
            common.log(f"{size}: {kind} (load {common.loadavg()})")
            reps = ["--reps", str(args.reps), "--max-new-tokens", str(args.max_new_tokens)]
            r[kind] = common.run_python([__file__, "--worker", kind, name, str(version), *reps], env, work,
                                        work / "logs" / f"serving-{kind}-{size}.log")
        results[size] = r
    return {"results": results, "args": vars(args), "info": info, "load": common.loadavg()}


def render(raw: dict, no_doc: bool) -> None:
    args = argparse.Namespace(**raw["args"])
    results, info = raw["results"], raw["info"]
    speed_rows, mem_rows = [], []
    for size, r in results.items():
        sp = r["speed"]
        for which in ("tuned", "base"):
            eng, pln = sp[f"engine/{which}"], sp[f"plain/{which}"]
            ttft_ratio = [e["ttft"] / q["ttft"] for e, q in zip(eng, pln)]
            tps_e = [e["tokens"] / e["total"] for e in eng]
            tps_p = [q["tokens"] / q["total"] for q in pln]
            speed_rows.append([size, which, str(pln[0]["tokens"]),
                               f"{1000 * common.median(e['ttft'] for e in eng):.1f}",
                               f"{1000 * common.median(q['ttft'] for q in pln):.1f}", common.median(ttft_ratio),
                               common.median(tps_e), common.median(tps_p),
                               common.median(a / b for a, b in zip(tps_e, tps_p)),
                               "yes" if all(e["same_text"] for e in eng) else "**no**"])
        me, mt = r["mem-engine"], r["mem-two"]
        mem_rows.append([size, f"{r['params'] / 1e6:.1f}M", f"{me['bytes'] / 2**20:.1f}", f"{mt['bytes'] / 2**20:.1f}",
                         me["bytes"] / mt["bytes"], f"{me['rss'] / 2**20:.0f}", f"{mt['rss'] / 2**20:.0f}",
                         me["rss"] / mt["rss"] if mt["rss"] > 0 else None])
    t_speed = common.table(["model", "side", "new tokens", "TTFT engine (ms)", "TTFT plain (ms)",
                            "TTFT ratio engine/plain", "tokens/s engine", "tokens/s plain",
                            "tokens/s ratio engine/plain", "same answer"], speed_rows)
    t_mem = common.table(["model", "params", "one base copy + adapter (MiB of tensors)", "two copies (MiB)",
                          "ratio", "RSS growth one copy (MiB)", "RSS growth two copies (MiB)", "RSS ratio"],
                         mem_rows)
    print(t_speed + "\n\n" + t_mem)
    if no_doc:
        return
    plot = _plot(results)
    body = f"""## 4. Serving: the playground's transformers engine vs plain `model.generate`; A/B memory

{common.machine_line(info)}
Shared 2-core machine (load average at the end: {raw["load"]}); ratios within one process and repetition are
what counts.

    python bench/serving.py --models {args.models} --reps {args.reps} --max-new-tokens {args.max_new_tokens} --threads {args.threads}

For each model a LoRA version is trained for 4 steps with `mlflow run recipes/support-bot -e lora
--backend finetune -P model=DIR` and registered; then `TransformersEngine` (mlflow_finetune_plugin/serving) serves
the version and its base (`NAME/V` and `NAME/V:base`: one base copy, adapter layers toggled per forward) while the
baseline runs `model.generate` on the same adapter folder over the same base (`PeftModel.from_pretrained`) and on
the plain base. Greedy, the first support-bot eval prompt, {args.max_new_tokens} new tokens at most; the
repetitions alternate engine and plain in one process after one warm-up round. TTFT: engine = call to first text
piece of `stream()` (what the playground shows); plain = call to first new token. Tokens/s: new tokens / time from
the call to the end (prefill included). "same answer": the engine's text equals plain greedy decoding's.

{t_speed}

Memory of an A/B comparison: the engine holding both sides (version + its base) against the naive way, the base
plus a merged copy of the tuned model. Tensors: bytes of distinct parameter and buffer storage (exact); RSS: growth
of the process's resident memory while loading (noisier: allocator and file cache).

{t_mem}

![serving](benchmarks/serving.png)

Reading: the engine's per-token cost over plain `generate` is a lock and an adapter-state check around each forward
and `TextIteratorStreamer` (detokenising in a second thread); its first piece also waits for the streamer to have a
whole word (one or more tokens: `TextIteratorStreamer` releases text up to the last space), which is most of
the TTFT gap; the answers are identical. Memory: one base copy plus a LoRA adapter is about
half of two copies, the adapter adding {_adapter_share(results)} of the base.
"""
    common.write_section("serving", body)
    print(f"\nwrote {common.DOC} and {plot}")


def _adapter_share(results) -> str:
    shares = {size: r["mem-engine"]["bytes"] / (r["mem-two"]["bytes"] / 2) - 1 for size, r in results.items()}
    return ", ".join(f"{100 * v:.1f}% ({size})" for size, v in shares.items())


def _plot(results) -> Path:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    sizes = list(results)
    width = 0.2
    for j, (who, which) in enumerate([("engine", "tuned"), ("plain", "tuned"), ("engine", "base"),
                                      ("plain", "base")]):
        ttft = [1000 * common.median(x["ttft"] for x in results[s]["speed"][f"{who}/{which}"]) for s in sizes]
        tps = [common.median(x["tokens"] / x["total"] for x in results[s]["speed"][f"{who}/{which}"]) for s in sizes]
        xs = [i + (j - 1.5) * width for i in range(len(sizes))]
        hatch = "//" if who == "plain" else None
        axes[0].bar(xs, ttft, width, label=f"{who} {which}", hatch=hatch)
        axes[1].bar(xs, tps, width, label=f"{who} {which}", hatch=hatch)
    for ax, title in ((axes[0], "time to first token (ms, median)"), (axes[1], "tokens/s (median)")):
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    ax = axes[2]
    one = [results[s]["mem-engine"]["bytes"] / 2**20 for s in sizes]
    two = [results[s]["mem-two"]["bytes"] / 2**20 for s in sizes]
    ax.bar([i - 0.2 for i in range(len(sizes))], one, 0.4, label="engine: one base + adapter")
    ax.bar([i + 0.2 for i in range(len(sizes))], two, 0.4, label="two copies")
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set_yscale("log")
    ax.set_title("A/B memory (MiB of tensors, log)", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return common.save_plot(fig, "serving.png")


if __name__ == "__main__":
    main()
