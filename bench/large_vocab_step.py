"""What does a large vocabulary cost a LoRA step, and what does the chunked LM head save? gemma3 (262,144
words).

One process loads the model once, wrapped as `mlflow run -e lora` wraps it (LoRA, and with a chosen chat
template its control tokens' trainable rows through PEFT), builds the trainer the plugin builds, and takes one
packed batch of support-bot rows (2 rows of up to 256 tokens). Then, interleaved in rotated order, each side
runs forward + backward on that same batch (no optimizer step: the LoRA update is the same on every side):
  plain     transformers + PEFT: `model(**batch)` with the labels, the model's own loss, the logits of every
  position logits    the plugin with `train.fused_lm_head: false`: the LM head on the labelled positions only,
  all at once chunked   the plugin with `train.fused_lm_head: chunked` (CPU auto): the head over chunks of
  labelled positions
and, with `--replay`, the KL replay term on one row of general text, as the trainer adds it every
`replay_every` steps: `kl logits` (both models' whole logits) against `kl chunked`.
Memory: the peak resident memory during the step (Linux VmHWM, reset before each step through
/proc/self/clear_refs) minus the resident memory just before it: what the step adds on top of the loaded model
(the script runs itself with glibc's MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB, so that memory freed by one step
is not counted as resident in the next). Time: wall seconds of the step, and the process's CPU time during it
(less sensitive to other work on shared cores). Loss: each side's against plain's (kl: chunked against
logits).

    python bench/large_vocab_step.py                          # gemma3, 3 reps: ~10 min on 2 shared cores
    python bench/large_vocab_step.py --model smollm2          # the same on a 49k vocabulary
    python bench/large_vocab_step.py --model tiny --reps 1    # smoke test, seconds
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import common

SIDES = ("plain", "logits", "chunked")
KL_SIDES = ("kl logits", "kl chunked")


def memory(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in bytes."""
    return 1024 * int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def build(model_name: str, template: str | None, replay: bool):
    """(trainer, model, packed batch) as the plugin's pipeline builds them for support-bot on `model_name`."""
    import torch

    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.data.splits import load_splits
    from mlflow_finetune_plugin.models.base import load_base_model, load_tokenizer
    from mlflow_finetune_plugin.train import templates
    from mlflow_finetune_plugin.train.adapters import attach
    from mlflow_finetune_plugin.train.objectives import sft
    from mlflow_finetune_plugin.train.trainers import training_arguments

    overrides = {"model.name": model_name, "data.max_length": 256, "train.batch_size": 2,
                 "data.packing": True, "eval.enabled": False, "data.replay": replay, "data.replay_every": 1,
                 "train.max_steps": 1}
    if template:
        overrides["model.chat_template"] = template
    recipe = load_recipe(common.SUPPORT_BOT, "lora", overrides=overrides)
    tokenizer = load_tokenizer(recipe.model.name, chat_template=recipe.model.chat_template,
                               base_dir=recipe.project_dir)
    data = templates.for_template(recipe, load_splits(recipe), tokenizer, main=False)
    torch.manual_seed(recipe.train.seed)
    model = load_base_model(recipe.model)
    trainable = templates.fit_model(recipe, model, tokenizer, main=False)
    model = attach(model, recipe, trainable)
    args = training_arguments(recipe, "bench", None)
    args["output_dir"] = tempfile.mkdtemp(prefix="large-vocab-")
    trainer = sft.build_trainer(recipe, model, tokenizer, data.train, None, args, callbacks=[])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    # A step mid-training, not the first: LoRA's B starts at zero (the tuned model would equal the base, and
    # the KL term would be 0); small seeded values make every side's loss and gradient depend on the adapter.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 1e-3)
    return trainer, model.train(), batch, trainable


