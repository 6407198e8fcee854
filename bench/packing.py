"""How much faster does packing train on mixed-length data? Packed plugin vs padded plain, the same rows.

Generated chat rows whose answer lengths are log-normal (many short, a long tail, like real instruction data),
one epoch over all of them on each side, in rotated order per repetition:

  plugin packed  mlflow run recipes/support-bot -e lora --backend finetune -P model=smollm2 -P data=ROWS
                 -P data.packing=true -P epochs=1: rows of up to max_length tokens, each holding several
                 examples
  plain padded   bench/plain_train.py, batches of --batch-size examples padded to their longest, one epoch

Both see the same examples, so the same non-padding tokens (printed as a check); the figure is those tokens /
the Trainer's `train_runtime` (the plugin's from its logged metrics). Goal (issue 18): packed >= 1.5x padded.

    python bench/packing.py                                   # 160 rows, 3 reps: ~15 min on 2 cores
    python bench/packing.py --rows 6 --reps 1                 # smoke test, ~1.5 min
"""

from __future__ import annotations

import argparse
import math

import common

LR, WARMUP = 4e-3, 0.05


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rows", type=int, default=160)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="Examples per padded batch (plain).")
    p.add_argument("--packed-batch-size", type=int, default=2,
                   help="Packed rows per batch (plugin): about as "
                        "many examples as a padded batch at the default lengths.")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from mlflow_finetune_plugin.models.base import resolve_model_path

    work, env = common.setup(args.workdir)
    model_dir = resolve_model_path(args.model)
    data = common.write_jsonl(work / "data" / f"mixed-{args.rows}.jsonl", common.chat_rows(args.rows))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = sorted(min(args.max_length, len(tokenizer.apply_chat_template(r["messages"], return_dict=True)
                                              ["input_ids"])) for r in common.chat_rows(args.rows))

    results = {"plugin packed": [], "plain padded": []}
    for rep in range(args.reps):
        for side in common.rotated(list(results), rep):
            common.log(f"rep {rep + 1}/{args.reps}: {side}")
            tag = f"packing-{side.replace(' ', '-')}-{rep}"
            if side == "plugin packed":
                run = common.mlflow_run({
                    "model": args.model, "data": data, "epochs": 1, "data.packing": "true",
                    "data.max_length": args.max_length, "train.batch_size": args.packed_batch_size,
                    "train.learning_rate": LR, "train.warmup_ratio": WARMUP, "train.save_steps": 100000,
                    "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0, "eval.enabled": "false",
                    "registry.enabled": "false"}, env, work, tag)
                r = common.training_figures(run["run_id"])
            else:
                r = common.plain_train({"model": model_dir, "data": data, "max_length": args.max_length,
                                        "batch_size": args.batch_size, "lr": LR, "warmup": WARMUP,
                                        "steps": math.ceil(args.rows / args.batch_size)}, env, work, tag)
            common.log(
                f"  {r['tokens']:.0f} tokens in {r['seconds']:.1f} s = {r['tokens_per_s']:.0f} tokens/s")
            results[side].append(r)

    common.header(
        f"Packing on mixed-length data: packed plugin vs padded plain; {args.model}, LoRA r=16, one epoch "
        f"over {args.rows} generated rows (tokens with the chat template: median "
        f"{lengths[len(lengths) // 2]}, p90 {lengths[int(0.9 * (len(lengths) - 1))]}, max {lengths[-1]}; "
        f"max_length {args.max_length}), {args.reps} reps: median (range)")
    packed = [r["tokens_per_s"] for r in results["plugin packed"]]
    padded = [r["tokens_per_s"] for r in results["plain padded"]]
    rows = [[side, common.summary(r["tokens"] for r in runs), common.summary(r["seconds"] for r in runs),
             common.summary(r["tokens_per_s"] for r in runs),
             "1" if side == "plain padded" else common.summary(common.ratios(packed, padded))]
            for side, runs in results.items()]
    print(common.table(["side", "non-padding tokens", "train seconds", "tokens/s",
                        "tokens/s vs plain padded"], rows))


if __name__ == "__main__":
    main()
