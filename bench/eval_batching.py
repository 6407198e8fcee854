"""How long does evaluation take? Greedy answers one at a time vs in left-padded batches, the same answers.

Both sides answer the first N support-bot eval prompts greedily in fp32 with the same model in this process,
with the plugin's own functions (`logged_model.generate`, one prompt per call; `generate_greedy_batch`, what
the run's evaluation uses), alternating; prints seconds per side, the speed-up and how many answers are
identical. Goal (issue 18): >= 4x over 30 examples, identical answers.

    python bench/eval_batching.py                 # 30 prompts, 48 new tokens, 2 reps: ~4 min on 2 quiet cores
    python bench/eval_batching.py --examples 3 --max-new-tokens 8 --reps 1     # smoke test, ~30 s
"""

from __future__ import annotations

import argparse
import time

import common


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--examples", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from mlflow_finetune_plugin.evaluate.contenders import read_conversations
    from mlflow_finetune_plugin.logged_model import LoadedModel, generate, generate_greedy_batch
    from mlflow_finetune_plugin.messages import split_conversation
    from mlflow_finetune_plugin.models.base import load_tokenizer, resolve_model_path

    convs = read_conversations(str(common.SUPPORT_BOT / "data" / "eval.jsonl"))
    prompts = [split_conversation(c)[0] for c in convs][: args.examples]
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=torch.float32).eval()
    loaded = LoadedModel(model, load_tokenizer(args.model), {})

    def one_at_a_time():
        return [generate(loaded, p, max_new_tokens=args.max_new_tokens) for p in prompts]

    def batched():
        return [answer for i in range(0, len(prompts), args.batch_size)
                for answer in generate_greedy_batch(loaded, prompts[i:i + args.batch_size],
                                                    args.max_new_tokens)]

    sides = [("one at a time", one_at_a_time), ("batched", batched)]
    times, answers = {name: [] for name, _ in sides}, {}
    for rep in range(args.reps):
        for name, fn in common.rotated(sides, rep):
            common.log(f"rep {rep + 1}/{args.reps}: {name}")
            start = time.perf_counter()
            answers[name] = fn()
            times[name].append(time.perf_counter() - start)

    common.header(
        f"Evaluation: batched vs one-at-a-time greedy answers; {args.model}, {len(prompts)} support-bot "
        f"eval prompts, up to {args.max_new_tokens} new tokens, batches of {args.batch_size}, {args.reps} "
        f"reps: median (range)")
    speedup = common.ratios(times["one at a time"], times["batched"])
    same = sum(a == b for a, b in zip(answers["one at a time"], answers["batched"]))
    print(common.table(["side", "seconds", "speed-up", "identical answers"], [
        ["one at a time", common.summary(times["one at a time"]), "1", "-"],
        ["batched", common.summary(times["batched"]), common.summary(speedup), f"{same}/{len(prompts)}"]]))


if __name__ == "__main__":
    main()
