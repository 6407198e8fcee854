"""CPU training precision on the real model: fp32 vs bf16 autocast vs bf16 weights (fp32 LoRA), same batches.

    python bench/cpu_precision.py [--model smollm2] [--steps 12] [--batch-size 8] [--reps 2]

One LoRA step = forward + backward + AdamW on a padded batch of support-bot rows (assistant-only labels), in one
process, modes interleaved. Prints tokens/s per mode as a ratio to fp32, and each mode's loss at every step against
fp32's (same data, same initial adapter), which is what `train.precision: auto` decides on.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("fp32", "bf16 autocast", "bf16 weights")


def batches(tokenizer, n_steps: int, batch_size: int):
    import json

    import torch

    rows = []
    for line in (REPO / "recipes" / "support-bot" / "data" / "train.jsonl").read_text().splitlines():
        enc = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        rows.append((enc["input_ids"], enc["assistant_masks"]))
    out = []
    for step in range(n_steps):
        chunk = rows[step * batch_size:(step + 1) * batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        labels, attn = torch.full_like(ids, -100), torch.zeros_like(ids)
        for i, (row, mask) in enumerate(chunk):
            ids[i, :len(row)] = torch.tensor(row)
            labels[i, :len(row)] = torch.tensor([t if m else -100 for t, m in zip(row, mask)])
            attn[i, :len(row)] = 1
        out.append({"input_ids": ids, "labels": labels, "attention_mask": attn})
    return out


def run_mode(mode: str, path: str, data: list) -> tuple[float, list[float]]:
    """(real tokens per second, loss at each step) of LoRA steps in `mode`."""
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    weights = torch.bfloat16 if mode == "bf16 weights" else torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=weights)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # LoRA weights and optimizer state stay fp32 in every mode
        p.data = p.data.float()
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16 autocast" else contextlib.nullcontext()
    losses, tokens, seconds = [], 0, 0.0
    for i, batch in enumerate(data):
        start = time.perf_counter()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i:  # step 0 warms up kernels and allocator
            seconds += time.perf_counter() - start
            tokens += int(batch["attention_mask"].sum())
        losses.append(loss.item())
    return tokens / seconds, losses


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from mlflow_finetune_plugin.models import cpu_has_fast_bf16, load_tokenizer, resolve_model_path

    path = resolve_model_path(args.model)
    data = batches(load_tokenizer(args.model), args.steps, args.batch_size)
    speed, losses = {m: [] for m in MODES}, {}
    for rep in range(args.reps):
        for mode in MODES[rep % 3:] + MODES[:rep % 3]:
            tps, losses[mode] = run_mode(mode, path, data)
            speed[mode].append(tps)
    base = statistics.median(speed["fp32"])
    print(f"{args.model}, LoRA r=16 all-linear, batch {args.batch_size}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads, AMX: {cpu_has_fast_bf16()}, {args.reps} reps (median; range)")
    print("| mode | tokens/s | vs fp32 | max abs loss diff vs fp32 | final loss |\n| --- | --- | --- | --- | --- |")
    for mode in MODES:
        diff = max(abs(a - b) for a, b in zip(losses[mode], losses["fp32"]))
        print(f"| {mode} | {statistics.median(speed[mode]):.0f} ({min(speed[mode]):.0f}-{max(speed[mode]):.0f}) | "
              f"{statistics.median(speed[mode]) / base:.2f}x | {diff:.4f} | {losses[mode][-1]:.4f} |")


if __name__ == "__main__":
    main()