def step(side: str, trainer, model, batch) -> float:
    """One forward + backward of `side`; its loss."""
    if side == "plain":  # the inputs the trainer hands the model for packed rows (no 2D attention mask)
        loss = model(**{k: v for k, v in batch.items() if k != "attention_mask"}, use_cache=False).loss
    elif side.startswith("kl"):
        trainer.fused_lm_head = False if side == "kl logits" else "chunked"
        trainer._replay_at = 0
        loss = trainer._replay_kl(model)
    # the task's loss alone: the replay term, which the trainer adds every `replay_every` steps, is apart
    else:
        trainer.fused_lm_head = False if side == "logits" else "chunked"
        replay, trainer.replay_kl = trainer.replay_kl, []
        try:
            loss = trainer.compute_loss(model, dict(batch))
        finally:
            trainer.replay_kl = replay
    loss.backward()
    return float(loss)


def measure(side: str, trainer, model, batch) -> dict:
    model.zero_grad(set_to_none=True)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = memory("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    loss = step(side, trainer, model, batch)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"loss": loss, "seconds": seconds, "cpu": cpu, "growth": memory("VmHWM") - before}


def main(argv=None):
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc serves allocations below a threshold that grows to 32 MiB from its heap, and keeps what is
        # freed there resident: a step's peak would then hide in memory a previous step left. A fixed
        # threshold of 1 MiB maps every larger tensor on its own and returns it when freed, so each step's
        # growth is its own.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2 ** 20)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3")
    p.add_argument("--template", default="auto",
                   help="model.chat_template ('none' for the model's own; auto: gemma for gemma3, else none)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--replay", action="store_true", help="also the KL replay term (kl logits, kl chunked)")
    args = p.parse_args(argv)
    common.setup()
    template = {"auto": "gemma" if args.model == "gemma3" else None, "none": None}.get(args.template,
                                                                                       args.template)

    import torch

    from mlflow_finetune_plugin.models.lm_head import head_of

    torch.set_num_threads(torch.get_num_threads())
    common.log(f"loading {args.model}")
    trainer, model, batch, trainable = build(args.model, template, args.replay)
    sides = list(SIDES) + (list(KL_SIDES) if args.replay else [])
    for side in sides:  # warm-up: the allocator, lazy imports and first-call costs, not measured
        common.log(f"warm-up: {side}")
        measure(side, trainer, model, batch)
    results = {side: [] for side in sides}
    for rep in range(args.reps):
        for side in common.rotated(sides, rep):
            common.log(f"rep {rep + 1}/{args.reps}: {side}")
            results[side].append(measure(side, trainer, model, batch))

    labelled = int((batch["labels"][:, 1:] != -100).sum())
    head = head_of(model)
    common.header(
        f"One LoRA step (forward + backward) on {args.model}, vocabulary {head.vocab:,}: one packed batch "
        f"of support-bot, {tuple(batch['input_ids'].shape)} tokens, {labelled} labelled; chat template "
        f"{template or 'the model own'}, trainable token rows {trainable or 'none'}; {args.reps} reps, "
        "interleaved: median (range)")
    mib = 2 ** 20
    rows = []
    for side, runs in results.items():
        base = "kl logits" if side.startswith("kl") else "plain"
        figures = {key: ([r[key] for r in runs], [r[key] for r in results[base]])
                   for key in ("growth", "seconds", "cpu")}
        diff = max(abs(r["loss"] - b["loss"]) for r, b in zip(runs, results[base]))
        row = [side]
        for key, scale in (("growth", 1 / mib), ("seconds", 1), ("cpu", 1)):
            mine, ref = figures[key]
            row += [common.summary(v * scale for v in mine), common.summary(common.ratios(mine, ref))]
        rows.append(row + [f"{runs[0]['loss']:.6f}", f"{diff:.1e}"])
    print(common.table(["side", "peak RSS growth (MiB)", "/ plain (kl: / kl logits)", "wall (s)", "ratio",
                        "CPU (s)", "ratio", "loss", "max abs loss difference"], rows))
    print(
        "\nwall: the step's elapsed time; CPU: the process's CPU time during it (user + system), which other "
        "processes on shared cores change less")


if __name__ == "__main__":
    main()
