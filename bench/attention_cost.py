"""How much a training row's cost grows with its length: the figure `data.packing: auto` decides with.

One LoRA forward + backward pass over one row of L tokens (SDPA, fp32, the plugin's LoRA defaults), timed for
several L, fitted as `t(L) = c0 + a*L + b*L^2` by least squares. `c0` is the fixed cost of a pass (in tokens'
worth: `c0/a`), `a/b` the *attention span*: the length at which a token's attention costs as much as its
linear layers. The plugin's estimate (`data/packing.py`) derives the span from the model's shape
(`span_from_config`); this script prints the measured span beside it, so the constant in that formula can be
checked on any CPU. The baseline is the model without attention term `t(L) = c0 + a*L`: the table shows how
far each length is from it.

    python bench/attention_cost.py --model smollm2 --reps 3
    python bench/attention_cost.py --model tiny --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--lengths", default="64,128,256,512,1024")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mlflow_finetune_plugin.data.packing import span_from_config
    from mlflow_finetune_plugin.models.base import resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    common.header(f"attention cost per row length, model {args.model}")
    path = resolve_model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    lengths = [int(x) for x in args.lengths.split(",")]
    vocab = model.config.vocab_size

    def step(n: int) -> float:
        ids = torch.randint(0, vocab, (1, n))
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(lengths[0])  # warm-up
    times = {n: [] for n in lengths}
    for rep in range(args.reps):
        for n in common.rotated(lengths, rep):
            times[n].append(step(n))
    med = {n: statistics.median(ts) for n, ts in times.items()}
    import numpy as np

    x = np.array(lengths, dtype=float)
    c0, a, b = np.linalg.lstsq(np.stack([np.ones_like(x), x, x * x], 1), np.array([med[n] for n in lengths]),
                               rcond=None)[0]
    rows = [[n, f"{med[n] * 1000:.1f} ({min(times[n]) * 1000:.1f}-{max(times[n]) * 1000:.1f})",
             f"{med[n] / n * 1e6:.0f}", f"{(c0 + a * n + b * n * n) * 1000:.1f}",
             f"{med[n] / (c0 + a * n):.2f}"]
            for n in lengths]
    print(common.table(["row length", "ms per pass (range)", "us per token", "fit c0+a*L+b*L^2 (ms)",
                        "vs no attention term c0+a*L"], rows))
    span = a / b if b > 0 else float("inf")
    print(
        f"\nfit: c0 = {c0 * 1000:.0f} ms a pass ({c0 / a:.0f} tokens' worth), a = {a * 1000:.2f} ms a token, "
        f"span a/b = {span:.0f} tokens; from the model's shape (data/packing.py): "
        f"{span_from_config(model.config):.0f} tokens")


if __name__ == "__main__":
    main()
