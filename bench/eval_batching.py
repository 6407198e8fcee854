"""Evaluation speed on the real model: greedy answers one at a time vs left-padded batches, same answers.

    python bench/eval_batching.py [--model smollm2] [--examples 30] [--batch-size 16] [--reps 2]

Both sides answer the first N support-bot eval prompts greedily in fp32 with the same model in one process,
alternating; prints seconds per side, the ratio and whether every answer is identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--examples", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from mlflow_finetune_plugin.evaluation import read_conversations, split_conversation
    from mlflow_finetune_plugin.logged_model import LoadedModel, generate, generate_greedy_batch
    from mlflow_finetune_plugin.models import load_tokenizer, resolve_model_path

    convs = read_conversations(str(REPO / "recipes" / "support-bot" / "data" / "eval.jsonl"))
    prompts = [split_conversation(c)[0] for c in convs][: args.examples]
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=torch.float32).eval()
    loaded = LoadedModel(model, load_tokenizer(args.model), {})

    def one_at_a_time():
        return [generate(loaded, p, max_new_tokens=args.max_new_tokens) for p in prompts]

    def batched():
        out = []
        for i in range(0, len(prompts), args.batch_size):
            out += generate_greedy_batch(loaded, prompts[i:i + args.batch_size], args.max_new_tokens)
        return out

    times, answers = {"one at a time": [], "batched": []}, {}
    for rep in range(args.reps):
        for name, fn in (("one at a time", one_at_a_time), ("batched", batched))[:: 1 if rep % 2 == 0 else -1]:
            start = time.perf_counter()
            answers[name] = fn()
            times[name].append(time.perf_counter() - start)
    same = sum(a == b for a, b in zip(answers["one at a time"], answers["batched"]))
    base = statistics.median(times["one at a time"])
    print(f"{args.model}, {len(prompts)} prompts, max_new_tokens {args.max_new_tokens}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {args.reps} reps (median; range)")
    print("| mode | seconds | speed-up |\n| --- | --- | --- |")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.1f} ({min(ts):.1f}-{max(ts):.1f}) | "
              f"{base / statistics.median(ts):.2f}x |")
    ratios = [a / b for a, b in zip(times["one at a time"], times["batched"])]
    print(f"speed-up per rep: {', '.join(f'{r:.2f}x' for r in ratios)}; identical answers: {same}/{len(prompts)}")
    print(json.dumps({"times": times, "identical": same, "n": len(prompts)}))


if __name__ == "__main__":
    main()
