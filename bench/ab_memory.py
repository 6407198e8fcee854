"""How much memory does an A/B comparison take? One base copy with the adapter toggled vs two model copies.

A LoRA version of the model is trained for 2 steps and registered in the bench store (once). Each side is a
fresh process that imports the same libraries, fetches the version's files, notes its resident memory, then
loads both sides of the comparison and answers one prompt with each (8 new tokens):
  engine      the playground's `TransformersEngine` with `NAME/V` and `NAME/V:base` (one base copy + the
  adapter) two copies  the base model and a merged copy of the tuned model (`PeftModel.merge_and_unload`)
Figure: peak resident memory (Linux VmHWM) minus the resident memory before loading (after a warm-up tokenizer
load, so the libraries' own memory is not counted; each side then loads one tokenizer of its own); the sides
alternate in rotated order. Goal (issue 18): engine / two copies <= 0.55.

    python bench/ab_memory.py                     # smollm2, 3 reps: ~3 min on 2 cores
    python bench/ab_memory.py --reps 1            # smoke test, ~1 min (the first time: +1 min)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import common

SIDES = ("engine", "two copies")


def memory(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, in bytes."""
    return 1024 * int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def worker(side: str, name: str, version: str) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlflow_finetune_plugin.logged_model import LoadedModel, generate
    from mlflow_finetune_plugin.models.base import resolve_model_path
    from mlflow_finetune_plugin.serving.base import ModelChoice, Settings
    from mlflow_finetune_plugin.serving.choices import local_model
    from mlflow_finetune_plugin.serving.transformers_engine import TransformersEngine

    torch.set_grad_enabled(False)
    tuned, base = ModelChoice(name, version), ModelChoice(name, version, base=True)
    local = local_model(tuned)
    # warm-up: the tokenizers library's own memory (~120 MiB)
    AutoTokenizer.from_pretrained(local.tokenizer_dir)
    messages = [{"role": "user", "content": "How do I export my notes?"}]
    before = memory("VmRSS")
    if side == "engine":
        engine = TransformersEngine(device="cpu")
        answers = [engine.generate(c, messages, Settings(max_new_tokens=8)) for c in (tuned, base)]
    else:  # its own tokenizer too, as the engine loads one (~12 MiB for smollm2's 49k vocabulary)
        tokenizer = AutoTokenizer.from_pretrained(local.tokenizer_dir)
        path = resolve_model_path(local.base_ref)
        plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                           str(local.adapter_dir)).merge_and_unload().eval()
        answers = [generate(LoadedModel(m, tokenizer, {}), messages, max_new_tokens=8)
                   for m in (merged, plain)]
    return {"before": before, "peak": memory("VmHWM"), "answers": answers}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workdir", default=None)
    p.add_argument("--worker", nargs=3, metavar=("SIDE", "NAME", "VERSION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return

    work, env = common.setup(args.workdir)
    name = f"bench-{args.model}"
    version = common.registered_version(name, env, work, args.model)
    results = {side: [] for side in SIDES}
    for rep in range(args.reps):
        for side in common.rotated(list(SIDES), rep):
            common.log(f"rep {rep + 1}/{args.reps}: {side}")
            results[side].append(common.run_json([Path(__file__).resolve(), "--worker", side, name, version],
                                                 env, work, f"ab-memory-{side.replace(' ', '-')}-{rep}"))

    common.header(
        f"A/B memory: one base copy + adapter (the playground's engine) vs two model copies; {args.model} "
        f"and a LoRA version of it, {args.reps} reps: median (range)")
    mib = 2 ** 20
    growth = {side: [(r["peak"] - r["before"]) / mib for r in runs] for side, runs in results.items()}
    rows = [
        [
            side,
            common.summary(r["before"] / mib for r in runs),
            common.summary(r["peak"] / mib for r in runs),
            common.summary(growth[side]),
            common.summary(common.ratios(growth[side], growth["two copies"])) if side == "engine" else "1",
        ]
        for side, runs in results.items()
    ]
    print(common.table(["side", "RSS before loading (MiB)", "peak RSS (MiB)", "peak growth (MiB)",
                        "growth / two copies"], rows))
    same = all(a["answers"] == b["answers"] for a, b in zip(results["engine"], results["two copies"]))
    print(f"\nsame answers on both sides (tuned, base): {'yes' if same else 'no'}")


if __name__ == "__main__":
    main()
