"""How much does evaluation gain from SDPA's own grouped-query attention on CPU? The same evaluation, KV heads
copied (transformers' path) vs broadcast inside SDPA (`models.attention`), the same answers.

Both sides run the plugin's `run_evaluation` as a run's evaluation stage does (base zero-shot, few-shot with 3
random train conversations, retrieval with the 3 nearest, tuned; each answering the first N support-bot eval
prompts greedily in one batch and scoring the reference answers in the same pass), on smollm2 in fp32 with a
fresh LoRA adapter (B = 0: the tuned side answers like the base), alternating; prints seconds per side, the
speed-up and whether every contender's answers are identical.

    python bench/eval_gqa.py                  # 30 prompts, 48 new tokens, 2 reps: ~15 min on 2 quiet AVX2
    cores python bench/eval_gqa.py --examples 4 --max-new-tokens 8 --reps 1      # smoke test, ~1 min
"""

from __future__ import annotations

import argparse
import time

import common


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--examples", type=int, default=30)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers.integrations import sdpa_attention

    from mlflow_finetune_plugin.config.schema import EvalConfig, ModelConfig
    from mlflow_finetune_plugin.evaluate.contenders import read_conversations, run_evaluation
    from mlflow_finetune_plugin.models.attention import native_gqa_on_cpu
    from mlflow_finetune_plugin.models.base import load_base_model, load_tokenizer

    data = common.SUPPORT_BOT / "data"
    eval_convs, train_convs = (
        read_conversations(str(data / "eval.jsonl")),
        read_conversations(str(data / "train.jsonl")),
    )
    base = load_base_model(ModelConfig(name=args.model), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).eval()
    tokenizer = load_tokenizer(args.model)
    cfg = EvalConfig(max_examples=args.examples, max_new_tokens=args.max_new_tokens, traces=False,
                     forgetting=False)
    assert native_gqa_on_cpu()
    hooked = sdpa_attention.use_gqa_in_sdpa
    stock = hooked.__wrapped__

    def side(hook):
        def run():
            sdpa_attention.use_gqa_in_sdpa = hook
            try:
                return run_evaluation(model, tokenizer, eval_convs, train_convs, cfg)
            finally:
                sdpa_attention.use_gqa_in_sdpa = hooked
        return run

    sides = [("KV heads copied (transformers)", side(stock)), ("GQA in SDPA (plugin)", side(hooked))]
    times, results = {name: [] for name, _ in sides}, {}
    for rep in range(args.reps):
        for name, fn in common.rotated(sides, rep):
            common.log(f"rep {rep + 1}/{args.reps}: {name}")
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)

    (copied, _), (broadcast, _) = sides
    contenders = results[copied].contenders
    same = [c for c in contenders
            if [r[f"{c}_answer"] for r in results[copied].rows]
            == [r[f"{c}_answer"] for r in results[broadcast].rows]]
    common.header(
        f"Evaluation stage (run_evaluation: {', '.join(contenders)}) with KV heads copied vs broadcast in "
        f"SDPA; {args.model}, fp32, {cfg.max_examples} support-bot eval prompts, up to "
        f"{args.max_new_tokens} new tokens, {args.reps} reps: median (range)")
    speedup = common.ratios(times[copied], times[broadcast])
    print(common.table(["side", "seconds", "speed-up", "identical answers"], [
        [copied, common.summary(times[copied]), "1", "-"],
        [broadcast, common.summary(times[broadcast]), common.summary(speedup),
         f"{len(same)}/{len(contenders)} contenders"]]))


if __name__ == "__main__":
    main()
