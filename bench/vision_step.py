"""A vision-language LoRA step: the plugin's path against plain TRL, on the same model, processor, rows and
LoRA.

- plain: TRL's `SFTTrainer` as its docs show it for a VLM: prompt-completion rows with an `images` column of
PIL
  images, the processor as `processing_class`, TRL's own `DataCollatorForVisionLanguageModeling` (loss on the
  completion), PEFT LoRA on the language model's linear layers.
- plugin: the project's trainer on the same rows (`train/objectives/sft.py`: `VisionCollator`, labels from the
chat
  format's turns aligned onto the processor's ids, every row checked once before the first step), the same
  LoRA.

Each side runs in its own process (peak memory is the process's), alternating, `--reps` times. The table gives
tokens/s (non-padding tokens of the batches, image tokens included), images/s and peak memory (CUDA: max
allocated; CPU: the process's max RSS), with plugin/plain ratios.

    python bench/vision_step.py --tiny                          # tiny-llava on CPU, recipes/vision-colors
    rows python bench/vision_step.py --model HuggingFaceTB/SmolVLM-256M-Instruct --steps 30 --batch-size 8  #
    a device
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "vision-colors"


def rows(path: Path) -> list[dict]:
    """The recipe's rows in the canonical form (the project's own reader): messages with placeholders +
    images."""
    from mlflow_finetune_plugin.data.read import load_training_dataset

    ds, _ = load_training_dataset(str(path))
    return [ds[i] for i in range(len(ds))]


def _peak(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Count:
    """Counts what each batch holds: non-padding tokens and images."""

    def __init__(self, collate):
        self.collate, self.tokens, self.images = collate, 0, 0

    def __call__(self, examples):
        out = self.collate(examples)
        self.tokens += int(out["attention_mask"].sum())
        self.images += sum(len(e.get("images") or []) for e in examples)
        return out


def side(which: str, model_name: str, steps: int, batch_size: int) -> dict:
    import torch
    from peft import LoraConfig

    from mlflow_finetune_plugin.data.images import load_image
    from mlflow_finetune_plugin.models.base import load_base_model, load_tokenizer
    from mlflow_finetune_plugin.models.vision import lora_target_modules, processor_of

    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = rows(RECIPE / "data" / "train.jsonl")
    tok = load_tokenizer(model_name)
    processor = processor_of(tok)
    from mlflow_finetune_plugin.config.loading import load_recipe

    recipe = load_recipe(RECIPE, method="lora", overrides={"model.name": model_name, "train.max_steps": steps,
                                                           "train.batch_size": batch_size,
                                                           "eval.enabled": False})
    model = load_base_model(recipe.model)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=lora_target_modules(model),
                      task_type="CAUSAL_LM")
    args = dict(output_dir=f"/tmp/vision-bench-{which}", max_steps=steps,
                per_device_train_batch_size=batch_size, learning_rate=3e-3, logging_steps=steps,
                save_strategy="no", report_to="none", seed=0, data_seed=0, use_cpu=device == "cpu",
                bf16=device == "cuda", dataloader_num_workers=0)
    if which == "plain":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        plain = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:],
                                    "images": [load_image(ref) for ref in r["images"]]} for r in data])
        trainer = SFTTrainer(model=model, args=SFTConfig(**args, max_length=recipe.data.max_length),
                             train_dataset=plain, processing_class=processor, peft_config=lora)
    else:
        from datasets import Dataset
        from peft import get_peft_model

        from mlflow_finetune_plugin.train.objectives.sft import build_trainer

        recipe_args = {**args, "output_dir": f"/tmp/vision-bench-{which}"}
        trainer = build_trainer(recipe, get_peft_model(model, lora), tok, Dataset.from_list(data), None,
                                recipe_args, [])
    trainer.data_collator = counter = _Count(trainer.data_collator)
    began = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - began
    return {"side": which, "seconds": seconds, "tokens_per_s": counter.tokens / seconds,
            "images_per_s": counter.images / seconds, "peak_mib": _peak(device), "loss": result.training_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--tiny", action="store_true", help="tiny-llava on CPU (the default model)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--side", choices=["plain", "plugin"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(side(args.side, args.model, args.steps, args.batch_size)))
        return
    sys.path.insert(0, str(REPO / "bench"))
    from common import header, ratios, summary, table

    header(f"vision LoRA step: {args.model}, {args.steps} steps of {args.batch_size} rows, {args.reps} reps")
    got: dict[str, list[dict]] = {"plain": [], "plugin": []}
    for rep in range(args.reps):
        for which in (("plain", "plugin") if rep % 2 == 0 else ("plugin", "plain")):
            cmd = [sys.executable, __file__, "--side", which, "--model", args.model, "--steps",
                   str(args.steps), "--batch-size", str(args.batch_size)]
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
            if out.returncode:
                sys.exit(f"{which} failed:\n{out.stderr[-3000:]}")
            got[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
    plain, plugin = got["plain"], got["plugin"]
    rows_out = []
    for key, label in (("tokens_per_s", "tokens/s"), ("images_per_s", "images/s"), ("peak_mib", "peak MiB"),
                       ("loss", "mean loss")):
        a, b = [r[key] for r in plain], [r[key] for r in plugin]
        rows_out.append([label, summary(a), summary(b), summary(ratios(b, a))])
    print(table(["", "plain TRL", "plugin", "plugin/plain"], rows_out))


if __name__ == "__main__":
    main()
