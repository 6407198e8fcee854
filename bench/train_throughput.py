"""How many tokens/s does `mlflow run -e lora` train on the real model, against plain transformers + PEFT?

Three sides on the same batches of support-bot rows (same model, chat template, truncation, assistant-only
labels, batch, steps, optimizer, schedule and sampler seed), one fresh process each, in rotated order per
repetition:

  plugin      mlflow run recipes/support-bot -e lora --backend finetune -P model=smollm2 ... (packing off, so
  that
              its batches are the plain script's; the plugin picks its precision: fp32 unless this CPU's bf16
              matmuls measure at least 1.6x fp32, models/precision.py)
  plain fp32  bench/plain_train.py --precision fp32
  plain bf16  bench/plain_train.py --precision bf16 (CPU: autocast over fp32 weights)

Figure on every side: non-padding tokens through the training loop / the Trainer's `train_runtime`. The
plugin's come from what its run logged (`train/num_tokens`, `train/summary_runtime`). Ratios are per
repetition, then the median and range. Goals (issue 18): plugin >= 2.5x plain fp32, >= 0.97x plain bf16.

    python bench/train_throughput.py                           # 30 steps of 8 rows, 3 reps: ~25 min on 2
    cores python bench/train_throughput.py --steps 2 --batch-size 2 --reps 1    # smoke test, ~2 min
"""

from __future__ import annotations

import argparse

import common

SIDES = ("plugin", "plain fp32", "plain bf16")
LR, WARMUP, LOGGING = 4e-3, 0.05, 5


def plugin_params(args, **extra) -> dict:
    """-P overrides that pin everything the plain script is given, whatever the recipe says today."""
    return {"model": args.model, "max_steps": args.steps, "train.batch_size": args.batch_size,
            "data.max_length": args.max_length, "data.packing": "false", "train.learning_rate": LR,
            "train.warmup_ratio": WARMUP, "train.lr_scheduler": "cosine", "train.logging_steps": LOGGING,
            "train.save_steps": args.steps + 1000, "train.seed": 42, "train.precision": args.precision,
            "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0, "eval.enabled": "false",
            "registry.enabled": "false", **extra}


def run_side(side: str, args, model_dir: str, env: dict, work, tag: str) -> dict:
    if side == "plugin":
        run = common.mlflow_run(plugin_params(args), env, work, tag)
        return common.training_figures(run["run_id"])
    return common.plain_train({"model": model_dir, "data": common.SUPPORT_BOT / "data" / "train.jsonl",
                               "precision": side.split()[1], "max_length": args.max_length,
                               "batch_size": args.batch_size, "steps": args.steps, "lr": LR, "warmup": WARMUP,
                               "logging_steps": LOGGING}, env, work, tag)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2 (the real built-in model) or tiny.")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--precision", default="auto", help="The plugin's train.precision (auto: its own choice).")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    from mlflow_finetune_plugin.models.base import resolve_model_path

    work, env = common.setup(args.workdir)
    model_dir = resolve_model_path(args.model)
    results = {side: [] for side in SIDES}
    for rep in range(args.reps):
        for side in common.rotated(list(SIDES), rep):
            common.log(f"rep {rep + 1}/{args.reps}: {side}")
            r = run_side(side, args, model_dir, env, work, f"throughput-{side.replace(' ', '-')}-{rep}")
            common.log(
                f"  {r['tokens']:.0f} tokens in {r['seconds']:.1f} s = {r['tokens_per_s']:.0f} tokens/s")
            results[side].append(r)

    common.header(
        f"Training tokens/s: `mlflow run -e lora` vs plain transformers + PEFT; {args.model}, LoRA r=16 "
        f"all-linear, {args.steps} steps of {args.batch_size} support-bot rows (max_length "
        f"{args.max_length}, padded), {args.reps} reps: median (range)")
    plugin = [r["tokens_per_s"] for r in results["plugin"]]
    rows = []
    for side in SIDES:
        runs = results[side]
        tps = [r["tokens_per_s"] for r in runs]
        rows.append([side, common.summary(r["tokens"] for r in runs), common.summary(r["loss"] for r in runs),
                     common.summary(tps), "1" if side == "plugin" else common.summary(common.ratios(plugin,
                                                                                                    tps))])
    print(common.table(["side", "non-padding tokens", "mean train loss", "tokens/s", "plugin / side"], rows))


if __name__ == "__main__":
    main()
